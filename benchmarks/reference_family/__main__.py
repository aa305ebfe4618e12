"""``python -m benchmarks.reference_family [--quick] [--out runs/reference_family] [--report docs/results/reference_family]``"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from ..harness import option, parse_config, results_dir
from .pipeline import FULL, LARGE_VARIANTS, QUICK, run


@dataclass
class ReferenceFamilyStudy:
    """The command line of ``python -m benchmarks.reference_family``."""

    quick: bool = option(False, "small SAEs and few tokens (a few minutes on a CPU)")
    out: str | None = option(None, "SAE folders and cached measurements (default runs/reference_family[_quick])")
    report: str | None = option(None, "results.md/.csv, figure, tree.html (default docs/results/reference_family "
                                      "for the full run, the --out folder for --quick)")
    cache: str | None = option(None, "MiniLM activation cache (default $MINILM_ACTS or /tmp/minilm_acts)")
    train_tokens: int | None = option(None, "training tokens (default: the plan's)")
    large_size: int | None = option(None, "latents of the large SAEs")
    reference_sizes: list[int] | None = option(None, "latents of the reference SAEs")
    variants: list[Literal[LARGE_VARIANTS]] | None = option(
        None, "large SAEs to train and compare (default: all)")
    seed: int = option(0, "training seed (every SAE); other seeds go to their own folders")
    threads: int = option(1, "torch CPU threads (1: on a shared machine more threads contend and run slower)")


def main(argv: list[str] | None = None) -> None:
    a = parse_config(ReferenceFamilyStudy, argv, prog="python -m benchmarks.reference_family", description=__doc__)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    plan = QUICK if a.quick else FULL
    changes = {"train_tokens": a.train_tokens, "large_size": a.large_size, "variants": a.variants and tuple(a.variants),
               "reference_sizes": a.reference_sizes and tuple(a.reference_sizes)}
    plan = replace(plan, seed=a.seed, **{k: v for k, v in changes.items() if v})
    suffix = f"_seed{a.seed}" if a.seed else ""
    out = Path(a.out or ("runs/reference_family_quick" if a.quick else "runs/reference_family") + suffix)
    report = Path(a.report or (out if a.quick else results_dir("reference_family") / (f"seed{a.seed}" if a.seed else "")))

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
