"""matryoshka_plugin.saebench: SAEBench's real evals on SAEs trained here with trainSAE, on a tiny
local model (passed in with model=) and local data sets (load_dataset=)."""

from __future__ import annotations

import itertools
import json

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


def test_eval_configs_fill_what_saebench_leaves_unset():
    for ev in EVAL_NAMES:
        cfg = sb.make_eval_config(ev, "gemma-2-2b", llm_batch_size=32, llm_dtype="bfloat16")
        if ev == "core":
            assert cfg["eval_batch_size_prompts"] == 32 and cfg["dataset"] == "Skylion007/openwebtext"
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
