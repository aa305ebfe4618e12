"""Fused kernels of the sparse training path, and the choice between them and plain torch.

* :mod:`.numba` (CPU, float32/float64): the all-prefix loss in one pass per token, and the
  encoder's sparse weight gradient (:func:`~.numba.segment_accumulate`).
* :mod:`.triton` (CUDA, float32/bfloat16/float16): the all-prefix loss.

Each kernel has a plain torch counterpart (``prefix_loss`` and ``sparse_encoder``) that runs
on any device and dtype and that the tests compare it with. numba and triton are optional and
imported only when a kernel is about to run on tensors it covers, so importing the package
stays cheap.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from ..sparse_latents import SparseLatents

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "numba_available",
    "triton_available",
    "numba_supported",
    "triton_supported",
    "fused_prefix_mse",
    "scale_grad_once",
]

BACKENDS = ("auto", "torch", "fused")

NUMBA_DTYPES = (torch.float32, torch.float64)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def numba_available() -> bool:
    """Whether numba imports (and with it the CPU kernels)."""
    try:
        from . import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (and with it the CUDA kernel)."""
    try:
        from . import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _uniform(tensors: tuple[torch.Tensor, ...], device_type: str, dtypes: tuple[torch.dtype, ...]) -> bool:
    """All ``tensors`` on ``device_type`` with one dtype out of ``dtypes``."""
    if not tensors:
        return False
    dtype = tensors[0].dtype
    return dtype in dtypes and all(t.device.type == device_type and t.dtype == dtype for t in tensors)


def numba_supported(*tensors: torch.Tensor) -> bool:
    """Whether the numba kernels handle these tensors (CPU, one float32/float64 dtype)."""
    return _uniform(tensors, "cpu", NUMBA_DTYPES) and numba_available()


def triton_supported(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernel handles these tensors (CUDA, one float32/bfloat16/float16 dtype)."""
    return _uniform(tensors, "cuda", TRITON_DTYPES) and triton_available()


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """``"fused"`` where a fused kernel exists for these tensors, else ``"torch"``.

    The environment variable ``MATRYOSHKA_BACKEND`` overrides ``"auto"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("MATRYOSHKA_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"MATRYOSHKA_BACKEND={backend!r} is not one of {BACKENDS}")
    supported = numba_supported(*tensors) or triton_supported(*tensors)
    if backend == "fused" and not supported:
        raise ValueError(
            "no fused kernel for these tensors (CPU needs numba and float32/float64, CUDA needs "
            "triton and float32/bfloat16/float16); use backend='torch'"
        )
    if backend == "auto":
        return "fused" if supported else "torch"
    return backend


def fused_prefix_mse(
    x: torch.Tensor,
    latents: SparseLatents,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    cum: torch.Tensor,
    chunk_elements: int,
    consume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, residual)`` of ``prefix_loss.prefix_mse`` from the fused kernel for ``x``'s
    device (Triton on CUDA, numba on CPU); ``cum`` holds the
    prefix weights' cumulative sums. ``chunk_elements`` bounds the CPU kernel's working memory."""
    if x.device.type == "cuda":
        from .triton import triton_prefix_mse

        return triton_prefix_mse(x, latents, W_dec, b_dec, cum, consume=consume)
    from .numba import numba_prefix_mse

    return numba_prefix_mse(x, latents, W_dec, b_dec, cum, chunk_elements, consume)


def scale_grad_once(ctx: Any, grad: torch.Tensor | None, scale: torch.Tensor | float) -> torch.Tensor | None:
    """``scale * grad`` in a fused kernel's backward. With ``ctx.consume`` the saved (decoder-
    sized) buffer is scaled in place instead, which saves a copy but allows only one backward
    pass (trainers need only one); ``ctx.used`` records that it happened."""
    if grad is None:
        return None
    if not ctx.consume:
        return grad * scale
    if ctx.used:
        raise RuntimeError("this prefix loss was built with consume_grads=True: one backward pass only")
    ctx.used = True
    return grad.mul_(scale)
