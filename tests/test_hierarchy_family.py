"""The hierarchy-family study's plumbing (issue 26, deliverables 2-3).

Absorption as the study records it is checked against a brute-force count on a hand-built
tree and SAE whose parent latent is silenced by one child; the per-pair report must name that
child and the latent that fires instead; a rerun must skip finished runs and redo runs whose
settings changed; the summaries must give the hand-computed median, worst tree and share cured.
"""

import json
import os

import pytest
import torch

from benchmarks.hierarchy_family.analysis import config_summaries, failures, pair_report, tree_summaries
from benchmarks.hierarchy_family.configs import CONFIGS, _fractions, config_by_name, level_sizes
from benchmarks.hierarchy_family.study import StudySettings, family, measure_run, record_path, run_family
from matryoshka_plugin.prefixes import group_sizes_from_fractions
from matryoshka_plugin.toy import Feature, HierarchyParams, HierarchySpec, evaluate_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hand_tree() -> HierarchySpec:
    """A parent (p 0.5) with two mutually exclusive children (0.4 each) and a singleton, orthonormal in d = 4."""
    parent = Feature(0.5, [Feature(0.4, name="a"), Feature(0.4, name="b")], exclusive=True, name="P")
    roots = [parent, Feature(0.3, name="s")]
    params = HierarchyParams(n_trees=1, depth=1, n_singletons=1, firing_noise=0.0)
    return HierarchySpec("hand", params, 0, roots, torch.eye(4, dtype=torch.float64), k=2)


class _AbsorbingSAE(torch.nn.Module):
    """Decoder rows are the true directions; the parent's latent (0) is silenced whenever child
    ``a`` (latent 1) fires, and latent 1 then carries the parent: child ``a`` absorbs its parent."""

    def __init__(self) -> None:
        super().__init__()
        self.W_dec = torch.nn.Parameter(torch.eye(4))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(x @ self.W_dec.T)
        z[:, 0] = torch.relu(x[:, 0] - 2 * x[:, 1])
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec


def test_absorption_matches_a_brute_force_count_and_names_the_absorbing_child():
    spec = _hand_tree()
    toy, sae, n = spec.build(), _AbsorbingSAE(), 4000
    rec = measure_run(sae, spec, toy, eval_samples=n)
    # brute force on the same evaluation samples (evaluate_sae's generator seed, 1234)
    feats, x = toy.sample(n, torch.Generator().manual_seed(1234))
    code = sae.encode(x)
    both = missed = both_a = missed_a = 0
    for f, z in zip(feats.tolist(), code.tolist()):
        if f[0] > 0 and (f[1] > 0 or f[2] > 0):
            both += 1
            missed += z[0] == 0
        if f[0] > 0 and f[1] > 0:
            both_a += 1
            missed_a += z[0] == 0
    assert both > 500
    assert rec["absorption"] == pytest.approx(missed / both, abs=1e-6)  # one sample is 1e-3
    assert 0.4 < rec["absorption"] < 0.6  # child a takes half of the parent's child firings
    assert rec["recovery"] == pytest.approx(1.0)
    assert rec["cured"] is False
    pairs = {(p["parent"], p["child"]): p for p in rec["pairs"]}
    assert pairs[("P", "a")]["n"] == both_a
    assert pairs[("P", "a")]["miss"] == pytest.approx(round(missed_a / both_a, 4))
    assert pairs[("P", "a")]["miss"] == 1.0 and pairs[("P", "b")]["miss"] == 0.0
    assert pairs[("P", "a")]["absorber"]["latent"] == 1 and pairs[("P", "a")]["absorber"]["matched_to"] == "a"
    assert pairs[("P", "b")]["absorber"] is None


def test_pair_report_agrees_with_evaluate_sae_per_parent():
    """With exclusive children the pairs partition the parent's samples: their weighted misses
    give evaluate_sae's per-parent absorption."""
    spec = _hand_tree()
    toy, sae = spec.build(), _AbsorbingSAE()
    m = evaluate_sae(sae, toy, n_samples=3000)
    pairs = pair_report(sae, toy, m, spec, n_samples=3000)
    weighted = sum(p["miss"] * p["n"] for p in pairs) / sum(p["n"] for p in pairs)
    assert weighted == pytest.approx(m.absorption_per_parent[0], abs=1e-3)


