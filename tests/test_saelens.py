"""SAELens export and import against stock SAELens (no mocks).

Real ``trainSAE`` runs (this package's trainers and dictionary_learning's BatchTopK, Matryoshka,
TopK, JumpReLU and standard trainers) are exported, then loaded with ``SAE.load_from_disk`` in a fresh
Python process that never imports this package; its latents, reconstructions and L0 must match
the original SAEs to 1e-5 relative error in fp32.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import low_rank_stream
from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer as UpstreamMatryoshkaTrainer
from dictionary_learning.trainers.standard import StandardTrainer
from dictionary_learning.trainers.jumprelu import JumpReluTrainer
from dictionary_learning.trainers.top_k import TopKTrainer
from dictionary_learning.training import trainSAE
from safetensors.torch import load_file
from sae_lens import SAE, JumpReLUSAE
from sae_lens.registry import SAE_CLASS_REGISTRY

import matryoshka_plugin
from matryoshka_plugin import (
    CheckpointError,
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
    MatryoshkaJumpReLUSAE,
    MatryoshkaLogSparsitySAE,
    MatryoshkaLogSparsityTrainer,
    export_to_saelens,
    import_from_saelens,
    load_dictionary,
    load_matryoshka_saelens,
    publish_to_huggingface,
    register_saelens_architecture,
)
from matryoshka_plugin.__main__ import main
from matryoshka_plugin.hook_names import tl_hook_name, tl_model_name
from matryoshka_plugin.saelens import MATRYOSHKA_ARCHITECTURE

D, N, K = 24, 48, 4
TOL = 1e-5
REPO = "test-org/matryoshka-saes"


class Stream:
    """An activation stream with a buffer-style ``config`` (trainSAE saves it as "buffer")."""

    config = {"d_submodule": D, "io": "out", "n_ctxs": 8, "ctx_len": 16, "refresh_batch_size": 4,
              "out_batch_size": 256, "device": "cpu"}

    def __iter__(self):
        return low_rank_stream(d=D)


PYTHIA = dict(lm_name="EleutherAI/pythia-70m-deduped", layer=3, submodule_name="gpt_neox.layers.3")
GEMMA = dict(lm_name="google/gemma-2-2b", layer=12, submodule_name="model.layers.12")
GPT2 = dict(lm_name="gpt2", layer=1, submodule_name="transformer.h.1.mlp")
COMMON = dict(steps=8, activation_dim=D, dict_size=N, device="cpu", warmup_steps=1)
GROUPS = [0.25, 0.75]  # widths 12, 48

# name -> (trainer config, expected SAELens architecture, training_architecture, expected hook)
ARCHS = {
    "matryoshka_batchtopk": (dict(trainer=MatryoshkaBatchTopKTrainer, k=K, group_fractions=GROUPS,
                                  threshold_start_step=2, **PYTHIA), "jumprelu", "blocks.3.hook_resid_post"),
    "matryoshka_log_sparsity": (dict(trainer=MatryoshkaLogSparsityTrainer, target_l0=K, group_fractions=GROUPS,
                                     prefix_mode="groups", **GEMMA), "standard", "blocks.12.hook_resid_post"),
    "batchtopk": (dict(trainer=BatchTopKTrainer, k=K, threshold_start_step=2, **GPT2), "jumprelu",
                  "blocks.1.hook_mlp_out"),
    "upstream_matryoshka": (dict(trainer=UpstreamMatryoshkaTrainer, k=K, group_fractions=GROUPS,
                                 threshold_start_step=2, **PYTHIA), "jumprelu", "blocks.3.hook_resid_post"),
    "topk": (dict(trainer=TopKTrainer, k=K, **GEMMA), "topk", "blocks.12.hook_resid_post"),
    "jumprelu": (dict(trainer=JumpReluTrainer, target_l0=float(K), sparsity_warmup_steps=2, **GPT2), "jumprelu",
                 "blocks.1.hook_mlp_out"),
    "standard": (dict(trainer=StandardTrainer, sparsity_warmup_steps=2, lm_name="toy", layer=2), "standard",
                 "blocks.2.hook_resid_post"),
}
NAMES = list(ARCHS)
TRAINING_ARCH = {"upstream_matryoshka": "matryoshka_batchtopk"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``trainer_i`` folders, one per architecture, plus one trained too briefly for a threshold."""
    root = tmp_path_factory.mktemp("runs")
    configs = [dict(ARCHS[name][0], **COMMON) for name in NAMES]
    configs.append(dict(trainer=MatryoshkaBatchTopKTrainer, k=K, group_fractions=GROUPS, **PYTHIA, **COMMON))
    trainSAE(data=Stream(), trainer_configs=configs, steps=8, save_dir=str(root), save_steps=[4], device="cpu")
    folders = {name: root / f"trainer_{i}" for i, name in enumerate(NAMES)}
    folders["no_threshold"] = root / f"trainer_{len(NAMES)}"
    return folders


@pytest.fixture(scope="module")
def x():
    return next(low_rank_stream(d=D, batch=512, seed=7))


