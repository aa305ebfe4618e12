"""Fused CPU kernels (numba) for the sparse training path.

* :func:`numba_prefix_mse` — the all-prefix loss of ``prefix_loss`` in one forward and one
  backward scan per token, computing the loss and every gradient in the same call, in
  chunks of tokens, so no ``[B, K, d]`` tensor ever exists. Decoder-row gradients are
  accumulated race-free: entries are grouped by latent (counting sort) and each thread owns
  whole rows.
* :func:`segment_accumulate` — ``out[f] += sum_e coef[e] * src[src_row[e]]`` over the entries
  ``e`` of latent ``f``; the encoder's sparse weight gradient uses it.

Each kernel is compiled twice, parallel and serial; :data:`PARALLEL_MIN_WORK` decides which
one a call runs. Importing this module imports numba (``kernels.numba_available`` asks).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

from ..sparse_latents import SparseLatents
from . import scale_grad_once

__all__ = ["PARALLEL_MIN_WORK", "numba_prefix_mse", "segment_accumulate", "group_by_latent"]

# Below this many multiply-adds a parallel region costs more than it saves: numba's worker
# threads spin between regions and starve the rest of a small training step (measured on toy
# shapes, B=200, d=20: 5x slower steps than the serial kernels).
PARALLEL_MIN_WORK = 1 << 20


def _kernel(parallel_fn, serial_fn, work: int):
    """The parallel kernel with numba's threads matched to torch's, or the serial one where one
    thread is allowed or the work is small."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if threads == 1 or work < PARALLEL_MIN_WORK:
        return serial_fn
    numba.set_num_threads(threads)
    return parallel_fn


@njit(parallel=True, fastmath=True, cache=True)
def _prefix_scan(x, b, vals, idx, offsets, W, cum, n, t0, t1, base, want_grad, G, gvals, resid, G0, loss_tok):
    """Tokens ``t0..t1``: loss, final residual and (if ``want_grad``) per-entry suffix sums.

    ``G[j - base]`` receives ``G_l`` for entry ``j``; ``gvals[j]`` receives ``<w_{p_l}, G_l>``;
    ``G0[t]`` receives ``G_0``. Scaling by ``-2/B`` happens outside.
    """
    d = x.shape[1]
    for t in prange(t0, t1):
        s = offsets[t]
        e = offsets[t + 1]
        r = np.empty(d, dtype=x.dtype)
        for q in range(d):
            r[q] = x[t, q] - b[q]
        acc = 0.0
        prev = -1
        for j in range(s, e):
            p = idx[j]
            c = cum[p + 1] - cum[prev + 1]
            a = vals[j]
            sq = 0.0
            for q in range(d):
                rq = r[q]
                sq += rq * rq
                r[q] = rq - a * W[p, q]
            acc += c * sq
            prev = p
        c_last = cum[n + 1] - cum[prev + 1]
        sq = 0.0
        for q in range(d):
            sq += r[q] * r[q]
            resid[t, q] = r[q]
        loss_tok[t] = acc + c_last * sq
        if not want_grad:
            continue
        g = np.empty(d, dtype=x.dtype)
        for q in range(d):
            g[q] = c_last * r[q]
        for j in range(e - 1, s - 1, -1):
            p = idx[j]
            a = vals[j]
            pp = idx[j - 1] if j > s else -1
            c = cum[p + 1] - cum[pp + 1]
            row = j - base
            dot = 0.0
            for q in range(d):
                gq = g[q]
                w = W[p, q]
                dot += w * gq
                G[row, q] = gq
                rq = r[q] + a * w  # r_{l-1} = r_l + a_l w_l
                r[q] = rq
                g[q] = gq + c * rq
            gvals[j] = dot
        for q in range(d):
            G0[t, q] = g[q]


@njit(cache=True)
def _group_by_latent(idx, n):
    """Stable counting sort of entries by latent: ``order`` and row pointers ``ptr [n+1]``."""
    ptr = np.zeros(n + 1, dtype=np.int64)
    for i in range(idx.size):
        ptr[idx[i] + 1] += 1
    for f in range(n):
        ptr[f + 1] += ptr[f]
    fill = ptr[:-1].copy()
    order = np.empty(idx.size, dtype=np.int64)
    for i in range(idx.size):
        f = idx[i]
        order[fill[f]] = i
        fill[f] += 1
    return ptr, order


@njit(parallel=True, fastmath=True, cache=True)
def _segment_accumulate(out, ptr, order, coef, src_row, src):
    d = out.shape[1]
    for f in prange(out.shape[0]):
        for k in range(ptr[f], ptr[f + 1]):
            i = order[k]
            cf = coef[i]
            r = src_row[i]
            for q in range(d):
                out[f, q] += cf * src[r, q]


# prange runs as range in a non-parallel compilation
_prefix_scan_serial = njit(fastmath=True, cache=True)(_prefix_scan.py_func)
_segment_accumulate_serial = njit(fastmath=True, cache=True)(_segment_accumulate.py_func)