def test_level_groups_are_exact_for_every_family_tree_under_both_rounding_rules():
    for spec in family(24, 0).values():
        sizes = level_sizes(spec)
        assert sum(sizes) == spec.n_features
        fr = _fractions(sizes)
        assert group_sizes_from_fractions(spec.n_features, fr) == sizes  # int(f * n), both trainers
        assert [round(f * spec.n_features) for f in fr] == sizes  # benchmarks.toy's check


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_redoes_changed_ones(tmp_path):
    configs = [config_by_name("btk_every"), config_by_name("up_mbtk")]
    st = StudySettings(steps=20, eval_samples=2000)
    trained, skipped = run_family(tmp_path, configs, [0], st, jobs=1, trees=["h02", "h20"], log=lambda *_: None)
    assert (trained, skipped) == (4, 0)
    spec = family()["h02"]
    path = record_path(tmp_path, spec, "btk_every", 0)
    rec = json.loads(path.read_text())
    assert rec["tree_fingerprint"] == spec.fingerprint and rec["trainer"]["steps"] == 20
    assert rec["trainer"]["k"] == spec.k and rec["trainer"]["dict_size"] == spec.n_features
    up = json.loads(record_path(tmp_path, spec, "up_mbtk", 0).read_text())
    assert up["trainer"]["group_fractions"] == pytest.approx(_fractions(level_sizes(spec)))
    stamp = path.stat().st_mtime_ns
    assert run_family(tmp_path, configs, [0], st, jobs=1, trees=["h02", "h20"], log=lambda *_: None) == (0, 4)
    assert path.stat().st_mtime_ns == stamp
    # another step count is another run
    st2 = StudySettings(steps=21, eval_samples=2000)
    assert run_family(tmp_path, configs[:1], [0], st2, jobs=1, trees=["h02"], log=lambda *_: None) == (1, 0)
    assert json.loads(path.read_text())["trainer"]["steps"] == 21


def _rec(config, tree, seed, absorption, recovery):
    from benchmarks.hierarchy_family.study import cured

    return {"config": config, "tree": tree, "seed": seed, "tree_fingerprint": "x", "absorption": absorption,
            "recovery": recovery, "fvu": 0.1, "l0": 2.0, "dead_latents": 0, "mixing_parent_child_signed": 0.0,
            "mixing_sibling_signed": 0.0, "mean_max_cosine": 1.0, "cured": cured(absorption, recovery),
            "tree_info": {"k": 2, "true_l0": 1.5, "k_regime": "around", "n_features": 3},
            "matched_cosine": [1.0, 0.5, 1.0], "pairs": []}


def test_summaries_give_median_worst_tree_and_share_cured():
    recs = [
        _rec("A", "t1", 0, 0.00, 0.99), _rec("A", "t1", 1, 0.08, 0.99),  # mean 0.04: cured, one run not
        _rec("A", "t2", 0, 0.30, 0.90), _rec("A", "t2", 1, 0.50, 0.80),  # worst tree
        _rec("A", "t3", 0, 0.02, 0.97), _rec("A", "t3", 1, None, 0.97),  # no parent samples: 0
    ]
    per_tree = tree_summaries(recs)
    assert per_tree[("A", "t1")]["absorption"] == pytest.approx(0.04)
    assert per_tree[("A", "t3")]["absorption"] == pytest.approx(0.01)
    (row,) = config_summaries(recs)
    assert row["trees_cured"] == pytest.approx(2 / 3)
    assert row["runs_cured"] == pytest.approx(3 / 6)
    assert row["absorption_median"] == pytest.approx(0.04)
    assert (row["absorption_worst_tree"], row["absorption_worst"]) == ("t2", pytest.approx(0.4))
    assert (row["recovery_worst_tree"], row["recovery_worst"]) == ("t2", pytest.approx(0.85))
    assert row["recovery_median"] == pytest.approx(0.97)
    fails = failures(recs)
    assert [f["tree"] for f in fails["A"]] == ["t2"]
    assert fails["A"][0]["seed"] == 1  # the worse seed is the one explained


