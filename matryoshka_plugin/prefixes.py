"""Prefix weights: which nested prefixes of the latents a Matryoshka loss sums over.

Every Matryoshka variant is the loss ``sum_m lam[m] * mean_b ||x - xhat_m||^2`` where
``xhat_m`` decodes with latents ``0..m-1`` only (see ``prefix_loss``). They differ only in
the vector ``lam`` over prefix lengths ``m = 0..n``:

* fixed nested groups (Bussmann et al.): weight on each group's end index;
* every prefix (block size 1): uniform weight on ``m = 1..n``;
* random truncated-Pareto prefixes (Nabeshima): the full SAE plus distinct sampled lengths,
  either sampled each step or replaced by their exact expectation;
* the full SAE only (a plain, "vanilla" SAE);
* balance weighting (feature-hedging work): inner levels scaled by ``beta**depth``.

Convention: ``lam`` is normalised to sum to 1, so the reconstruction term is a weighted
*mean* of prefix MSEs and stays on the scale of one SAE's MSE whatever the number of
prefixes (this keeps auxiliary-loss and sparsity coefficients comparable across modes).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "PrefixWeights",
    "PrefixSampler",
    "group_sizes_from_fractions",
    "pareto_length_probabilities",
    "pareto_inclusion_probabilities",
    "PREFIX_MODES",
]

PREFIX_MODES = ("groups", "every", "pareto", "pareto_expected", "none")


class PrefixWeights:
    """Weights ``lam[m]`` on prefix lengths ``m = 0..n`` (normalised to sum to 1).

    Attributes:
        lam: float64 tensor ``[n + 1]``; ``lam[m]`` weighs the prefix of the first ``m`` latents.
        cum: float64 tensor ``[n + 2]``; ``cum[t] = sum_{m < t} lam[m]``, the quantity the
            sparse loss reads (``cum[n + 1] == 1``).
    """

    def __init__(self, lam: torch.Tensor):
        lam = torch.as_tensor(lam, dtype=torch.float64).flatten()
        if lam.numel() < 2:
            raise ValueError("prefix weights need at least one latent (lam has n + 1 >= 2 entries)")
        if not torch.isfinite(lam).all() or (lam < 0).any():
            raise ValueError("prefix weights must be finite and non-negative")
        total = float(lam.sum())
        if total <= 0:
            raise ValueError("prefix weights are all zero: no prefix would be trained")
        self.lam = lam / total
        self.cum = torch.cat([lam.new_zeros(1), torch.cumsum(self.lam, 0)])

    @property
    def n(self) -> int:
        """Number of latents."""
        return self.lam.numel() - 1

    @property
    def support(self) -> torch.Tensor:
        """Prefix lengths with non-zero weight, ascending."""
        return torch.nonzero(self.lam > 0).flatten()

    def tail(self) -> torch.Tensor:
        """``tail[i] = sum_{m > i} lam[m]``: the share of prefixes containing latent ``i``.

        A sparsity penalty summed over the same prefixes weighs latent ``i`` by this.
        """
        return (1.0 - self.cum[1 : self.n + 1]).clamp_min(0.0)

    def balanced(self, beta: float) -> "PrefixWeights":
        """Scale the support points by ``beta**depth`` (depth 0 = the longest prefix).

        ``beta = 1`` keeps the weights, ``beta = 0`` leaves only the longest prefix (a plain
        SAE); the feature-hedging work reports ``beta ~ 0.75`` as a good compromise.
        """
        if not (0.0 <= beta <= 1.0):
            raise ValueError(f"balance beta must lie in [0, 1], got {beta}")
        support = self.support
        depth = torch.arange(support.numel() - 1, -1, -1, dtype=torch.float64)
        lam = torch.zeros_like(self.lam)
        lam[support] = self.lam[support] * torch.pow(torch.tensor(beta, dtype=torch.float64), depth)
        return PrefixWeights(lam)

    def to(self, device: torch.device | str) -> "PrefixWeights":
        out = PrefixWeights.__new__(PrefixWeights)
        out.lam = self.lam.to(device)
        out.cum = self.cum.to(device)
        return out

    def __repr__(self) -> str:
        s = self.support.tolist()
        shown = s if len(s) <= 8 else s[:4] + ["..."] + s[-3:]
        return f"PrefixWeights(n={self.n}, support={shown})"

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def full_only(cls, n: int) -> "PrefixWeights":
        """Only the full SAE: a plain SAE loss."""
        lam = torch.zeros(n + 1, dtype=torch.float64)
        lam[n] = 1.0
        return cls(lam)

    @classmethod
    def fixed_groups(
        cls, group_sizes: Sequence[int], group_weights: Sequence[float] | None = None
    ) -> "PrefixWeights":
        """Nested groups: weight ``w_g`` on the end index of group ``g`` (relative weights)."""
        sizes = [int(s) for s in group_sizes]
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"every group needs at least one latent, got group sizes {sizes}")
        if group_weights is None:
            group_weights = [1.0] * len(sizes)
        if len(group_weights) != len(sizes):
            raise ValueError(
                f"{len(group_weights)} group weights for {len(sizes)} groups (sizes {sizes})"
            )
        if any((not math.isfinite(w)) or w < 0 for w in group_weights):
            raise ValueError(f"group weights must be finite and non-negative, got {list(group_weights)}")
        n = sum(sizes)
        lam = torch.zeros(n + 1, dtype=torch.float64)
        ends = np.cumsum(sizes)
        for end, w in zip(ends, group_weights):
            lam[int(end)] += float(w)
        return cls(lam)

    @classmethod
    def every_prefix(cls, n: int) -> "PrefixWeights":
        """Every prefix ``m = 1..n`` with equal weight (Matryoshka with block size 1)."""
        lam = torch.ones(n + 1, dtype=torch.float64)
        lam[0] = 0.0
        return cls(lam)

    @classmethod
    def pareto_expected(
        cls, n: int, n_prefixes: int = 10, power: float = 0.5, min_length: int = 1
    ) -> "PrefixWeights":
        """The exact expectation of the sampled random-prefix loss (no sampling noise).

        Each step the sampled loss averages the full SAE and ``n_prefixes - 1`` distinct
        lengths; its expectation puts ``P(length j is drawn) / n_prefixes`` on each ``j``.
        """
        n_draw, n_total = _pareto_counts(n, n_prefixes, min_length)
        lam = torch.zeros(n + 1, dtype=torch.float64)
        if n_draw > 0:
            pi = pareto_inclusion_probabilities(n, n_draw, power, min_length)
            lam[min_length:n] = torch.from_numpy(pi)
        lam[n] += 1.0
        return cls(lam / n_total)

    @classmethod
    def pareto_sample(
        cls,
        n: int,
        n_prefixes: int = 10,
        power: float = 0.5,
        min_length: int = 1,
        generator: torch.Generator | None = None,
    ) -> "PrefixWeights":
        """One step's random prefixes: the full SAE plus distinct truncated-Pareto lengths.

        Distinct lengths are drawn without replacement with probability proportional to the
        truncated Pareto law (as the reference ``np.random.choice(replace=False, p=...)``);
        drawn here with the equivalent Gumbel-top-k trick.
        """
        n_draw, _ = _pareto_counts(n, n_prefixes, min_length)
        lam = torch.zeros(n + 1, dtype=torch.float64)
        lam[n] = 1.0
        if n_draw > 0:
            p = torch.from_numpy(pareto_length_probabilities(n, power, min_length))
            u = torch.rand(p.shape, generator=generator, dtype=torch.float64)
            u = u.clamp_min(torch.finfo(torch.float64).tiny)
            keys = p.log() - torch.log(-torch.log(u))
            drawn = torch.topk(keys, n_draw).indices + min_length
            lam[drawn] = 1.0
        return cls(lam)


def group_sizes_from_fractions(dict_size: int, group_fractions: Sequence[float]) -> list[int]:
    """Group sizes as dictionary_learning computes them, with the errors it lacks.

    ``int(f * dict_size)`` for every group but the last, which takes the remainder.
    """
    fr = [float(f) for f in group_fractions]
    if not fr:
        raise ValueError("group_fractions is empty: give at least one group")
    if any((not math.isfinite(f)) or f <= 0 for f in fr):
        raise ValueError(f"group fractions must be positive, got {fr}")
    if not math.isclose(sum(fr), 1.0, rel_tol=1e-6, abs_tol=1e-9):
        raise ValueError(f"group fractions must sum to 1, got sum {sum(fr):.6g} for {fr}")
    sizes = [int(f * dict_size) for f in fr[:-1]]
    sizes.append(dict_size - sum(sizes))
    empty = [i for i, s in enumerate(sizes) if s <= 0]
    if empty:
        raise ValueError(
            f"group(s) {empty} would be empty with dict_size={dict_size} and fractions {fr} "
            f"(sizes {sizes}); use larger fractions or a larger dictionary"
        )
    return sizes


def _pareto_counts(n: int, n_prefixes: int, min_length: int) -> tuple[int, int]:
    if n < 1:
        raise ValueError(f"need at least one latent, got n={n}")
    if n_prefixes < 1:
        raise ValueError(f"n_prefixes must be >= 1 (the full SAE counts as one), got {n_prefixes}")
    if not (1 <= min_length <= n):
        raise ValueError(f"min_prefix_length must lie in [1, n={n}], got {min_length}")
    n_draw = min(n_prefixes - 1, n - min_length)
    return n_draw, n_draw + 1


def pareto_length_probabilities(n: int, power: float = 0.5, min_length: int = 1) -> np.ndarray:
    """Truncated Pareto law over lengths ``min_length..n-1``: ``P(L <= j) = ((j-m0+1)/(n-m0))**power``.

    With ``power = 0.5`` the density falls as ``j**-0.5``; the median length is about ``n/4``.
    """
    if not power > 0:
        raise ValueError(f"pareto power must be positive, got {power}")
    count = n - min_length
    if count <= 0:
        return np.zeros(0)
    u = np.arange(count + 1, dtype=np.float64) / count
    return np.diff(u**power)


@lru_cache(maxsize=32)
def _inclusion_cached(n: int, n_draw: int, power: float, min_length: int, nodes: int) -> np.ndarray:
    p = pareto_length_probabilities(n, power, min_length)
    return _successive_sampling_inclusion(p, n_draw, nodes)


def pareto_inclusion_probabilities(
    n: int, n_draw: int, power: float = 0.5, min_length: int = 1, nodes: int = 128
) -> np.ndarray:
    """``P(length j is among n_draw distinct draws)`` for ``j = min_length..n-1``.

    Exact up to quadrature error (about 1e-12 with the default nodes; the tests compare it
    with full enumeration and check ``sum == n_draw``).
    """
    return _inclusion_cached(int(n), int(n_draw), float(power), int(min_length), int(nodes)).copy()


def _poly_mul(a: np.ndarray, b: np.ndarray, deg_a: int, deg_b: int) -> np.ndarray:
    """Product of polynomials (coefficients on the last axis, degrees at most ``deg_a`` and
    ``deg_b``), truncated to ``a``'s number of terms."""
    s = a.shape[-1]
    out = np.zeros(np.broadcast_shapes(a.shape, b.shape))
    for i in range(min(s, deg_a + 1)):
        top = min(s - i, deg_b + 1)
        out[..., i : i + top] += a[..., i : i + 1] * b[..., :top]
    return out


