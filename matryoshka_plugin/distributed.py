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

Three time limits, so that a rank that dies or hangs makes the others fail with an error instead
of waiting forever, while a healthy run is never cut short:

* ``startup_timeout_s`` (default 120 s): the start-up rendezvous, waiting for every process of
  ``WORLD_SIZE`` to join;
* ``timeout_s`` (default 600 s): every collective of a training step (the batch broadcast, the
  top-k selection, the statistics and the gradient all-reduce), on a process group of its own;
* ``prepare_timeout_s`` (default 24 h): the waits for rank 0's or a rank's long one-off work,
  which only one rank does or whose length depends on the disk: skipping the consumed batches on
  resume, the norm factor, reading and writing checkpoints, ``save_steps`` files and the final
  save. These waits go over a separate gloo group whose timeout is this one.
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
    "LocalCollective",
    "ProcessGroupCollective",
    "setup",
    "assign_trainers",
]

DISTRIBUTED_MODES = ("trainers", "data")
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_PREPARE_TIMEOUT_S = 24 * 3600.0
DEFAULT_STARTUP_TIMEOUT_S = 120.0
# What setup() writes into os.environ for a one-process group (and takes out again).
_RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
# Process groups created by setup(), by (purpose, timeout, backend): a later train() call reuses them.
_GROUPS: dict[tuple[str, float, str], Any] = {}


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
    group: Any = None
    """The process group of the training collectives (timeout ``timeout_s``)."""
    wait_group: Any = None
    """The gloo group of the waits around one-off work (timeout ``prepare_timeout_s``)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    prepare_timeout_s: float = DEFAULT_PREPARE_TIMEOUT_S

    @property
    def active(self) -> bool:
        return self.mode is not None and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this rank trains on: ``cuda`` becomes ``cuda:<local_rank>``; an explicit
        ``cuda:<i>`` is refused where this process sees several GPUs (every rank would share one)."""
        if not self.active:
            return requested
        if requested == "cuda":
            return f"cuda:{self.local_rank}"
        if requested.startswith("cuda:") and torch.cuda.device_count() > 1:
            raise ValueError(
                f"device={requested!r} in a run of {self.world_size} processes would put every rank on the "
                f"same GPU; pass device='cuda' (each rank then takes cuda:<local rank>), or give each process "
                "one GPU with CUDA_VISIBLE_DEVICES"
            )
        return requested

    def wait(self, what: str) -> None:
        """Wait until every rank has finished ``what`` (one-off work: bounded by ``prepare_timeout_s``)."""
        if not self.active:
            return
        try:
            dist.barrier(group=self.wait_group)
        except RuntimeError as e:
            raise RuntimeError(
                f"rank {self.rank}: the other ranks did not finish {what} within prepare_timeout_s="
                f"{self.prepare_timeout_s:g} s, or one of them died: {e}"
            ) from e

    def all_true(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a wait around one-off work)."""
        if not self.active:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.wait_group)
        return bool(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a wait around one-off work)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.wait_group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a wait around one-off work)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.wait_group)
        return out

    def _comm_device(self) -> torch.device:
        nccl = dist.get_backend(self.group) == "nccl"
        return torch.device(f"cuda:{self.local_rank}") if nccl else torch.device("cpu")

    def broadcast_batch(self, batch: torch.Tensor | None) -> torch.Tensor | None:
        """Rank 0's batch (``None``: the data ran out) on every rank, on the communication device."""
        if not self.active:
            return batch
        dev = self._comm_device()
        header = [None]
        if self.is_main:
            header = [None if batch is None else (tuple(batch.shape), batch.dtype)]
        dist.broadcast_object_list(header, src=0, group=self.group)
        if header[0] is None:
            return None
        shape, dtype = header[0]
        if self.is_main:
            out = batch.to(dev).contiguous()
        else:
            out = torch.empty(shape, dtype=dtype, device=dev)
        dist.broadcast(out, src=0, group=self.group)
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



