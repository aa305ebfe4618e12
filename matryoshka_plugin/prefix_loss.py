"""The one Matryoshka reconstruction loss: ``sum_m lam[m] * mean_b ||x - xhat_m||^2``.

For one token whose active latents, sorted by index, are ``p_1 < ... < p_K`` (``p_0 = -1``,
``p_{K+1} = n``), the prefix reconstruction only changes at active indices, so with
residuals ``r_j = x - b - sum_{l <= j} a_{p_l} w_{p_l}`` and ``cum[t] = sum_{m < t} lam[m]``:

    sum_m lam[m] ||x - xhat_m||^2 = sum_{j=0..K} c_j ||r_j||^2,
    c_j = cum[p_{j+1} + 1] - cum[p_j + 1].

With suffix sums ``G_l = sum_{j >= l} c_j r_j`` the gradients are ``db = -2 G_0``,
``da_{p_l} = -2 <w_{p_l}, G_l>`` and ``dw_{p_l} = -2 a_{p_l} G_l``. The cost is O(B K d) —
a sparse decode — for *any* prefix weights (fixed groups, every prefix, the Pareto
expectation, balance weights): no decoder pass per prefix.

Two implementations share this module's entry point :func:`prefix_mse`:

* ``"torch"``: plain tensor operations over a padded ``[rows, K, d]`` layout, in chunks.
  It runs on any device and dtype and is the reference the fast kernels are tested against.
* ``"fused"``: one pass per token that accumulates the loss and all gradients without a
  ``[B, K, d]`` tensor (``kernels/``: numba on CPU, Triton on CUDA).

The active latents come as :class:`~.sparse_latents.SparseLatents`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .kernels import fused_prefix_mse, resolve_backend
from .prefixes import PrefixWeights
from .sparse_latents import SparseLatents

__all__ = ["PrefixLoss", "detached_level_mse", "level_residuals", "prefix_mse", "segment_weights"]

# Elements of one [rows, K, d] working tensor of the torch implementation.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


class PrefixLoss(NamedTuple):
    """Result of :func:`prefix_mse`."""

    loss: torch.Tensor
    """Scalar ``sum_m lam[m] * mean_b ||x - xhat_m||^2`` (differentiable)."""
    residual: torch.Tensor
    """``[B, d]`` residual of the full SAE, ``x - xhat_n`` (detached)."""


# -- the torch reference implementation -----------------------------------------------------


def _chunk_rows(k: int, d: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, (k + 1) * d))


def segment_weights(indices: torch.Tensor, cum: torch.Tensor, n: int) -> torch.Tensor:
    """``c_j = cum[p_{j+1} + 1] - cum[p_j + 1]`` for ``j = 0..K`` (``[rows, K + 1]``, padded)."""
    rows = indices.shape[0]
    lo = torch.cat([indices.new_full((rows, 1), -1), indices], 1) + 1
    hi = torch.cat([indices, indices.new_full((rows, 1), n)], 1) + 1
    return cum[hi] - cum[lo]


def _residuals(x, b_dec, values, indices, W_dec):
    """``[rows, K + 1, d]`` residuals ``r_0..r_K`` and the gathered decoder rows."""
    rows_w = W_dec[indices]  # [rows, K, d]
    contrib = values.unsqueeze(-1) * rows_w
    r0 = (x - b_dec).unsqueeze(1)
    return torch.cat([r0, r0 - torch.cumsum(contrib, 1)], 1), rows_w


class _TorchPrefixMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, values, indices, W_dec, cum, n, chunk_elements):
        batch, d = x.shape
        step = _chunk_rows(indices.shape[1], d, chunk_elements)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        residual = torch.empty_like(x)
        for s in range(0, batch, step):
            e = min(batch, s + step)
            res, _ = _residuals(x[s:e], b_dec, values[s:e], indices[s:e], W_dec)
            c = segment_weights(indices[s:e], cum, n).to(res.dtype)
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
        need_x, need_b, need_v, _, need_w = ctx.needs_input_grad[:5]
        scale = (-2.0 / batch) * grad_loss
        g_x = torch.zeros_like(x) if need_x else None
        g_b = torch.zeros_like(b_dec) if need_b else None
        g_v = torch.zeros_like(values) if need_v else None
        g_w = torch.zeros_like(W_dec) if need_w else None
        step = _chunk_rows(indices.shape[1], d, ctx.chunk_elements)
        for s in range(0, batch, step):
            e = min(batch, s + step)
            res, rows_w = _residuals(x[s:e], b_dec, values[s:e], indices[s:e], W_dec)
            c = segment_weights(indices[s:e], cum, ctx.n).to(res.dtype)
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


def _torch_prefix_mse(x, latents, W_dec, b_dec, cum, chunk_elements):
    values, indices = latents.padded()
    chunk_elements = chunk_elements or DEFAULT_CHUNK_ELEMENTS
    return _TorchPrefixMSE.apply(x, b_dec, values, indices, W_dec, cum, latents.n_latents, chunk_elements)


def prefix_mse(
    x: torch.Tensor,
    latents: SparseLatents,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    weights: PrefixWeights,
    chunk_elements: int | None = None,
    backend: str = "auto",
    consume_grads: bool = False,
) -> PrefixLoss:
    """Matryoshka reconstruction loss over the prefixes ``weights`` describes.

    Args:
        x: ``[B, d]`` targets.
        latents: active latents (``values`` differentiable), e.g. from
            ``sparse_latents.sparse_from_dense``, ``sparse_latents.sparse_from_flat`` or an SAE's
            training encoder.
        W_dec: ``[n, d]`` decoder rows (norms are not assumed).
        b_dec: ``[d]`` decoder bias.
        weights: prefix weights over ``m = 0..n``.
        chunk_elements: size of one working tensor (only memory changes): the torch path's
            ``[rows, K, d]`` tensors (default ``DEFAULT_CHUNK_ELEMENTS``), the CPU kernel's
            suffix-sum buffer (default ``kernels.numba.DEFAULT_WORK_ELEMENTS``).
        backend: ``"auto"`` (the fused kernel where available and once it has passed its
            self-check on this device, see ``kernels.kernel_trusted``), ``"fused"`` (the kernel,
            unchecked) or ``"torch"``.
        consume_grads: let the fused kernels hand their decoder-gradient buffer to autograd
            without a copy (saves one ``[n, d]`` tensor at the peak); the loss then supports a
            single backward pass, as in a training step.
    """
    n = latents.n_latents
    if weights.n != n:
        raise ValueError(f"prefix weights cover {weights.n} latents but the SAE has {n}")
    if W_dec.shape[0] != n or x.ndim != 2 or x.shape[-1] != W_dec.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W_dec {tuple(W_dec.shape)}, n={n}")
    if latents.batch_size != x.shape[0]:
        raise ValueError(f"latents hold {latents.batch_size} rows but x has {x.shape[0]}")
    cum = weights.cum.to(device=x.device)
    x = x.to(W_dec.dtype)
    latents = latents._replace(values=latents.values.to(W_dec.dtype))
    if resolve_backend(backend, x, W_dec, b_dec, self_check=True) == "fused":
        loss, residual = fused_prefix_mse(x, latents, W_dec, b_dec, cum, chunk_elements, consume_grads)
    else:
        loss, residual = _torch_prefix_mse(x, latents, W_dec, b_dec, cum, chunk_elements)
    return PrefixLoss(loss, residual)


# -- nested levels (fixed groups): residuals per level, stop-gradient between levels ---------


def _level_bounds(level_ends: Sequence[int], n: int) -> list[tuple[int, int]]:
    ends = [int(e) for e in level_ends]
    if not ends or ends[-1] != n or any(b <= a for a, b in zip([0, *ends], ends)):
        raise ValueError(f"level ends must increase strictly from above 0 to n={n}, got {ends}")
    return list(zip([0, *ends[:-1]], ends))


def _level_parts(latents: SparseLatents, W_dec: torch.Tensor, bounds: list[tuple[int, int]]):
    """Each level's decoded contribution ``sum_{s <= i < e} a_i w_i`` (``[B, d]``, differentiable)."""
    values, indices = latents.padded()
    values = values.to(W_dec.dtype)
    for s, e in bounds:
        inside = (indices >= s) & (indices < e)
        yield F.embedding_bag(indices, W_dec, per_sample_weights=values * inside, mode="sum")