def test_every_configuration_builds_its_trainer_on_a_superposed_deep_tree():
    from benchmarks.hierarchy_family.configs import trainer_kwargs
    from benchmarks.toy.config import VariantSpec
    from benchmarks.toy.train import make_trainer

    spec = family()["h05"]  # 4 levels, superposed
    for cfg in CONFIGS:
        kw = trainer_kwargs(cfg, spec, 0, 200)
        tr = make_trainer(VariantSpec(cfg.name, cfg.family), kw)
        if cfg.groups == "levels":
            got = getattr(tr, "group_sizes", None) or tr.config["group_sizes"]
            assert list(got) == level_sizes(spec), cfg.name


def test_paired_tables_give_per_tree_median_changes():
    from benchmarks.hierarchy_family.analysis import breakdown_markdown, paired_markdown, prefix_effect_by_exclusivity

    def rec(config, tree, a, excl):
        r = _rec(config, tree, 0, a, 0.9)
        r["tree_info"].update(n_exclusive_parents=excl, n_parents=2, d=3)
        return r

    recs = [rec("btk_none", "t1", 0.5, 2), rec("btk_none", "t2", 0.4, 2), rec("btk_none", "t3", 0.1, 0),
            rec("btk_every", "t1", 0.1, 2), rec("btk_every", "t2", 0.3, 2), rec("btk_every", "t3", 0.4, 0)]
    row = next(line for line in paired_markdown(recs, ["btk_none", "btk_every"]).splitlines()
               if line.startswith("| btk_every |"))
    # changes -0.4, -0.1, +0.3: median -0.1, two trees lower, one higher
    assert row.split(" | ")[1:8] == ["btk_none", "3", "-0.100", "+0.000", "2", "1", "0"]
    split = next(line for line in prefix_effect_by_exclusivity(recs, ["btk_none", "btk_every"]).splitlines()
                 if line.startswith("| btk_every |"))
    assert "-0.250 (2 lower, 0 higher of 2)" in split and "+0.300 (0 lower, 1 higher of 1)" in split
    assert "### Failures by mechanism" in breakdown_markdown(recs, ["btk_none", "btk_every"])


