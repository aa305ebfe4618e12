"""Several processes with ``torch.distributed`` (launched by ``torchrun``).

Two ways to use N processes, chosen by ``train(..., distributed=...)``:

* ``"trainers"``: the trainer configs are spread over the ranks; each rank trains its subset of
  SAEs on the same activations (rank 0 reads the data and broadcasts every batch). Each SAE's
  training is exactly the serial one.
* ``"data"``: every SAE is trained by all ranks together; each rank takes a contiguous shard of
  every batch. The batch top-k selection is global (the ``k * batch`` largest activations of the
  whole batch, as one process would pick them), per-batch statistics are reduced over ranks and
  gradients are averaged, so every rank holds the same weights after every step; the result equals
  single-process training on the same batches up to fp32 summation order.

Collectives time out after ``timeout`` seconds (default 600), so a rank that dies or hangs makes
the others fail with an error instead of waiting forever.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "DISTRIBUTED_MODES",
    "DistributedRun",
    "ProcessGroupCollective",
    "setup",
    "assign_trainers",
]

DISTRIBUTED_MODES = ("trainers", "data")
DEFAULT_TIMEOUT_S = 600.0


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistributedRun:
    """Where this process stands in a multi-process run."""

    mode: str | None
    """``"trainers"``, ``"data"`` or ``None`` (one process)."""
    rank: int = 0
    """This process's rank."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU)."""

    @property
    def active(self) -> bool:
        return self.mode is not None and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this rank trains on: ``cuda`` becomes ``cuda:<local_rank>``."""
        if self.active and requested == "cuda":
            return f"cuda:{self.local_rank}"
        return requested

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_true(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank."""
        if not self.active:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _comm_device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if dist.get_backend() == "nccl" else torch.device("cpu")

    def broadcast_batch(self, batch: torch.Tensor | None) -> torch.Tensor | None:
        """Rank 0's batch (``None``: the data ran out) on every rank, on the communication device."""
        if not self.active:
            return batch
        dev = self._comm_device()
        header = [None]
        if self.is_main:
            header = [None if batch is None else (tuple(batch.shape), batch.dtype)]
        dist.broadcast_object_list(header, src=0)
        if header[0] is None:
            return None
        shape, dtype = header[0]
        if self.is_main:
            out = batch.to(dev).contiguous()
        else:
            out = torch.empty(shape, dtype=dtype, device=dev)
        dist.broadcast(out, src=0)
        return out

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous rows of ``batch`` (``"data"`` mode)."""
        if self.mode != "data" or not self.active:
            return batch
        n = batch.shape[0]
        if n % self.world_size:
            raise ValueError(
                f"a batch of {n} activations does not divide over {self.world_size} processes; "
                f"use a batch size that is a multiple of the world size"
            )
        per = n // self.world_size
        return batch[self.rank * per : (self.rank + 1) * per]



def setup(mode: str | None, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> DistributedRun:
    """Join (or create, from torchrun's environment) the default process group for ``mode``."""
    world = dist.get_world_size() if dist.is_initialized() else _launched_world_size()
    if mode is None:
        if world > 1:
            raise ValueError(
                f"launched as one of {world} processes but distributed=None: pass distributed='trainers' "
                "(spread the trainer configs over the ranks) or 'data' (data-parallel training of each SAE)"
            )
        return DistributedRun(None)
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"unknown distributed mode {mode!r}; choose one of {DISTRIBUTED_MODES} or None")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # One process asked for a distributed mode: a group of one, so the same code runs.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        if backend == "gloo":
            _match_numba_threads()
        # The group stays for later train() calls in this process (re-creating it from torchrun's
        # store hangs) and is destroyed at exit.
        atexit.register(_destroy)
    return DistributedRun(
        mode,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
    )


def _match_numba_threads() -> None:
    """CPU processes share the cores: the numba kernels take as many threads as torch (torchrun
    sets OMP_NUM_THREADS=1) instead of one per core each, which oversubscribed 2 cores 2x."""
    try:
        import numba
    except ImportError:
        return
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assign_trainers(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Trainer indices per rank: greedy by cost (largest first onto the least loaded rank), so
    ranks finish at about the same time; ties keep the original order."""
    load = [0.0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += costs[i]
    return [sorted(x) for x in out]


class ProcessGroupCollective:
    """The reductions a data-parallel trainer needs, over the default process group."""

    def __init__(self) -> None:
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (same shape on each) concatenated in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0)
        return t

    @torch.no_grad()
    def average_gradients_(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Gradients averaged over ranks, in one flat all-reduce."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.sum_(flat).div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def batch_topk_select(self, scores: torch.Tensor, count: int, backend: str = "auto") -> torch.Tensor:
        """Flat indices (ascending) of this rank's entries among the ``count`` largest of all
        ranks' ``scores`` together (``count`` is the global number, e.g. ``k * global batch``).

        The global cut-off is the ``count``-th largest of the union of each rank's ``count``
        largest values; entries above it are kept, and entries equal to it are handed out in rank
        order so that exactly ``count`` are selected overall.
        """
        from .sparse_encoder import batch_topk_select

        flat = scores.reshape(-1)
        m = min(count, flat.numel())
        local = flat[batch_topk_select(scores, m, backend)]  # this rank's m largest (sampled cut-off, exact)
        if m < count:
            local = torch.cat([local, local.new_full((count - m,), float("-inf"))])
        everything = self.gather_rows(local)
        cutoff = torch.topk(everything, count, sorted=True).values[-1]
        above = flat > cutoff
        ties = flat == cutoff
        counts = torch.stack([above.sum(), ties.sum()]).to(torch.int64)
        all_counts = self.gather_rows(counts.unsqueeze(0))  # [world, 2]
        need = count - int(all_counts[:, 0].sum())
        before = int(all_counts[: self.rank, 1].sum())
        take = max(0, min(int(counts[1]), need - before))
        keep = above
        if take:
            tie_idx = torch.nonzero(ties).squeeze(1)[:take]
            keep = above.clone()
            keep[tie_idx] = True
        return torch.nonzero(keep).squeeze(1)