@torch.no_grad()
def level_residuals(
    x: torch.Tensor, latents: SparseLatents, W_dec: torch.Tensor, b_dec: torch.Tensor, level_ends: Sequence[int]
) -> list[torch.Tensor]:
    """``x - b - sum_{i < e} a_i w_i`` for each level end ``e`` (``[B, d]`` each, no graph).

    Level ``g`` holds latents ``[e_{g-1}, e_g)``; the last residual is the full SAE's.
    """
    out, recon = [], b_dec.to(W_dec.dtype).expand_as(x)
    for part in _level_parts(latents, W_dec, _level_bounds(level_ends, latents.n_latents)):
        recon = recon + part
        out.append(x.to(W_dec.dtype) - recon)
    return out


def detached_level_mse(
    x: torch.Tensor,
    latents: SparseLatents,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    weights: PrefixWeights,
    level_ends: Sequence[int],
) -> PrefixLoss:
    """The fixed-groups Matryoshka loss with a stop-gradient between levels.

    The value equals :func:`prefix_mse` with the same weights (which must sit on the level ends
    only). The gradient differs: level ``g``'s term ``lam[e_g] * mean_b ||x - xhat_g||^2`` uses
    ``xhat_g = stopgrad(xhat_{g-1}) + sum_{e_{g-1} <= i < e_g} a_i w_i`` (``xhat_{-1} = b``), so it
    trains only level ``g``'s own latents (activations, hence the encoder, and decoder rows); the
    decoder bias belongs to the first level. Each level learns the residual the inner levels
    leave, and inner latents are trained by their own level's term alone.

    Plain autograd over one sparse decode per level (``O(G B K d)``): the fused kernels
    compute the undetached gradient only.
    """
    n = latents.n_latents
    bounds = _level_bounds(level_ends, n)
    lam = weights.lam
    if weights.n != n:
        raise ValueError(f"prefix weights cover {weights.n} latents but the SAE has {n}")
    ends = torch.tensor([e for _, e in bounds])
    off = torch.ones_like(lam, dtype=torch.bool)
    off[ends] = False
    if bool((lam[off] > 0).any()):
        raise ValueError("a stop-gradient between levels needs prefix weights on the level ends only")
    x = x.to(W_dec.dtype)
    total = x.new_zeros(())
    recon = b_dec.to(W_dec.dtype).expand_as(x)
    for (_, e), part in zip(bounds, _level_parts(latents, W_dec, bounds)):
        recon = (recon if e == bounds[0][1] else recon.detach()) + part
        if float(lam[e]) > 0:
            total = total + float(lam[e]) * (x - recon).pow(2).sum(-1).mean()
    return PrefixLoss(total, (x - recon).detach())
