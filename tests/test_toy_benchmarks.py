"""Reduced toy benchmarks on CPU: the headline directions of the Matryoshka post and the
hedging critique, plus smoke runs of the loud-child and superposition set-ups.

The full study is ``python -m benchmarks.toy.run`` (README, "Toy benchmarks").
"""

import json
import math
from pathlib import Path

import pytest


from benchmarks.toy.config import default_setups, merge_overrides, parse_variant
import benchmarks.toy.run as run_module
from benchmarks.harness import parse_config
from benchmarks.toy.run import ToyStudy, build_config
from benchmarks.toy.run import main as run_main
from benchmarks.toy.train import train_and_evaluate

SETUPS = default_setups()


def reduced(name, **over):
    return merge_overrides(SETUPS[name], {"eval_samples": 10_000, **over})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Reduced settings, checked over seeds 0-9 (see the README's toy-benchmark section).
POST_STEPS = 3000
HEDGE_STEPS = 1500


@pytest.mark.slow  # trains eight toy SAEs
def test_post_tree_vanilla_absorbs_and_matryoshka_does_not():
    setup = reduced("post_tree", steps=POST_STEPS)
    vanilla, _ = train_and_evaluate(setup, "vanilla", seed=0)
    matryoshka, _ = train_and_evaluate(setup, "mat_every", seed=0)
    print(f"vanilla absorption {vanilla['absorption']:.3f}, matryoshka {matryoshka['absorption']:.3f}")
    assert vanilla["absorption"] >= 0.5
    assert matryoshka["absorption"] <= 0.05
    assert matryoshka["l0"] > vanilla["l0"]  # keeping parents whole costs L0


def test_one_latent_sae_hedges_and_matryoshka_inherits_it():
    setup = reduced("hedging", steps=HEDGE_STEPS)
    one, _ = train_and_evaluate(setup, "vanilla_1", seed=0)
    (group,) = one["mixing_per_parent"]
    assert one["matching"][0] == 0  # the single latent is the parent's
    child_cos = group["child_cos"]
    print(f"1-latent SAE: cos with parent {one['recovery']:.3f}, with children {child_cos}")
    assert one["recovery"] > 0.7
    assert all(c > 0.15 for c in child_cos)  # hedging: the children leak into the parent latent
    mat, _ = train_and_evaluate(setup, "mat_groups", seed=0)
    print(f"Matryoshka [1, 3]: parent->child {mat['mixing_parent_child_signed']:.3f}, "
          f"child->sibling {mat['mixing_sibling_signed']:.3f}, absorption {mat['absorption']:.3f}")
    assert mat["absorption"] <= 0.05
    assert mat["mixing_parent_child_signed"] > 0.15 and mat["mixing_sibling_signed"] < -0.15


@pytest.mark.parametrize("name, variant, k", [("magnitude", "mat_pareto", None), ("hierarchy", "btk_groups", 2)])
def test_other_setups_run_and_measure(name, variant, k):
    setup = reduced(name, steps=400, eval_samples=5_000)
    rec, sae = train_and_evaluate(setup, variant, seed=0, k=k)
    for key in ("absorption", "recovery", "l0", "fvu", "mixing_parent_child"):
        assert rec[key] is not None and math.isfinite(rec[key]), key
    assert 0.0 <= rec["absorption"] <= 1.0 and -1.0 <= rec["recovery"] <= 1.0
    if name == "hierarchy":
        assert 0.0 < rec["saelens_mcc"] <= 1.0 and rec["saelens_true_l0"] > 1.0
        assert len(rec["absorption_per_parent"]) > 5  # parents at two levels


def test_runner_writes_tables_figures_and_resumes(tmp_path, capsys):
    args = ["--setups", "hedging", "--variants", "vanilla_1", "mat_groups", "--seeds", "0", "--steps", "150",
            "--out", str(tmp_path)]
    assert run_main(args) == 0
    assert "2 to train" in capsys.readouterr().out
    table = (tmp_path / "results.md").read_text()
    assert "`vanilla_1`" in table and "`mat_groups`" in table
    assert (tmp_path / "results.csv").read_text().count("\n") == 3
    for fig in ("hedging_activations.png", "hedging_decoder_cosine.png", "hedging_tradeoff.png"):
        assert (tmp_path / "figures" / fig).read_bytes()[:4] == b"\x89PNG"
    assert run_main(args + ["--no-figures"]) == 0
    assert "2 cached, 0 to train" in capsys.readouterr().out
    # --report: the same tables and the figures in one published folder, nothing retrained
    report = tmp_path / "docs" / "results" / "toy"
    assert run_main(args + ["--report", str(report)]) == 0
    assert "2 cached, 0 to train" in capsys.readouterr().out
    for name in ("results.csv", "summary.csv", "results.md"):
        assert (report / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert (report / "hedging_tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_runs_are_trainsae_folders_that_load_and_remeasure_identically(tmp_path, capsys):
    """Each run's SAE is a trainSAE ``trainer_0`` folder (ours and upstream's classes) that
    ``load_dictionary`` reads; re-measuring the loaded SAEs reproduces the stored metrics."""
    from matryoshka_plugin import load_dictionary

    args = ["--setups", "hedging", "--variants", "mat_groups", "up_btk", "--seeds", "0", "--steps", "150",
            "--out", str(tmp_path), "--no-figures"]
    assert run_main(args) == 0
    runs = {v: tmp_path / "runs" / "hedging" / v / "seed0" for v in ("mat_groups", "up_btk_k1")}
    records = {v: json.loads((d / "record.json").read_text()) for v, d in runs.items()}
    for v, d in runs.items():
        config = json.loads((d / "trainer_0" / "config.json").read_text())
        assert set(config) == {"trainer", "buffer"} and config["buffer"]["seed"] == 10_000
        sae, cfg = load_dictionary(d / "trainer_0")
        assert cfg == config and sae.dict_size == records[v]["trainer"]["dict_size"]
    assert type(load_dictionary(runs["up_btk_k1"] / "trainer_0")[0]).__module__.startswith("dictionary_learning")
    capsys.readouterr()
    assert run_main(args + ["--remeasure"]) == 0
    assert "2 cached, 0 to train" in capsys.readouterr().out
    for v, d in runs.items():
        assert json.loads((d / "record.json").read_text()) == records[v]


def _study(*argv):
    return parse_config(ToyStudy, list(argv))


def test_config_file_overrides_and_selects(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"seeds": [3], "overrides": {"hedging": {"steps": 7, "log": {"sparsity_coeff": 2.0}}}}))
    setups, seeds = build_config(_study("--config", str(cfg)))
    assert list(setups) == ["hedging"] and seeds == [3]
    assert setups["hedging"].steps == 7 and setups["hedging"].log == {"sparsity": "l1", "sparsity_coeff": 2.0}
    setups, _ = build_config(_study("--config", str(cfg), "--setups", "post_tree", "hedging"))
    assert list(setups) == ["post_tree", "hedging"]
    setups, seeds = build_config(_study("--quick", "--set", "overrides.magnitude.toy.child_magnitude=5"))
    assert list(setups) == ["magnitude"] and seeds == [0, 1] and setups["magnitude"].steps == 2000
    assert setups["magnitude"].toy["child_magnitude"] == 5 and setups["magnitude"].toy["parent_magnitude"] == 2.0
    for f in sorted((Path(run_module.__file__).parent / "configs").glob("*.json")):
        assert list(build_config(_study("--config", str(f)))[0]) == ["post_tree"], f
    cfg.write_text(json.dumps({"overrides": {"nope": {}}}))
    with pytest.raises(ValueError, match="unknown set-up 'nope'"):
        build_config(_study("--config", str(cfg)))
    with pytest.raises(SystemExit, match="unknown set-up 'nope'"):
        run_main(["--config", str(cfg)])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\] in \[hedging\]"):
        build_config(_study("--set", "overrides.hedging.stepz=3"))
    with pytest.raises(ValueError, match="unknown variant 'mat_grops'"):
        build_config(_study("--variants", "mat_grops"))
    with pytest.raises(ValueError, match="must lie in"):
        parse_variant("btk_groups_b1.5")
    with pytest.raises(SystemExit):
        run_main(["--stepz", "3"])
    assert "--stepz" in capsys.readouterr().err