@pytest.fixture(scope="module")
def exported(runs, x, tmp_path_factory):
    root = tmp_path_factory.mktemp("saelens")
    return {
        name: export_to_saelens(runs[name], root / name, dataset_path="toy/low-rank", activations=x,
                                extra_metadata={"note": f"exported {name}"})
        for name in NAMES
    }


@pytest.fixture(scope="module")
def staged(exported, tmp_path_factory):
    """A publishing dry run of two folders, turned into an offline Hugging Face cache."""
    tmp = tmp_path_factory.mktemp("publish")
    plan = publish_to_huggingface(
        {"blocks.3.hook_resid_post__matryoshka": exported["matryoshka_batchtopk"],
         "nested/batchtopk": exported["batchtopk"]},
        REPO, dry_run=True, staging_dir=tmp / "staging")
    commit = "0" * 40
    repo = tmp / "hub" / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    import shutil

    shutil.copytree(plan.staging_dir, repo / "snapshots" / commit)
    return plan, tmp / "hub"


FRESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE

    folders, hub_ids, repo, inputs, out = json.loads(sys.argv[1])
    x = load_file(inputs)["x"]
    x3 = x[:64].reshape(4, 16, -1)
    results, cfgs = {}, {}
    with torch.no_grad():
        for name, folder in folders.items():
            sae = SAE.load_from_disk(folder)
            f = sae.encode(x)
            results[name + ".encode"] = f
            results[name + ".decode"] = sae.decode(f)
            results[name + ".forward"] = sae(x)
            results[name + ".l0"] = (f != 0).sum(-1)
            results[name + ".encode3"] = sae.encode(x3)
            results[name + ".forward3"] = sae(x3)
            cfgs[name] = {"class": type(sae).__name__, "cfg": {k: v for k, v in sae.cfg.to_dict().items()}}
        for sae_id in hub_ids:
            sae = SAE.from_pretrained(repo, sae_id)
            results["hub:" + sae_id] = sae(x)
    save_file({k: v.contiguous() for k, v in results.items()}, out + ".safetensors")
    assert "matryoshka_plugin" not in sys.modules and "dictionary_learning" not in sys.modules
    cfgs["_modules"] = sorted(m for m in sys.modules if m.startswith(("matryoshka", "dictionary_learning")))
    json.dump(cfgs, open(out + ".json", "w"), default=str)
    """
)


@pytest.fixture(scope="module")
def fresh(exported, staged, x, tmp_path_factory):
    """Everything stock SAELens computes, in a process that never imports this package."""
    tmp = tmp_path_factory.mktemp("fresh")
    from safetensors.torch import save_file

    save_file({"x": x.contiguous()}, str(tmp / "x.safetensors"))
    plan, hub = staged
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub), HF_HOME=str(tmp / "hf_home"))
    args = [{n: str(p) for n, p in exported.items()}, plan.sae_ids, REPO, str(tmp / "x.safetensors"), str(tmp / "out")]
    proc = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, json.dumps(args)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_file(str(tmp / "out.safetensors")), json.loads((tmp / "out.json").read_text())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def original(runs, name):
    ae, _ = load_dictionary(runs[name])
    return ae.eval()


# ---------------------------------------------------------------------------------------------
# Round trip through stock SAELens in a fresh process
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_stock_saelens_matches_in_fresh_process(name, runs, fresh, x):
    results, cfgs = fresh
    assert cfgs["_modules"] == []
    ae = original(runs, name)
    with torch.no_grad():
        f = ae.encode(x)
        ours = {"encode": f, "decode": ae.decode(f), "forward": ae(x)}
        x3 = x[:64].reshape(4, 16, D)
        ours3 = {"encode3": ae.encode(x3), "forward3": ae(x3)}
    errs = {}
    for key, ref in {**ours, **ours3}.items():
        got = results[f"{name}.{key}"]
        assert got.shape == ref.shape, key
        errs[key] = max(rel_err(got, ref), max_rel_err(got, ref))
        assert errs[key] <= TOL, (name, key, errs[key])
    l0 = (f != 0).sum(-1)
    assert torch.equal(results[f"{name}.l0"], l0)
    assert torch.equal(results[f"{name}.encode"] != 0, f != 0)  # the same latents fire
    print(f"\n{name}: max relative error {max(errs.values()):.2e}, mean L0 {float(l0.float().mean()):.3f} (equal)")
    arch = ARCHS[name][1]
    assert cfgs[name]["class"] == {"jumprelu": "JumpReLUSAE", "standard": "StandardSAE", "topk": "TopKSAE"}[arch]


@pytest.mark.parametrize("name", NAMES)
def test_cfg_and_metadata(name, exported, fresh):
    _, cfgs = fresh
    cfg = cfgs[name]["cfg"]
    meta = cfg["metadata"]
    arch, hook = ARCHS[name][1], ARCHS[name][2]
    assert cfg["architecture"] == arch and cfg["d_in"] == D and cfg["d_sae"] == N and cfg["dtype"] == "float32"
    assert cfg["normalize_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] is (name not in ("matryoshka_log_sparsity", "jumprelu"))
    assert meta["sae_lens_version"] == __import__("sae_lens").__version__
    assert meta["hook_name"] == hook
    assert meta["context_size"] == 16 and meta["dataset_path"] == "toy/low-rank"
    lm = ARCHS[name][0]["lm_name"]
    assert meta["model_name"] == {"EleutherAI/pythia-70m-deduped": "pythia-70m-deduped", "google/gemma-2-2b": "gemma-2-2b",
                                  "gpt2": "gpt2", "toy": "toy"}[lm]
    assert meta["prepend_bos"] is (lm not in ("gpt2", "EleutherAI/pythia-70m-deduped"))
    assert meta["training_architecture"] == TRAINING_ARCH.get(name, name)
    assert meta["note"] == f"exported {name}"  # custom keys round-trip
    if name in ("matryoshka_batchtopk", "upstream_matryoshka", "matryoshka_log_sparsity"):
        assert meta["matryoshka_widths"] == [12, 48]
        assert meta["training_architecture_details"]["matryoshka_widths"] == [12, 48]
    else:
        assert meta["matryoshka_widths"] is None
    if name in ("matryoshka_batchtopk", "upstream_matryoshka", "batchtopk", "topk"):
        assert meta["k"] == K and meta["training_architecture_details"]["k"] == K
    if name == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    if name == "matryoshka_batchtopk":
        assert meta["training_architecture_details"]["prefix_mode"] == "groups"
    files = sorted(p.name for p in exported[name].iterdir())
    assert files == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]


def test_published_layout_loads_with_from_pretrained(staged, fresh, x, runs):
    plan, _ = staged
    results, _ = fresh
    staging = plan.staging_dir
    assert sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()) == [
        "blocks.3.hook_resid_post__matryoshka/cfg.json",
        "blocks.3.hook_resid_post__matryoshka/sae_weights.safetensors",
        "blocks.3.hook_resid_post__matryoshka/sparsity.safetensors",
        "nested/batchtopk/cfg.json",
        "nested/batchtopk/sae_weights.safetensors",
        "nested/batchtopk/sparsity.safetensors",
    ]
    assert not plan.uploaded
    assert plan.load_lines == [f'SAE.from_pretrained("{REPO}", "blocks.3.hook_resid_post__matryoshka")',
                               f'SAE.from_pretrained("{REPO}", "nested/batchtopk")']
    # SAE.from_pretrained("org/repo", sae_id) on the staged tree (served from an offline hub cache)
    for sae_id, name in (("blocks.3.hook_resid_post__matryoshka", "matryoshka_batchtopk"),
                         ("nested/batchtopk", "batchtopk")):
        with torch.no_grad():
            ref = original(runs, name)(x)
        assert rel_err(results["hub:" + sae_id], ref) <= TOL


# ---------------------------------------------------------------------------------------------
# Sparsity, names, options
# ---------------------------------------------------------------------------------------------


def test_sparsity_file(runs, exported, x, tmp_path):
    ae = original(runs, "matryoshka_batchtopk")
    with torch.no_grad():
        freq = (ae.encode(x) != 0).float().mean(0)
    sparsity = load_file(str(exported["matryoshka_batchtopk"] / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (N,)
    assert torch.allclose(sparsity, torch.log10(freq.double() + 1e-10).float(), atol=1e-6)
    out = export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "f", firing_frequencies=freq)
    assert torch.allclose(load_file(str(out / "sparsity.safetensors"))["sparsity"], sparsity, atol=1e-6)
    out = export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "none")
    assert not (out / "sparsity.safetensors").exists()
    with pytest.raises(ValueError, match="firing_frequencies must be 48 values"):
        export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "g", firing_frequencies=torch.ones(3))
    with pytest.raises(ValueError, match="not both"):
        export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "g", activations=x, firing_frequencies=freq)
    with pytest.raises(ValueError, match=r"activations must be a float tensor \[\.\.\., 24\]"):
        export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "g", activations=torch.ones(4, 5))
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "submodule, io, layer, lm, hook",
    [
        ("model.layers.12", "out", 12, "google/gemma-2-2b", "blocks.12.hook_resid_post"),
        ("model.layers.12", "in", 12, "google/gemma-2-2b", "blocks.12.hook_resid_pre"),
        ("transformer.h.5", "out", 5, "gpt2", "blocks.5.hook_resid_post"),
        ("transformer.h.5.attn", "out", 5, "gpt2", "blocks.5.hook_attn_out"),
        ("transformer.h.5.mlp", "out", 5, "gpt2", "blocks.5.hook_mlp_out"),
        ("gpt_neox.layers.3", "out", 3, "EleutherAI/pythia-70m-deduped", "blocks.3.hook_resid_post"),
        ("gpt_neox.layers.3.attention", "out", 3, "EleutherAI/pythia-70m-deduped", "blocks.3.hook_attn_out"),
        ("gpt_neox.layers.3.mlp", "out", 3, "EleutherAI/pythia-70m-deduped", "blocks.3.hook_mlp_out"),
        ("model.layers.7.self_attn", "out", 7, "meta-llama/Llama-3.2-1B", "blocks.7.hook_attn_out"),
        (None, None, 4, "anything", "blocks.4.hook_resid_post"),
    ],
)
def test_hook_names(submodule, io, layer, lm, hook):
    assert tl_hook_name(submodule, io, layer, lm) == hook


@pytest.mark.parametrize(
    "submodule, io, layer, lm, message",
    [
        ("model.decoder.layers.3", "out", 3, "facebook/opt-125m", "cannot derive a TransformerLens hook"),
        ("model.layers.12.mlp", "out", 12, "google/gemma-2-2b", "post-norm"),
        ("transformer.h.5.mlp", "in", 5, "gpt2", "no exact TransformerLens hook"),
        ("transformer.h.5", "in_and_out", 5, "gpt2", "io='in_and_out'"),
        (None, "out", None, "gpt2", "neither submodule_name nor layer"),
    ],
)
def test_hook_name_errors(submodule, io, layer, lm, message):
    with pytest.raises(ValueError, match=message):
        tl_hook_name(submodule, io, layer, lm)


def test_model_names():
    assert tl_model_name("google/gemma-2-2b") == "gemma-2-2b"
    assert tl_model_name("EleutherAI/pythia-70m-deduped") == "pythia-70m-deduped"
    assert tl_model_name("gpt2") == "gpt2"
    assert tl_model_name("openai-community/gpt2") == "gpt2"


def test_unknown_family_needs_hook_name_and_arguments_override(runs, tmp_path):
    folder = copy_run(runs["matryoshka_batchtopk"], tmp_path / "src")
    edit_config(folder, lambda c: c["trainer"].update(submodule_name="model.decoder.layers.3", lm_name="facebook/opt-125m"))
    with pytest.raises(ValueError, match="pass hook_name="):
        export_to_saelens(folder, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    out = export_to_saelens(folder, tmp_path / "b", hook_name="blocks.3.hook_resid_post", model_name="opt-125m",
                            context_size=1024, prepend_bos=False)
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta["model_name"], meta["context_size"], meta["prepend_bos"]) == (
        "blocks.3.hook_resid_post", "opt-125m", 1024, False)


def test_half_precision_and_checkpoints(runs, tmp_path, x):
    out = export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "bf16", dtype="bfloat16")
    sae = SAE.load_from_disk(out)
    assert sae.W_enc.dtype == torch.bfloat16 and sae.cfg.dtype == "bfloat16"
    ae4, _ = load_dictionary(runs["matryoshka_batchtopk"], checkpoint=4)
    out = export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "step4", checkpoint=4)
    assert torch.equal(SAE.load_from_disk(out).W_dec, ae4.W_dec.detach())


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_threshold_never_estimated(runs, tmp_path):
    with pytest.raises(CheckpointError, match=r"no inference threshold yet.*threshold_start_step=1000"):
        export_to_saelens(runs["no_threshold"], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["matryoshka_batchtopk", "matryoshka_log_sparsity", "batchtopk", "topk"])
def test_missing_and_corrupt_files(runs, tmp_path, name):
    folder = copy_run(runs[name], tmp_path / "src")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="no such SAE folder"):
        export_to_saelens(tmp_path / "nowhere", out)
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        export_to_saelens(folder, out)
    (folder / "ae.pt").unlink()
    with pytest.raises(CheckpointError, match="missing weights file"):
        export_to_saelens(folder, out)
    (folder / "ae.pt").write_bytes(data)
    (folder / "config.json").write_text('{"trainer": {"dict_')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        export_to_saelens(folder, out)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config file"):
        export_to_saelens(folder, out)
    assert not out.exists()


def test_shape_mismatch_and_unknown_class(runs, tmp_path):
    folder = copy_run(runs["matryoshka_batchtopk"], tmp_path / "a")
    edit_config(folder, lambda c: c["trainer"].update(dict_size=64))
    with pytest.raises(CheckpointError, match="shape mismatch.*dict_size=64 but the weights have 48"):
        export_to_saelens(folder, tmp_path / "out")
    folder = copy_run(runs["matryoshka_batchtopk"], tmp_path / "b")
    state = torch.load(folder / "ae.pt")
    state["W_dec"] = torch.zeros(N, D + 1)
    torch.save(state, folder / "ae.pt")
    with pytest.raises(CheckpointError, match="does not hold a valid"):
        export_to_saelens(folder, tmp_path / "out")
    folder = copy_run(runs["batchtopk"], tmp_path / "c")
    state = torch.load(folder / "ae.pt")
    state["b_dec"] = torch.zeros(D + 1)
    torch.save(state, folder / "ae.pt")
    with pytest.raises(CheckpointError, match="could not load"):
        export_to_saelens(folder, tmp_path / "out")
    folder = copy_run(runs["matryoshka_batchtopk"], tmp_path / "d")
    edit_config(folder, lambda c: c["trainer"].update(dict_class="HyperbolicSAE"))
    with pytest.raises(CheckpointError, match="unknown dict_class 'HyperbolicSAE'"):
        export_to_saelens(folder, tmp_path / "out")
    # a class dictionary_learning loads but SAELens export does not cover
    from dictionary_learning.dictionary import GatedAutoEncoder

    folder = tmp_path / "gated"
    folder.mkdir()
    torch.save(GatedAutoEncoder(D, N).state_dict(), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder", "layer": 0,
                                                                "lm_name": "toy"}}))
    with pytest.raises(CheckpointError, match="export does not support GatedAutoEncoder"):
        export_to_saelens(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_folder(runs, exported, tmp_path):
    src = runs["matryoshka_batchtopk"]
    out = tmp_path / "out"
    out.mkdir()
    export_to_saelens(src, out)  # an empty folder is fine
    before = (out / "cfg.json").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        export_to_saelens(src, out, model_name="other")
    assert (out / "cfg.json").read_text() == before
    export_to_saelens(src, out, model_name="other", overwrite=True)
    assert json.loads((out / "cfg.json").read_text())["metadata"]["model_name"] == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        export_to_saelens(src, tmp_path / "file", overwrite=True)


def test_overwrite_replaces_only_an_export(runs, tmp_path):
    src = runs["batchtopk"]
    out = export_to_saelens(src, tmp_path / "out", model_name="first")
    (out / "notes.txt").write_text("my notes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=r"refusing to overwrite .*\['notes.txt'\]"):
        export_to_saelens(src, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing deleted
    (out / "notes.txt").unlink()
    (out / "runs").mkdir()  # a folder is foreign too, even one named like nothing we write
    with pytest.raises(FileExistsError, match=r"\['runs'\]"):
        export_to_saelens(src, out, overwrite=True)
    (out / "runs").rmdir()
    export_to_saelens(src, out, model_name="second", overwrite=True)
    assert json.loads((out / "cfg.json").read_text())["metadata"]["model_name"] == "second"
    # A SAELens folder this package did not write (same file names, no export mark) is kept.
    cfg = json.loads((out / "cfg.json").read_text())
    del cfg["metadata"]["exported_by"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(FileExistsError, match="not written by matryoshka_plugin's SAELens export"):
        export_to_saelens(src, out, overwrite=True)
    # extra_metadata cannot replace the mark
    marked = export_to_saelens(src, tmp_path / "marked", extra_metadata={"exported_by": "someone else"})
    assert json.loads((marked / "cfg.json").read_text())["metadata"]["exported_by"].startswith("matryoshka_plugin ")
    export_to_saelens(src, marked, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marked", "out"]  # no temporary leftovers


def test_overwrite_of_an_import_folder(runs, exported, tmp_path):
    imported = tmp_path / "imported"
    import_from_saelens(exported["batchtopk"], out_dir=imported)
    import_from_saelens(exported["batchtopk"], out_dir=imported, k=7, overwrite=True)
    assert load_dictionary(imported)[1]["trainer"]["k"] == 7
    # neither a trainSAE folder (checkpoints/ is foreign) nor an export is replaced by an import
    trainer = copy_run(runs["matryoshka_batchtopk"], tmp_path / "trainer_0")
    with pytest.raises(FileExistsError, match=r"\['checkpoints'\]"):
        import_from_saelens(exported["batchtopk"], out_dir=trainer, overwrite=True)
    with pytest.raises(FileExistsError, match=r"no matryoshka_plugin import writes: \['cfg.json'"):
        import_from_saelens(exported["batchtopk"], out_dir=exported["topk"], overwrite=True)
    assert load_dictionary(trainer)[1]["trainer"]["dict_class"] == "MatryoshkaBatchTopKSAE"
    SAE.load_from_disk(exported["topk"])


RACE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import matryoshka_plugin.io as io
    from matryoshka_plugin.saelens import export_to_saelens

    src, out, me, other, name = sys.argv[1:]
    publish = io.publish_folder

    def at_the_same_time(*args, **kwargs):
        # Both exports are written and checked; publish them together (a file barrier).
        Path(me).touch()
        deadline = time.time() + 120
        while not Path(other).exists():
            if time.time() > deadline:
                raise TimeoutError("the other export never got here")
            time.sleep(0.01)
        return publish(*args, **kwargs)

    io.publish_folder = at_the_same_time
    try:
        export_to_saelens(src, out, model_name=name)
    except Exception as e:
        print(json.dumps([type(e).__name__, str(e)]))
    else:
        print(json.dumps(["ok", name]))
    """
)


