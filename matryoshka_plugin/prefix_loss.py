"""The one Matryoshka reconstruction loss: ``sum_m lam[m] * mean_b ||x - xhat_m||^2``.

For one token whose active latents, sorted by index, are ``p_1 < ... < p_K`` (``p_0 = -1``,
``p_{K+1} = n``), the prefix reconstruction only changes at active indices, so with
residuals ``r_j = x - b - sum_{l <= j} a_{p_l} w_{p_l}`` and ``cum[t] = sum_{m < t} lam[m]``:

    sum_m lam[m] ||x - xhat_m||^2 = sum_{j=0..K} c_j ||r_j||^2,
    c_j = cum[p_{j+1} + 1] - cum[p_j + 1].

With suffix sums ``G_l = sum_{j >= l} c_j r_j`` the gradients are ``db = -2 G_0``,
``da_{p_l} = -2 <w_{p_l}, G_l>`` and ``dw_{p_l} = -2 a_{p_l} G_l``. The cost is O(B K d) —
a sparse decode — for *any* prefix weights (fixed groups, every prefix, the Pareto
expectation, balance weights): no decoder pass per prefix. Zero-valued padding slots
leave the loss unchanged, so tokens with different numbers of active latents share one
padded ``[B, K]`` layout.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .prefixes import PrefixWeights

__all__ = [
    "SparseLatents",
    "PrefixLoss",
    "prefix_mse",
    "sparse_from_dense",
    "sparse_from_flat",
    "sparse_decode",
]

# Elements of one [rows, K, d] working tensor; bounds memory to a few of these at a time.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


class SparseLatents(NamedTuple):
    """Active latents of a batch in a padded, index-sorted layout."""

    values: torch.Tensor
    """``[B, K]`` activations; zero in padding slots. Carries the encoder's autograd graph."""
    indices: torch.Tensor
    """``[B, K]`` int64 latent indices, ascending along each row. Padding repeats the row's last
    index with value 0, so densify with ``scatter_add`` (never ``scatter``)."""
    n_latents: int
    """Dictionary size ``n``; indices lie in ``[0, n)``."""


class PrefixLoss(NamedTuple):
    """Result of :func:`prefix_mse`."""

    loss: torch.Tensor
    """Scalar ``sum_m lam[m] * mean_b ||x - xhat_m||^2`` (differentiable)."""
    residual: torch.Tensor
    """``[B, d]`` residual of the full SAE, ``x - xhat_n`` (detached)."""


