"""CPU thread counts chosen by work size.

Torch's default is one intra-op thread per core. For small steps (toy SAEs, tiny tests) the
threads' synchronisation costs more than the work, and on a loaded machine a thread that waits
for a busy core stalls the whole step, so a toy step runs slower with two threads than with one
(figures: docs/speed.md, "Thread counts for small steps"). Large steps (real SAE widths) keep
every thread.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import torch

__all__ = ["STEP_PARALLEL_MIN_WORK", "threads_for", "cpu_threads", "threads_by_work"]

# Multiply-adds of a step's encoder matmul (batch x d x latents) below which one thread runs
# the whole step: below it a parallel region's start-up and barriers are no longer negligible
# and a stalled thread costs more than the split saves (docs/speed.md, "Thread counts for small
# steps"). (The numba kernels keep their own, smaller cut-off: kernels.numba.PARALLEL_MIN_WORK.)
STEP_PARALLEL_MIN_WORK = 1 << 24

F = TypeVar("F", bound=Callable)


def threads_for(work: int, max_threads: int | None = None) -> int:
    """Intra-op threads for ``work`` multiply-adds: 1 below :data:`STEP_PARALLEL_MIN_WORK`, else all."""
    limit = max_threads if max_threads is not None else torch.get_num_threads()
    return 1 if work < STEP_PARALLEL_MIN_WORK else max(1, int(limit))


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_by_work(method: F) -> F:
    """Decorate a trainer's ``update``/``loss(self, step_or_x, ...)``: its CPU threads follow the
    step's encoder work (rows x activation_dim x dict_size) on CPU; GPU steps are untouched."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        x = next((a for a in args if isinstance(a, torch.Tensor)), kwargs.get("x"))
        if not isinstance(x, torch.Tensor) or x.ndim == 0 or torch.device(self.device).type != "cpu":
            return method(self, *args, **kwargs)
        work = (x.numel() // max(int(x.shape[-1]), 1)) * self.ae.activation_dim * self.ae.dict_size
        with cpu_threads(threads_for(work)):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
