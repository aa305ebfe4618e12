"""The sparse encoder path of top-k SAEs: exact batch top-k selection and sparse gradients.

A top-k SAE needs every pre-activation to choose the winners (one dense matmul), but only the
chosen ``B*k`` entries carry gradient. :func:`encoder_entries` returns the chosen
activations as a differentiable tensor whose backward touches only those entries:
``dW_enc[:, f] += g * (x_b - b_dec)``, ``db_enc[f] += g``, ``db_dec = -W_enc @ db_enc``,
at O(B k d) instead of a second dense matmul. :func:`batch_topk_encode` is the whole training
encoder of a BatchTopK SAE (dense pre-activations, exact selection, sparse backward) in one call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .distributed import LOCAL, LocalCollective, ProcessGroupCollective
from .kernels import BACKENDS, fused_op
from .kernels.reference import gradient_rows, torch_above
from .sparse_latents import SparseLatents, sparse_from_flat

__all__ = [
    "TopKEncoding", "batch_topk_encode", "batch_topk_select", "top_dead_entries", "encoder_entries", "encoder_matmul_dtype",
    "dense_pre_activations",
]

LOW_PRECISION = (torch.bfloat16, torch.float16)


def encoder_matmul_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the encoder's dense matmul should run in for input ``x``: ``x``'s own when it
    is bf16/fp16 (``trainSAE(autocast_dtype=torch.bfloat16)`` on CPU passes bf16 activations),
    else autocast's when autocast is on for ``x``'s device, else ``None`` (the weights' dtype)."""
    if x.dtype in LOW_PRECISION:
        return x.dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


