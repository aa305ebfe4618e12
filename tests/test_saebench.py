"""matryoshka_plugin.saebench: SAEBench's real evals on SAEs trained here with trainSAE, on a tiny
local model (passed in with model=) and local data sets (load_dataset=)."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch
from saebench_local import HF_NAME, MODEL_NAME, LocalHub, tiny_models, web_text

import matryoshka_plugin.saebench as sb
import matryoshka_plugin.saebench.run as sb_run
from matryoshka_plugin import CheckpointError, MatryoshkaBatchTopKTrainer, export_to_saelens
from matryoshka_plugin.saebench import (
    EVAL_NAMES,
    SAEBenchError,
    collect_results,
    describe_sae,
    read_result,
    result_path,
    run_saebench,
)

# Every test here runs SAEBench on SAEs trained in a shared fixture (about 25 s) or a fresh process.
pytestmark = pytest.mark.slow

CORE = {"n_eval_reconstruction_batches": 2, "n_eval_sparsity_variance_batches": 2, "eval_batch_size_prompts": 8,
        "context_size": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """This package's Matryoshka SAE and dictionary_learning's BatchTopK, trained together with
    trainSAE on an ActivationBuffer over the tiny model (nnsight), plus a SAELens export."""
    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.training import trainSAE

    models = tiny_models()
    lm = models.language_model()
    root = tmp_path_factory.mktemp("saebench")
    buf = ActivationBuffer(itertools.cycle(web_text()), lm, lm.transformer.h[1], d_submodule=64, io="out", n_ctxs=300,
                           ctx_len=48, refresh_batch_size=150, out_batch_size=256, device="cpu")
    common = dict(steps=120, activation_dim=64, dict_size=128, k=8, layer=1, lm_name=HF_NAME,
                  submodule_name="transformer.h.1", lr=3e-3, warmup_steps=10, threshold_start_step=30,
                  device="cpu", seed=0)
    trainSAE(data=buf, trainer_configs=[dict(trainer=MatryoshkaBatchTopKTrainer, group_fractions=[0.25, 0.75], **common),
                                        dict(trainer=BatchTopKTrainer, **common)],
             steps=120, save_dir=str(root / "train"), device="cpu")
    exported = export_to_saelens(root / "train" / "trainer_0", root / "exported")
    return {"root": root, "ours": root / "train" / "trainer_0", "upstream": root / "train" / "trainer_1",
            "exported": exported, "models": models}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail if the adapter would load a model by name."""
    def refuse(*a, **kw):
        raise AssertionError("the adapter tried to load a model")

    monkeypatch.setattr(sb_run, "_load_model", refuse)


def test_describe_reads_metadata_of_every_kind(trained):
    ours = describe_sae(trained["ours"], "m")
    assert (ours.kind, ours.model_name, ours.hook_name, ours.hook_layer, ours.d_in, ours.d_sae, ours.k) == (
        "trainer_folder", MODEL_NAME, "blocks.1.hook_resid_post", 1, 64, 128, 8)
    assert ours.architecture == "matryoshka_batchtopk"
    assert describe_sae(trained["upstream"]).architecture == "batchtopk"
    exp = describe_sae(trained["exported"])
    assert (exp.kind, exp.model_name, exp.hook_name, exp.d_sae) == ("saelens_folder", MODEL_NAME,
                                                                   "blocks.1.hook_resid_post", 128)
    pub = describe_sae("saelens:saebench_gemma-2-2b_width-2pow14_date-0107:blocks.12.hook_resid_post__trainer_2")
    assert (pub.kind, pub.model_name, pub.hook_name, pub.hook_layer) == (
        "saelens_release", "gemma-2-2b", "blocks.12.hook_resid_post", 12)


