"""The random feature-hierarchy generator and its fixed family (issue 26, deliverable 1).

The realised statistics are checked against Monte-Carlo estimates from the built toy's own
samples: root firing rates, P(child | parent), exclusivity, children only with their parent,
firing magnitudes and their noise, the directions' overlaps and the true L0.
"""

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from matryoshka_plugin.toy import (
    Feature,
    HierarchyParams,
    HierarchySpec,
    ToyModel,
    family_table,
    hierarchy_family,
    random_hierarchy,
)
from matryoshka_plugin.toy.hierarchies import k_regime, spread_directions

ROOT = Path(__file__).resolve().parents[1]
N = 200_000

MIXED = HierarchyParams(
    n_trees=3, depth=2, branching=(2, 3), parent_prob=(0.1, 0.3), child_prob=(0.3, 0.6),
    exclusive_share=0.5, magnitude=(0.5, 2.0), firing_noise=0.1, n_singletons=3,
    singleton_prob=(0.05, 0.1), features_per_dim=1.0,
)


def _within(rate: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    """``rate`` is a binomial estimate of ``p`` from ``n`` trials (5 sigma, plus a float floor)."""
    return abs(rate - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-6) / max(n, 1)) + 1e-9


@pytest.fixture(scope="module")
def mixed():
    spec = random_hierarchy(MIXED, seed=3)
    toy = spec.build()
    feats, x = toy.sample(N, torch.Generator().manual_seed(11))
    return spec, toy, feats, x


def test_same_seed_same_tree_and_samples_other_seed_differs():
    a, b, c = (random_hierarchy(MIXED, seed=s) for s in (3, 3, 4))
    assert a.fingerprint == b.fingerprint and a.describe() == b.describe()
    fa, xa = a.build().sample(500, torch.Generator().manual_seed(0))
    fb, xb = b.build().sample(500, torch.Generator().manual_seed(0))
    assert torch.equal(fa, fb) and torch.equal(xa, xb)
    assert c.fingerprint != a.fingerprint
    fc, xc = c.build().sample(500, torch.Generator().manual_seed(0))
    assert fc.shape != fa.shape or not torch.equal(xc, xa)
    # building twice does not share state: the realised features are copied into each toy
    t1, t2 = a.build(), a.build()
    t1.features[0].prob = 0.99
    assert t2.features[0].prob != 0.99 and a.roots[0].prob != 0.99


def test_fingerprint_names_the_realised_tree_params_and_k():
    spec = random_hierarchy(MIXED, seed=3)
    roots = [Feature(r.prob, r.children, r.exclusive, r.magnitude, r.name) for r in spec.roots]
    same = HierarchySpec("x", spec.params, spec.seed, roots, spec.directions, spec.k)
    assert same.fingerprint == spec.fingerprint  # the name is not part of it
    roots[0] = Feature(roots[0].prob * 0.5, roots[0].children, roots[0].exclusive, roots[0].magnitude, roots[0].name)
    assert HierarchySpec("x", spec.params, spec.seed, roots, spec.directions, spec.k).fingerprint != spec.fingerprint
    other_k = HierarchySpec("x", spec.params, spec.seed, spec.roots, spec.directions, spec.k + 1)
    assert other_k.fingerprint != spec.fingerprint
    other = replace(MIXED, firing_noise=0.2)  # same tree draws, another parameter
    assert random_hierarchy(other, seed=3).fingerprint != spec.fingerprint
    assert re.fullmatch(r"[0-9a-f]{12}", spec.fingerprint)


