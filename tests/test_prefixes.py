"""Prefix weights against exhaustive enumeration, the reference sampler and upstream sizing."""

import itertools

import numpy as np
import pytest
import torch

from matryoshka_plugin.prefixes import (
    PrefixSampler,
    PrefixWeights,
    group_sizes_from_fractions,
    pareto_inclusion_probabilities,
    pareto_length_probabilities,
)


def enumerate_inclusion(p: np.ndarray, s: int) -> np.ndarray:
    """Inclusion probabilities of successive sampling by summing over every ordered draw."""
    pi = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), s):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        pi[list(seq)] += prob
    return pi


@pytest.mark.parametrize("n,s", [(5, 1), (8, 3), (9, 4), (7, 5), (9, 7)])
def test_inclusion_probabilities_match_enumeration(n, s):
    exact = enumerate_inclusion(pareto_length_probabilities(n), s)
    ours = pareto_inclusion_probabilities(n, s)
    np.testing.assert_allclose(ours, exact, atol=1e-12)


@pytest.mark.parametrize("n", [20, 300, 4096])
def test_inclusion_probabilities_sum_to_draws(n):
    pi = pareto_inclusion_probabilities(n, 9)
    assert pi.sum() == pytest.approx(9.0, abs=1e-9)
    assert np.all(np.diff(pi) <= 1e-15)  # shorter prefixes are likelier


def test_pareto_law_matches_reference_formula():
    # P(L <= j) = sqrt(j / (n - 1)) over lengths 1..n-1, as in the post's reference code.
    n = 50
    p = pareto_length_probabilities(n)
    cdf = np.cumsum(p)
    np.testing.assert_allclose(cdf, np.sqrt(np.arange(1, n) / (n - 1)), atol=1e-14)


def test_sampler_matches_numpy_choice_without_replacement():
    """Our Gumbel-top-k draw has the distribution of np.random.choice(replace=False, p=...)."""
    n, draws, trials = 12, 4, 10_000
    p = pareto_length_probabilities(n)
    rng = np.random.default_rng(0)
    ref = np.zeros(n - 1)
    for _ in range(trials):
        ref[rng.choice(n - 1, size=draws, replace=False, p=p)] += 1
    gen = torch.Generator().manual_seed(0)
    ours = np.zeros(n + 1)
    for _ in range(trials):
        w = PrefixWeights.pareto_sample(n, n_prefixes=draws + 1, generator=gen)
        ours += (w.lam > 0).numpy()
    assert ours[n] == trials  # the full SAE is always included
    assert ours[0] == 0
    exact = pareto_inclusion_probabilities(n, draws)
    tol = 4 * np.sqrt(exact * (1 - exact) / trials) + 1e-3
    np.testing.assert_array_less(np.abs(ours[1:n] / trials - exact), tol)
    np.testing.assert_array_less(np.abs(ref / trials - exact), tol)


def test_pareto_expected_is_mean_of_samples():
    n = 16
    expected = PrefixWeights.pareto_expected(n, 10)
    gen = torch.Generator().manual_seed(1)
    mean = sum(PrefixWeights.pareto_sample(n, 10, generator=gen).lam for _ in range(5_000)) / 5_000
    np.testing.assert_allclose(mean.numpy(), expected.lam.numpy(), atol=1.2e-2)
    assert expected.lam.sum() == pytest.approx(1.0)


def test_fixed_groups_and_balance():
    w = PrefixWeights.fixed_groups([2, 3, 5], [1.0, 1.0, 2.0])
    assert w.support.tolist() == [2, 5, 10]
    np.testing.assert_allclose(w.lam[[2, 5, 10]].numpy(), [0.25, 0.25, 0.5])
    b = PrefixWeights.fixed_groups([2, 3, 5]).balanced(0.5)
    # beta^2, beta, 1 for the innermost, middle and full level
    np.testing.assert_allclose(b.lam[[2, 5, 10]].numpy(), np.array([0.25, 0.5, 1.0]) / 1.75)
    assert PrefixWeights.fixed_groups([2, 3, 5]).balanced(0.0).support.tolist() == [10]
    # tail[i]: share of prefixes containing latent i
    np.testing.assert_allclose(w.tail().numpy(), [1, 1, 0.75, 0.75, 0.75, 0.5, 0.5, 0.5, 0.5, 0.5])


def test_every_prefix_is_uniform():
    w = PrefixWeights.every_prefix(7)
    assert w.lam[0] == 0
    np.testing.assert_allclose(w.lam[1:].numpy(), np.full(7, 1 / 7))


def test_group_sizes_match_dictionary_learning():
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer as Upstream

    fr = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32]
    up = Upstream(steps=10, activation_dim=8, dict_size=1000, k=4, layer=0, lm_name="x",
                  group_fractions=fr, warmup_steps=1, device="cpu")
    assert group_sizes_from_fractions(1000, fr) == up.group_sizes


@pytest.mark.parametrize(
    "fractions,match",
    [([0.5, 0.4], "sum to 1"), ([0.004, 0.996], "empty"), ([], "empty"), ([1.2, -0.2], "positive")],
)
def test_bad_group_fractions(fractions, match):
    with pytest.raises(ValueError, match=match):
        group_sizes_from_fractions(100, fractions)


def test_sampler_rejects_bad_modes():
    with pytest.raises(ValueError, match="unknown prefix mode"):
        PrefixSampler("sometimes", 10)
    with pytest.raises(ValueError, match="balance_beta"):
        PrefixSampler("every", 10, balance_beta=0.5)
    with pytest.raises(ValueError, match="group sizes"):
        PrefixSampler("groups", 10)
    with pytest.raises(ValueError, match="n_prefixes"):
        PrefixSampler("pareto", 10, n_prefixes=0)
