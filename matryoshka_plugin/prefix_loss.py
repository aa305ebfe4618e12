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

* ``"torch"``: plain tensor operations over a padded ``[rows, K, d]`` layout, in chunks
  (``kernels/reference.py``). It runs on any device and dtype and is the reference the fast
  kernels are tested against.
* ``"fused"``: one pass per token that accumulates the loss and all gradients without a
  ``[B, K, d]`` tensor (``kernels/``: numba on CPU, Triton on CUDA).

The active latents come as :class:`~.sparse_latents.SparseLatents`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .kernels import PREFIX_MSE, fused_op
from .kernels.reference import torch_prefix_mse
from .prefixes import PrefixWeights
from .sparse_latents import SparseLatents

__all__ = ["PrefixLoss", "detached_level_mse", "level_residuals", "prefix_mse"]


class PrefixLoss(NamedTuple):
    """Result of :func:`prefix_mse`."""

    loss: torch.Tensor
    """Scalar ``sum_m lam[m] * mean_b ||x - xhat_m||^2`` (differentiable)."""
    residual: torch.Tensor
    """``[B, d]`` residual of the full SAE, ``x - xhat_n`` (detached)."""


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
            ``[rows, K, d]`` tensors (default ``kernels.reference.DEFAULT_CHUNK_ELEMENTS``), the CPU kernel's
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
    run = fused_op(PREFIX_MSE, backend, x, W_dec, b_dec, required=True) or torch_prefix_mse
    return PrefixLoss(*run(x, latents, W_dec, b_dec, cum, chunk_elements, consume_grads))


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