@pytest.mark.slow  # two fresh processes import torch and SAELens
def test_concurrent_exports_into_one_new_folder(runs, tmp_path):
    """Two processes export into the same new folder and publish at the same moment: exactly one
    succeeds, the other raises FileExistsError, and the folder holds the winner's complete export."""
    out = tmp_path / "shared" / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(matryoshka_plugin.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", RACE_SCRIPT, str(runs["batchtopk"]), str(out),
                          str(tmp_path / f"ready_{i}"), str(tmp_path / f"ready_{1 - i}"), f"writer_{i}"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    winners = [r[1] for r in results if r[0] == "ok"]
    losers = [r for r in results if r[0] != "ok"]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0][0] == "FileExistsError" and "written by someone else" in losers[0][1]
    assert json.loads((out / "cfg.json").read_text())["metadata"]["model_name"] == winners[0]
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # the loser's temporary folder is gone
    with torch.no_grad():
        x = torch.randn(8, D)
        assert rel_err(SAE.load_from_disk(out)(x), original(runs, "batchtopk")(x)) <= TOL


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                         (0o002, 0o775, 0o664)])
def test_written_folders_follow_the_umask(runs, exported, x, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "out", activations=x)
        export_to_saelens(runs["matryoshka_batchtopk"], out, overwrite=True, activations=x)
        imported = tmp_path / "imported"
        import_from_saelens(exported["batchtopk"], out_dir=imported)
    finally:
        os.umask(old)
    for folder, files in ((out, 3), (imported, 2)):
        assert stat.S_IMODE(folder.stat().st_mode) == dir_mode, folder
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert len(modes) == files and set(modes.values()) == {file_mode}, modes


