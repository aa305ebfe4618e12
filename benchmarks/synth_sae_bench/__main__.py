"""``python -m benchmarks.synth_sae_bench [--protocol cpu|full] [--quick] [--samples N] [--epochs E]``

SynthSAEBench (SAELens' synthetic model with 16,384 known features, or the same generator at a
quarter of the size for a CPU): trains this package's MatryoshkaBatchTopKTrainer variants and
SAELens' BatchTopK and MatryoshkaBatchTopK training SAEs on the same samples, scores them with
``sae_lens.synthetic.eval_sae_on_synthetic_data`` and writes docs/results/synth_sae_bench/results.csv
and results.md (one row per SAE; rerunning skips the rows already there).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..harness import option, parse_config, results_dir
from .config import PROTOCOLS, VARIANTS
from .figure import plot_f1
from .hedging import hedging_markdown, write_hedging
from .model import SeededBatches, fingerprint, load_or_build, sample_pool
from .run import Pool, run_benchmark, write_markdown

QUICK_VARIANTS = ["saelens-matryoshka", "matryoshka", "matryoshka+all"]


@dataclass
class SynthStudy:
    """The command line of ``python -m benchmarks.synth_sae_bench``."""

    protocol: Literal[tuple(sorted(PROTOCOLS))] = option("cpu", "the protocol (config.PROTOCOLS)")
    quick: bool = option(False, "a few minutes: 64k samples, 3 variants, one seed")
    samples: int | None = option(None, "distinct training samples (cpu: cached once and shared; default: the protocol's)")
    epochs: int | None = option(None, "passes over the samples (default: the protocol's)")
    eval_samples: int | None = option(None, "held-out samples (default: the protocol's)")
    variants: list[Literal[tuple(sorted(VARIANTS))]] | None = option(None, "variants (default: all)")
    seeds: list[int] | None = option(None, "seeds (default: the protocol's)")
    l0: list[int] | None = option(None, "target L0s (default: the protocol's)")
    cache: str = option(os.environ.get("SYNTH_SAE_BENCH_CACHE", "outputs/synth_sae_bench"),
                        "synthetic model, sample pools and trained SAEs")
    docs: str = option(str(results_dir("synth_sae_bench")), "where results.csv, results.md and the figure go")
    dead_window: int | None = option(
        None, "steps without firing before a latent counts as dead, for every SAE (default: the protocol's)")
    checkpoint_every: int | None = option(
        None, "steps between full-state checkpoints of the SAE in training, from which a rerun continues it "
              "(default: a tenth of its steps; 0: none)")
    device: str | None = option(None, "torch device (default: the protocol's)")
    threads: int | None = option(None, "torch threads")


def main(argv: list[str] | None = None) -> int:
    a = parse_config(SynthStudy, argv, prog="python -m benchmarks.synth_sae_bench", description=__doc__.split("\n\n")[1])

    def error(message: str) -> None:
        raise SystemExit(f"python -m benchmarks.synth_sae_bench: error: {message}")

    proto = PROTOCOLS[a.protocol]
    if a.dead_window:
        proto = dataclasses.replace(proto, dead_window=a.dead_window)
    device = a.device or proto.device
    if a.threads:
        torch.set_num_threads(a.threads)
    samples = a.samples or (65_536 if a.quick else proto.samples)
    eval_samples = a.eval_samples or (4096 if a.quick else proto.eval_samples)
    names = a.variants or (QUICK_VARIANTS if a.quick else list(VARIANTS))
    seeds = tuple(a.seeds or (proto.seeds[:1] if a.quick else proto.seeds))
    l0s = tuple(a.l0 or proto.l0s)
    epochs = a.epochs or (1 if a.quick else proto.epochs)
    if a.checkpoint_every is not None and a.checkpoint_every < 0:
        error("--checkpoint-every must be 0 (no checkpoints) or a number of steps")
    if samples < proto.batch_size:
        error(f"--samples must be at least one batch ({proto.batch_size})")

    cache = Path(a.cache)
    model = load_or_build(proto, cache, device=device)
    eval_features = sample_pool(model, eval_samples, 999, cache / f"{proto.name}-eval-{eval_samples}.pt")[1]
    if device == "cpu":  # sampling is slower than training here: draw once, share between the SAEs
        hidden, _ = sample_pool(model, samples, 1, cache / f"{proto.name}-train-{samples}.pt")
        data = Pool(hidden, proto.batch_size, epochs, device)
        label = proto.label(data.batches_per_epoch * proto.batch_size, epochs, fingerprint(model))
    else:  # drawn afresh for every batch: all samples are distinct
        data = SeededBatches(model, proto.batch_size, samples * epochs // proto.batch_size, seed=1, device=device)
        label = proto.label(data.samples, 1, fingerprint(model))
    docs = Path(a.docs)
    variants = [VARIANTS[n] for n in names]
    every = max(1, data.steps // 10) if a.checkpoint_every is None else (a.checkpoint_every or None)
    run_benchmark(proto, label, variants, model, data, eval_features, cache / "saes" / label.replace(":", "_"),
                  docs / "results.csv", seeds, l0s, checkpoint_every=every)
    header = (f"# SynthSAEBench results\n\nWritten by `python -m benchmarks.synth_sae_bench`; see "
              f"[../../synth_sae_bench.md](../../synth_sae_bench.md) for the protocols. Mean ± standard deviation over seeds; "
              f"`protocol` = name:model-width@model fingerprint:training samples (distinct x passes):"
              f"dead-latent window (steps).\n\n![F1 of every SAE](f1.png)")
    # hedging and absorption per parent of the hierarchy, for every SAE of this protocol trained so far
    dense = eval_features.to_dense()
    write_hedging(cache / "saes" / label.replace(":", "_"), model, model.feature_dict(dense.to(device)).cpu(),
                  dense, docs / f"hedging-{label.replace(':', '_')}.csv")
    hedging = []
    for path in sorted(docs.glob("hedging-*.csv")):
        with path.open() as g:
            rows = [{**r, **{k: float(r[k]) for k in ("hedging", "absorption")}} for r in csv.DictReader(g)]
        hedging.append(hedging_markdown(path.stem[len("hedging-"):], rows))
    write_markdown(docs / "results.csv", docs / "results.md", {v.name: v.description for v in VARIANTS.values()},
                   header, footer="".join(hedging))
    plot_f1(docs / "results.csv", docs / "f1.png")
    print(f"wrote {docs / 'results.csv'} and {docs / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
