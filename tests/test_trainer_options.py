"""MatryoshkaBatchTopKTrainer's options against reference computations: per-level AuxK,
stop-gradient between levels, latents reordered by an EMA statistic, annealed k, the decoder
bias's start."""

from __future__ import annotations

import pytest
import torch

from matryoshka_plugin import MatryoshkaBatchTopKTrainer
from matryoshka_plugin.prefix_loss import detached_level_mse, level_residuals, prefix_mse
from matryoshka_plugin.prefixes import PrefixSampler
from matryoshka_plugin.sparse_latents import sparse_from_dense
from matryoshka_plugin.trainers.common import geometric_median
from matryoshka_plugin.trainers.matryoshka_batch_top_k import annealed_k

from helpers import brute_force


def _settings(**extra) -> dict:
    return dict(steps=30, activation_dim=16, dict_size=32, k=4, group_fractions=[0.125, 0.375, 0.5], seed=0,
                device="cpu", warmup_steps=2, threshold_start_step=3, dead_feature_threshold=10_000, **extra)


def _batch(i: int, b: int = 64, d: int = 16) -> torch.Tensor:
    return torch.randn(b, d, generator=torch.Generator().manual_seed(100 + i)) * 2 + 0.5


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, n, d = 12, 20, 8
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    dense = torch.randn(B, n, generator=g, dtype=torch.float64).relu() * (torch.rand(B, n, generator=g) < 0.3)
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    return x, dense, W, b, [3, 8, 20]


def _dense_detached(x, f, W, b, lam, ends):
    """Brute force: level g decodes stopgrad(level g-1) + its own latents, one dense matmul per level."""
    total, recon, start = x.new_zeros(()), b, 0
    for g, e in enumerate(ends):
        recon = (recon if g == 0 else recon.detach()) + f[:, start:e] @ W[start:e]
        total = total + lam[e] * (x - recon).pow(2).sum(-1).mean()
        start = e
    return total


@pytest.mark.parametrize("beta", [None, 0.5])
def test_detached_levels_match_brute_force(beta):
    x, dense, W, b, ends = _case()
    weights = PrefixSampler("groups", 20, group_sizes=[3, 5, 12], balance_beta=beta).expected()
    f = dense.clone().requires_grad_()
    W1, b1 = W.clone().requires_grad_(), b.clone().requires_grad_()
    lat = sparse_from_dense(f)
    out = detached_level_mse(x, lat, W1, b1, weights, ends)
    out.loss.backward()
    f2, W2, b2 = dense.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_()
    ref = _dense_detached(x, f2, W2, b2, weights.lam, ends)
    ref.backward()
    # the value is the ordinary Matryoshka loss; only the gradient is stopped
    assert torch.allclose(out.loss, brute_force(x, dense, W, b, weights), rtol=1e-12)
    assert torch.allclose(out.loss, ref, rtol=1e-12)
    assert torch.allclose(out.residual, x - dense @ W - b, atol=1e-12)
    active = dense > 0
    assert torch.allclose(f.grad[active], f2.grad[active], atol=1e-12)
    assert torch.allclose(W1.grad, W2.grad, atol=1e-12) and torch.allclose(b1.grad, b2.grad, atol=1e-12)
    # and it really is stopped: the undetached loss trains inner latents through outer levels
    f3 = dense.clone().requires_grad_()
    prefix_mse(x, sparse_from_dense(f3), W, b, weights, backend="torch").loss.backward()
    assert not torch.allclose(f3.grad[:, :3][active[:, :3]], f2.grad[:, :3][active[:, :3]])
    assert torch.allclose(f3.grad[:, 8:][active[:, 8:]], f2.grad[:, 8:][active[:, 8:]], atol=1e-12)  # the outermost level sees every term


def test_detached_levels_reject_weights_between_levels():
    x, dense, W, b, ends = _case()
    every = PrefixSampler("every", 20).expected()
    with pytest.raises(ValueError, match="level ends only"):
        detached_level_mse(x, sparse_from_dense(dense), W, b, every, ends)
    with pytest.raises(ValueError, match="level ends must increase"):
        level_residuals(x, sparse_from_dense(dense), W, b, [3, 3, 20])