def test_latent_order_table_splits_pairs_by_which_latent_comes_first():
    """Counted by hand: 3 pairs with the parent's latent first (1 absorbed), 2 with the child's
    first (both absorbed); of the 3 absorbed pairs with an absorber, 2 absorbers precede the parent."""
    from benchmarks.hierarchy_family.analysis import latent_order_markdown

    def pair(parent_latent, child_latent, miss, absorber=None):
        return {"parent_latent": parent_latent, "child_latent": child_latent, "miss": miss,
                "absorber": None if absorber is None else {"latent": absorber}, "parent_latent_cos_parent": 0.9,
                "child_latent_cos_parent": 0.1, "child_latent_cos_child": 0.9, "child_latent_fires": 1.0}

    r1, r2 = _rec("btk_every", "t1", 0, 0.3, 0.9), _rec("btk_every", "t2", 0, 0.3, 0.9)
    r1["pairs"] = [pair(0, 3, 0.0), pair(1, 4, 0.5, absorber=5), pair(6, 2, 0.9, absorber=2)]
    r2["pairs"] = [pair(2, 7, 0.01), pair(5, 1, 0.3, absorber=0)]
    r1["tree_info"].update(n_exclusive_parents=1, n_parents=1, d=3)
    r2["tree_info"].update(n_exclusive_parents=1, n_parents=1, d=3)
    row = next(line for line in latent_order_markdown([r1, r2], ["btk_every", "btk_none"]).splitlines()
               if line.startswith("| btk_every |"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["btk_every", "3", "0.33", "2", "1.00", "67% of 3"]
    # by children's exclusivity: both trees have exclusive children for all parents
    kind_row = [line for line in latent_order_markdown([r1, r2], ["btk_every"]).splitlines()
                if line.startswith("| btk_every |")][1]
    assert [c.strip() for c in kind_row.strip("|").split("|")] == ["btk_every", "0.33 (3)", "–", "–", "1.00 (2)", "–", "–"]


def test_growing_prototype_lets_only_the_first_latents_fire_and_keeps_the_biases():
    """While m < n latents take part, the later ones never fire (their since-fired counters keep
    counting) and their encoder biases come back unchanged after the step."""
    from benchmarks.hierarchy_family.order_prototypes import GrowingTrainer

    torch.manual_seed(0)
    tr = GrowingTrainer(steps=40, activation_dim=6, dict_size=5, k=2, lr=1e-3, warmup_steps=1, device="cpu",
                        prefix_mode="every", threshold_start_step=100)
    assert [tr.active_latents(s) for s in (0, 5, 10, 15, 20, 30)] == [1, 2, 3, 4, 5, 5]
    x = torch.randn(64, 6)
    for step in range(5):  # m = 1: only latent 0
        before = tr.ae.b_enc.detach().clone()
        tr.update(step, x)
        assert torch.equal(tr.ae.b_enc[1:], before[1:])
    assert int(tr.num_tokens_since_fired[0]) == 0
    assert (tr.num_tokens_since_fired[1:] == 5 * 64).all()
    tr.update(5, x)  # m = 2: latent 1 may fire now (k = 2 per token on average)
    assert int(tr.num_tokens_since_fired[1]) == 0 and (tr.num_tokens_since_fired[2:] == 6 * 64).all()


def test_one_job_runs_at_the_asked_niceness(tmp_path):
    """With --jobs 1 the runs happen in the calling process, which --nice lowers too."""
    import subprocess
    import sys

    code = ("import os; from benchmarks.hierarchy_family.study import StudySettings, run_family; "
            "from benchmarks.hierarchy_family.configs import config_by_name; "
            f"run_family({str(tmp_path)!r}, [config_by_name('btk_none')], seeds=[0], jobs=1, trees=['h00'], niceness=7, "
            "settings=StudySettings(steps=20, eval_samples=2000), log=lambda s: None); print('nice', os.nice(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1] == str(min(19, os.nice(0) + 7))


def test_inspect_gives_each_latents_decoder_cosines_on_the_small_tree():
    from benchmarks.hierarchy_family.order_prototypes import decoder_cosines

    names, cos = decoder_cosines("btk_none", steps=30)
    assert names == ["t0", "t0.0", "t0.1", "t0.2", "t1", "t1.0", "t1.1", "t1.2", "s0", "s1", "s2"]
    assert cos.shape == (11, 11) and float(cos.abs().max()) <= 1 + 1e-5


def test_oracle_start_puts_the_true_features_first_parents_before_children():
    """start_at_truth: the first latents' decoder rows are the true unit directions (every parent
    before any of its children), encoder columns tied to them, biases zero; a short oracle run is
    measured like any other (its matched cosines start from the truth)."""
    from benchmarks.hierarchy_family.configs import config_by_name, trainer_kwargs
    from benchmarks.hierarchy_family.order_prototypes import run_oracle, start_at_truth
    from benchmarks.hierarchy_family.study import StudySettings, family
    from benchmarks.toy.config import VariantSpec
    from benchmarks.toy.train import make_trainer

    spec = family(24)["h03"]
    toy = spec.build()
    cfg = config_by_name("btk_every")
    trainer = make_trainer(VariantSpec(cfg.name, cfg.family), trainer_kwargs(cfg, spec, 0, 20))
    order = start_at_truth(trainer.ae, toy)
    f = toy.n_features
    assert sorted(order) == list(range(f))
    pos = {feat: i for i, feat in enumerate(order)}
    assert all(pos[p] < pos[c] for c, p in enumerate(toy.parent) if p >= 0)
    torch.testing.assert_close(trainer.ae.W_dec[:f], toy.unit_directions[order])
    torch.testing.assert_close(trainer.ae.W_enc[:, :f], toy.unit_directions[order].T)
    assert not trainer.ae.b_enc[:f].any() and not trainer.ae.b_dec.any()
    r = run_oracle("h03", "btk_none", settings=StudySettings(steps=300, eval_samples=4000))
    assert r["prototype"] == "oracle" and r["fvu"] < 0.2 and r["recovery"] > 0.9, r["recovery"]