@torch.no_grad()
def dense_pre_activations(
    centred: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, matmul_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``relu(centred @ W_enc + b_enc)`` in ``W_enc``'s dtype, without autograd.

    With ``matmul_dtype`` (bf16/fp16) the matmul alone runs in that dtype (the GEMM accumulates in
    fp32) on copies of its operands; the master weights, the bias and the result stay in
    ``W_enc``'s dtype, so the top-k selection and every sparse part of the step run in fp32.
    """
    if matmul_dtype is None or matmul_dtype == W_enc.dtype:
        with torch.autocast(centred.device.type, enabled=False):
            return torch.addmm(b_enc, centred.to(W_enc.dtype), W_enc).relu_()
    with torch.autocast(centred.device.type, enabled=False):
        pre = centred.to(matmul_dtype) @ W_enc.to(matmul_dtype)
    return pre.to(W_enc.dtype).add_(b_enc).relu_()

_SAMPLE = 1 << 15  # enough for the cut-off estimate: its margin (30% + 64 ranks) is many standard errors wide
_GENERATORS: dict[str, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    key = str(device)
    if key not in _GENERATORS:
        _GENERATORS[key] = torch.Generator(device=device).manual_seed(0)
    return _GENERATORS[key]


@torch.no_grad()
def batch_topk_select(scores: torch.Tensor, count: int, backend: str = "auto") -> torch.Tensor:
    """Flat indices (ascending) of the ``count`` largest entries of ``scores``.

    Exact, like ``torch.topk`` over the flattened matrix, but instead of ranking all
    ``B*n`` values it estimates a cut-off from a random sample, keeps the entries above it
    (a little more than ``count``) and ranks only those; if the cut-off was too high it
    falls back to the full ``torch.topk``. Ties at the boundary are broken arbitrarily, as
    ``torch.topk`` does; NaN ranks above every number, as in ``torch.topk``. ``backend``
    chooses the cut-off pass (``kernels.fused_op``: the numba kernel on CPU unless ``"torch"``).
    """
    flat = scores.reshape(-1)
    total = flat.numel()
    if count >= total:
        return torch.arange(total, device=flat.device)
    if total >= 4 * _SAMPLE and count * 8 <= total:
        pick = torch.randint(total, (_SAMPLE,), device=flat.device, generator=_generator(flat.device))
        rank = min(_SAMPLE - 1, int(count / total * _SAMPLE * 1.3) + 64)
        cutoff = torch.topk(flat[pick], rank + 1, sorted=True).values[-1]
        above = fused_op("above", backend, flat) or torch_above
        candidates, values = above(flat, float(cutoff))
        if candidates.numel() >= count:
            keep = torch.topk(values, count, sorted=False).indices
            return torch.sort(candidates[keep]).values
    return torch.sort(torch.topk(flat, count, sorted=False).indices).values


class _EncoderEntries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, rows, cols, values, backend):
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols, values)
        ctx.backend = backend
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, b_dec, rows, cols, values = ctx.saved_tensors
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[:4]
        g = torch.where(values > 0, grad, torch.zeros_like(grad))  # ReLU'
        n = W_enc.shape[1]
        g_benc = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        g_bdec = -(W_enc @ g_benc) if need_bd else None
        g_w = None
        if need_w:
            centred = (x - b_dec).detach().contiguous()
            g = g.contiguous()
            accumulate = fused_op("column_accumulate", ctx.backend, W_enc, centred, g)
            if accumulate is not None:
                # Written in W_enc's own [d, n] layout, every column assigned: no zero-fill.
                g_w = torch.empty_like(W_enc)
                accumulate(g_w, cols, g, rows, centred)
            else:
                g_wt = gradient_rows(n, cols, g, rows, centred)
                g_w = g_wt.T if W_enc.T.is_contiguous() else g_wt.T.contiguous()  # W_enc's layout
        g_x = None
        if need_x:
            g_x = torch.zeros_like(x).index_add_(0, rows, g[:, None] * W_enc.T[cols])
        return g_x, g_w, g_benc if need_be else None, g_bdec, None, None, None, None


def encoder_entries(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Differentiable ``relu((x - b_dec) @ W_enc + b_enc)[rows, cols]``.

    ``values`` must hold those activations already (computed without autograd from the dense
    pre-activations that selected the entries); only the backward is new: it is sparse.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    x = x.to(W_enc.dtype)  # bf16 activations: the sparse gradient is accumulated in fp32
    return _EncoderEntries.apply(x, W_enc, b_enc, b_dec, rows, cols, values, backend)


class TopKEncoding(NamedTuple):
    """Result of :func:`batch_topk_encode`: what the training losses need from the encoder."""

    latents: SparseLatents
    """The selected activations; ``values`` carry the sparse backward of :func:`encoder_entries`."""
    pre_activations: torch.Tensor
    """``[B, n]`` dense ``relu((x - b_dec) @ W_enc + b_enc)`` without autograd (AuxK picks dead
    latents from it, the trainer estimates its threshold's L0 on it)."""


def batch_topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    backend: str = "auto",
    matmul_dtype: torch.dtype | None = None,
    collective: LocalCollective | ProcessGroupCollective = LOCAL,
) -> TopKEncoding:
    """BatchTopK encoding of ``[B, d]`` input for training: the ``k * B`` largest pre-activations
    over the batch, differentiable through a sparse backward.

    The dense pre-activations are computed without autograd, the matmul in ``matmul_dtype`` if
    given (:func:`dense_pre_activations`; default: :func:`encoder_matmul_dtype` of ``x``). The
    selection is the top ``k`` times the *global* batch over the ``collective``'s ranks: this
    rank's largest entries, reduced by ``collective.keep_global_top`` (one process:
    ``distributed.LOCAL``, which keeps them; data-parallel training:
    ``distributed.ProcessGroupCollective``, ``x`` being this rank's shard).
    """
    rows, n = x.shape[0], W_enc.shape[1]
    if matmul_dtype is None:
        matmul_dtype = encoder_matmul_dtype(x)
    x = x.to(W_enc.dtype)
    with torch.no_grad():
        pre = dense_pre_activations(x - b_dec, W_enc, b_enc, matmul_dtype)
        count = k * rows * collective.world_size  # the global batch's
        flat = collective.keep_global_top(pre, batch_topk_select(pre, min(count, pre.numel()), backend), count)
        vals = pre.reshape(-1)[flat]
    lat = sparse_from_flat(flat, vals, rows, n, presorted=True)
    values = encoder_entries(x, W_enc, b_enc, b_dec, lat.rows(), lat.indices, vals, backend)
    return TopKEncoding(lat._replace(values=values), pre)


def top_dead_entries(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    pre_activations: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k_aux`` largest pre-activations among the ``dead`` latents (AuxK):
    ``([B, k_aux] values, differentiable through the sparse backward; [B, k_aux] latent indices)``."""
    with torch.no_grad():
        masked = pre_activations.masked_fill(~dead[None, :], float("-inf"))
        vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
    vals = encoder_entries(x, W_enc, b_enc, b_dec, rows, idx.reshape(-1), vals.reshape(-1), backend)
    return vals.view(-1, k_aux), idx
