"""The comparison's configuration binding: every named configuration reads to the same
BenchmarkConfig through benchmarks/harness.py as through the hand-written binding it replaced,
kept here (shortened) as the reference: TOML tables merged for ``extends``, dotted overrides
written into the raw tables, then each section's dataclass built from its table."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from benchmarks.causal_lm_comparison import config as C
from benchmarks.causal_lm_comparison.config import CONFIGS, BenchmarkConfig, ConfigError, PublishedSuite, load_config

SECTIONS = {"model": C.ModelConfig, "data": C.DataConfig, "training": C.TrainingConfig, "evals": C.EvalConfig,
            "hardware": C.HardwareConfig}
OVERRIDES = {"run_dir": "x", "evals.extra_saes": {"a": "b"}, "training.seeds": {"matryoshka": [0, 1]},
             "evals.overrides.tpp.train_set_size": 100, "training.nproc": 4, "data.cache_dir": "c"}


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read(path: Path) -> dict:
    data = tomllib.loads(path.read_text())
    base = data.pop("extends", None)
    return data if base is None else _merged(_read(CONFIGS.get(base) or path.parent / base), data)


def reference(name: str | None, overrides: dict[str, Any] | None = None) -> BenchmarkConfig:
    """The old binding: no type checks, a table given whole replaces the file's."""
    data = _read(C.config_path(name)) if name is not None else {}
    for key, value in (overrides or {}).items():
        *heads, last = key.split(".")
        node = data
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = value
    kwargs = {k: SECTIONS[k](**v) if k in SECTIONS else v for k, v in data.items()}
    if "published" in kwargs:
        kwargs["published"] = [PublishedSuite(**p) for p in kwargs["published"]]
    cfg = BenchmarkConfig(**kwargs)
    cfg.source = str(C.config_path(name)) if name is not None else None
    return cfg


@pytest.mark.parametrize("name", [None, *CONFIGS])
def test_named_configurations_read_as_with_the_old_binding(name):
    got = load_config(name, validate=False)
    assert dataclasses.asdict(got) == dataclasses.asdict(reference(name))
    assert got == reference(name)


def test_overrides_read_as_with_the_old_binding():
    assert load_config("tiny", OVERRIDES, validate=False) == reference("tiny", OVERRIDES)
    assert load_config("tiny", validate=False).evals.overrides["tpp"].get("train_set_size") != 100
    # where they differ: a table given for a whole dict field now merges into the file's
    seeds = {"batchtopk": [3]}
    new = load_config("smollm2_135m", {"training.seeds": seeds}, validate=False).training.seeds
    old = reference("smollm2_135m", {"training.seeds": seeds}).training.seeds
    assert old == seeds and new == {**load_config("smollm2_135m", validate=False).training.seeds, **seeds}


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