def _dense_level_auxk(x, f, post_relu, dead, W, b, ends, top_k_aux):
    """Brute force of per-level AuxK: each level's dead latents fit that level's residual."""
    total, start = 0.0, 0
    for e in ends:
        mine = torch.zeros_like(dead)
        mine[start:e] = dead[start:e]
        n_dead = int(mine.sum())
        r = x - b - f[:, :e] @ W[:e]
        start = e
        if n_dead == 0:
            continue
        k_aux = min(top_k_aux, n_dead)
        acts = torch.zeros_like(post_relu)
        for row in range(x.shape[0]):  # top dead latents token by token
            cand = torch.where(mine, post_relu[row], torch.tensor(float("-inf")))
            top = cand.topk(k_aux).indices
            acts[row, top] = post_relu[row, top]
        l2 = (r - acts @ W).pow(2).sum(-1).mean()
        var = (r - r.mean(0)).pow(2).sum(-1).mean()
        total += min(n_dead / top_k_aux, 1.0) * float(l2 / var)
    return total


@pytest.mark.parametrize("detach", [False, True])
def test_per_level_auxk_matches_brute_force(detach):
    t = MatryoshkaBatchTopKTrainer(**_settings(matryoshka_aux_loss=True, detach_inner_levels=detach, top_k_aux=3))
    for s in range(4):
        t.update(s, _batch(s))
    x = _batch(50, b=6)
    # no latent fired for a long time: those silent on these 6 tokens count as dead
    t.num_tokens_since_fired.fill_(10_000)
    ae = t.ae
    with torch.no_grad():
        post_relu = torch.relu((x - ae.b_dec) @ ae.W_enc + ae.b_enc)
        f = ae.encode(x, use_threshold=False)
    fired = (f > 0).any(0)
    dead = (t.num_tokens_since_fired + x.shape[0] >= 10_000) & ~fired
    assert int(dead[:4].sum()) >= 1 and int(dead[4:].sum()) >= 2
    got = t.loss(x, logging=True).losses["auxk_loss"]
    want = _dense_level_auxk(x, f, post_relu, dead, ae.W_dec.detach(), ae.b_dec.detach(), [4, 16, 32], 3)
    assert got == pytest.approx(want, rel=1e-4)
    # differs from the ordinary AuxK (every dead latent fits the full SAE's residual)
    t.cfg.matryoshka_aux_loss = False
    assert t.loss(x, logging=True).losses["auxk_loss"] != pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize("by", ["frequency", "contribution"])
def test_reordering_is_a_relabelling_when_the_loss_ignores_order(by):
    """With prefix_mode="none" the loss does not depend on the order, so a reordered run must be the
    plain run with its latents permuted: weights, Adam moments, counters; and the EMA must be the
    statistic's EMA computed from the plain run's latents."""
    kw = dict(_settings(), prefix_mode="none", group_fractions=None, dead_feature_threshold=256)
    plain = MatryoshkaBatchTopKTrainer(**kw)
    moved = MatryoshkaBatchTopKTrainer(**kw, reorder_by=by, reorder_decay=0.8)
    ema = torch.zeros(32)
    plain._b_dec_initialised = moved._b_dec_initialised = True  # encode() below sees the b_dec update() uses
    for s in range(12):
        x = _batch(s)
        with torch.no_grad():
            f = plain.ae.encode(x, use_threshold=False)
            stat = (f > 0).float().mean(0) if by == "frequency" else (f * plain.ae.W_dec.norm(dim=1)).pow(2).mean(0)
        ema = 0.8 * ema + 0.2 * stat
        plain.update(s, x)
        moved.update(s, x)
        origin = moved.latent_origin
        assert torch.equal(origin, torch.argsort(ema, descending=True, stable=True)) or torch.allclose(
            ema[origin], ema.sort(descending=True).values)
        assert torch.allclose(moved.reorder_ema, ema[origin], atol=1e-6)
    assert not torch.equal(origin, torch.arange(32))
    p, m = plain.ae, moved.ae
    assert torch.allclose(m.W_enc, p.W_enc[:, origin], atol=1e-5)
    assert torch.allclose(m.W_dec, p.W_dec[origin], atol=1e-5)
    assert torch.allclose(m.b_enc, p.b_enc[origin], atol=1e-5)
    assert torch.allclose(m.b_dec, p.b_dec, atol=1e-5)
    for name, dim in (("W_enc", 1), ("W_dec", 0), ("b_enc", 0)):
        sp, sm = plain.optimizer.state[getattr(p, name)], moved.optimizer.state[getattr(m, name)]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sm[key], sp[key].index_select(dim, origin), atol=1e-6, rtol=1e-4), (name, key)
    assert torch.equal(moved.num_tokens_since_fired, plain.num_tokens_since_fired[origin])


