"""Per-rank cost of ``train(distributed=...)`` and of full-state checkpoints.

    python -m benchmarks.distributed [--d 384 --dict-size 4096 --k 32 --batch 1024 --steps 40]

Runs, in one go, with one thread per process: one process training one SAE; two processes
training it data-parallel (torchrun, gloo); one process training two SAEs; two processes with one
SAE each (``"trainers"``); and a full-state checkpoint of one trainer (size, write and read time).
Prints ms per step and the ratios. On a GPU machine pass ``--device cuda`` (NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _batches(n: int, batch: int, d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(4 * d, d, generator=g) / d**0.5
    return [((torch.rand(batch, 4 * d, generator=g) < 0.02).float() * torch.rand(batch, 4 * d, generator=g)) @ dirs
            for _ in range(n)]


def _configs(a: argparse.Namespace, n: int) -> list[dict]:
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer

    return [dict(trainer=MatryoshkaBatchTopKTrainer, steps=a.steps, activation_dim=a.d, dict_size=a.dict_size, k=a.k,
                 group_fractions=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32], seed=i, device=a.device, layer=0,
                 lm_name="synthetic", warmup_steps=5, threshold_start_step=5) for i in range(n)]


def worker(a: argparse.Namespace) -> None:
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


def checkpoint_cost(a: argparse.Namespace) -> dict:
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


def _measure(a: argparse.Namespace, mode: str, saes: int, nproc: int) -> float:
    # Settings travel in the environment: torchrun would parse options after the script as its own.
    spec = json.dumps(dict(mode=mode, saes=saes, d=a.d, dict_size=a.dict_size, k=a.k, batch=a.batch,
                           steps=a.steps, device=a.device))
    args = [str(Path(__file__).resolve()), "--worker"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", DISTRIBUTED_BENCH=spec)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["ms_per_step"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--dict-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(argparse.Namespace(**json.loads(os.environ["DISTRIBUTED_BENCH"])))
        return 0
    print(f"d={a.d} F={a.dict_size} k={a.k} batch={a.batch}, {a.steps} steps, one thread per process, {a.device}")
    one = _measure(a, "one", 1, 1)
    data = _measure(a, "data", 1, 2)
    two_serial = _measure(a, "one", 2, 1)
    spread = _measure(a, "trainers", 2, 2)
    print("| set-up | ms per step | ratio |")
    print("|---|---|---|")
    print(f"| 1 SAE, 1 process | {one:.1f} | 1.00 |")
    print(f"| 1 SAE, 2 processes data-parallel | {data:.1f} | {data / one:.2f} of one process |")
    print(f"| 2 SAEs, 1 process | {two_serial:.1f} | 1.00 |")
    print(f"| 2 SAEs, 2 processes (trainers spread) | {spread:.1f} | {spread / two_serial:.2f} of one process |")
    c = checkpoint_cost(a)
    print(f"full-state checkpoint of one trainer: {c['checkpoint_MB']:.1f} MB, write {c['write_s']:.2f} s, "
          f"read + load {c['read_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
