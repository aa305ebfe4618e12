"""matryoshka_plugin.analysis against direct computations on small, constructed SAEs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import linear_sae
from dictionary_learning.dictionary import AutoEncoder
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE

from matryoshka_plugin.analysis import (
    cofiring_edges,
    mean_max_correlation,
    nested_widths,
    prefix_fvu,
)
from matryoshka_plugin.sae import MatryoshkaBatchTopKSAE


def _sae(d: int, n: int, seed: int, threshold: float = 0.3, groups=None, dead=()) -> MatryoshkaBatchTopKSAE:
    """A random Matryoshka BatchTopK SAE with a fixed inference threshold (per-token encoding)."""
    torch.manual_seed(seed)
    sae = MatryoshkaBatchTopKSAE(d, n, k=4, group_sizes=groups or [n])
    with torch.no_grad():
        sae.threshold.fill_(threshold)
        sae.b_enc.normal_(0, 0.1)
        for i in dead:
            sae.b_enc[i] = -1e3  # never fires
    return sae


def _acts(n: int = 600, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _brute_force(ref, other, x):
    """Max correlation per reference latent from torch.corrcoef on all tokens at once."""
    with torch.no_grad():
        a, b = ref.encode(x).double(), other.encode(x).double()
    corr = torch.corrcoef(torch.cat([a, b], 1).T)[: a.shape[1], a.shape[1]:]
    corr = torch.where(torch.isnan(corr), torch.full_like(corr, -math.inf), corr)
    best, idx = corr.max(1)
    dead_ref = a.std(0) == 0
    best = torch.where(dead_ref | torch.isinf(best), torch.full_like(best, math.nan), best)
    idx = torch.where(torch.isnan(best), torch.full_like(idx, -1), idx)
    return best, idx, int(dead_ref.sum()), int((b.std(0) == 0).sum())


def test_mean_max_correlation_matches_corrcoef_with_dead_latents():
    x = _acts()
    ref = _sae(8, 12, 1, dead=(3, 7))
    other = _sae(8, 20, 2, dead=(0, 5, 19))
    got = mean_max_correlation(ref, other, x, batch_size=128)
    best, idx, dead_ref, dead_other = _brute_force(ref, other, x)
    assert torch.allclose(got.max_corr, best, atol=1e-10, equal_nan=True)
    assert torch.equal(got.argmax, idx)
    assert (got.n_dead_reference, got.n_dead_other, got.n_tokens) == (2, 3, 600) == (dead_ref, dead_other, 600)
    assert torch.isnan(got.max_corr[[3, 7]]).all() and (got.argmax[[3, 7]] == -1).all()
    assert not set(got.argmax.tolist()) & {0, 5, 19}
    assert got.mean == pytest.approx(float(best[~torch.isnan(best)].mean()), abs=1e-12)


def test_mean_max_correlation_other_sae_classes():
    """Any SAE with encode: dictionary_learning's BatchTopK SAE against its ReLU AutoEncoder."""
    torch.manual_seed(0)
    ref, other = BatchTopKSAE(8, 10, k=3), AutoEncoder(8, 16)
    with torch.no_grad():
        ref.threshold.fill_(0.2)
    x = _acts()
    got = mean_max_correlation(ref, other, x, batch_size=100)
    best, idx, _, _ = _brute_force(ref, other, x)
    assert torch.allclose(got.max_corr, best, atol=1e-10, equal_nan=True)
    assert torch.equal(got.argmax, idx)


def test_permuted_copy_scores_exactly_one():
    x = _acts(800)
    ref = _sae(8, 16, 3)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    copy = MatryoshkaBatchTopKSAE(8, 16, k=4, group_sizes=[16])
    with torch.no_grad():
        copy.W_enc.copy_(ref.W_enc[:, perm])
        copy.b_enc.copy_(ref.b_enc[perm])
        copy.W_dec.copy_(ref.W_dec[perm])
        copy.b_dec.copy_(ref.b_dec)
        copy.threshold.copy_(ref.threshold)
    got = mean_max_correlation(ref, copy, x, batch_size=96)
    assert got.n_dead_reference == 0
    assert abs(got.mean - 1.0) < 1e-12
    assert torch.equal(got.argmax, perm.argsort())