def _upstream_k_schedule(steps: int, k: int, d: int, anneal: int) -> list[int]:
    """dictionary_learning head: after the update at step s, k <- int(d (1 - r) + k r), r = min(s, A) / A."""
    out, current = [], d
    for s in range(steps):
        out.append(current)  # the k step s trains with
        r = min(s, anneal) / anneal
        current = int(d * (1 - r) + k * r)
    return out


def test_k_anneal_follows_dictionary_learning_schedule():
    want = _upstream_k_schedule(30, 4, 16, 10)
    assert [annealed_k(s, 4, 16, 10) for s in range(30)] == want
    assert want[0] == 16 and want[1] == 16 and want[-1] == 4 and want[6] == int(16 - 0.5 * 12)
    t = MatryoshkaBatchTopKTrainer(**_settings(k_anneal_steps=10))
    used = []
    for s in range(14):
        t.update(s, _batch(s))
        used.append(int(t.ae.k))
        assert t.effective_l0 <= used[-1]
    assert used == want[:14]
    assert t.effective_l0 == pytest.approx(4, abs=0.5)


@pytest.mark.parametrize("init", ["geometric_median", "mean", "zeros"])
def test_b_dec_init_is_a_start_from_the_first_batch(init):
    """The first step with ``b_dec_init`` equals the first step of a trainer whose ``b_dec`` was set
    by hand (zeros, the batch mean, Weiszfeld's geometric median) and marked as started."""
    x = _batch(0)
    want = {"zeros": torch.zeros(16), "mean": x.mean(0), "geometric_median": geometric_median(x)}[init]
    if init == "geometric_median":  # Weiszfeld's fixed point: the unit vectors to the points sum to 0
        u = (x - want) / (x - want).norm(dim=1, keepdim=True)
        assert u.sum(0).norm() < 1e-3 * x.shape[0]
    got = MatryoshkaBatchTopKTrainer(**_settings(b_dec_init=init))
    ref = MatryoshkaBatchTopKTrainer(**_settings())
    with torch.no_grad():
        ref.ae.b_dec.copy_(want)
    ref._b_dec_initialised = True
    assert torch.equal(got.ae.W_enc, ref.ae.W_enc)
    for s in range(3):
        assert got.update(s, _batch(s)) == pytest.approx(ref.update(s, _batch(s)), rel=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(got.ae, name), getattr(ref.ae, name), atol=1e-5), name
    assert got.config["b_dec_init"] == init


@pytest.mark.parametrize("bad,match", [
    (dict(b_dec_init="median"), "b_dec_init must be one of"),
    (dict(matryoshka_aux_loss=True, prefix_mode="every"), "matryoshka_aux_loss needs prefix_mode='groups'"),
    (dict(detach_inner_levels=True, prefix_mode="pareto"), "detach_inner_levels needs prefix_mode='groups'"),
    (dict(reorder_by="size"), "reorder_by must be one of"),
    (dict(reorder_by="frequency", reorder_decay=1.0), "reorder_decay must lie in"),
    (dict(k_anneal_steps=30), r"k_anneal_steps must be an integer in \[0, steps=30\)"),
    (dict(k_anneal_steps=5, k=16), "k=16 must be smaller"),
])
def test_option_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        MatryoshkaBatchTopKTrainer(**{**_settings(), **bad})
