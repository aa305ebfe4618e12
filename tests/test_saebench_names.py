"""SAE names become result file and folder names: every name that is not one plain path component
is refused, naming it, before anything is written or deleted (no model, no training: fast)."""

from __future__ import annotations

import json

import pytest
import torch

import matryoshka_plugin.saebench.run as sb_run
from matryoshka_plugin.saebench import SAEBenchError, read_result, remove_results, result_path, run_saebench

MODEL_NAME = "tiny-gpt2"
BAD_NAMES = ["../../x", "..", ".", "a/b", "a\\b", "/abs", "", "x\n", "x\x00y", "tab\there", " lead", ".hidden"]


def _sae(n: int = 8, d: int = 4):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    return StandardSAE(StandardSAEConfig(d_in=d, d_sae=n, metadata=SAEMetadata(
        model_name=MODEL_NAME, hook_name="blocks.1.hook_resid_post")))


def _snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """``tmp/a/b/out`` as output_dir, with decoy files where ``../../x`` from ``out/<eval>`` and
    ``out/saelens`` would land."""
    monkeypatch.setattr(sb_run, "_load_model", lambda *a, **k: pytest.fail("the adapter tried to load a model"))
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    decoys = [tmp_path / "a" / "b" / "x_custom_sae_eval_results.json", tmp_path / "a" / "x", tmp_path / "x"]
    for p in decoys:
        p.write_text(json.dumps({"eval_result_metrics": {"keep": 1}}))
    return tmp_path, out


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_run_saebench_refuses_unsafe_names_before_touching_anything(layout, bad):
    root, out = layout
    before = _snapshot(root)
    for force in (False, True):
        with pytest.raises(SAEBenchError, match="SAE name " + __import__("re").escape(repr(bad))) as e:
            run_saebench({bad: _sae()}, out, ["meta_structure"], device="cpu", progress=False, force=force)
        assert isinstance(e.value, ValueError)
    assert _snapshot(root) == before


@pytest.mark.parametrize("bad", ["../../x", "x\n", ""])
def test_result_helpers_refuse_unsafe_names(layout, bad):
    root, out = layout
    before = _snapshot(root)
    for call in (lambda: remove_results(out, bad), lambda: result_path(out, bad, "core"),
                 lambda: read_result(out, bad, "core")):
        with pytest.raises(SAEBenchError, match="SAE name"):
            call()
    assert _snapshot(root) == before


def test_plain_names_are_accepted(tmp_path):
    for ok in ["m", "ours_exported", "v1.2+x", "a..b", "trainer_0"]:
        assert result_path(tmp_path, ok, "core") == tmp_path / "core" / f"{ok}_custom_sae_eval_results.json"
    assert remove_results(tmp_path, "m") == []
