"""``python -m benchmarks.synth_sae_bench [--protocol cpu|full] [--quick] [--samples N] [--epochs E]``

SynthSAEBench (SAELens' synthetic model with 16,384 known features, or the same generator at a
quarter of the size for a CPU): trains this package's MatryoshkaBatchTopKTrainer variants and
SAELens' BatchTopK and MatryoshkaBatchTopK training SAEs on the same samples, scores them with
``sae_lens.synthetic.eval_sae_on_synthetic_data`` and writes docs/synth_sae_bench/results.csv and
results.md (one row per SAE; rerunning skips the rows already there).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
from pathlib import Path

import torch

from .config import PROTOCOLS, VARIANTS
from .figure import plot_f1
from .hedging import hedging_markdown, write_hedging
from .model import SeededBatches, fingerprint, load_or_build, sample_pool
from .run import Pool, run_benchmark, write_markdown

QUICK_VARIANTS = ["saelens-matryoshka", "matryoshka", "matryoshka+all"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.synth_sae_bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    p.add_argument("--quick", action="store_true", help="a few minutes: 64k samples, 3 variants, one seed")
    p.add_argument("--samples", type=int, default=None,
                   help="distinct training samples (cpu: cached once and shared; default: the protocol's)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the samples (default: the protocol's)")
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--l0", type=int, nargs="+", default=None)
    p.add_argument("--cache", default=os.environ.get("SYNTH_SAE_BENCH_CACHE", "outputs/synth_sae_bench"),
                   help="synthetic model, sample pools and trained SAEs (default: %(default)s)")
    p.add_argument("--docs", default="docs/synth_sae_bench", help="where results.csv and results.md go")
    p.add_argument("--dead-window", type=int, default=None,
                   help="steps without firing before a latent counts as dead, for every SAE (default: the protocol's)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="steps between full-state checkpoints of the SAE in training, from which a rerun "
                        "continues it (default: a tenth of its steps; 0: none)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)

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
        p.error("--checkpoint-every must be 0 (no checkpoints) or a number of steps")
    if samples < proto.batch_size:
        p.error(f"--samples must be at least one batch ({proto.batch_size})")

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
              f"[../synth_sae_bench.md](../synth_sae_bench.md) for the protocols. Mean ± standard deviation over seeds; "
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