def group_by_latent(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pointers ``[n + 1]`` and the entry order that groups ``indices`` by latent."""
    ptr, order = _group_by_latent(indices.numpy(), n)
    return torch.from_numpy(ptr), torch.from_numpy(order)


def segment_accumulate(
    out: torch.Tensor, indices: torch.Tensor, coef: torch.Tensor, src_row: torch.Tensor, src: torch.Tensor
) -> None:
    """In place: ``out[indices[e]] += coef[e] * src[src_row[e]]`` for every entry ``e``."""
    ptr, order = _group_by_latent(indices.numpy(), out.shape[0])
    accumulate = _kernel(_segment_accumulate, _segment_accumulate_serial, indices.numel() * out.shape[1])
    accumulate(out.numpy(), ptr, order, coef.numpy(), src_row.numpy(), src.numpy())


def _token_chunks(offsets: np.ndarray, max_entries: int):
    """Consecutive token ranges holding at most ``max_entries`` entries (at least one token)."""
    batch = offsets.size - 1
    t0 = 0
    while t0 < batch:
        limit = offsets[t0] + max_entries
        t1 = int(np.searchsorted(offsets, limit, side="right")) - 1
        t1 = min(batch, max(t1, t0 + 1))
        yield t0, t1
        t0 = t1


class _NumbaPrefixMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, values, indices, offsets, W_dec, cum, n, chunk_elements, consume):
        batch, d = x.shape
        work = indices.numel() * d
        scan = _kernel(_prefix_scan, _prefix_scan_serial, work)
        accumulate = _kernel(_segment_accumulate, _segment_accumulate_serial, work)
        need_x, need_b, need_v, _, _, need_w = ctx.needs_input_grad[:6]
        want = need_x or need_b or need_v or need_w
        xs, Ws = x.detach().contiguous(), W_dec.detach().contiguous()
        vals = values.detach().contiguous()
        resid = torch.empty_like(xs)
        loss_tok = np.empty(batch)
        gvals = torch.zeros_like(vals)
        G0 = torch.empty_like(xs) if want else torch.empty((1, d), dtype=xs.dtype)
        dW = torch.zeros_like(Ws) if need_w else None
        offs = offsets.numpy()
        idx = indices.numpy()
        max_entries = max(1, chunk_elements // d)
        G = torch.empty((min(max_entries, max(1, idx.size)) if want else 1, d), dtype=xs.dtype)
        args = (xs.numpy(), b_dec.detach().numpy(), vals.numpy(), idx, offs, Ws.numpy(), cum.numpy(), n)
        chunks = _token_chunks(offs, max_entries) if want else [(0, batch)]
        for t0, t1 in chunks:
            lo, hi = int(offs[t0]), int(offs[t1])
            if want and hi - lo > G.shape[0]:  # a single token longer than the chunk
                G = torch.empty((hi - lo, d), dtype=xs.dtype)
            scan(*args, t0, t1, lo, want, G.numpy(), gvals.numpy(), resid.numpy(), G0.numpy(), loss_tok)
            if need_w and hi > lo:
                # dW[p_l] += a_l * G_l, grouped by latent so each thread owns whole rows.
                ptr, order = _group_by_latent(idx[lo:hi], n)
                rows = np.arange(hi - lo, dtype=np.int64)
                accumulate(dW.numpy(), ptr, order, vals.numpy()[lo:hi], rows, G.numpy())
        scale = -2.0 / batch
        ctx.scale = scale
        ctx.save_for_backward(
            gvals if need_v else None,
            dW if need_w else None,
            G0.sum(0) if need_b else None,
            G0 if need_x else None,
        )
        ctx.mark_non_differentiable(resid)
        ctx.consume, ctx.used = consume, False
        loss = torch.tensor(float(loss_tok.sum()) / batch, dtype=x.dtype)
        return loss, resid

    @staticmethod
    def backward(ctx, grad_loss, _grad_resid):
        if ctx.consume and ctx.used:
            raise RuntimeError("this prefix loss was built with consume_grads=True: one backward pass only")
        gvals, dW, g0sum, G0 = ctx.saved_tensors
        s = ctx.scale * grad_loss
        g_x = -s * G0 if G0 is not None else None
        g_b = s * g0sum if g0sum is not None else None
        g_v = s * gvals if gvals is not None else None
        g_w = scale_grad_once(ctx, dW, s)
        return g_x, g_b, g_v, None, None, g_w, None, None, None, None


def numba_prefix_mse(
    x: torch.Tensor,
    latents: SparseLatents,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    cum: torch.Tensor,
    chunk_elements: int,
    consume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, residual)`` of ``prefix_loss.prefix_mse`` on CPU tensors; ``latents`` is a
    ``SparseLatents``, ``cum`` the prefix weights' cumulative sums, ``chunk_elements`` the size
    of one ``[entries, d]`` working buffer."""
    return _NumbaPrefixMSE.apply(
        x,
        b_dec,
        latents.values,
        latents.indices.contiguous(),
        latents.offsets.contiguous(),
        W_dec,
        cum.double().contiguous(),
        latents.n_latents,
        chunk_elements,
        consume,
    )