def sparse_from_flat(
    flat_index: torch.Tensor, values: torch.Tensor, batch: int, n_latents: int
) -> SparseLatents:
    """Build :class:`SparseLatents` from entries of a flattened ``[B, n]`` matrix.

    ``flat_index`` (any order) indexes ``row * n + latent``; ``values`` align with it.
    """
    order = torch.argsort(flat_index)
    flat_index = flat_index[order]
    values = values[order]
    rows = torch.div(flat_index, n_latents, rounding_mode="floor")
    cols = flat_index - rows * n_latents
    counts = torch.bincount(rows, minlength=batch)
    k_max = int(counts.max()) if counts.numel() else 0
    k_max = max(k_max, 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    out_idx = torch.full((batch, k_max), -1, dtype=torch.long, device=rows.device)
    out_idx[rows, pos] = cols
    # Padding repeats the row's last index (or 0 for an empty row) so rows stay sorted.
    filled = torch.arange(k_max, device=rows.device)[None, :] < counts[:, None]
    last = torch.where(counts > 0, out_idx.gather(1, (counts - 1).clamp_min(0)[:, None])[:, 0], 0)
    out_idx = torch.where(filled, out_idx, last[:, None])
    out_val = values.new_zeros((batch, k_max)).index_put((rows, pos), values)
    return SparseLatents(out_val, out_idx, n_latents)


def sparse_from_dense(f: torch.Tensor) -> SparseLatents:
    """Non-zero entries of dense latents ``f [B, n]`` (gradients flow back into ``f``)."""
    batch, n = f.shape
    rows, cols = torch.nonzero(f.detach(), as_tuple=True)
    return sparse_from_flat(rows * n + cols, f[rows, cols], batch, n)


def sparse_decode(latents: SparseLatents, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``sum_l values[:, l] * W_dec[indices[:, l]] + b_dec`` without a dense ``[B, n]`` matmul."""
    out = torch.nn.functional.embedding_bag(
        latents.indices, W_dec, per_sample_weights=latents.values.to(W_dec.dtype), mode="sum"
    )
    return out + b_dec


def _chunk_rows(k: int, d: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, (k + 1) * d))


def _segment_weights(indices: torch.Tensor, cum: torch.Tensor, n: int) -> torch.Tensor:
    """``c_j = cum[p_{j+1} + 1] - cum[p_j + 1]`` for ``j = 0..K`` (``[rows, K + 1]``)."""
    rows = indices.shape[0]
    lo = torch.cat([indices.new_full((rows, 1), -1), indices], 1) + 1
    hi = torch.cat([indices, indices.new_full((rows, 1), n)], 1) + 1
    return cum[hi] - cum[lo]


def _residuals(x, b_dec, values, indices, W_dec):
    """``[rows, K + 1, d]`` residuals ``r_0..r_K`` and the gathered decoder rows."""
    rows_w = W_dec[indices]  # [rows, K, d]
    contrib = values.unsqueeze(-1) * rows_w
    r0 = (x - b_dec).unsqueeze(1)
    res = torch.cat([r0, r0 - torch.cumsum(contrib, 1)], 1)
    return res, rows_w


class _PrefixMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, values, indices, W_dec, cum, n, chunk_elements):
        batch, d = x.shape
        k = indices.shape[1]
        step = _chunk_rows(k, d, chunk_elements)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        residual = torch.empty_like(x)
        for s in range(0, batch, step):
            e = min(batch, s + step)
            res, _ = _residuals(x[s:e], b_dec, values[s:e], indices[s:e], W_dec)
            c = _segment_weights(indices[s:e], cum, n).to(res.dtype)
            total += (c * res.pow(2).sum(-1)).sum().double()
            residual[s:e] = res[:, -1]
        ctx.save_for_backward(x, b_dec, values, indices, W_dec, cum)
        ctx.n, ctx.chunk_elements = n, chunk_elements
        ctx.mark_non_differentiable(residual)
        return (total / batch).to(x.dtype), residual

    @staticmethod
    def backward(ctx, grad_loss, _grad_residual):
        x, b_dec, values, indices, W_dec, cum = ctx.saved_tensors
        batch, d = x.shape
        k = indices.shape[1]
        need_x, need_b, need_v, _, need_w = ctx.needs_input_grad[:5]
        scale = (-2.0 / batch) * grad_loss
        g_x = torch.zeros_like(x) if need_x else None
        g_b = torch.zeros_like(b_dec) if need_b else None
        g_v = torch.zeros_like(values) if need_v else None
        g_w = torch.zeros_like(W_dec) if need_w else None
        step = _chunk_rows(k, d, ctx.chunk_elements)
        for s in range(0, batch, step):
            e = min(batch, s + step)
            res, rows_w = _residuals(x[s:e], b_dec, values[s:e], indices[s:e], W_dec)
            c = _segment_weights(indices[s:e], cum, ctx.n).to(res.dtype)
            # Suffix sums G_l = sum_{j >= l} c_j r_j, as a reversed cumulative sum.
            suffix = torch.flip(torch.cumsum(torch.flip(c.unsqueeze(-1) * res, [1]), 1), [1])
            if need_x:
                g_x[s:e] = -scale * suffix[:, 0]
            if need_b:
                g_b += scale * suffix[:, 0].sum(0)
            if need_v:
                g_v[s:e] = scale * (rows_w * suffix[:, 1:]).sum(-1)
            if need_w:
                upd = (scale * values[s:e]).unsqueeze(-1) * suffix[:, 1:]
                g_w.index_add_(0, indices[s:e].reshape(-1), upd.reshape(-1, d))
        return g_x, g_b, g_v, None, g_w, None, None, None


def prefix_mse(
    x: torch.Tensor,
    latents: SparseLatents,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    weights: PrefixWeights,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> PrefixLoss:
    """Matryoshka reconstruction loss over the prefixes ``weights`` describes.

    Args:
        x: ``[B, d]`` targets.
        latents: active latents (``values`` differentiable), from :func:`sparse_from_dense`,
            :func:`sparse_from_flat` or an SAE's training encoder.
        W_dec: ``[n, d]`` decoder rows (norms are not assumed).
        b_dec: ``[d]`` decoder bias.
        weights: prefix weights over ``m = 0..n``.
        chunk_elements: size of one ``[rows, K, d]`` working tensor; only memory changes.
    """
    n = latents.n_latents
    if weights.n != n:
        raise ValueError(f"prefix weights cover {weights.n} latents but the SAE has {n}")
    if W_dec.shape[0] != n or x.shape[-1] != W_dec.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W_dec {tuple(W_dec.shape)}, n={n}")
    cum = weights.cum.to(device=x.device)
    values = latents.values.to(W_dec.dtype)
    loss, residual = _PrefixMSE.apply(
        x.to(W_dec.dtype), b_dec, values, latents.indices, W_dec, cum, n, chunk_elements
    )
    return PrefixLoss(loss, residual)