def setup(
    mode: str | None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    backend: str | None = None,
    prepare_timeout_s: float = DEFAULT_PREPARE_TIMEOUT_S,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> DistributedRun:
    """Join (or create, from torchrun's environment) the default process group for ``mode``, with
    a group of its own for the training collectives (``timeout_s``, applied to a group created
    before too) and a gloo group for the waits around one-off work (``prepare_timeout_s``)."""
    for name, value in (("timeout_s", timeout_s), ("prepare_timeout_s", prepare_timeout_s),
                        ("startup_timeout_s", startup_timeout_s)):
        if not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
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
    local_rank = None
    if not dist.is_initialized():
        saved = None
        if "RANK" not in os.environ:
            # One process asked for a distributed mode: a group of one, so the same code runs. The
            # rendezvous variables are taken out again afterwards.
            saved = {k: os.environ.get(k) for k in _RENDEZVOUS_ENV}
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        try:
            local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            # The default group's timeout bounds the rendezvous; the training collectives get
            # their own group below.
            try:
                dist.init_process_group(backend=backend, timeout=timedelta(seconds=startup_timeout_s))
            except RuntimeError as e:
                raise RuntimeError(
                    f"the start-up rendezvous at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                    f"did not gather the {os.environ.get('WORLD_SIZE')} processes of WORLD_SIZE within "
                    f"startup_timeout_s={startup_timeout_s:g} s (is every rank started?): {e}"
                ) from e
        finally:
            if saved is not None:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        # The group stays for later train() calls in this process (re-creating it from torchrun's
        # store hangs) and is destroyed at exit.
        atexit.register(_destroy)
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    world = dist.get_world_size()
    group = wait_group = None
    if world > 1:
        group = _group("train", timeout_s, dist.get_backend())
        wait_group = _group("wait", prepare_timeout_s, "gloo")
    return DistributedRun(
        mode, rank=dist.get_rank(), world_size=world, local_rank=local_rank, group=group, wait_group=wait_group,
        timeout_s=timeout_s, prepare_timeout_s=prepare_timeout_s,
    )


def _group(purpose: str, timeout_s: float, backend: str) -> Any:
    """A process group over every rank with this timeout (created once; every rank calls this in
    the same order, as new_group requires)."""
    key = (purpose, float(timeout_s), backend)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return _GROUPS[key]


def _destroy() -> None:
    _GROUPS.clear()
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
    """The reductions a data-parallel trainer needs, over ``group`` (default: the default group)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (same shape on each) concatenated in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0, group=self.group)
        return t

    def batch_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over dim 0 of every rank's ``t`` together (ranks may hold different numbers of
        rows; ``nan`` where no rank holds any), in one all-reduce of the sums and the row count."""
        sums = t.sum(0).reshape(-1)
        total = self.sum_(torch.cat([sums, sums.new_full((1,), t.shape[0])]))
        return (total[:-1] / total[-1]).reshape(t.shape[1:])

    def batch_variance(self, r: torch.Tensor) -> torch.Tensor:
        """The total variance of every rank's rows ``r`` ``[B, d]`` together (equal ``B`` on each):
        the mean over the global batch of each row's squared distance from the global mean."""
        n = r.shape[0] * self.world_size
        mean = self.sum_(r.sum(0)) / n
        return self.sum_((r - mean).pow(2).sum()) / n

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
    def keep_global_top(self, scores: torch.Tensor, local_top: torch.Tensor, count: int) -> torch.Tensor:
        """Flat indices (ascending) of this rank's entries among the ``count`` largest of all
        ranks' ``scores`` together (``count`` is the global number, e.g. ``k * global batch``),
        given ``local_top``, the flat indices of this rank's ``min(count, scores.numel())``
        largest (``sparse_encoder.batch_topk_select``; the caller selects, this only reduces).

        The global cut-off is the ``count``-th largest of the union of each rank's ``count``
        largest values; entries above it are kept, and entries equal to it are handed out in rank
        order so that exactly ``count`` are selected overall.
        """
        flat = scores.reshape(-1)
        m = local_top.numel()
        local = flat[local_top]  # this rank's m largest
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


class LocalCollective:
    """The collective of single-process training: world size 1, every reduction the identity.

    A trainer computes each statistic through its collective, so one code path serves one process
    (this class) and data-parallel ranks (:class:`ProcessGroupCollective`); nothing here changes
    the local arithmetic."""

    world_size = 1
    rank = 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def batch_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over dim 0 (``nan`` for no rows)."""
        return t.mean(0)

    def batch_variance(self, r: torch.Tensor) -> torch.Tensor:
        """The total variance of the rows ``r`` ``[B, d]``: the mean squared distance from their mean."""
        return (r - r.mean(0)).pow(2).sum(-1).mean()

    def average_gradients_(self, params: Sequence[torch.nn.Parameter]) -> None:
        return None

    def keep_global_top(self, scores: torch.Tensor, local_top: torch.Tensor, count: int) -> torch.Tensor:
        """``local_top``: one process's largest entries are the global ones."""
        return local_top


LOCAL = LocalCollective()
"""The shared instance (it holds no state)."""
