"""Training-step speed and peak memory: this package's trainers vs dictionary_learning's.

    python benchmarks/speed.py                      # CPU: d=2304, F=16384, k=80, B=2048
    python benchmarks/speed.py --device cuda        # GPU: F=65536 by default
    python benchmarks/speed.py --scaling            # also step time against F and k
    python benchmarks/speed.py --grid               # prefix modes against groups and the matmul, over shapes

Every candidate runs in its own process on identical data (same seed), so peak memory is
measured per trainer: peak RSS above the process's baseline on CPU, peak allocated memory on
GPU. Times are ``trainer.update(step, x)`` wall-clock, the minimum and median over the timed
steps after warm-up steps (numba compiles on the first call). The floor is one dense encoder
matmul ``x @ W_enc + b_enc``. Prints a table and one JSON line of ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # ``python benchmarks/speed.py``: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import last_json_line, markdown_table, option, parse_config, run_worker, worker_settings

CANDIDATES = {
    "matmul": "one dense encoder matmul (floor)",
    "ours_groups": "matryoshka_plugin MatryoshkaBatchTopK, 5 fixed groups",
    "ours_every": "matryoshka_plugin MatryoshkaBatchTopK, every prefix",
    "ours_pareto": "matryoshka_plugin MatryoshkaBatchTopK, Pareto expectation",
    "ours_groups_bf16": "matryoshka_plugin MatryoshkaBatchTopK, 5 fixed groups, bf16 activations",
    "ours_groups_torch": "matryoshka_plugin MatryoshkaBatchTopK, 5 groups, plain torch backend",
    "ours_log_sparsity": "matryoshka_plugin MatryoshkaLogSparsity, 10 Pareto prefixes (L0 set to k)",
    "upstream_matryoshka": "dictionary_learning MatryoshkaBatchTopKTrainer, 5 groups",
    "upstream_batchtopk": "dictionary_learning BatchTopKTrainer",
    "saelens_matryoshka": "SAELens MatryoshkaBatchTopKTrainingSAE, 5 widths (forward, backward, Adam)",
    "sparsify_topk": "EleutherAI sparsify SparseCoder, plain TopK (forward, backward, Adam)",
}
FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _saelens_step(x, d: int, F: int, k: int, device: str):
    """One SAELens training step: ``training_forward_pass`` (the loss over the nested widths,
    the top-k auxiliary loss with no dead latents), backward and an Adam step, as SAELens'
    ``SAETrainer`` runs it, with this benchmark's group widths."""
    import torch
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    widths, total = [], 0
    for frac in FRACTIONS[:-1]:
        total += int(frac * F)
        widths.append(total)
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(d_in=d, d_sae=F, k=k, matryoshka_widths=widths + [F], device=device)
    sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(F, dtype=torch.bool, device=device)

    def step(i: int) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=i, is_logging_step=False)
        )
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sparsify_step(x, d: int, F: int, k: int, device: str):
    """One step of EleutherAI sparsify's TopK sparse coder (``pip install --no-deps eai-sparsify
    natsort schedulefree simple-parsing``): forward (FVU and the AuxK loss, no dead latents),
    backward, Adam. A per-token TopK SAE, not a Matryoshka one: a lower bound for a Matryoshka step
    built on it."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=F, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(F, dtype=torch.bool, device=device)

    def step(i: int) -> None:
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(spec: dict) -> dict:
    """Run one candidate; returns timings and peak memory."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device, d, F, k, B = spec["device"], spec["d"], spec["dict_size"], spec["k"], spec["batch"]
    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(B, d, generator=gen) * 4 + 1).to(device=device, dtype=dtype)
    name = spec["name"]
    if name.startswith("ours") and device == "cpu":
        # This package's candidates opt in to malloc's reuse of freed memory (docs/speed.md, "Host
        # memory"); MATRYOSHKA_REUSE_MEMORY=0 measures them without it.
        from matryoshka_plugin import reuse_host_memory

        reuse_host_memory()
    common = dict(steps=10_000, activation_dim=d, dict_size=F, layer=12, lm_name="bench", device=device, seed=0)
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    if name == "matmul":
        W = torch.randn(d, F, generator=gen).to(device=device, dtype=dtype)
        b = torch.zeros(F, device=device, dtype=dtype)
        step = lambda i: torch.addmm(b, x, W)  # noqa: E731
    else:
        if name.startswith("ours_log"):
            from matryoshka_plugin import MatryoshkaLogSparsityTrainer

            tr = MatryoshkaLogSparsityTrainer(target_l0=k, lr=1e-3, warmup_steps=1, **common)
            with torch.no_grad():  # start at L0 ~ k, where a trained ReLU SAE sits
                pre = (x.float() / tr.ae.input_scale()) @ tr.ae.W_enc
                tr.ae.b_enc.copy_(-torch.quantile(pre[:256].float(), 1 - k / F, dim=0))
        elif name.startswith("ours"):
            from matryoshka_plugin import MatryoshkaBatchTopKTrainer

            if "every" in name:
                mode = dict(prefix_mode="every", group_fractions=None)
            elif "pareto" in name:
                mode = dict(prefix_mode="pareto_expected", group_fractions=None)
            else:
                mode = dict(group_fractions=FRACTIONS)
            if name.endswith("_bf16"):  # as trainSAE(autocast_dtype=torch.bfloat16) passes them on CPU
                x = x.bfloat16()
            backend = "torch" if name.endswith("_torch") else "auto"
            tr = MatryoshkaBatchTopKTrainer(k=k, warmup_steps=1, threshold_start_step=0, backend=backend, **mode, **common)
        elif name == "upstream_matryoshka":
            from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

            tr = MatryoshkaBatchTopKTrainer(k=k, group_fractions=FRACTIONS, warmup_steps=1, threshold_start_step=0, **common)
        elif name == "saelens_matryoshka":
            tr = None
        elif name == "sparsify_topk":
            tr = None
        elif name == "upstream_batchtopk":
            from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer

            tr = BatchTopKTrainer(k=k, warmup_steps=1, threshold_start_step=0, **common)
        else:
            raise ValueError(f"unknown candidate {name}")
        if tr is not None:
            step = lambda i: tr.update(i, x)  # noqa: E731
        elif name == "sparsify_topk":
            step = _sparsify_step(x, d, F, k, device)
        else:
            step = _saelens_step(x, d, F, k, device)
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        t0 = time.perf_counter()
        step(i)
        _sync(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"name": name, "min_s": min(times), "median_s": statistics.median(times), "peak_mb": peak}


