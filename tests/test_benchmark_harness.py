"""benchmarks/harness.py: the results store, mean ± std over seeds, the table writers and the
dataclass-driven command line that every benchmark study uses."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pytest

from benchmarks import harness
from benchmarks.harness import (
    RunStore, apply_overrides, config_from_dict, fmt_mean_std, markdown_table, mean_std, option, parse_config,
    summarise, write_csv,
)


def test_mean_std_matches_numpy_and_skips_missing_values():
    rng = np.random.default_rng(0)
    vals = rng.normal(size=7).tolist()
    mean, std, n = mean_std(vals + [None, float("nan"), "text"])
    assert n == 7
    assert mean == pytest.approx(np.mean(vals), abs=1e-12)
    assert std == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
    assert mean_std([2.5]) == (2.5, 0.0, 1)
    # exact=True: the statistics module's correctly rounded sums (SynthSAEBench's tables)
    assert mean_std(vals, exact=True) == (statistics.mean(vals), statistics.stdev(vals), 7)
    m, s, n = mean_std([None])
    assert math.isnan(m) and math.isnan(s) and n == 0


def test_summarise_groups_in_first_seen_order_with_numpy_stats():
    rng = np.random.default_rng(1)
    records = []
    for seed in range(4):
        for variant in ("b", "a"):
            records.append({"variant": variant, "k": 2, "seed": seed, "fvu": float(rng.random()),
                            "l0": None if (variant == "a" and seed == 0) else float(rng.random())})
    rows = summarise(records, by=["variant", ("key", lambda r: f"{r['variant']}/k{r['k']}")],
                     metrics=["fvu", "l0", "absent"], counts=True)
    assert [r["variant"] for r in rows] == ["b", "a"]
    assert rows[1]["key"] == "a/k2"
    for row in rows:
        mine = [r for r in records if r["variant"] == row["variant"]]
        assert row["seeds"] == 4
        fvu = [r["fvu"] for r in mine]
        assert row["fvu"] == pytest.approx(np.mean(fvu)) and row["fvu_std"] == pytest.approx(np.std(fvu, ddof=1))
        l0 = [r["l0"] for r in mine if r["l0"] is not None]
        assert row["l0_n"] == len(l0) and row["l0_std"] == pytest.approx(np.std(l0, ddof=1))
        assert math.isnan(row["absent"]) and row["absent_n"] == 0


def test_format_and_tables():
    assert fmt_mean_std(0.12345, 0.0061) == "0.123 ± 0.006"
    assert fmt_mean_std(float("nan"), 1.0) == "–"
    assert fmt_mean_std(2.0, None, 1) == "2.0"
    table = markdown_table(["a", "b|c"], [[1, "x|y"], ["–", 2.5]])
    assert table.splitlines() == ["| a | b\\|c |", "|---|---|", "| 1 | x\\|y |", "| – | 2.5 |"]


def test_write_csv_round_trips_with_empty_cells_for_none(tmp_path):
    path = write_csv(tmp_path / "sub" / "r.csv", [{"a": 1, "b": None}, {"a": 2.5, "c": "z"}])
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert rows == [{"a": "1", "b": "", "c": ""}, {"a": "2.5", "b": "", "c": "z"}]
    assert path.read_bytes().count(b"\r\n") == 3  # the csv module's dialect, as the studies wrote before
    assert not list(path.parent.glob(".*tmp"))  # the temporary file is gone


def test_run_store_skips_finished_runs_and_reruns_changed_ones(tmp_path):
    store = RunStore(tmp_path)
    fp = {"lr": 1e-3, "groups": (1, 2)}  # a tuple reads back as a list: still the same fingerprint
    trained = []

    def study(fingerprint):
        for key in ("setup/a/seed0", "setup/a/seed1"):
            if not store.is_done(key, fingerprint):
                trained.append(key)
                store.save(key, {"seed": int(key[-1]), "fvu": 0.5}, fingerprint)

    study(fp)
    assert trained == ["setup/a/seed0", "setup/a/seed1"]
    study(fp)
    assert len(trained) == 2  # the rerun skips both
    assert json.loads((tmp_path / "setup/a/seed0/record.json").read_text())["fingerprint"]["groups"] == [1, 2]
    study({**fp, "lr": 3e-3})
    assert len(trained) == 4  # a changed setting reruns them
    assert [r["seed"] for r in store.records()] == [0, 1]
    assert store.load("setup/b/seed0") is None and not store.is_done("setup/b/seed0")
    with pytest.raises(ValueError, match="'..'"):
        store.path("../escape")


@dataclass
class Inner:
    d: int = 20
    noise: float = 0.05


@dataclass
class Study:
    steps: int = option(100, "training steps")
    lr: float = option(1e-3, "learning rate")
    name: str = option("run", "a name")
    quick: bool = option(False, "a smoke run")
    seeds: list[int] = option(default_factory=lambda: [0, 1], help="seeds")
    mode: Literal["groups", "none"] = option("groups", "prefix mode")
    k: int | None = option(None, "k (None: the set-up's)")
    ratios: tuple[float, ...] = option((0.5, 0.5), "group ratios")
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = option(default_factory=list, help="tables")
    hidden: int = option(3, "not a flag", flag=False)


def test_cli_parses_each_field_type():
    cfg = parse_config(Study, ["--steps", "5", "--lr", "3e-4", "--name", "x", "--quick", "--seeds", "3", "4", "5",
                               "--mode", "none", "--k", "8", "--ratios", "0.25", "0.75"])
    assert cfg == Study(steps=5, lr=3e-4, name="x", quick=True, seeds=[3, 4, 5], mode="none", k=8,
                        ratios=(0.25, 0.75))
    assert parse_config(Study, []) == Study()
    cfg = parse_config(Study, ["--extra", "lr=3e-3", "--extra", "name=x", "--seeds", "[1, 2]", "--ratios", "0.1"])
    assert cfg.extra == {"lr": 3e-3, "name": "x"} and cfg.seeds == [1, 2] and cfg.ratios == (0.1,)
    assert parse_config(Study, ["--rows", '[{"lr": 1e-3, "on": true}]', "{'lr': 2}"]).rows == [{"lr": 1e-3, "on": True},
                                                                                               {"lr": 2}]
    assert parse_config(Study, ["--no-quick"]).quick is False
    assert isinstance(parse_config(Study, ["--lr", "1"]).lr, float)


def test_set_overrides_nested_and_dict_fields_and_goes_last(tmp_path):
    cfg = parse_config(Study, ["--steps", "5", "--set", "steps=7", "--set", "inner.d=32", "--set", "extra.x=1e-3",
                               "--set", "k=None", "--set", "hidden=9", "--set", "name=plain text"])
    assert cfg.steps == 7 and cfg.inner == Inner(d=32) and cfg.extra == {"x": 1e-3} and cfg.k is None
    assert cfg.hidden == 9 and cfg.name == "plain text"


@pytest.mark.parametrize("suffix", ["toml", "json"])
def test_config_file_then_flags_then_set(tmp_path, suffix):
    path = tmp_path / f"c.{suffix}"
    if suffix == "toml":
        path.write_text('steps = 50\nseeds = [7]\n[inner]\nnoise = 0.0\n[extra]\nlog = {sparsity = "l1"}\n')
    else:
        path.write_text(json.dumps({"steps": 50, "seeds": [7], "inner": {"noise": 0.0},
                                    "extra": {"log": {"sparsity": "l1"}}}))
    cfg = parse_config(Study, ["--config", str(path), "--steps", "60"])
    assert cfg.steps == 60 and cfg.seeds == [7] and cfg.inner == Inner(20, 0.0)
    assert cfg.extra == {"log": {"sparsity": "l1"}}


@pytest.mark.parametrize("argv, words", [
    (["--set", "stpes=3"], ["stpes", "steps"]),
    (["--set", "inner.dd=3"], ["'dd'", "[inner]"]),
    (["--set", "steps=many"], ["steps", "many"]),
    (["--set", "steps"], ["KEY=VALUE"]),
    (["--steps", "1.5"], ["steps"]),
    (["--mode", "other"], ["invalid choice"]),
    (["--extra", "novalue"], ["--extra", "KEY=VALUE"]),
    (["--seeds", "1", "x"], ["seeds", "'x'"]),
])
def test_bad_settings_are_errors_naming_the_key(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Study, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err


def test_config_from_dict_and_overrides_check_types():
    assert config_from_dict(Inner, {"d": 8}) == Inner(d=8)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['x', 'y'\] at the top level"):
        config_from_dict(Inner, {"x": 1, "y.z": 2})
    with pytest.raises(ValueError, match="noise"):
        apply_overrides(Inner(), {"noise": "loud"})
    assert apply_overrides(Study(), {"inner": {"d": 4}}).inner == Inner(d=4, noise=0.05)


@dataclass
class Suite:
    label: str
    release: str = "r"


@dataclass
class Section:
    suites: list[Suite] = field(default_factory=list)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)


def test_required_fields_lists_of_tables_and_nested_dicts():
    cfg = config_from_dict(Section, {"suites": [{"label": "a"}, {"label": "b", "release": "s"}]})
    assert cfg.suites == [Suite("a"), Suite("b", "s")]
    with pytest.raises(ValueError, match=r"missing setting\(s\) \['label'\] in \[suites\[1\]\]"):
        config_from_dict(Section, {"suites": [{"label": "a"}, {"release": "s"}]})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['x'\] in \[suites\[0\]\]"):
        config_from_dict(Section, {"suites": [{"label": "a", "x": 1}]})
    base = Section(tables={"core": {"n": 1, "m": 2}})
    deeper = apply_overrides(base, {"tables.core.n": 5, "tables.tpp.k": 3})
    assert deeper.tables == {"core": {"n": 5, "m": 2}, "tpp": {"k": 3}}
    assert base.tables == {"core": {"n": 1, "m": 2}}  # the original is left as it was
    assert apply_overrides(base, {"tables.core": {}}).tables == {"core": {}}  # a key's table replaces it
    with pytest.raises(ValueError, match="tables.core.n is not a table"):
        apply_overrides(base, {"tables.core.n.x": 1})


def test_config_file_extends_another(tmp_path):
    (tmp_path / "base.toml").write_text('steps = 5\nseeds = [1, 2]\n[extra.log]\na = 1\nb = 2\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\nseeds = [3]\n[extra.log]\nb = 3\n')
    (tmp_path / "grand.toml").write_text('extends = "kid"\nname = "g"\n')
    data = harness.load_config_file(tmp_path / "child.toml")
    assert data == {"steps": 5, "seeds": [3], "extra": {"log": {"a": 1, "b": 3}}}  # lists replaced, tables merged
    assert harness.load_config_file(tmp_path / "grand.toml", named={"kid": tmp_path / "child.toml"})["name"] == "g"
    (tmp_path / "loop.toml").write_text('extends = "loop2.toml"\n')
    (tmp_path / "loop2.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ValueError, match="comes back to itself"):
        harness.load_config_file(tmp_path / "loop.toml")
    with pytest.raises(ValueError, match="no such config file"):
        harness.load_config_file(tmp_path / "grand.toml")
    (tmp_path / "broken.toml").write_text("steps = \n")
    with pytest.raises(ValueError, match="broken.toml is not valid TOML"):
        harness.load_config_file(tmp_path / "broken.toml")


def test_width_label():
    assert [harness.width_label(w) for w in (512, 4096, 65536)] == ["512", "4k", "65k"]


def test_run_worker_hands_settings_and_reports_failures(tmp_path):
    script = tmp_path / "w.py"
    script.write_text("import json, os, sys\n"
                      "s = json.loads(os.environ['BENCHMARK_WORKER'])\n"
                      "if s.get('fail'): sys.exit('broken on purpose')\n"
                      "print('noise'); print(json.dumps({**s, 'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
                      "                                   'threads': os.environ.get('OMP_NUM_THREADS')}))\n")
    out = harness.run_worker(script, {"a": 1, "b": [2, 3]}, flag="--grid-worker", env={"OMP_NUM_THREADS": "1"})
    got = harness.last_json_line(out)
    assert got == {"a": 1, "b": [2, 3], "argv": ["--grid-worker"], "cwd": str(harness.REPO_ROOT), "threads": "1"}
    with pytest.raises(RuntimeError, match="broken on purpose"):
        harness.run_worker(script, {"fail": True})


@dataclass
class Train:
    steps: int = 1
    seeds: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class Top:
    train: Train = field(default_factory=Train)
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)
    name: str = "x"


def test_extends_replaces_a_table_of_values_and_merges_sections(tmp_path):
    """With the settings' dataclass, ``seeds = {}`` in the extending file clears the base's seeds
    (a table of values is one setting), while sections and tables of tables still merge."""
    (tmp_path / "base.toml").write_text('[train]\nsteps = 5\nseeds = { a = [0, 1], b = [0, 1] }\n'
                                        '[overrides.core]\nn = 1\nm = 2\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[train]\nseeds = { c = [2] }\n'
                                         '[overrides.core]\nn = 3\n')
    (tmp_path / "clear.toml").write_text('extends = "child.toml"\n[train]\nseeds = {}\n')
    child = harness.load_config_file(tmp_path / "child.toml", cls=Top)
    assert child == {"train": {"steps": 5, "seeds": {"c": [2]}}, "overrides": {"core": {"n": 3, "m": 2}}}
    cleared = harness.config_from_dict(Top, harness.load_config_file(tmp_path / "clear.toml", cls=Top))
    assert cleared.train == Train(steps=5, seeds={}) and cleared.overrides == {"core": {"n": 3, "m": 2}}
    # without the dataclass every table merges, as before
    assert harness.load_config_file(tmp_path / "child.toml")["train"]["seeds"] == {"a": [0, 1], "b": [0, 1], "c": [2]}
