"""Freed host memory kept for the next training step (glibc's malloc): an opt-in.

A CPU training step allocates the same large tensors every time: the dense pre-activations
(batch x latents), the weight gradients (latents x d each). glibc serves a block above its mmap
threshold (128 KiB, rising to at most 32 MiB) with fresh pages from the kernel and unmaps it on
free, so every step pays a page fault and a kernel zero-fill per 4 KiB of each such tensor.
:func:`reuse_host_memory` tells malloc to serve every block from its heap and to keep what is
freed (``M_MMAP_MAX = 0``, a 2 GiB trim threshold): the next step reuses pages already mapped,
as a caching allocator would. The cost is that the process keeps its peak footprint instead of
returning freed memory to the system. Figures: docs/speed.md ("Host memory").

It changes malloc for the whole process and cannot be undone, so the package never does it on
its own: call :func:`reuse_host_memory` (the speed benchmark and the comparison pipelines do), or
set ``MATRYOSHKA_REUSE_MEMORY=1`` and a trainer built for the CPU applies it.
``MATRYOSHKA_REUSE_MEMORY=0`` keeps malloc as it is even where :func:`reuse_host_memory` is
called. Outside glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["ENV_VAR", "reuse_host_memory", "reuse_if_requested"]

ENV_VAR = "MATRYOSHKA_REUSE_MEMORY"

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # the largest int: freed memory at the heap's top is kept

_applied: bool | None = None


def _glibc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        if not hasattr(libc, "gnu_get_libc_version"):  # musl has a mallopt that does nothing
            return None
        return libc.mallopt
    except (OSError, AttributeError):
        return None


def reuse_host_memory() -> bool:
    """Make this process's malloc keep and reuse freed memory; whether it is in effect.

    For the whole process and for good (glibc has no way back); calling it again does nothing.
    Returns ``False`` when ``MATRYOSHKA_REUSE_MEMORY=0``, outside glibc, or if glibc refused.
    """
    global _applied
    if _applied is None:
        mallopt = None if os.environ.get(ENV_VAR) == "0" else _glibc_mallopt()
        if mallopt is None:
            _applied = False
        else:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            # glibc returns 1 on success
            _applied = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
    return _applied


def reuse_if_requested() -> bool:
    """:func:`reuse_host_memory` if ``MATRYOSHKA_REUSE_MEMORY=1``, else nothing (the trainers
    call it when built for the CPU); whether reuse is in effect."""
    if os.environ.get(ENV_VAR) == "1":
        return reuse_host_memory()
    return bool(_applied)