def test_interrupted_export_leaves_nothing_half_written(runs, tmp_path, monkeypatch):
    import matryoshka_plugin.io as mod

    src = runs["matryoshka_batchtopk"]
    good = export_to_saelens(src, tmp_path / "good")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real_save = mod.save_file

    def interrupted(tensors, path):
        real_save(tensors, path)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_to_saelens(src, tmp_path / "new")
    with pytest.raises(KeyboardInterrupt):
        export_to_saelens(src, good, overwrite=True, model_name="other")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    SAE.load_from_disk(good)


# ---------------------------------------------------------------------------------------------
# The registered Matryoshka architecture
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # a fresh process imports SAELens
def test_importing_the_saelens_module_first_registers_the_architecture():
    """Importing the SAELens adapter (which imports SAELens) registers the architecture."""
    code = """import json\nimport matryoshka_plugin.saelens\nfrom sae_lens.registry import SAE_CLASS_REGISTRY
print(json.dumps(SAE_CLASS_REGISTRY["matryoshka_jumprelu"][0].__qualname__))"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(matryoshka_plugin.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == "MatryoshkaJumpReLUSAE"


def test_registration_is_idempotent():
    assert SAE_CLASS_REGISTRY[MATRYOSHKA_ARCHITECTURE] == (MatryoshkaJumpReLUSAE, matryoshka_plugin.MatryoshkaJumpReLUSAEConfig)
    register_saelens_architecture()
    register_saelens_architecture()
    saved = SAE_CLASS_REGISTRY[MATRYOSHKA_ARCHITECTURE]
    SAE_CLASS_REGISTRY[MATRYOSHKA_ARCHITECTURE] = (JumpReLUSAE, saved[1])
    try:
        with pytest.raises(ValueError, match="already taken"):
            register_saelens_architecture()
    finally:
        SAE_CLASS_REGISTRY[MATRYOSHKA_ARCHITECTURE] = saved


@pytest.mark.parametrize("name", ["matryoshka_batchtopk", "upstream_matryoshka", "matryoshka_log_sparsity"])
def test_prefixes_of_the_registered_architecture(name, runs, exported, x):
    ae = original(runs, name)
    sae = load_matryoshka_saelens(exported[name])
    assert isinstance(sae, MatryoshkaJumpReLUSAE) and sae.matryoshka_widths == [12, 48]
    with torch.no_grad():
        assert rel_err(sae(x), ae(x)) <= TOL
        for groups, width in ((1, 12), (2, 48)):
            if isinstance(ae, MatryoshkaLogSparsitySAE):
                ae.prefix_length = width
            else:
                ae.active_groups = groups
            sae.active_width = width
            f_ref = ae.encode(x)
            assert (f_ref[:, width:] == 0).all()
            assert rel_err(sae.encode(x), f_ref) <= TOL and rel_err(sae(x), ae(x)) <= TOL
            small = sae.truncated(width)
            assert type(small) is JumpReLUSAE and small.cfg.d_sae == width
            assert small.cfg.metadata.matryoshka_widths == [w for w in (12, 48) if w <= width]
            assert rel_err(small.encode(x), f_ref[:, :width]) <= TOL and rel_err(small(x), ae(x)) <= TOL
    assert [s.cfg.d_sae for s in sae.levels()] == [12, 48]
    with pytest.raises(ValueError, match="active_width"):
        sae.active_width = 49


def test_export_as_registered_architecture(runs, tmp_path, x):
    out = export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "m", architecture=MATRYOSHKA_ARCHITECTURE)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == MATRYOSHKA_ARCHITECTURE and cfg["matryoshka_widths"] == [12, 48]
    sae = SAE.load_from_disk(out)  # with matryoshka_plugin.saelens imported
    assert isinstance(sae, MatryoshkaJumpReLUSAE) and sae.matryoshka_widths == [12, 48]
    with torch.no_grad():
        assert rel_err(sae(x), original(runs, "matryoshka_batchtopk")(x)) <= TOL
    with pytest.raises(ValueError, match="stock SAELens cannot load"):
        publish_to_huggingface({"a": out}, REPO, dry_run=True)
    with pytest.raises(ValueError, match="per-token TopK"):
        export_to_saelens(runs["topk"], tmp_path / "t", architecture=MATRYOSHKA_ARCHITECTURE)


@pytest.mark.slow  # a fresh process imports SAELens
def test_saebench_loads_a_registered_architecture_folder_without_the_adapter_imported(runs, tmp_path):
    """Importing the package registers nothing with SAELens; SAEBench's loader registers first."""
    out = export_to_saelens(runs["matryoshka_batchtopk"], tmp_path / "m", architecture=MATRYOSHKA_ARCHITECTURE)
    code = f"""import json, sys
import matryoshka_plugin
from sae_lens.registry import SAE_CLASS_REGISTRY
before = "matryoshka_jumprelu" in SAE_CLASS_REGISTRY
from matryoshka_plugin.saebench.references import load_sae
sae = load_sae({str(out)!r})
print(json.dumps([before, type(sae).__name__]))"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert json.loads(got.stdout.strip().splitlines()[-1]) == [False, "MatryoshkaJumpReLUSAE"]


def test_topk_does_not_load_as_matryoshka(exported):
    with pytest.raises(CheckpointError, match="'topk' SAE"):
        load_matryoshka_saelens(exported["topk"])


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [("matryoshka_batchtopk", MatryoshkaBatchTopKSAE), ("upstream_matryoshka", MatryoshkaBatchTopKSAE),
     ("batchtopk", MatryoshkaBatchTopKSAE), ("matryoshka_log_sparsity", MatryoshkaLogSparsitySAE),
     ("standard", MatryoshkaLogSparsitySAE)],
)
def test_import_round_trip(name, cls, runs, exported, x, tmp_path):
    ae = original(runs, name)
    back = import_from_saelens(exported[name])
    assert type(back) is cls
    with torch.no_grad():
        f_ref, f = ae.encode(x), back.encode(x)
        assert rel_err(f, f_ref) <= TOL and rel_err(back(x), ae(x)) <= TOL
        assert torch.equal(f != 0, f_ref != 0)
    if cls is MatryoshkaBatchTopKSAE:
        assert int(back.k) == K
        assert back.widths == ([48] if name == "batchtopk" else [12, 48])
    # from an SAE object (as SAE.from_pretrained returns), and into a folder load_dictionary reads
    again = import_from_saelens(SAE.load_from_disk(exported[name]), out_dir=tmp_path / "imported")
    loaded, cfg = load_dictionary(tmp_path / "imported")
    assert type(loaded) is cls and cfg["trainer"]["package"] == "matryoshka_plugin"
    with torch.no_grad():
        assert rel_err(loaded(x), again(x)) == 0


def test_import_needs_k_and_a_shared_threshold(exported, x):
    sae = SAE.load_from_disk(exported["batchtopk"])
    sae.cfg.metadata.k = None
    sae.cfg.metadata.training_architecture_details = {}
    with pytest.raises(CheckpointError, match="pass k="):
        import_from_saelens(sae)
    back = import_from_saelens(sae, k=7, widths=[16])
    assert int(back.k) == 7 and back.widths == [16, 48]
    with torch.no_grad():
        assert rel_err(back(x), sae(x)) <= TOL
        sae.threshold[3] += 0.1
    with pytest.raises(CheckpointError, match="per-latent thresholds"):
        import_from_saelens(sae, k=7)


def test_import_folds_b_dec_when_not_applied_to_input(exported, x):
    sae = SAE.load_from_disk(exported["matryoshka_batchtopk"])
    sae.cfg.apply_b_dec_to_input = False  # now a different SAE: encoder sees raw x
    back = import_from_saelens(sae)
    with torch.no_grad():
        assert rel_err(back.encode(x), sae.encode(x)) <= TOL and rel_err(back(x), sae(x)) <= TOL


def test_import_errors(exported, tmp_path):
    with pytest.raises(CheckpointError, match="'topk' SAE"):
        import_from_saelens(exported["topk"])
    with pytest.raises(CheckpointError, match="no such SAELens folder"):
        import_from_saelens(tmp_path / "nowhere")
    import shutil

    bad = shutil.copytree(exported["batchtopk"], tmp_path / "bad")
    (bad / "cfg.json").unlink()
    with pytest.raises(CheckpointError, match="missing cfg.json"):
        import_from_saelens(bad)
    shutil.copy(exported["batchtopk"] / "cfg.json", bad / "cfg.json")
    data = (bad / "sae_weights.safetensors").read_bytes()
    (bad / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="SAELens could not load"):
        import_from_saelens(bad)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_matryoshka_saelens(bad)


# ---------------------------------------------------------------------------------------------
# Publishing and the command line
# ---------------------------------------------------------------------------------------------


def test_publish_checks(exported, tmp_path):
    with pytest.raises(ValueError, match="org/repo"):
        publish_to_huggingface({"a": exported["topk"]}, "no-slash", dry_run=True)
    with pytest.raises(ValueError, match="invalid sae_id"):
        publish_to_huggingface({"../a": exported["topk"]}, REPO, dry_run=True)
    with pytest.raises(ValueError, match="prefixes of other"):
        publish_to_huggingface({"a": exported["topk"], "a/b": exported["standard"]}, REPO, dry_run=True)
    with pytest.raises(CheckpointError, match="missing cfg.json"):
        publish_to_huggingface({"a": tmp_path}, REPO, dry_run=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        publish_to_huggingface({"a": exported["topk"]}, REPO, dry_run=True, staging_dir=tmp_path / "busy")
    plan = publish_to_huggingface({"topk": exported["topk"]}, REPO, dry_run=True)
    assert (plan.staging_dir / "topk" / "cfg.json").is_file()


def test_command_line(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(runs["topk"]), str(out), "--context-size", "64", "--no-prepend-bos"]) == 0
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["context_size"] == 64 and meta["prepend_bos"] is False
    assert main(["export", str(runs["topk"]), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(runs["no_threshold"]), str(tmp_path / "x")]) == 2
    assert "threshold_start_step" in capsys.readouterr().err
    acts = tmp_path / "acts.pt"
    torch.save(next(low_rank_stream(d=D, batch=64)), acts)
    m = tmp_path / "m"
    assert main(["export", str(runs["matryoshka_batchtopk"]), str(m), "--activations", str(acts)]) == 0
    assert (m / "sparsity.safetensors").is_file()
    assert main(["import", str(m), str(tmp_path / "back")]) == 0
    ae, _ = load_dictionary(tmp_path / "back")
    assert isinstance(ae, MatryoshkaBatchTopKSAE) and ae.widths == [12, 48]
    assert main(["publish", REPO, f"a={m}", "--dry-run", "--staging-dir", str(tmp_path / "stage")]) == 0
    assert f'SAE.from_pretrained("{REPO}", "a")' in capsys.readouterr().out
    assert (tmp_path / "stage" / "a" / "sae_weights.safetensors").is_file()


def test_threshold_ties_match(tmp_path):
    """Pre-activations exactly at the threshold stay off in both (strict ``>``)."""
    ae = MatryoshkaBatchTopKSAE(D, N, K, [12, 36])
    with torch.no_grad():
        ae.threshold.fill_(0.5)
        ae.b_dec.copy_(torch.randn(D))
        ae.b_enc.fill_(0.25)
        ae.b_enc[:4] = 0.5  # exactly at the threshold for x = b_dec
        ae.b_enc[4:8] = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0))
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    torch.save(ae.state_dict(), folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "MatryoshkaBatchTopKSAE", "package": "matryoshka_plugin", "k": K, "activation_dim": D,
        "dict_size": N, "group_sizes": [12, 36], "layer": 0, "lm_name": "toy"}}))
    sae = SAE.load_from_disk(export_to_saelens(folder, tmp_path / "out"))
    x = ae.b_dec.detach().expand(3, D).clone()
    with torch.no_grad():
        f_ref, f = ae.encode(x), sae.encode(x)
    assert torch.equal(f_ref != 0, f != 0) and int((f[0] != 0).sum()) == 4
    assert torch.equal(f, f_ref)


def test_import_the_published_dictionary_learning_format(runs, x, tmp_path, monkeypatch):
    """SAEBench's published suites load through SAELens' dictionary_learning_1 converter, which
    records neither k nor the widths: import them with k= and widths=."""
    import shutil

    import huggingface_hub.constants
    from sae_lens.loading.pretrained_sae_loaders import dictionary_learning_sae_huggingface_loader_1

    commit = "1" * 40
    repo = tmp_path / "hub" / "models--saebench--suite"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name in ("upstream_matryoshka", "batchtopk"):
        shutil.copytree(runs[name], repo / "snapshots" / commit / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    sae = SAE.from_pretrained("saebench/suite", "upstream_matryoshka", converter=dictionary_learning_sae_huggingface_loader_1)
    assert sae.cfg.architecture() == "jumprelu" and sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    with pytest.raises(CheckpointError, match="pass k="):
        import_from_saelens(sae)
    back = import_from_saelens(sae, k=K, widths=[12])
    ae = original(runs, "upstream_matryoshka")
    with torch.no_grad():
        assert rel_err(back(x), ae(x)) <= TOL and torch.equal(back.encode(x) != 0, ae.encode(x) != 0)
    assert back.widths == [12, 48]
    sae = SAE.from_pretrained("saebench/suite", "batchtopk", converter=dictionary_learning_sae_huggingface_loader_1)
    back = import_from_saelens(sae, k=K)
    with torch.no_grad():
        assert rel_err(back(x), original(runs, "batchtopk")(x)) <= TOL
