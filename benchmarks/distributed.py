"""Per-rank cost of ``train(distributed=...)`` and of full-state checkpoints.

    python -m benchmarks.distributed [--d 384 --dict-size 4096 --k 32 --batch 1024 --steps 40]

Runs, in one go, with one thread per process: one process training one SAE; two processes
training it data-parallel (torchrun, gloo); one process training two SAEs; two processes with one
SAE each (``"trainers"``); and a full-state checkpoint of one trainer (size, write and read time).
Prints ms per step and the ratios. On a GPU machine pass ``--device cuda`` (NCCL).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import (
    config_from_dict, last_json_line, markdown_table, option, parse_config, run_worker, worker_settings,
)


@dataclass
class DistributedBench:
    """The command line of ``python -m benchmarks.distributed`` (and one worker's settings)."""

    d: int = option(384, "activation dimension")
    dict_size: int = option(4096, "latents")
    k: int = option(32, "BatchTopK k")
    batch: int = option(1024, "tokens per step")
    steps: int = option(40, "timed steps")
    device: str = option("cpu", "torch device (cuda: NCCL)")
    worker: bool = option(False, argparse.SUPPRESS)
    mode: str = option("one", "a worker's mode: one, data or trainers", flag=False)
    saes: int = option(1, "a worker's number of SAEs", flag=False)


def _batches(n: int, batch: int, d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(4 * d, d, generator=g) / d**0.5
    return [((torch.rand(batch, 4 * d, generator=g) < 0.02).float() * torch.rand(batch, 4 * d, generator=g)) @ dirs
            for _ in range(n)]


def _configs(a: DistributedBench, n: int) -> list[dict]:
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer

    return [dict(trainer=MatryoshkaBatchTopKTrainer, steps=a.steps, activation_dim=a.d, dict_size=a.dict_size, k=a.k,
                 group_fractions=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32], seed=i, device=a.device, layer=0,
                 lm_name="synthetic", warmup_steps=5, threshold_start_step=5) for i in range(n)]


def worker(a: DistributedBench) -> None:
    """One measurement (run as its own process, or by torchrun)."""
    from matryoshka_plugin import train

    torch.set_num_threads(1)
    data = _batches(a.steps, a.batch, a.d)
    dist_mode = None if a.mode == "one" else a.mode
    with tempfile.TemporaryDirectory() as tmp:
        # a short run first: process group, kernels and allocations warm up
        train(data[:3], _configs(a, a.saes)[:a.saes], 3, device=a.device, progress=False, distributed=dist_mode)
        t0 = time.perf_counter()
        train(data, _configs(a, a.saes), a.steps, device=a.device, progress=False, distributed=dist_mode,
              save_dir=os.path.join(tmp, "run"))
        dt = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"ms_per_step": 1000 * dt / a.steps}))


def checkpoint_cost(a: DistributedBench) -> dict:
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer
    from matryoshka_plugin.io import atomic_torch_save
    from matryoshka_plugin.resume import load_trainer_state, trainer_state_dict

    cfg = dict(_configs(a, 1)[0])
    cfg.pop("trainer")
    t = MatryoshkaBatchTopKTrainer(**cfg)
    for s, x in enumerate(_batches(3, a.batch, a.d)):
        t.update(s, x)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trainer_0.pt"
        t0 = time.perf_counter()
        atomic_torch_save(trainer_state_dict(t), path)
        write = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_trainer_state(MatryoshkaBatchTopKTrainer(**cfg), torch.load(path, weights_only=True))
        read = time.perf_counter() - t0
        size = path.stat().st_size
    return {"checkpoint_MB": size / 2**20, "write_s": write, "read_s": read}


def _measure(a: DistributedBench, mode: str, saes: int, nproc: int) -> float:
    spec = dataclasses.replace(a, mode=mode, saes=saes, worker=False)
    out = run_worker(__file__, dataclasses.asdict(spec), nproc=nproc, env={"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})
    return last_json_line(out)["ms_per_step"]


def main(argv: list[str] | None = None) -> int:
    a = parse_config(DistributedBench, argv, prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    if a.worker:
        worker(config_from_dict(DistributedBench, worker_settings()))
        return 0
    print(f"d={a.d} F={a.dict_size} k={a.k} batch={a.batch}, {a.steps} steps, one thread per process, {a.device}")
    one = _measure(a, "one", 1, 1)
    data = _measure(a, "data", 1, 2)
    two_serial = _measure(a, "one", 2, 1)
    spread = _measure(a, "trainers", 2, 2)
    print(markdown_table(["set-up", "ms per step", "ratio"], [
        ["1 SAE, 1 process", f"{one:.1f}", "1.00"],
        ["1 SAE, 2 processes data-parallel", f"{data:.1f}", f"{data / one:.2f} of one process"],
        ["2 SAEs, 1 process", f"{two_serial:.1f}", "1.00"],
        ["2 SAEs, 2 processes (trainers spread)", f"{spread:.1f}", f"{spread / two_serial:.2f} of one process"]]))
    c = checkpoint_cost(a)
    print(f"full-state checkpoint of one trainer: {c['checkpoint_MB']:.1f} MB, write {c['write_s']:.2f} s, "
          f"read + load {c['read_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
