"""Does data-parallel ``MatryoshkaLogSparsityTrainer`` training give as good an SAE as one process?

    python -m benchmarks.distributed_drift [--steps 300 --seeds 0 1 2 --d 32 --dict-size 128]

For each seed it trains one SAE on the same synthetic batches (sparse features on random directions
plus noise) three ways: one process; two processes data-parallel (torchrun, gloo); and one process
on batches scaled by ``1 + 2**-22`` (a perturbation of the size of fp32 summation-order rounding).
It prints, per run, the held-out FVU, L0 and dead latents (never firing on 8192 held-out tokens),
the largest weight difference from the seed's one-process SAE, and the first step at which the
L0 the controller saw differs from the one-process run's. If the data-parallel SAE departs from
the one-process SAE as much as the perturbed one does, and its quality lies within the spread over
seeds, the departure is rounding amplified by the training's discrete decisions (the L0
controller's step, dead-latent resampling, the reordering), not a wrongly reduced statistic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.harness import config_from_dict, markdown_table, option, parse_config, run_worker, worker_settings

BATCH, N_TRUE = 256, 96


@dataclass
class DriftBench:
    """The command line of ``python -m benchmarks.distributed_drift`` (and one worker's settings)."""

    steps: int = option(300, "training steps")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2], help="seeds")
    d: int = option(32, "activation dimension")
    dict_size: int = option(128, "latents")
    target_l0: float = option(8.0, "the log-sparsity controller's target L0")
    lr: float = option(3e-3, "learning rate")
    worker: bool = option(False, argparse.SUPPRESS)
    seed: int = option(0, "a worker's seed", flag=False)
    data_parallel: bool = option(False, "a worker: two processes data-parallel", flag=False)
    scale: float = option(1.0, "a worker's input scale", flag=False)
    out: str = option("", "a worker's result file", flag=False)


def batches(d: int, steps: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    dirs = torch.randn(N_TRUE, d, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    p = 0.1 / torch.arange(1, N_TRUE + 1).float() ** 0.5
    out = []
    for i in range(steps + 1):  # the last is held out
        n = BATCH if i < steps else 8192
        gi = torch.Generator().manual_seed(10_000 + i)
        on = (torch.rand(n, N_TRUE, generator=gi) < p).float() * (0.5 + torch.rand(n, N_TRUE, generator=gi))
        out.append((on @ dirs + 0.05 * torch.randn(n, d, generator=gi)) * scale)
    return out


def config(a: DriftBench, seed: int) -> dict:
    from matryoshka_plugin import MatryoshkaLogSparsityTrainer

    return dict(trainer=MatryoshkaLogSparsityTrainer, steps=a.steps, activation_dim=a.d, dict_size=a.dict_size,
                target_l0=a.target_l0, seed=seed, device="cpu", layer=0, lm_name="synthetic", lr=a.lr)


def worker(a: DriftBench) -> dict:
    """Train one SAE (one process, or this rank of a torchrun); the per-step L0 and the SAE."""
    from matryoshka_plugin import MatryoshkaLogSparsityTrainer, train

    torch.set_num_threads(1)
    trace: list[float] = []
    update = MatryoshkaLogSparsityTrainer.update

    def traced(self, step, x):
        out = update(self, step, x)
        trace.append(self.effective_l0)
        return out

    MatryoshkaLogSparsityTrainer.update = traced
    data = batches(a.d, a.steps, a.scale)
    (trainer,) = train(data[:-1], [config(a, a.seed)], a.steps, device="cpu", progress=False,
                       distributed="data" if a.data_parallel else None)
    ae = trainer.ae
    held = data[-1] / a.scale
    with torch.no_grad():
        f = ae.encode(held)
        x_hat = ae.decode(f)
    fvu = float((held - x_hat).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    return {"fvu": fvu, "l0": float((f > 0).sum(1).float().mean()), "dead": int(((f > 0).sum(0) == 0).sum()),
            "l0_trace": trace, "state": {k: v.tolist() for k, v in ae.state_dict().items()}}


def _run(a: DriftBench, seed: int, data_parallel: bool, scale: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = dataclasses.replace(a, seed=seed, data_parallel=data_parallel, scale=scale, worker=False,
                                   out=os.path.join(tmp, "r.json"))
        run_worker(__file__, dataclasses.asdict(spec), nproc=2 if data_parallel else 1,
                   env={"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})
        return json.loads(Path(spec.out).read_text())


def _max_diff(a: dict, b: dict) -> float:
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


def _first_difference(a: list[float], b: list[float]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main(argv: list[str] | None = None) -> int:
    a = parse_config(DriftBench, argv, prog="python -m benchmarks.distributed_drift", description=__doc__.split("\n\n")[0])
    if a.worker:
        spec = config_from_dict(DriftBench, worker_settings())
        result = worker(spec)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(spec.out).write_text(json.dumps(result))
        return 0
    print(f"MatryoshkaLogSparsityTrainer d={a.d} n={a.dict_size} target_l0={a.target_l0:g} lr={a.lr}, "
          f"batch {BATCH}, {a.steps} steps; held-out 8192 tokens")
    rows = []
    for seed in a.seeds:
        one = _run(a, seed, False, 1.0)
        runs = {"one process": one, "2 processes data-parallel": _run(a, seed, True, 1.0),
                "one process, input x (1 + 2^-22)": _run(a, seed, False, 1.0 + 2.0**-22)}
        for name, r in runs.items():
            diff = _max_diff(r["state"], one["state"]) if r is not one else 0.0
            first = _first_difference(r["l0_trace"], one["l0_trace"]) if r is not one else None
            rows.append([seed, name, f"{r['fvu']:.4f}", f"{r['l0']:.2f}", r["dead"], f"{diff:.2g}",
                         "-" if first is None else first])
    print(markdown_table(["seed", "run", "FVU", "L0", "dead", "max weight diff from one process",
                          "first step whose L0 differs"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