@pytest.mark.slow  # trains two toy SAEs and a meta-SAE for each
def test_meta_structure_column(tmp_path, capsys, monkeypatch):
    """--meta-structure adds SAEBench's meta-SAE variance explained of each run's decoder to its
    record and a column to the table; the value is the one decoder_meta_structure gives."""
    import benchmarks.toy.run as toy_run
    from matryoshka_plugin import load_dictionary
    from matryoshka_plugin.saebench import decoder_meta_structure

    monkeypatch.setattr(toy_run, "META_STRUCTURE", {"autocast": False, "train_steps": 50, "train_batch_size": 64})
    args = ["--setups", "hedging", "--variants", "mat_groups", "up_btk", "--seeds", "0", "--steps", "150",
            "--out", str(tmp_path), "--no-figures"]
    assert run_main(args) == 0
    assert "meta-SAE" not in (tmp_path / "results.md").read_text()  # off by default
    assert run_main(args + ["--meta-structure"]) == 0
    assert "meta-SAE var. expl." in (tmp_path / "results.md").read_text()
    run = tmp_path / "runs" / "hedging" / "mat_groups" / "seed0"
    got = json.loads((run / "record.json").read_text())["meta_variance_explained"]
    sae, _ = load_dictionary(run / "trainer_0")
    again = decoder_meta_structure(sae, seeds=[0], autocast=False, train_steps=50, train_batch_size=64)
    # 50 meta-SAE steps on a 3-latent decoder: not converged, the score can be negative; it is reproducible
    assert got <= 1.0 and got == again["variance_explained"]