def test_tree_follows_its_parameters(mixed):
    spec, toy, _, _ = mixed
    p = MIXED
    assert len(spec.roots) == p.n_trees + p.n_singletons
    assert max(spec.depths) == p.depth
    parents = spec.parents()
    assert any(f.exclusive for f in parents) and any(not f.exclusive for f in parents)
    for r in spec.roots[: p.n_trees]:
        assert p.parent_prob[0] <= r.prob <= p.parent_prob[1]
    for r in spec.roots[p.n_trees :]:
        assert not r.children and p.singleton_prob[0] <= r.prob <= p.singleton_prob[1]
    for f in parents:
        assert p.branching[0] <= len(f.children) <= p.branching[1]
        probs = [c.prob for c in f.children]
        if f.exclusive:
            assert sum(probs) <= p.max_exclusive_total + 1e-9 and max(probs) <= p.child_prob[1]
        else:
            assert all(p.child_prob[0] <= q <= p.child_prob[1] for q in probs)
    assert all(p.magnitude[0] <= f.magnitude <= p.magnitude[1] for f in toy.features)
    assert toy.n_features == spec.n_features and toy.d == spec.d


def test_firing_statistics_match_the_tree(mixed):
    spec, toy, feats, _ = mixed
    on = feats > 0
    for i, (f, parent) in enumerate(zip(toy.features, toy.parent)):
        if parent < 0:  # roots and singletons
            assert _within(float(on[:, i].float().mean()), f.prob, N), (f.name, float(on[:, i].float().mean()), f.prob)
        else:
            with_parent = on[:, parent]
            assert not torch.any(on[:, i] & ~with_parent), f"{f.name} fired without its parent"
            n_par = int(with_parent.sum())
            rate = float(on[with_parent, i].float().mean())
            assert _within(rate, f.prob, n_par), (f.name, rate, f.prob, n_par)
    for parent, children in toy.parent_child_groups():
        kids = on[:, children]
        if toy.features[parent].exclusive:
            assert int(kids.sum(1).max()) <= 1, f"exclusive children of {toy.features[parent].name} co-fired"
        else:  # independent given the parent: both fire at the product of their rates
            a, b = children[:2]
            n_par = int(on[:, parent].sum())
            both = float((kids[:, 0] & kids[:, 1])[on[:, parent]].float().mean())
            assert _within(both, toy.features[a].prob * toy.features[b].prob, n_par)
            assert both > 0


def test_magnitudes_and_their_noise(mixed):
    spec, toy, feats, x = mixed
    assert spec.max_cos < 1e-6  # orthonormal: projections read each feature's firing back
    gram = toy.unit_directions @ toy.unit_directions.T
    torch.testing.assert_close(gram, torch.eye(toy.n_features), atol=1e-5, rtol=0)
    coeff = x @ toy.unit_directions.T  # [N, F]: magnitude * (1 + noise) where firing
    for i, f in enumerate(toy.features):
        fired = coeff[feats[:, i] > 0, i] / f.magnitude
        assert float(fired.mean()) == pytest.approx(1.0, abs=0.01), f.name
        assert float(fired.std()) == pytest.approx(MIXED.firing_noise, rel=0.1), f.name
        assert torch.all(coeff[feats[:, i] == 0, i].abs() < 1e-4)
    quiet = random_hierarchy(replace(MIXED, firing_noise=0.0), seed=3).build()
    fq, _ = quiet.sample(1000, torch.Generator().manual_seed(0))
    assert set(fq.unique().tolist()) <= {0.0, 1.0}  # no noise: binary features as before


def test_true_l0_matches_monte_carlo(mixed):
    spec, toy, feats, _ = mixed
    # the analytic expectation: the sum over features of the product of probabilities on the path
    mc = float((feats > 0).float().sum(1).mean())
    var = float((feats > 0).float().sum(1).var())
    assert abs(mc - spec.true_l0) < 5 * math.sqrt(var / N)
    assert toy.expected_l0(n=50_000) == pytest.approx(spec.true_l0, rel=0.03)
    assert spec.k == max(1, round(MIXED.k_ratio * spec.true_l0))