def run_candidate(spec: dict) -> dict:
    try:
        return last_json_line(run_worker(__file__, spec))
    except RuntimeError as e:
        raise RuntimeError(f"{spec['name']} failed:\n{e}") from None


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


# -- the shape grid: prefix modes against the groups mode, and the groups mode against the matmul --

GRID = {"d": [384, 768, 2304], "F": [4096, 16384], "k": [16, 32, 80, 160], "B": [1024, 2048]}
GRID_MODES = {"groups": dict(group_fractions=FRACTIONS), "every": dict(prefix_mode="every", group_fractions=None),
              "pareto": dict(prefix_mode="pareto_expected", group_fractions=None)}
MODE_TARGET, MATMUL_TARGET = 1.15, 1.6


def grid_cell(d: int, F: int, k: int, B: int, device: str, steps: int, warmup: int, profile: bool) -> dict:
    """One grid cell in this process: the three prefix modes and the matmul, stepped in turn
    (round-robin, so background load hits them alike); minimum seconds per step of each."""
    import torch

    from matryoshka_plugin import MatryoshkaBatchTopKTrainer, reuse_host_memory

    if device == "cpu":
        reuse_host_memory()  # as the worker does for this package's candidates
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(B, d, generator=gen) * 4 + 1).to(device)
    common = dict(steps=10_000, activation_dim=d, dict_size=F, k=k, layer=0, lm_name="bench", device=device, seed=0,
                  warmup_steps=1, threshold_start_step=0)
    trainers = {m: MatryoshkaBatchTopKTrainer(**common, **kw) for m, kw in GRID_MODES.items()}
    W, b = torch.randn(d, F, generator=gen).to(device), torch.zeros(F, device=device)
    steps_of = {m: (lambda i, t=t: t.update(i, x)) for m, t in trainers.items()}
    steps_of["matmul"] = lambda i: torch.addmm(b, x, W)
    times: dict[str, list[float]] = {m: [] for m in steps_of}
    for i in range(warmup + steps):
        for m, step in steps_of.items():
            _sync(device)
            t0 = time.perf_counter()
            step(i)
            _sync(device)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    best = {m: min(t) for m, t in times.items()}
    cell = {"seconds": {m: round(v, 5) for m, v in best.items()},
            "every_over_groups": round(best["every"] / best["groups"], 3),
            "pareto_over_groups": round(best["pareto"] / best["groups"], 3),
            "groups_over_matmul": round(best["groups"] / best["matmul"], 3)}
    missed = (max(cell["every_over_groups"], cell["pareto_over_groups"]) > MODE_TARGET
              or cell["groups_over_matmul"] > MATMUL_TARGET)
    if profile and missed:
        cell["profile"] = {m: profile_step(steps_of[m], warmup + steps) for m in ("groups", "every", "pareto")}
    return cell


