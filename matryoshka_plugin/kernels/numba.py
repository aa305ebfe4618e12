"""Fused CPU kernels (numba) for the sparse training path.

* :func:`numba_prefix_mse` — the all-prefix loss and every gradient in two passes:

  1. a forward scan per token (parallel over tokens) subtracts the active decoder rows in index
     order and keeps the residual only where its weight ``c_j`` is non-zero (a *segment
     boundary*: every active latent in ``"every"`` mode, a group change in ``"groups"`` mode),
     then turns those few residuals into the suffix sums ``G`` in place, while they are in cache;
  2. a pass per latent (parallel over latents, balanced by entries) reads its decoder row once
     and, for each of its entries, the suffix sum that entry needs: ``<w_p, G>`` (the activation
     gradient) and ``dW[p] += a G`` (each decoder-gradient row written once, no atomics).

  So the decoder is gathered once per entry (not twice), a fixed-groups loss stores ~G vectors
  per token instead of K, and no ``[B, K, d]`` tensor exists in ``"groups"`` mode; the working
  buffer is bounded by ``chunk_elements`` (tokens are processed in chunks when it overflows).
* :func:`column_accumulate` — ``out[:, f] = sum_e coef[e] * src[src_row[e]]`` over the
  entries ``e`` of latent ``f``, for a ``[d, n]`` output: the encoder's sparse weight gradient
  in ``W_enc``'s layout, written a tile of latents at a time.
* :func:`above` — the entries above the batch top-k's sampled cut-off, in one pass;
* :func:`project_out_rows_` and :func:`normalise_rows_` — the decoder's radial gradient
  projection and unit-norm constraint, one pass over the rows each.

Each kernel is compiled twice, parallel and serial; :data:`PARALLEL_MIN_WORK` decides which
one a call runs. Importing this module imports numba (``kernels.numba_available`` asks).
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from numba import njit, prange

from ..sparse_latents import SparseLatents
from . import scale_grads_once

__all__ = [
    "PARALLEL_MIN_WORK", "DEFAULT_WORK_ELEMENTS", "numba_prefix_mse", "column_accumulate",
    "group_by_latent", "project_out_rows_", "normalise_rows_", "above",
]

# Below this many multiply-adds a parallel region costs more than it saves: numba's worker
# threads spin between regions and starve the rest of a small training step (the measurement:
# docs/speed.md, "The sparse training path and backends").
PARALLEL_MIN_WORK = 1 << 20

# Default size of the suffix-sum buffer (elements): 256 MB in fp32. Large enough that a
# fixed-groups batch fits in one chunk, so each decoder-gradient row is written once.
DEFAULT_WORK_ELEMENTS = 1 << 26

# Latent pieces per thread in the per-latent passes: early Matryoshka latents fire far more
# often than late ones, so equal latent ranges would leave one thread with most of the work.
_PIECES_PER_THREAD = 16


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _kernel(parallel_fn, serial_fn, work: int):
    """The parallel kernel with numba's threads matched to torch's, or the serial one where one
    thread is allowed or the work is small."""
    threads = _threads()
    if threads == 1 or work < PARALLEL_MIN_WORK:
        return serial_fn
    numba.set_num_threads(threads)
    return parallel_fn


@njit(cache=True)
def _segments(idx, offsets, cum, n):
    """Segment rows of every token: ``seg_ptr [B+1]`` (token ``t`` owns rows
    ``seg_ptr[t]..seg_ptr[t+1]-1``, the last its final residual), ``brow [E]`` (the row that keeps
    the residual before entry ``j``, or -1 when ``c_j = 0``), ``erow [E]`` (the row whose suffix
    sum entry ``j``'s gradients read) and ``crow`` (each row's weight ``c``)."""
    B = offsets.size - 1
    E = idx.size
    cj = np.empty(E, dtype=np.float64)
    seg_ptr = np.zeros(B + 1, dtype=np.int64)
    for t in range(B):
        prev = -1
        nb = 0
        for j in range(offsets[t], offsets[t + 1]):
            p = idx[j]
            c = cum[p + 1] - cum[prev + 1]
            cj[j] = c
            if c != 0.0:
                nb += 1
            prev = p
        seg_ptr[t + 1] = seg_ptr[t] + nb + 1
    brow = np.full(E, -1, dtype=np.int64)
    erow = np.empty(E, dtype=np.int64)
    crow = np.empty(seg_ptr[B], dtype=np.float64)
    for t in range(B):
        row = seg_ptr[t]
        last = -1
        for j in range(offsets[t], offsets[t + 1]):
            if cj[j] != 0.0:
                brow[j] = row
                crow[row] = cj[j]
                row += 1
            erow[j] = row
            last = idx[j]
        crow[row] = cum[n + 1] - cum[last + 1]
    return seg_ptr, brow, erow, crow


@njit(parallel=True, fastmath=True, cache=True)
def _forward_scan(x, b, vals, idx, offsets, W, seg_ptr, brow, crow, t0, t1, want, R, resid, G0, loss_tok, zero):
    """Tokens ``t0..t1``: loss per token, final residual and (``want``) the suffix sums.

    ``R`` holds rows ``seg_ptr[t0]..seg_ptr[t1]-1``. After the call row ``s`` of token ``t``
    holds ``G_s = sum_{s' >= s} c_{s'} r_{s'}`` and ``G0[t]`` the token's full sum (gradients
    before the ``-2/B`` factor).
    """
    d = x.shape[1]
    base = seg_ptr[t0]
    for t in prange(t0, t1):
        fin = seg_ptr[t + 1] - 1 - base
        r = R[fin]  # the running residual lives in the token's final row
        for q in range(d):
            r[q] = x[t, q] - b[q]
        acc = 0.0
        for j in range(offsets[t], offsets[t + 1]):
            br = brow[j]
            if br >= 0:  # keep r_{j-1}: its weight is non-zero
                keep = R[br - base]
                sq = zero
                for q in range(d):
                    v = r[q]
                    sq += v * v
                    keep[q] = v
                acc += crow[br] * sq
            a = vals[j]
            p = idx[j]
            for q in range(d):
                r[q] -= a * W[p, q]
        sq = zero
        for q in range(d):
            v = r[q]
            sq += v * v
            resid[t, q] = v
        acc += crow[fin + base] * sq
        loss_tok[t] = acc
        if not want:
            continue
        c = zero + crow[fin + base]
        for q in range(d):
            r[q] *= c
        first = seg_ptr[t] - base
        for s in range(fin - 1, first - 1, -1):
            c = zero + crow[s + base]
            cur = R[s]
            nxt = R[s + 1]
            for q in range(d):
                cur[q] = c * cur[q] + nxt[q]
        g = R[first]
        for q in range(d):
            G0[t, q] = g[q]


@njit(parallel=True, fastmath=True, cache=True)
def _latent_pass(dW, W, pieces, ptr, order, e0, vals, erow, base, R, gvals, assign, want_w, scale, zero):
    """Per latent ``p`` (over balanced ``pieces``), for its entries ``e``:
    ``gvals[e] = scale <w_p, G_e>`` and ``dW[p] (+)= scale * a_e G_e`` (``assign``: rows are
    overwritten, and rows without entries zeroed)."""
    d = W.shape[1]
    for c in prange(pieces.size - 1):
        for p in range(pieces[c], pieces[c + 1]):
            lo = ptr[p]
            hi = ptr[p + 1]
            if want_w and assign:
                for q in range(d):
                    dW[p, q] = zero
            for k in range(lo, hi):
                e = order[k] + e0
                g = R[erow[e] - base]
                a = vals[e] * scale
                dot = zero
                if want_w:
                    for q in range(d):
                        gq = g[q]
                        dot += W[p, q] * gq
                        dW[p, q] += a * gq
                else:
                    for q in range(d):
                        dot += W[p, q] * g[q]
                gvals[e] = dot * scale


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


@njit(cache=True)
def _pieces(ptr, count, align):
    """About ``count`` consecutive latent ranges of equal work (entries, plus one per latent
    for its zero-fill), each starting at a multiple of ``align``."""
    n = ptr.size - 1
    total = ptr[n] + n
    target = max(1, (total + count - 1) // count)
    out = [0]
    acc = 0
    for f in range(n):
        acc += ptr[f + 1] - ptr[f] + 1
        if acc >= target and (f + 1) % align == 0:
            out.append(f + 1)
            acc = 0
    if out[-1] != n:
        out.append(n)
    return np.array(out, dtype=np.int64)


_TILE = 16  # latents per tile of the column-layout accumulation: one 64-byte line of fp32


@njit(parallel=True, fastmath=True, cache=True)
def _column_accumulate(out, pieces, ptr, order, coef, src_row, src, zero):
    """``out[:, f] = sum_e coef[e] * src[src_row[e]]`` over the entries of latent ``f`` for a
    ``[d, n]`` ``out``: each tile of :data:`_TILE` latents is summed as rows in a scratch tile,
    then written out whole cache lines at a time. ``pieces`` are tile-aligned latent ranges."""
    d, n = out.shape
    for c in prange(pieces.size - 1):
        tile = np.empty((_TILE, d), dtype=out.dtype)
        for f0 in range(pieces[c], pieces[c + 1], _TILE):
            width = min(_TILE, n - f0)
            for j in range(width):
                row = tile[j]
                for q in range(d):
                    row[q] = zero
                for k in range(ptr[f0 + j], ptr[f0 + j + 1]):
                    i = order[k]
                    cf = coef[i]
                    r = src_row[i]
                    for q in range(d):
                        row[q] += cf * src[r, q]
            for q in range(d):
                for j in range(width):
                    out[q, f0 + j] = tile[j, q]


# error_model="numpy": a row of NaN (a diverged decoder) divides by zero under fastmath's max;
# numpy's model gives inf/NaN there instead of raising ZeroDivisionError from inside a kernel.
@njit(parallel=True, fastmath=True, error_model="numpy", cache=True)
def _project_out_rows(G, W, zero):
    """``G[f] -= (<G[f], W[f]> / max(|W[f]|^2, 1e-12)) W[f]`` for every row, in one pass."""
    n, d = W.shape
    for f in prange(n):
        dot = zero
        sq = zero
        for q in range(d):
            w = W[f, q]
            dot += G[f, q] * w
            sq += w * w
        c = dot / max(sq, 1e-12)
        for q in range(d):
            G[f, q] -= c * W[f, q]


@njit(parallel=True, fastmath=True, error_model="numpy", cache=True)
def _normalise_rows(W, eps, zero):
    """``W[f] /= max(|W[f]|, eps)`` for every row, in one pass."""
    n, d = W.shape
    for f in prange(n):
        sq = zero
        for q in range(d):
            sq += W[f, q] * W[f, q]
        inv = 1.0 / max(np.sqrt(sq), eps)
        for q in range(d):
            W[f, q] *= inv


# The cut-off passes decide sizes and write positions from comparisons, so they are compiled
# without fastmath: under it LLVM may assume no NaN and evaluate the comparison differently in
# the count and the fill (a NaN counted out but filled in wrote past the arrays). The count is an
# integer reduction and vectorises without it.
@njit(cache=True)
def _count_above(seg, cutoff):
    # A separate function over a slice: inlined in _above's loop over pieces, LLVM did not
    # vectorise this count.
    k = 0
    for i in range(seg.size):
        k += not (seg[i] <= cutoff)  # NaN counts as above, as torch.topk ranks it first
    return k


@njit(cache=True)
def _fill_above(seg, base, cutoff, idx, vals, k, end):
    """Write the entries above ``cutoff`` at ``k..end-1``, never past ``end`` (what the count
    sized); returns the position after the last one written."""
    for i in range(seg.size):
        v = seg[i]
        if not (v <= cutoff):
            if k >= end:
                return end + 1  # more than counted: reported, nothing written out of bounds
            idx[k] = base + i
            vals[k] = v
            k += 1
    return k


@njit(parallel=True, cache=True)
def _above(flat, cutoff, pieces):
    """Indices (ascending) and values of the entries of ``flat`` above ``cutoff`` (NaN counts as
    above), and whether every piece filled exactly what it counted: count per piece, then fill,
    one read of ``flat`` each."""
    m = pieces.size - 1
    counts = np.zeros(m + 1, dtype=np.int64)
    for c in prange(m):
        counts[c + 1] = _count_above(flat[pieces[c] : pieces[c + 1]], cutoff)
    for c in range(m):
        counts[c + 1] += counts[c]
    idx = np.empty(counts[m], dtype=np.int64)
    vals = np.empty(counts[m], dtype=flat.dtype)
    bad = np.zeros(m, dtype=np.bool_)
    for c in prange(m):
        end = counts[c + 1]
        bad[c] = _fill_above(flat[pieces[c] : pieces[c + 1]], pieces[c], cutoff, idx, vals, counts[c], end) != end
    return idx, vals, not bad.any()


# prange runs as range in a non-parallel compilation
_forward_scan_serial = njit(fastmath=True, cache=True)(_forward_scan.py_func)
_latent_pass_serial = njit(fastmath=True, cache=True)(_latent_pass.py_func)
_column_accumulate_serial = njit(fastmath=True, cache=True)(_column_accumulate.py_func)
_above_serial = njit(cache=True)(_above.py_func)
_project_out_rows_serial = njit(fastmath=True, error_model="numpy", cache=True)(_project_out_rows.py_func)
_normalise_rows_serial = njit(fastmath=True, error_model="numpy", cache=True)(_normalise_rows.py_func)


def _zero(dtype: np.dtype):
    return np.zeros(1, dtype=dtype)[0]


_workspace = threading.local()


def _suffix_buffer(rows: int, d: int, dtype: np.dtype) -> np.ndarray:
    """A ``[rows, d]`` scratch buffer kept between calls (per thread): a fresh one would cost a
    page fault per 4 KiB on every training step."""
    have = getattr(_workspace, "buf", None)
    if have is None or have.dtype != dtype or have.size < rows * d:
        have = _workspace.buf = np.empty(rows * d, dtype=dtype)
    return have[: rows * d].reshape(rows, d)


def _check_index(name: str, index: np.ndarray, size: int) -> None:
    """The kernels index arrays with these without bounds checks: out-of-range entries would
    read or write outside them, so they are refused first (one pass over the entries)."""
    if index.size and (index.min() < 0 or index.max() >= size):
        raise IndexError(f"{name} out of range: {int(index.min())}..{int(index.max())} for size {size}")


def _check_entries(indices: np.ndarray, offsets: np.ndarray, n: int) -> None:
    """Compressed rows the kernels can walk safely: latent indices in ``[0, n)`` and row
    pointers rising from 0 to the number of entries."""
    _check_index("latent indices", indices, n)
    if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != indices.size or (np.diff(offsets) < 0).any():
        raise ValueError(f"row pointers must rise from 0 to the {indices.size} entries")


def group_by_latent(indices: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pointers ``[n + 1]`` and the entry order that groups ``indices`` by latent."""
    _check_index("latent indices", indices.numpy(), n)
    ptr, order = _group_by_latent(indices.numpy(), n)
    return torch.from_numpy(ptr), torch.from_numpy(order)


def column_accumulate(
    out: torch.Tensor, indices: torch.Tensor, coef: torch.Tensor, src_row: torch.Tensor, src: torch.Tensor
) -> None:
    """``out[:, f] = sum over entries e of latent f of coef[e] * src[src_row[e]]`` for a
    contiguous ``[d, n]`` ``out`` (overwritten whole; columns without entries become 0): the
    encoder's weight gradient in ``W_enc``'s own layout."""
    d, n = out.shape
    if not (indices.numel() == coef.numel() == src_row.numel()) or src.shape[-1] != d:
        raise ValueError(f"column_accumulate: {indices.numel()} indices, {coef.numel()} coefficients, "
                         f"{src_row.numel()} source rows, source {tuple(src.shape)}, output {tuple(out.shape)}")
    _check_index("latent indices", indices.numpy(), n)
    _check_index("source rows", src_row.numpy(), src.shape[0])
    accumulate = _kernel(_column_accumulate, _column_accumulate_serial, indices.numel() * d)
    ptr, order = _group_by_latent(indices.numpy(), n)
    pieces = _pieces(ptr, _threads() * _PIECES_PER_THREAD, _TILE)
    o = out.numpy()
    accumulate(o, pieces, ptr, order, coef.numpy(), src_row.numpy(), src.numpy(), _zero(o.dtype))


def above(flat: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) and values of the entries of a contiguous 1-D ``flat`` above
    ``cutoff``: ``nonzero(~(flat <= cutoff))`` (NaN counts as above) and the gather, in two
    reads of ``flat``."""
    run = _kernel(_above, _above_serial, flat.numel())
    n = flat.numel()
    pieces = np.linspace(0, n, _threads() * _PIECES_PER_THREAD + 1).astype(np.int64)
    idx, vals, exact = run(flat.numpy(), flat.numpy().dtype.type(cutoff), pieces)
    if not exact:  # the passes disagreed (they cannot without fastmath): nothing was written out of bounds
        raise RuntimeError("the cut-off kernel's count and fill passes disagree")
    return torch.from_numpy(idx), torch.from_numpy(vals)


def project_out_rows_(grad: torch.Tensor, W: torch.Tensor) -> None:
    """In place: remove from each row of ``grad`` its component along the row of ``W``
    (contiguous ``[n, d]`` tensors)."""
    run = _kernel(_project_out_rows, _project_out_rows_serial, W.numel())
    g = grad.numpy()
    run(g, W.detach().numpy(), _zero(g.dtype))


def normalise_rows_(W: torch.Tensor, eps: float) -> None:
    """In place: each row of a contiguous ``[n, d]`` ``W`` divided by ``max(its norm, eps)``."""
    run = _kernel(_normalise_rows, _normalise_rows_serial, W.numel())
    w = W.detach().numpy()
    run(w, eps, _zero(w.dtype))


def _token_chunks(seg_ptr: np.ndarray, max_rows: int):
    """Consecutive token ranges holding at most ``max_rows`` segment rows (at least one token)."""
    batch = seg_ptr.size - 1
    t0 = 0
    while t0 < batch:
        t1 = int(np.searchsorted(seg_ptr, seg_ptr[t0] + max_rows, side="right")) - 1
        t1 = min(batch, max(t1, t0 + 1))
        yield t0, t1
        t0 = t1


class _NumbaPrefixMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, values, indices, offsets, W_dec, cum, n, chunk_elements, consume):
        batch, d = x.shape
        work = indices.numel() * d
        scan = _kernel(_forward_scan, _forward_scan_serial, work)
        latent_pass = _kernel(_latent_pass, _latent_pass_serial, work)
        need_x, need_b, need_v, _, _, need_w = ctx.needs_input_grad[:6]
        want = need_x or need_b or need_v or need_w
        xs, Ws = x.detach().contiguous(), W_dec.detach().contiguous()
        vals = values.detach().contiguous()
        zero = _zero(xs.numpy().dtype)
        idx, offs = indices.numpy(), offsets.numpy()
        _check_entries(idx, offs, n)
        if (tuple(W_dec.shape) != (n, d) or b_dec.numel() != d or cum.numel() != n + 2
                or vals.numel() != idx.size or offs.size != batch + 1):
            raise ValueError(
                f"prefix loss: {idx.size} entries, {vals.numel()} values, {offs.size - 1} rows for a batch "
                f"of {batch} x {d}, decoder {tuple(W_dec.shape)}, bias {tuple(b_dec.shape)}, "
                f"{cum.numel()} cumulative weights for {n} latents")
        seg_ptr, brow, erow, crow = _segments(idx, offs, cum.numpy(), n)
        crow_x = crow.astype(zero.dtype)
        resid = torch.empty_like(xs)
        loss_tok = np.empty(batch)
        gvals = torch.empty_like(vals)
        G0 = torch.empty_like(xs) if want else torch.empty((1, d), dtype=xs.dtype)
        dW = torch.empty_like(Ws) if need_w else torch.empty((1, d), dtype=xs.dtype)
        max_rows = max(1, chunk_elements // d)
        R = _suffix_buffer(min(max_rows, int(seg_ptr[-1])), d, zero.dtype)
        scale = -2.0 / batch
        pieces_wanted = _threads() * _PIECES_PER_THREAD
        x_np, b_np, v_np, W_np = xs.numpy(), b_dec.detach().contiguous().numpy(), vals.numpy(), Ws.numpy()
        first = True
        for t0, t1 in _token_chunks(seg_ptr, max_rows):
            rows = int(seg_ptr[t1] - seg_ptr[t0])
            if rows > R.shape[0]:  # a single token with more rows than the chunk
                R = _suffix_buffer(rows, d, zero.dtype)
            scan(x_np, b_np, v_np, idx, offs, W_np, seg_ptr, brow, crow_x, t0, t1, want, R,
                 resid.numpy(), G0.numpy(), loss_tok, zero)
            if not (need_v or need_w):
                continue
            lo, hi = int(offs[t0]), int(offs[t1])
            if hi == lo and not first:  # no entries, and the gradient rows are already zeroed
                continue
            ptr, order = _group_by_latent(idx[lo:hi], n)
            pieces = _pieces(ptr, pieces_wanted, 1)
            latent_pass(dW.numpy(), W_np, pieces, ptr, order, lo, v_np, erow, int(seg_ptr[t0]), R,
                        gvals.numpy(), first, need_w, zero.dtype.type(scale), zero)
            first = False
        ctx.save_for_backward(
            gvals if need_v else None,
            dW if need_w else None,
            G0.sum(0).mul_(scale) if need_b else None,
            G0.mul_(-scale) if need_x else None,
        )
        ctx.mark_non_differentiable(resid)
        ctx.consume, ctx.used = consume, False
        loss = torch.tensor(float(loss_tok.sum()) / batch, dtype=x.dtype)
        return loss, resid

    @staticmethod
    def backward(ctx, grad_loss, _grad_resid):
        gvals, dW, g_b, g_x = ctx.saved_tensors
        # The gradients were computed for d(loss) = 1; training passes exactly that, so the
        # decoder-sized buffer is handed over without another pass over it.
        g_x, g_b, gvals, dW = scale_grads_once(ctx, [g_x, g_b, gvals, dW], grad_loss)
        return g_x, g_b, gvals, None, None, dW, None, None, None, None


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
    of the ``[rows, d]`` suffix-sum buffer."""
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