def test_superposed_directions_are_bounded_and_mild():
    p = replace(MIXED, features_per_dim=1.4, max_cos=0.3)
    spec = random_hierarchy(p, seed=5)
    toy = spec.build()
    assert spec.n_features > spec.d == math.ceil(spec.n_features / 1.4)
    g = toy.unit_directions @ toy.unit_directions.T
    torch.testing.assert_close(torch.diagonal(g), torch.ones(spec.n_features), atol=1e-5, rtol=0)
    g.fill_diagonal_(0)
    assert 0.05 < float(g.abs().max()) <= 0.3  # superposed, but no pair overlaps more than asked
    assert float(g.abs().max()) == pytest.approx(spec.max_cos, abs=1e-5)
    # the directions keep their magnitudes in superposition too
    mags = torch.tensor([f.magnitude for f in toy.features])
    torch.testing.assert_close(toy.directions.norm(dim=1), mags, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Welch bound"):
        spread_directions(20, 4, 0.3, seed=0)


def test_k_regimes():
    assert k_regime(1, 2.0) == "below" and k_regime(2, 2.0) == "around" and k_regime(3, 2.0) == "above"
    below = random_hierarchy(replace(MIXED, k_ratio=0.5, n_singletons=8, singleton_prob=(0.2, 0.3)), seed=3)
    above = random_hierarchy(replace(MIXED, k_ratio=2.0), seed=3)
    assert below.k_regime == "below" and above.k_regime == "above"


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(parent_prob=(0.3, 0.02)), "parent_prob"),
        (dict(child_prob=(0.5, 1.5)), "child_prob"),
        (dict(exclusive_share=1.5), "exclusive_share"),
        (dict(branching=(0, 2)), "branching"),
        (dict(firing_noise=-0.1), "firing_noise"),
        (dict(n_trees=0, n_singletons=0), "some features"),
        (dict(max_cos=1.0), "max_cos"),
        (dict(k_ratio=0.0), "k_ratio"),
    ],
)
def test_params_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        HierarchyParams(**bad)


@pytest.fixture(scope="module")
def family():
    return hierarchy_family()


def test_family_is_fixed_and_distinct(family):
    assert len(family) >= 24
    again = hierarchy_family()
    assert [s.fingerprint for s in family] == [s.fingerprint for s in again]
    assert len({s.fingerprint for s in family}) == len(family)
    assert [s.name for s in family] == [f"h{i:02d}" for i in range(len(family))]
    assert [s.fingerprint for s in hierarchy_family(seed=1)] != [s.fingerprint for s in family]


def test_family_spans_the_ranges_the_issue_names(family):
    descs = [s.describe() for s in family]
    root_probs = [r.prob for s in family for r in s.roots if r.children]
    assert min(root_probs) <= 0.03 and max(root_probs) >= 0.25
    kinds = {(d["n_exclusive_parents"] == d["n_parents"], d["n_exclusive_parents"] == 0) for d in descs}
    assert (True, False) in kinds and (False, True) in kinds and (False, False) in kinds  # all, none, mixed
    regimes = [s.k_regime for s in family]
    assert all(regimes.count(r) >= 6 for r in ("below", "around", "above")), regimes
    assert {d["depth"] for d in descs} >= {1, 2, 3}
    assert any(s.n_features > s.d for s in family) and any(s.n_features <= s.d for s in family)
    assert all(s.max_cos <= 0.3 for s in family)
    assert sum(d["n_singletons"] > 0 for d in descs) >= len(descs) // 2
    assert {s.params.firing_noise > 0 for s in family} == {True, False}
    assert any(s.params.magnitude[1] > s.params.magnitude[0] for s in family)
    assert all(s.n_features <= 40 for s in family)  # quick to train on a CPU


def test_docs_table_is_the_generated_one(family):
    doc = (ROOT / "docs" / "toy" / "hierarchies.md").read_text()
    assert family_table(family) in doc, "docs/toy/hierarchies.md is stale: python -m matryoshka_plugin.toy.hierarchies"


def test_toy_model_options_keep_the_standard_trees():
    """``directions``/``firing_noise`` are off by default: the post's tree draws as before."""
    toy = ToyModel.post_tree()
    feats, _ = toy.sample(100, torch.Generator().manual_seed(0))
    assert set(feats.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="shape"):
        ToyModel([Feature(0.5)], d=3, directions=torch.ones(2, 3))
    with pytest.raises(ValueError, match="firing_noise"):
        ToyModel([Feature(0.5)], d=3, firing_noise=-1.0)