def test_bad_input_is_rejected_before_the_model_is_loaded(trained, tmp_path, no_model_loading):
    ok = {"m": trained["ours"]}
    with pytest.raises(SAEBenchError, match=r"unknown eval name\(s\) \['absorbtion'\]"):
        run_saebench(ok, tmp_path, ["core", "absorbtion"])
    with pytest.raises(SAEBenchError, match="no such SAE folder"):
        run_saebench({"m": tmp_path / "missing" / "trainer_0"}, tmp_path, ["core"])
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((trained["ours"] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no ae.pt"):
        run_saebench({"m": unfinished}, tmp_path, ["core"])
    with pytest.raises(SAEBenchError, match="model mismatch: the config asks for 'gemma-2-2b'"):
        run_saebench(ok, tmp_path, ["core"], model_name="gemma-2-2b")
    with pytest.raises(SAEBenchError, match="hook mismatch: the config asks for 'blocks.0.hook_resid_post'"):
        run_saebench(ok, tmp_path, ["core"], hook_name="blocks.0.hook_resid_post")
    with pytest.raises(SAEBenchError, match="different models"):
        gemma = "saelens:saebench_gemma-2-2b_width-2pow14_date-0107:blocks.12.hook_resid_post__trainer_0"
        run_saebench({"m": trained["ours"], "g": gemma}, tmp_path, ["core"])
    mlp = export_to_saelens(trained["ours"], tmp_path / "mlp", hook_name="blocks.1.hook_mlp_out", verify=False)
    with pytest.raises(SAEBenchError, match="absorption trains its first-letter probes on blocks.N.hook_resid_post"):
        run_saebench({"mlp": mlp}, tmp_path, ["absorption"])
    with pytest.raises(SAEBenchError, match=r"unknown sparse_probing config fields \['n_probes'\]"):
        run_saebench(ok, tmp_path, ["sparse_probing"], eval_overrides={"sparse_probing": {"n_probes": 3}})
    with pytest.raises(SAEBenchError, match="unknown core settings"):
        run_saebench(ok, tmp_path, ["core"], eval_overrides={"core": {"batches": 3}})
    with pytest.raises(SAEBenchError, match="two SAEs are named 'm'"):
        run_saebench([("m", trained["ours"]), ("m", trained["upstream"])], tmp_path, ["core"])
    with pytest.raises(SAEBenchError, match="must start with a letter"):
        run_saebench({"bad/name": trained["ours"]}, tmp_path, ["core"])
    models = tiny_models()
    with pytest.raises(SAEBenchError, match="model= is in torch.float32 but llm_dtype='bfloat16'"):
        run_saebench(ok, tmp_path, ["core"], model=models.tl_model, llm_dtype="bfloat16")
    assert not (tmp_path / "core").exists()


def test_cli_reports_bad_input(trained, tmp_path, capsys, no_model_loading):
    from matryoshka_plugin.__main__ import main

    assert main(["saebench", str(tmp_path), f"m={tmp_path / 'missing'}", "--evals", "core"]) == 2
    assert "no such SAE folder" in capsys.readouterr().err
    assert main(["saebench", str(tmp_path), f"m={trained['ours']}", "--evals", "cor"]) == 2
    assert "unknown eval name(s) ['cor']" in capsys.readouterr().err
    assert main(["saebench", str(tmp_path), f"m={trained['ours']}", "--model-name", "gemma-2-2b"]) == 2
    assert "model mismatch" in capsys.readouterr().err


def test_core_on_trainer_and_exported_folders(trained, tmp_path, no_model_loading):
    """Trainer folders (ours and dictionary_learning's) and an exported SAELens folder go through
    SAEBench's core eval; the export gives the same metrics as its trainer folder."""
    hub = LocalHub()
    saes = {"ours": trained["ours"], "ours_exported": trained["exported"], "upstream": trained["upstream"]}
    run = run_saebench(saes, tmp_path, ["core"], model=trained["models"].tl_model, load_dataset=hub.load_dataset,
                       device="cpu", eval_overrides={"core": CORE}, progress=False)
    assert [(r.name, r.status) for r in run.records] == [(n, "done") for n in saes]
    assert "Skylion007/openwebtext" in hub.calls  # SAEBench's core eval read its text through load_dataset
    for name in saes:
        data = json.loads(result_path(tmp_path, name, "core").read_text())
        m = data["eval_result_metrics"]
        assert {"explained_variance", "mse", "cossim"} <= set(m["reconstruction_quality"])
        assert {"l0", "l1"} <= set(m["sparsity"])
        assert "ce_loss_score" in m["model_performance_preservation"]
        assert data["sae_lens_release_id"] == name and data["sae_cfg_dict"]["metadata"]["model_name"] == MODEL_NAME
    ours, exported = (read_result(tmp_path, n, "core")["metrics"] for n in ("ours", "ours_exported"))
    for key in ("reconstruction_quality.explained_variance", "sparsity.l0", "model_performance_preservation.ce_loss_score"):
        assert ours[key] == pytest.approx(exported[key], rel=1e-4, abs=1e-6), key
    assert 2 <= ours["sparsity.l0"] <= 20
    rows = {r["name"]: r for r in run.rows()}
    assert rows["ours"]["architecture"] == "matryoshka_batchtopk" and rows["upstream"]["architecture"] == "batchtopk"
    assert rows["ours"]["l0"] == ours["sparsity.l0"] and rows["ours"]["absorption"] is None
    assert (tmp_path / "saelens" / "ours" / "cfg.json").is_file() and not (tmp_path / ".staging").exists()

    # Resuming: existing results are skipped without loading any model.
    again = run_saebench(saes, tmp_path, ["core"], eval_overrides={"core": CORE}, progress=False)
    assert {r.status for r in again.records} == {"skipped"}
    assert again.records[0].metrics == run.records[0].metrics


def test_absorption_without_first_letter_knowledge_is_recorded(trained, tmp_path, no_model_loading):
    """A random model has no spelling knowledge: SAEBench's absorption returns {} and writes
    nothing; the adapter records why instead."""
    random_model = tiny_models(first_letters=False).tl_model
    over = {"absorption": {"max_k_value": 2, "k_sparse_probe_num_epochs": 3}}
    run = run_saebench({"m": trained["ours"]}, tmp_path, ["absorption"], model=random_model, device="cpu",
                       eval_overrides=over, progress=False)
    (rec,) = run.records
    assert rec.status == "not_evaluated" and rec.metrics == {}
    assert "first letters have a ground-truth probe with F1 > 0.6" in rec.reason
    assert not result_path(tmp_path, "m", "absorption").exists()
    record = json.loads((tmp_path / "absorption" / "m_custom_sae_absorption_not_evaluated.json").read_text())
    assert len(record["letters_with_good_probe"]) < 20 and len(record["probe_f1_per_letter"]) == 26
    assert collect_results(tmp_path)["m"]["absorption"]["status"] == "not_evaluated"
    assert run.rows()[0]["absorption"] is None
    # It counts as finished when resuming.
    again = run_saebench({"m": trained["ours"]}, tmp_path, ["absorption"], eval_overrides=over, progress=False)
    assert [r.status for r in again.records] == ["skipped"] and again.records[0].reason == rec.reason
    assert torch.is_grad_enabled()


def test_letter_latents_recorded_in_an_absorption_result(tmp_path):
    """The first-letter latents SAEBench's absorption picks (its k = 1 probes) land in the result's
    unstructured part for the letters it scores, and read_result reports their mean F1."""
    probes = [{"letter": c, "f1_sparse_sae_1": f1, "sparse_sae_k_1_feats": [i], "cos_probe_sae_dec_k_1": [cos]}
              for c, f1, i, cos in [("a", 0.5, 7, 0.4), ("b", 0.0, 3, -0.1), ("c", 0.9, 1, 0.8)]]
    summary = tmp_path / "m_custom_sae_k_sparse_probing.json"
    summary.write_text(json.dumps(probes))
    result = sb.result_path(tmp_path, "m", "absorption")
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps({"eval_result_metrics": {"mean": {"mean_absorption_fraction_score": 0.7}},
                                  "eval_result_details": [{"first_letter": "a"}, {"first_letter": "b"}],
                                  "eval_result_unstructured": None}))
    found = sb.add_letter_latents(result, summary)
    assert found["per_letter"] == {"a": {"latent": 7, "f1": 0.5, "decoder_cos": 0.4},
                                   "b": {"latent": 3, "f1": 0.0, "decoder_cos": -0.1}}  # c is not scored
    assert found["mean_f1"] == pytest.approx(0.25) and found["mean_abs_decoder_cos"] == pytest.approx(0.25)
    data = json.loads(result.read_text())
    assert data["eval_result_unstructured"]["first_letter_latents"] == found
    assert data["eval_result_metrics"]["mean"]["mean_absorption_fraction_score"] == 0.7
    got = sb.read_result(tmp_path, "m", "absorption")
    assert got["metrics"]["first_letter_latents.mean_f1"] == pytest.approx(0.25)
    assert sb.headline_row({"absorption": got})["letter_latent_f1"] == pytest.approx(0.25)
    assert sb.letter_latents(probes, ["z"])["mean_f1"] is None


def test_eval_configs_fill_what_saebench_leaves_unset():
    for ev in EVAL_NAMES:
        cfg = sb.make_eval_config(ev, "gemma-2-2b", llm_batch_size=32, llm_dtype="bfloat16")
        if ev == "core":
            assert cfg["eval_batch_size_prompts"] == 32 and cfg["dataset"] == "Skylion007/openwebtext"
            continue
        assert cfg.random_seed == 42
        if ev == "meta_structure":  # trains on the decoder alone: no model settings
            assert "model_name" not in cfg.to_dict() and cfg.llm_dtype == "bfloat16"
            continue
        if ev == "sparse_probing_sae_probes":  # sae-probes picks its own batch size
            assert cfg.model_name == "gemma-2-2b" and len(cfg.dataset_names) == 113
            continue
        assert (cfg.model_name, cfg.llm_batch_size, cfg.llm_dtype) == ("gemma-2-2b", 32, "bfloat16")
    assert sb.make_eval_config("scr", "x", llm_batch_size=1, llm_dtype="float32").perform_scr is True
    assert sb.make_eval_config("tpp", "x", llm_batch_size=1, llm_dtype="float32").perform_scr is False
    assert sb.default_llm_settings("gemma-2-2b") == (32, "bfloat16")
    with pytest.raises(SAEBenchError, match="min_feats_for_eval >= 2"):
        sb.make_eval_config("absorption", "x", llm_batch_size=1, llm_dtype="float32",
                            overrides={"min_feats_for_eval": 1})


def test_importing_the_adapter_loads_no_saebench():
    """SAEBench is loaded where it is used, on the first run, not by ``import matryoshka_plugin.saebench``."""
    import subprocess
    import sys

    code = "import sys, matryoshka_plugin.saebench; print(sorted(m for m in sys.modules if m.startswith('sae_bench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# meta_structure, sparse_probing_sae_probes and seeds
# ----------------------------------------------------------------------------------------------

# A short meta-SAE run (SAEBench's default is 1500 steps of 1024 rows).
META = {"train_steps": 100, "train_batch_size": 128, "autocast": False}
SAE_PROBES_DATASETS = ["23_headline_ischina", "105_click_bait"]  # texts shorter than the tiny model's context


def _saelens_sae(w_dec: torch.Tensor):
    """A stock SAELens SAE with the given decoder rows, recorded as trained on the tiny model."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    n, d = w_dec.shape
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=n, metadata=SAEMetadata(
        model_name=MODEL_NAME, hook_name="blocks.1.hook_resid_post")))
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
    return sae


def test_meta_structure_runs_without_a_model_and_sees_shared_structure(trained, tmp_path, no_model_loading):
    """SAEBench's meta-SAE on SAEs trained here, with no language model; and on decoders built to
    have (rows = sums of 2 of 16 shared directions) or lack (random rows) shared structure."""
    gen = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(16, 64, generator=gen), dim=1)
    pairs = torch.stack([torch.randperm(16, generator=gen)[:2] for _ in range(256)])
    structured = torch.nn.functional.normalize(atoms[pairs].sum(1), dim=1)
    random_rows = torch.nn.functional.normalize(torch.randn(256, 64, generator=gen), dim=1)
    saes = {"ours": trained["ours"], "upstream": trained["upstream"], "structured": _saelens_sae(structured),
            "random": _saelens_sae(random_rows)}
    run = run_saebench(saes, tmp_path, ["meta_structure"], device="cpu", progress=False,
                       eval_overrides={"meta_structure": {**META, "train_steps": 300, "k": 2}})
    assert [(r.name, r.status) for r in run.records] == [(n, "done") for n in saes]
    data = json.loads(result_path(tmp_path, "ours", "meta_structure").read_text())
    assert data["eval_type_id"] == "meta_structure_decoder_variance"
    assert data["eval_config"]["train_steps"] == 300 and data["eval_config"]["random_seed"] == 42
    ve = {r["name"]: r["meta_variance_explained"] for r in run.rows()}
    assert all(0.0 < v < 1.0 for v in ve.values()), ve
    # 2 active meta-latents of 64 can rebuild a sum of 2 of 16 atoms, not a random direction
    assert ve["structured"] > 0.7 and ve["random"] < 0.45, ve
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("*.pt"))


def test_runs_sharing_an_output_folder_keep_each_others_staging(trained, tmp_path, no_model_loading):
    """Each run stages its results in a folder of its own process: another live run's staged files
    survive this run's clean-up, a dead run's folder is removed, and this run leaves none behind."""
    import subprocess

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for proc in (live, dead):
            (tmp_path / f".staging-{proc.pid}" / "core").mkdir(parents=True)
            (tmp_path / f".staging-{proc.pid}" / "core" / "x_eval_results.json").write_text("{}")
        run = run_saebench({"ours": trained["ours"]}, tmp_path, ["meta_structure"], device="cpu", progress=False,
                           eval_overrides={"meta_structure": META})
        assert [r.status for r in run.records] == ["done"]
        assert (tmp_path / f".staging-{live.pid}" / "core" / "x_eval_results.json").read_text() == "{}"
        assert sorted(p.name for p in tmp_path.glob(".staging*")) == [f".staging-{live.pid}"]
    finally:
        live.kill()
        live.wait()


def test_seeds_repeat_the_sampled_evals_and_report_mean_and_std(trained, tmp_path, no_model_loading):
    import statistics

    saes = {"ours": trained["ours"]}
    over = {"meta_structure": META}
    run = run_saebench(saes, tmp_path, ["meta_structure"], seeds=[0, 1, 2], device="cpu", eval_overrides=over,
                       progress=False)
    assert [(r.name, r.seed, r.status) for r in run.records] == [("ours", s, "done") for s in (0, 1, 2)]
    assert not result_path(tmp_path, "ours", "meta_structure").exists()
    per_seed = {s: json.loads(result_path(sb.seed_dir(tmp_path, s), "ours", "meta_structure").read_text())
                for s in (0, 1, 2)}
    values = [per_seed[s]["eval_result_metrics"]["meta_structure"]["decoder_fraction_variance_explained"]
              for s in (0, 1, 2)]
    assert [per_seed[s]["eval_config"]["random_seed"] for s in (0, 1, 2)] == [0, 1, 2]
    assert len(set(values)) == 3  # the seed changes the meta-SAE
    (row,) = run.rows()
    assert row["meta_variance_explained"] == pytest.approx(statistics.mean(values))
    assert row["meta_variance_explained_std"] == pytest.approx(statistics.stdev(values))
    assert row["meta_variance_explained_n"] == 3

    # Resumable per seed: a fourth seed runs alone; an existing seed rerun gives the same value.
    more = run_saebench(saes, tmp_path, ["meta_structure"], seeds=[0, 1, 2, 3], eval_overrides=over, device="cpu",
                        progress=False)
    assert [(r.seed, r.status) for r in more.records] == [
        (0, "skipped"), (1, "skipped"), (2, "skipped"), (3, "done")]
    again = run_saebench({"ours": trained["ours"]}, tmp_path, ["meta_structure"], seeds=[1], eval_overrides=over,
                         device="cpu", force=True, progress=False)
    assert again.records[0].metrics["meta_structure.decoder_fraction_variance_explained"] == values[1]
    assert len(sb.remove_results(tmp_path, "ours")) == 4
    for bad in ([], [1, 1], [-1], 3, ["a"]):
        with pytest.raises(SAEBenchError, match="seeds"):
            run_saebench(saes, tmp_path, ["meta_structure"], seeds=bad)


def test_sparse_probing_sae_probes_end_to_end_offline(trained, tmp_path, no_model_loading):
    """SAEBench's sae-probes eval on the tiny model with two data sets sae-probes ships: the model
    activations it caches are the run's model's, the model's tokenizer is left as it was."""
    models = trained["models"]
    tok = models.tl_model.tokenizer
    sides = (tok.truncation_side, tok.padding_side) = ("right", "left")
    over = {"sparse_probing_sae_probes": {"dataset_names": SAE_PROBES_DATASETS, "ks": [1, 2]}}
    saes = {"ours": trained["ours"], "upstream": trained["upstream"]}
    run = run_saebench(saes, tmp_path, ["sparse_probing_sae_probes"], model=models.tl_model, device="cpu",
                       eval_overrides=over, progress=False)
    assert [(r.name, r.status) for r in run.records] == [(n, "done") for n in saes]
    assert (tok.truncation_side, tok.padding_side) == sides
    data = json.loads(result_path(tmp_path, "ours", "sparse_probing_sae_probes").read_text())
    assert sorted(d["dataset_name"] for d in data["eval_result_details"]) == sorted(SAE_PROBES_DATASETS)
    m = data["eval_result_metrics"]
    assert 0.5 <= m["sae"]["sae_top_2_test_accuracy"] <= 1 and 0.5 <= m["llm"]["llm_test_accuracy"] <= 1
    rows = {r["name"]: r for r in run.rows()}
    assert rows["ours"]["sae_probes_top1"] == m["sae"]["sae_top_1_test_accuracy"]
    assert rows["upstream"]["sae_probes_llm"] == m["llm"]["llm_test_accuracy"]  # one baseline for both SAEs

    # The cached activations are the tiny model's residual stream at each text's last token.
    (acts_file,) = (tmp_path / "artifacts" / "sparse_probing_sae_probes").glob(
        f"model_activations_*/model_activations_{MODEL_NAME}/23_headline_ischina_blocks.1.hook_resid_post.pt")
    acts = torch.load(acts_file, weights_only=True)
    from sae_probes.utils_data import read_numbered_dataset_df

    text = str(read_numbered_dataset_df("23_headline_ischina").prompt.iloc[0])
    _, cache = models.tl_model.run_with_cache(tok(text, return_tensors="pt")["input_ids"],
                                              names_filter="blocks.1.hook_resid_post")
    torch.testing.assert_close(acts[0], cache["blocks.1.hook_resid_post"][0, -1], rtol=1e-4, atol=1e-4)

    again = run_saebench(saes, tmp_path, ["sparse_probing_sae_probes"], eval_overrides=over, progress=False)
    assert {r.status for r in again.records} == {"skipped"}

    # A retrained SAE under an old name is probed afresh (sae-probes skips data sets whose result
    # file exists): "ours" now holds the upstream SAE and gets the upstream SAE's scores.
    sae_scores = {n: json.loads(result_path(tmp_path, n, "sparse_probing_sae_probes").read_text())[
        "eval_result_metrics"]["sae"] for n in saes}
    assert sae_scores["ours"] != sae_scores["upstream"]
    run_saebench({"ours": trained["upstream"]}, tmp_path, ["sparse_probing_sae_probes"], model=models.tl_model,
                 device="cpu", eval_overrides=over, force=True, progress=False)
    redone = json.loads(result_path(tmp_path, "ours", "sparse_probing_sae_probes").read_text())
    assert redone["eval_result_metrics"]["sae"] == sae_scores["upstream"]


def test_new_eval_configs_are_checked_before_anything_loads(trained, tmp_path, no_model_loading):
    ok = {"m": trained["ours"]}
    for over, match in [({"dataset_names": ["no_such_dataset"]}, r"unknown dataset\(s\) \['no_such_dataset'\]"),
                        ({"setting": "scarcity"}, "setting 'scarcity' is not aggregated"),
                        ({"results_path": "x"}, r"\['results_path'\] are set by the run"),
                        ({"ks": []}, "ks must be positive")]:
        with pytest.raises(SAEBenchError, match=match):
            run_saebench(ok, tmp_path, ["sparse_probing_sae_probes"],
                         eval_overrides={"sparse_probing_sae_probes": over})
    with pytest.raises(SAEBenchError, match=r"unknown meta_structure config fields \['steps'\]"):
        run_saebench(ok, tmp_path, ["meta_structure"], eval_overrides={"meta_structure": {"steps": 3}})
    assert not any(tmp_path.iterdir())


def test_absorption_caches_are_kept_apart_per_seed():
    """The run seeds Python's random state, which draws absorption's probe vocabulary split: the
    cached probes of one seed must not serve another."""
    keys = {sb.make_eval_config("absorption", "x", llm_batch_size=1, llm_dtype="float32", random_seed=s).cache_key()
            for s in (0, 1)}
    assert len(keys) == 2