def test_streaming_and_chunking_match_one_shot():
    x = _acts(700)
    ref, other = _sae(8, 12, 4, dead=(2,)), _sae(8, 24, 5, dead=(6,))
    one = mean_max_correlation(ref, other, x, batch_size=len(x), chunk=None)
    uneven = [x[:50], x[50:51], x[51:400], x[400:]]
    for got in (
        mean_max_correlation(ref, other, iter(uneven), chunk=None),  # one-shot stream, one pass
        mean_max_correlation(ref, other, uneven, chunk=5),  # 5 passes over a list
        mean_max_correlation(ref, other, x, batch_size=64, chunk=7),
    ):
        assert torch.allclose(got.max_corr, one.max_corr, atol=1e-12, equal_nan=True)
        assert torch.equal(got.argmax, one.argmax)
        assert (got.n_dead_reference, got.n_dead_other, got.n_tokens) == (1, 1, 700)


def test_mean_max_correlation_bad_input():
    ref, other = _sae(8, 6, 0), _sae(8, 12, 1)
    x = _acts(100)
    with pytest.raises(ValueError, match="one-shot iterator"):
        mean_max_correlation(ref, other, iter([x]), chunk=4)
    with pytest.raises(ValueError, match="no tokens"):
        mean_max_correlation(ref, other, [])
    with pytest.raises(ValueError, match=r"\[tokens, d\]"):
        mean_max_correlation(ref, other, x[None])


@torch.no_grad()
def test_prefix_fvu_matches_direct_computation():
    x = _acts(500) * 2 + 1
    sae = _sae(8, 24, 6, threshold=0.1, groups=[4, 8, 12])
    assert nested_widths(sae) == [4, 12, 24]
    got = prefix_fvu(sae, x, batch_size=77)
    f = sae.encode(x).double()
    W, b, xd = sae.W_dec.detach().double(), sae.b_dec.detach().double(), x.double()
    total = ((xd - xd.mean(0)) ** 2).sum()
    for i, m in enumerate([4, 12, 24]):
        direct = float(((xd - (f[:, :m] @ W[:m] + b)) ** 2).sum() / total)
        assert float(got.fvu[i]) == pytest.approx(float(direct), rel=1e-6)
        assert float(got.l0[i]) == pytest.approx(float((f[:, :m] != 0).sum(1).double().mean()), rel=1e-12)
    custom = prefix_fvu(sae, [x[:100], x[100:]], widths=[0, 24])
    assert custom.widths == [0, 24] and float(custom.fvu[0]) == pytest.approx(float(((xd - b) ** 2).sum() / total))
    with pytest.raises(ValueError, match="outside"):
        prefix_fvu(sae, x, widths=[30])


def test_cofiring_edges_known_answers():
    e = torch.eye(4)
    # Token types and counts: A = e0+e1 (30), B = e0 (20), E = e1 (10), C = e2+e3 (15), D = e2 (5).
    x = torch.cat([(e[0] + e[1]).expand(30, 4), e[0].expand(20, 4), e[1].expand(10, 4),
                   (e[2] + e[3]).expand(15, 4), e[2].expand(5, 4)])
    parent = linear_sae([[1, 0, 0, 0], [0, 0, 1, 0]], [[1, 0, 0, 0], [0, 0, 1, 0]])
    s = 1 / math.sqrt(2)
    # child 0 reads e1 (fires on A, E), child 1 reads e3 (C), child 2 reads e0 (A, B), child 3 never fires.
    child = linear_sae([[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0], [-1, -1, -1, -1]],
                        [[s, s, 0, 0], [0, 0, -s, s], [1, 0, 0, 0], [0, 0, 0, 1]])
    got = cofiring_edges(parent, child, [x[:33], x[33:]], top=2)
    edges = {(int(c), int(p)): (float(q), float(cos)) for c, p, q, cos in
             zip(got.child, got.parent, got.p_parent_given_child, got.decoder_cosine)}
    assert edges.keys() == {(0, 0), (1, 1), (2, 0)}
    assert edges[(0, 0)] == pytest.approx((0.75, s))
    assert edges[(1, 1)] == pytest.approx((1.0, -s))
    assert edges[(2, 0)] == pytest.approx((1.0, 1.0))
    assert got.child_fires.tolist() == [40, 15, 50, 0] and got.parent_fires.tolist() == [50, 20]
    assert got.n_tokens == 80
    # min_p drops the weaker edge; order within a child is best first.
    assert cofiring_edges(parent, child, x, min_p=0.8).child.tolist() == [1, 2]
