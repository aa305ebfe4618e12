"""The plain torch implementation of every fused kernel: what runs where no kernel does (another
device or dtype, ``backend="torch"``, numba or triton not installed), and the reference each
kernel's self-check and tests compare it with. Any device and dtype; nothing here imports numba
or triton. :data:`REFERENCES` maps a kernel's name (``kernels.KERNELS``) to its counterpart here,
which takes the kernel's arguments and returns (or writes in place) what the kernel does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..sparse_latents import SparseLatents

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS", "REFERENCES", "segment_weights", "torch_prefix_mse", "torch_above", "gradient_rows",
    "torch_column_accumulate", "torch_project_out_rows_", "torch_normalise_rows_",
]

# -- the prefix loss (prefix_loss.prefix_mse; the derivation is in that module's docstring) ---

# Elements of one [rows, K, d] working tensor of the torch implementation.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


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


def torch_prefix_mse(x: torch.Tensor, latents: SparseLatents, W_dec: torch.Tensor, b_dec: torch.Tensor,
                     cum: torch.Tensor, chunk_elements: int | None, consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, residual)`` of the prefix loss (see ``prefix_loss``) in plain tensor operations
    over a padded ``[rows, K, d]`` layout, ``chunk_elements`` at a time (default
    :data:`DEFAULT_CHUNK_ELEMENTS`). Any device and dtype. ``consume`` is the fused kernels'
    (their buffer hand-over) and changes nothing here: autograd owns these gradients."""
    values, indices = latents.padded()
    chunk_elements = chunk_elements or DEFAULT_CHUNK_ELEMENTS
    return _TorchPrefixMSE.apply(x, b_dec, values, indices, W_dec, cum, latents.n_latents, chunk_elements)


# -- the sparse encoder (sparse_encoder) --------------------------------------------------


def torch_above(flat: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) and values of the entries of 1-D ``flat`` above ``cutoff``, NaN
    counted as above (as ``torch.topk`` ranks it): the torch counterpart of the ``above`` kernel."""
    candidates = torch.nonzero(~(flat <= cutoff)).squeeze(1)
    return candidates, flat[candidates]


def gradient_rows(n: int, indices: torch.Tensor, coef: torch.Tensor, src_row: torch.Tensor,
                  src: torch.Tensor) -> torch.Tensor:
    """``[n, d]``: row ``f`` is ``sum_e coef[e] * src[src_row[e]]`` over the entries of latent
    ``f``, accumulated in slices that bound the ``[entries, d]`` temporary."""
    rows = torch.zeros(n, src.shape[1], dtype=src.dtype, device=src.device)
    step = max(1, (1 << 22) // max(1, src.shape[1]))
    for s in range(0, indices.numel(), step):
        e = min(indices.numel(), s + step)
        rows.index_add_(0, indices[s:e], coef[s:e, None] * src[src_row[s:e]])
    return rows


def torch_column_accumulate(out: torch.Tensor, indices: torch.Tensor, coef: torch.Tensor, src_row: torch.Tensor,
                            src: torch.Tensor) -> None:
    """``out[:, f] = sum_e coef[e] * src[src_row[e]]`` over the entries of latent ``f`` for a
    ``[d, n]`` ``out``: the torch counterpart of the ``column_accumulate`` kernel."""
    out.copy_(gradient_rows(out.shape[1], indices, coef, src_row, src).T)


# -- the decoder's row operations (trainers.common) ----------------------------------------


def torch_project_out_rows_(grad: torch.Tensor, W: torch.Tensor) -> None:
    """The torch counterpart of the ``project_out_rows_`` kernel (any device and dtype)."""
    dots = torch.einsum("fd,fd->f", grad, W)
    sq = torch.einsum("fd,fd->f", W, W).clamp_min(1e-12)
    grad.addcmul_(W, (dots / sq).unsqueeze(1), value=-1.0)


def torch_normalise_rows_(W: torch.Tensor, eps: float) -> None:
    """The torch counterpart of the ``normalise_rows_`` kernel (any device and dtype)."""
    W.div_(W.norm(dim=1, keepdim=True).clamp_min(eps))


REFERENCES: dict[str, Callable[..., Any]] = {
    "prefix_mse": torch_prefix_mse,
    "above": torch_above,
    "column_accumulate": torch_column_accumulate,
    "project_out_rows_": torch_project_out_rows_,
    "normalise_rows_": torch_normalise_rows_,
}
