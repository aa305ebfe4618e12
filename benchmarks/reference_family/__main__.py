"""``python -m benchmarks.reference_family [--quick] [--out runs/reference_family] [--report docs/reference_family]``"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import torch

from .pipeline import FULL, LARGE_VARIANTS, QUICK, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference_family", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small SAEs and few tokens (a few minutes on a CPU)")
    p.add_argument("--out", default=None, help="SAE folders and cached measurements (default runs/reference_family[_quick])")
    p.add_argument("--report", default=None, help="results.md/.csv, figure, tree.html "
                   "(default docs/reference_family for the full run, the --out folder for --quick)")
    p.add_argument("--cache", default=None, help="MiniLM activation cache (default $MINILM_ACTS or /tmp/minilm_acts)")
    p.add_argument("--train-tokens", type=int, default=None)
    p.add_argument("--large-size", type=int, default=None, help="latents of the large SAEs")
    p.add_argument("--reference-sizes", type=int, nargs="+", default=None, help="latents of the reference SAEs")
    p.add_argument("--variants", nargs="+", default=None, choices=LARGE_VARIANTS,
                   help="large SAEs to train and compare (default: all)")
    p.add_argument("--seed", type=int, default=0, help="training seed (every SAE); other seeds go to their own folders")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared machine more threads contend and run slower)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    plan = QUICK if a.quick else FULL
    if a.train_tokens:
        plan = replace(plan, train_tokens=a.train_tokens)
    if a.large_size:
        plan = replace(plan, large_size=a.large_size)
    if a.reference_sizes:
        plan = replace(plan, reference_sizes=tuple(a.reference_sizes))
    if a.variants:
        plan = replace(plan, variants=tuple(a.variants))
    plan = replace(plan, seed=a.seed)
    suffix = f"_seed{a.seed}" if a.seed else ""
    out = Path(a.out or ("runs/reference_family_quick" if a.quick else "runs/reference_family") + suffix)
    report = Path(a.report or (out if a.quick else "docs/reference_family" + (f"/seed{a.seed}" if a.seed else "")))

    from benchmarks.real_model.activations import DEFAULT_CACHE, cached_activations

    from .sample import aligned_sample

    cache = Path(a.cache) if a.cache else DEFAULT_CACHE
    train = cached_activations(plan.train_tokens, held_out=False, cache_dir=cache)
    held_out = cached_activations(plan.held_out_tokens, held_out=True, cache_dir=cache).float()
    out.mkdir(parents=True, exist_ok=True)
    sample = aligned_sample(plan.sample_tokens, out / "aligned_sample.pt")
    run(out, plan, train, held_out, sample=sample, report_dir=report)
    print(f"report in {report}")


if __name__ == "__main__":
    main()