def profile_step(step, i: int, top: int = 8) -> list[list]:
    """The ``top`` operations of one step by their own CPU time: ``[name, ms, calls]``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(i)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [[e.key, round(e.self_cpu_time_total / 1000, 1), e.count] for e in rows]


def run_grid(args: "SpeedBench") -> dict:
    """Every cell of the grid not yet in the cache (``--grid-cache``), each in a fresh process;
    the cache is rewritten after each cell, so an interrupted grid resumes where it stopped."""
    from matryoshka_plugin.io import atomic_write_json

    cache_path = args.grid_cache
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    Fs = GRID["F"] + ([65536] if args.device.startswith("cuda") else [])
    cells = [(d, F, k, B) for d in (args.grid_d or GRID["d"]) for F in (args.grid_F or Fs)
             for k in (args.grid_k or GRID["k"]) for B in (args.grid_B or GRID["B"])]
    for d, F, k, B in cells:
        key = f"{args.device} d={d} F={F} k={k} B={B}"
        if key in cache:
            continue
        spec = dict(d=d, F=F, k=k, B=B, device=args.device, steps=args.steps, warmup=args.warmup,
                    profile=args.profile, threads=args.threads)
        try:
            cache[key] = last_json_line(run_worker(__file__, spec, flag="--grid-worker"))
        except RuntimeError as e:
            raise RuntimeError(f"grid cell {key} failed:\n{e}") from None
        print(f"{key}: {cache[key]['seconds']}", flush=True)
        atomic_write_json(cache, cache_path)
    print(format_grid({k: v for k, v in cache.items() if k.startswith(args.device + " ")}))
    return cache


def format_grid(cache: dict) -> str:
    def mark(v: float, target: float) -> str:
        return f"**{v:.2f}** ✗" if v > target else f"{v:.2f}"

    def order(key: str):
        return tuple(int(p.split("=")[1]) for p in key.split()[1:])

    rows = [[*order(key), f"{c['seconds']['groups']:.3f}", f"{c['seconds']['matmul']:.3f}",
             mark(c["every_over_groups"], MODE_TARGET), mark(c["pareto_over_groups"], MODE_TARGET),
             mark(c["groups_over_matmul"], MATMUL_TARGET)] for key, c in sorted(cache.items(), key=lambda kv: order(kv[0]))]
    table = markdown_table(["d", "F", "k", "B", "groups s/step", "matmul s", "every / groups", "pareto / groups",
                            "groups / matmul"], rows)
    return table + (f"\n\n✗: target missed (modes within {MODE_TARGET}x of groups, groups within {MATMUL_TARGET}x "
                    "of one encoder matmul); minimum over the timed steps, the four stepped in turn in one process.")


@dataclass
class SpeedBench:
    """The command line of ``python benchmarks/speed.py``."""

    device: str = option("cpu", "torch device")
    d: int = option(2304, "activation dimension")
    dict_size: int | None = option(None, "latents (default: 16384 on CPU, 65536 on GPU)")
    k: int = option(80, "BatchTopK k")
    batch: int = option(2048, "tokens per step")
    dtype: str = option("float32", "activation dtype")
    steps: int = option(5, "timed steps")
    warmup: int = option(2, "warm-up steps")
    threads: int = option(0, "torch threads (0: torch's default)")
    rounds: int = option(1, "run the candidates this many times, interleaved, keeping each one's best "
                            "(robust to background load)")
    only: list[Literal[tuple(CANDIDATES)]] | None = option(None, "candidates to run (default: all)")
    scaling: bool = option(False, "also time our step against F and k")
    json: str | None = option(None, "also write the results to this file")
    grid: bool = option(False, "time the prefix modes against groups and groups against the matmul over the shape grid")
    grid_cache: str = option("outputs/speed_grid.json", "per-cell results (resumable)")
    grid_d: list[int] | None = option(None, "only these d (default: the whole grid)")
    grid_F: list[int] | None = option(None, "only these F")
    grid_k: list[int] | None = option(None, "only these k")
    grid_B: list[int] | None = option(None, "only these B")
    profile: bool = option(False, "with --grid: profile cells that miss a target")
    worker: bool = option(False, argparse.SUPPRESS)
    grid_worker: bool = option(False, argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(SpeedBench, argv, prog="python benchmarks/speed.py", description=__doc__)
    if args.worker:
        print(json.dumps(worker(worker_settings())))
        return {}
    if args.grid_worker:
        spec = worker_settings()
        threads = spec.pop("threads")
        if threads:
            import torch

            torch.set_num_threads(threads)
        print(json.dumps(grid_cell(**spec)))
        return {}
    if args.grid:
        os.makedirs(os.path.dirname(os.path.abspath(args.grid_cache)), exist_ok=True)
        return run_grid(args)

    from tqdm import tqdm

    F = args.dict_size or (65536 if args.device.startswith("cuda") else 16384)
    base = dict(device=args.device, d=args.d, dict_size=F, k=args.k, batch=args.batch, dtype=args.dtype,
                steps=args.steps, warmup=args.warmup, threads=args.threads)
    names = args.only or list(CANDIDATES)
    results = {}
    for _ in tqdm(range(args.rounds), desc="rounds", disable=args.rounds == 1):
        for name in tqdm(names, desc="candidates", leave=False):
            r = run_candidate({**base, "name": name})
            best = results.get(name)
            if best is None or r["min_s"] < best["min_s"]:
                r["peak_mb"] = max(r["peak_mb"], best["peak_mb"]) if best else r["peak_mb"]
                results[name] = r
    print(f"\nMachine: {machine()}")
    print(f"Shape: d={args.d}, F={F}, k={args.k}, B={args.batch}, {args.dtype}, {args.device}; "
          f"{args.steps} timed steps after {args.warmup} warm-up steps, best of {args.rounds} round(s)\n")
    floor = results.get("matmul", {}).get("min_s")
    print(markdown_table(["candidate", "min s/step", "median s/step", "x floor", "peak memory MB"], (
        [CANDIDATES[name], f"{r['min_s']:.3f}", f"{r['median_s']:.3f}", f"{r['min_s'] / floor:.2f}" if floor else "-",
         f"{r['peak_mb']:.0f}"] for name, r in results.items())))

    def ratio(a, b):
        if a in results and b in results:
            return round(results[a]["min_s"] / results[b]["min_s"], 3)
        return None

    summary = {
        "shape": {"d": args.d, "F": F, "k": args.k, "B": args.batch, "dtype": args.dtype, "device": args.device},
        "machine": machine(),
        "upstream_matryoshka_over_ours": ratio("upstream_matryoshka", "ours_groups"),
        "upstream_batchtopk_over_ours": ratio("upstream_batchtopk", "ours_groups"),
        "saelens_matryoshka_over_ours": ratio("saelens_matryoshka", "ours_groups"),
        "sparsify_topk_over_ours": ratio("sparsify_topk", "ours_groups"),
        "ours_over_matmul": ratio("ours_groups", "matmul"),
        "every_over_groups": ratio("ours_every", "ours_groups"),
        "peak_mb": {n: round(r["peak_mb"]) for n, r in results.items()},
        "seconds": {n: round(r["min_s"], 4) for n, r in results.items()},
    }
    if "ours_groups" in results:
        summary["tokens_per_s"] = round(args.batch / results["ours_groups"]["min_s"])
    if args.scaling:
        scaling = {"F": {}, "k": {}}
        sizes = [F // 4, F // 2, F, F * 2]
        ks = [args.k // 4, args.k // 2, args.k, args.k * 2]
        jobs = [("F", s, {**base, "dict_size": s}) for s in sizes] + [("k", kk, {**base, "k": kk}) for kk in ks]
        for axis, value, spec in tqdm(jobs, desc="scaling"):
            ours = run_candidate({**spec, "name": "ours_groups"})["min_s"]
            floor_s = run_candidate({**spec, "name": "matmul"})["min_s"]
            scaling[axis][value] = {"ours_s": round(ours, 4), "matmul_s": round(floor_s, 4), "ratio": round(ours / floor_s, 2)}
        print("\n" + markdown_table(["axis", "value", "ours s/step", "matmul s", "ours / matmul"], (
            [axis, value, f"{r['ours_s']:.3f}", f"{r['matmul_s']:.3f}", f"{r['ratio']:.2f}"]
            for axis, rows in scaling.items() for value, r in rows.items())))
        summary["scaling"] = scaling
    print("\n" + json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "results": results}, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