def _successive_sampling_inclusion(p: np.ndarray, s: int, nodes: int) -> np.ndarray:
    """Inclusion probabilities of sampling ``s`` items without replacement, prob. ∝ ``p``.

    Successive sampling equals ranking independent exponential clocks ``E_i / p_i``, so
    ``pi_j = ∫ p_j e^{-p_j t} P(fewer than s other clocks rang by t) dt``. The count of
    other clocks is Poisson-binomial. Its distribution over all items (truncated to ``s``
    terms) comes from a product tree; leaving item ``j`` out is a polynomial division, which
    is stable while ``q_j <= 1/2`` and otherwise replaced by the tree's down-sweep (the
    product over everything outside each node). Gauss-Legendre on geometric panels
    integrates over ``[0, T]``, where ``T`` leaves less than 1e-15 of the mass.
    """
    p = np.asarray(p, dtype=np.float64)
    n_items = p.size
    if s >= np.count_nonzero(p):
        return (p > 0).astype(np.float64)
    if s <= 0:
        return np.zeros(n_items)
    size = 1 << max(0, math.ceil(math.log2(n_items)))
    p_pad = np.zeros(size)
    p_pad[:n_items] = p

    def up_sweep(q: np.ndarray, terms: int) -> list[tuple[np.ndarray, int]]:
        leaves = np.zeros(q.shape + (terms,))
        leaves[..., 0] = 1.0 - q
        if terms > 1:
            leaves[..., 1] = q
        levels = [(leaves, 1)]
        while levels[-1][0].shape[1] > 1:
            cur, deg = levels[-1]
            levels.append((_poly_mul(cur[:, 0::2], cur[:, 1::2], deg, deg), 2 * deg))
        return levels

    def clocks(t: np.ndarray) -> np.ndarray:
        return -np.expm1(-np.outer(t, p_pad))  # P(clock i rang by t)

    t_max = 1.0
    while up_sweep(clocks(np.array([t_max])), s + 1)[-1][0][0, 0].sum() >= 1e-15 and t_max < 1e12:
        t_max *= 2.0
    panels = max(2, nodes // 8)
    gl_x, gl_w = np.polynomial.legendre.leggauss(8)
    edges = np.concatenate([[0.0], np.geomspace(min(0.25, t_max / 4), t_max, panels)])
    half, mid = np.diff(edges) / 2, (edges[:-1] + edges[1:]) / 2
    ts = (mid[:, None] + half[:, None] * gl_x[None, :]).ravel()
    ws = (half[:, None] * gl_w[None, :]).ravel()

    pi = np.zeros(size)
    chunk = max(1, int(4e6 // (size * s)))
    for start in range(0, ts.size, chunk):
        t, w = ts[start : start + chunk], ws[start : start + chunk]
        q = clocks(t)
        levels = up_sweep(q, s)
        if (q > 0.5).any():
            outside = np.zeros((t.size, 1, s))
            outside[..., 0] = 1.0
            deg_out = 0
            for level, deg in reversed(levels[:-1]):
                nxt = np.empty_like(level)
                nxt[:, 0::2] = _poly_mul(outside, level[:, 1::2], deg_out, deg)
                nxt[:, 1::2] = _poly_mul(outside, level[:, 0::2], deg_out, deg)
                outside, deg_out = nxt, deg_out + deg
            fewer = outside.sum(-1)
        else:
            root = levels[-1][0][:, 0, :]  # [nodes, s]
            inv = 1.0 / (1.0 - q)
            coef = root[:, None, 0] * inv
            fewer = coef.copy()
            for k in range(1, s):
                coef = (root[:, None, k] - q * coef) * inv
                fewer += coef
        pi += (w[:, None] * p_pad[None, :] * np.exp(-np.outer(t, p_pad)) * fewer).sum(0)
    return np.clip(pi[:n_items], 0.0, 1.0)


class PrefixSampler:
    """The prefix weights a trainer uses at each step, for one of :data:`PREFIX_MODES`.

    * ``"groups"``: fixed nested groups (weights ``group_weights``, optional balance ``beta``);
    * ``"every"``: every prefix ``1..n`` (block size 1), exactly;
    * ``"pareto"``: the full SAE plus ``n_prefixes - 1`` distinct truncated-Pareto lengths,
      resampled every step;
    * ``"pareto_expected"``: the exact expectation of ``"pareto"`` (no sampling noise);
    * ``"none"``: the full SAE only (a plain SAE).
    """

    def __init__(
        self,
        mode: str,
        n: int,
        group_sizes: Sequence[int] | None = None,
        group_weights: Sequence[float] | None = None,
        balance_beta: float | None = None,
        n_prefixes: int = 10,
        pareto_power: float = 0.5,
        min_prefix_length: int = 1,
    ):
        if mode not in PREFIX_MODES:
            raise ValueError(f"unknown prefix mode {mode!r}; choose one of {PREFIX_MODES}")
        if balance_beta is not None and mode != "groups":
            raise ValueError(f"balance_beta applies to prefix_mode='groups' (levels), not {mode!r}")
        if group_weights is not None and mode != "groups":
            raise ValueError(f"group_weights apply to prefix_mode='groups', not {mode!r}")
        self.mode, self.n = mode, n
        self.n_prefixes, self.pareto_power, self.min_prefix_length = n_prefixes, pareto_power, min_prefix_length
        self._fixed: PrefixWeights | None = None
        if mode == "groups":
            if group_sizes is None:
                raise ValueError("prefix_mode='groups' needs group sizes (group_fractions)")
            w = PrefixWeights.fixed_groups(group_sizes, group_weights)
            if w.n != n:
                raise ValueError(f"group sizes {list(group_sizes)} sum to {w.n}, not dict_size={n}")
            self._fixed = w.balanced(balance_beta) if balance_beta is not None else w
        elif mode == "every":
            self._fixed = PrefixWeights.every_prefix(n)
        elif mode == "none":
            self._fixed = PrefixWeights.full_only(n)
        else:
            _pareto_counts(n, n_prefixes, min_prefix_length)  # validate now, not mid-training
            pareto_length_probabilities(n, pareto_power, min_prefix_length)
        self._expected: PrefixWeights | None = self._fixed

    @property
    def random(self) -> bool:
        return self.mode == "pareto"

    def sample(self, generator: torch.Generator | None = None) -> PrefixWeights:
        """This step's weights (fresh random prefixes in ``"pareto"`` mode)."""
        if self.mode == "pareto":
            return PrefixWeights.pareto_sample(
                self.n, self.n_prefixes, self.pareto_power, self.min_prefix_length, generator
            )
        return self.expected()

    def expected(self) -> PrefixWeights:
        """The expected weights (equal to :meth:`sample` for the deterministic modes)."""
        if self._expected is None:
            self._expected = PrefixWeights.pareto_expected(
                self.n, self.n_prefixes, self.pareto_power, self.min_prefix_length
            )
        return self._expected
