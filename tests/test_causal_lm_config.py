"""The comparison's configuration binding: every named configuration reads to the same
BenchmarkConfig as the hand-written binding did before it moved onto benchmarks/harness.py
(tests/data/causal_lm_configs.json holds those values, dumped from the old code)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks.causal_lm_comparison.config import CONFIGS, BenchmarkConfig, ConfigError, PublishedSuite, load_config

SAVED = json.loads((Path(__file__).parent / "data" / "causal_lm_configs.json").read_text())
OVERRIDES = {"run_dir": "x", "evals.extra_saes": {"a": "b"}, "training.seeds": {"matryoshka": [0, 1]},
             "evals.overrides.tpp.train_set_size": 100, "training.nproc": 4, "data.cache_dir": "c"}


def _values(cfg: BenchmarkConfig) -> dict:
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if d["source"] is not None:
        d["source"] = "benchmarks/causal_lm_comparison/" + Path(d["source"]).name
    return d


def _typed(x):
    """Values with their JSON types made visible (80 and 80.0 differ)."""
    if isinstance(x, dict):
        return {k: _typed(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_typed(v) for v in x]
    return (type(x).__name__, x)


@pytest.mark.parametrize("name", [None, *CONFIGS])
def test_named_configurations_read_as_before(name):
    got = _values(load_config(name, validate=False))
    assert _typed(got) == _typed(SAVED[str(name)])


def test_overrides_read_as_before():
    cfg = load_config("tiny", OVERRIDES, validate=False)
    cfg.source = None
    assert _typed(_values(cfg)) == _typed(SAVED["tiny+overrides"])
    assert load_config("tiny", validate=False).evals.overrides["tpp"].get("train_set_size") != 100


def test_binding_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr'\] in \[model\]"):
        load_config("tiny", {"model.lr": 1}, validate=False)
    with pytest.raises(ConfigError, match="training.tokens"):
        load_config("tiny", {"training.tokens": "many"}, validate=False)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[published]]\nrelease = "r"\n')
    with pytest.raises(ConfigError, match=r"label"):
        load_config(bad, validate=False)
    bad.write_text('[[published]]\nlabel = "l"\nrelease = "r"\n')
    assert load_config(bad, validate=False).published == [PublishedSuite("l", "r")]
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
