"""Fused GPU kernel (Triton) for the all-prefix loss; the CUDA counterpart of :mod:`.numba`.

One program per (token, tile of ``d``) runs the forward residual scan over the token's
active latents and, when gradients are wanted, the reverse suffix scan, adding its share of
``<w, G_l>`` and ``a_l G_l`` into the latent and decoder-row gradients with atomics. Every
quantity the loss needs is a sum over ``d``, so tiles are independent. Compute and
accumulation are float32 whatever the input dtype (bf16 is supported); ``cum`` stays float64
for the segment weights' differences.

Validated against the torch reference in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU
tensors; run ``tests/test_kernels_triton.py`` on a CUDA machine to check it there. Importing
this module imports triton (``kernels.triton_available`` asks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sparse_latents import SparseLatents
from . import scale_grad_once

__all__ = ["triton_prefix_mse"]


@triton.jit
def _prefix_kernel(
    x_ptr, b_ptr, vals_ptr, idx_ptr, off_ptr, W_ptr, cum_ptr, n, d, n_tiles, scale,
    loss_ptr, resid_ptr, gvals_ptr, dW_ptr, G0_ptr,
    WANT_GRAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    tile = tl.program_id(1)
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    s = tl.load(off_ptr + t)
    e = tl.load(off_ptr + t + 1)
    r = tl.load(x_ptr + t * d + cols, mask=mask, other=0.0).to(tl.float32)
    r -= tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.sum(r * 0.0, axis=0)
    prev = s * 0 - 1
    for j in range(s, e):
        p = tl.load(idx_ptr + j)
        c = (tl.load(cum_ptr + p + 1) - tl.load(cum_ptr + prev + 1)).to(tl.float32)
        a = tl.load(vals_ptr + j).to(tl.float32)
        w = tl.load(W_ptr + p * d + cols, mask=mask, other=0.0).to(tl.float32)
        acc += c * tl.sum(r * r, axis=0)
        r -= a * w
        prev = p
    c_last = (tl.load(cum_ptr + n + 1) - tl.load(cum_ptr + prev + 1)).to(tl.float32)
    acc += c_last * tl.sum(r * r, axis=0)
    tl.store(loss_ptr + t * n_tiles + tile, acc)
    tl.store(resid_ptr + t * d + cols, r, mask=mask)
    if WANT_GRAD:
        g = c_last * r
        for jj in range(0, e - s):
            j = e - 1 - jj
            p = tl.load(idx_ptr + j)
            pp = tl.load(idx_ptr + j - 1, mask=j > s, other=-1)
            c = (tl.load(cum_ptr + p + 1) - tl.load(cum_ptr + pp + 1)).to(tl.float32)
            a = tl.load(vals_ptr + j).to(tl.float32)
            w = tl.load(W_ptr + p * d + cols, mask=mask, other=0.0).to(tl.float32)
            tl.atomic_add(gvals_ptr + j, scale * tl.sum(w * g, axis=0))
            tl.atomic_add(dW_ptr + p * d + cols, (scale * a) * g, mask=mask)
            r += a * w  # r_{l-1} = r_l + a_l w_l
            g += c * r
        tl.store(G0_ptr + t * d + cols, g, mask=mask)


class _TritonPrefixMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, values, indices, offsets, W_dec, cum, n, block_d, consume):
        batch, d = x.shape
        need_x, need_b, need_v, _, _, need_w = ctx.needs_input_grad[:6]
        want = need_x or need_b or need_v or need_w
        dev = x.device
        n_tiles = triton.cdiv(d, block_d)
        f32 = dict(device=dev, dtype=torch.float32)
        loss_part = torch.empty(batch * n_tiles, **f32)
        resid = torch.empty(batch, d, **f32)
        gvals = torch.zeros(values.numel() if want else 1, **f32)
        dW = torch.zeros(W_dec.shape if want else (1, d), **f32)
        G0 = torch.empty(batch if want else 1, d, **f32)
        scale = -2.0 / batch
        _prefix_kernel[(batch, n_tiles)](
            x.contiguous(), b_dec.contiguous(), values.detach().contiguous(), indices.contiguous(),
            offsets.contiguous(), W_dec.detach().contiguous(), cum, n, d, n_tiles, scale,
            loss_part, resid, gvals, dW, G0, WANT_GRAD=want, BLOCK_D=block_d,
        )
        ctx.save_for_backward(
            gvals.to(values.dtype) if need_v else None,
            dW.to(W_dec.dtype) if need_w else None,
            G0.sum(0).to(b_dec.dtype) if need_b else None,
            G0.to(x.dtype) if need_x else None,
        )
        ctx.scale = scale
        ctx.consume, ctx.used = consume, False
        ctx.mark_non_differentiable(resid)
        loss = (loss_part.double().sum() / batch).to(x.dtype)
        return loss, resid.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss, _grad_resid):
        if ctx.consume and ctx.used:
            raise RuntimeError("this prefix loss was built with consume_grads=True: one backward pass only")
        gvals, dW, g0sum, G0 = ctx.saved_tensors
        g = grad_loss.float()
        # gvals, dW and G0 were scaled by -2/B inside the kernel; G0 was not.
        g_x = (-ctx.scale * g * G0).to(G0.dtype) if G0 is not None else None
        g_b = (ctx.scale * g * g0sum).to(g0sum.dtype) if g0sum is not None else None
        g_v = (g * gvals).to(gvals.dtype) if gvals is not None else None
        g_w = scale_grad_once(ctx, dW, g.to(dW.dtype)) if dW is not None else None
        return g_x, g_b, g_v, None, None, g_w, None, None, None, None


def triton_prefix_mse(
    x: torch.Tensor,
    latents: SparseLatents,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    cum: torch.Tensor,
    block_d: int = 256,
    consume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, residual)`` of ``prefix_loss.prefix_mse`` on CUDA tensors; ``cum`` is the prefix
    weights' cumulative sums, ``block_d`` the tile of ``d`` one program handles."""
    return _TritonPrefixMSE.apply(
        x, b_dec, latents.values, latents.indices, latents.offsets, W_dec,
        cum.double().contiguous(), latents.n_latents, block_d, consume,
    )
