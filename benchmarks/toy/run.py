"""Run the toy benchmarks: ``python -m benchmarks.toy.run [--quick] [--out DIR] ...``.

Every (set-up, variant, k, seed) run is cached in its folder ``DIR/runs/<setup>/<variant>/seed<s>/``:
``trainer_0/`` holds the trained SAE as ``trainSAE`` saves it (``ae.pt`` + ``config.json``; load
it with ``matryoshka_plugin.load_dictionary``) and ``record.json`` its metrics and the exact
settings. A rerun skips runs whose cached settings match and retrains the others, so an
interrupted benchmark resumes where it stopped. At the end ``results.csv`` (one row per run), ``summary.csv`` and ``results.md``
(mean ± std over seeds) and the figures under ``DIR/figures`` are (re)written.

Settings: defaults in ``config.py``; ``--config file.json`` overrides them, e.g.
``{"seeds": [0, 1, 2], "setups": {"post_tree": {"steps": 40000, "log": {"sparsity": "l1"}}}}``;
a config that names set-ups runs only those; ``--setups/--variants/--seeds/--steps`` override
both.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .config import QUICK, SetupConfig, default_setups, merge_overrides, parse_variant

DEFAULT_SEEDS = [0, 1, 2, 3, 4]


def build_config(args: argparse.Namespace) -> tuple[dict[str, SetupConfig], list[int]]:
    setups = default_setups()
    seeds = list(DEFAULT_SEEDS)
    if args.quick:
        setups = {n: merge_overrides(s, QUICK.get(n, {})) for n, s in setups.items()}
        seeds = [0, 1]
    if args.config:
        cfg = json.loads(Path(args.config).read_text())
        unknown = set(cfg) - {"seeds", "setups"}
        if unknown:
            raise SystemExit(f"unknown keys {sorted(unknown)} in {args.config} (use 'seeds' and 'setups')")
        seeds = cfg.get("seeds", seeds)
        for name, over in cfg.get("setups", {}).items():
            if name not in setups:
                raise SystemExit(f"unknown set-up {name!r} in {args.config}; known: {sorted(setups)}")
            setups[name] = merge_overrides(setups[name], over)
        if cfg.get("setups") and not args.setups:  # a config about some set-ups runs just those
            setups = {n: setups[n] for n in cfg["setups"]}
    if args.setups:
        missing = [s for s in args.setups if s not in setups]
        if missing:
            raise SystemExit(f"unknown set-up(s) {missing}; known: {sorted(setups)}")
        setups = {n: setups[n] for n in args.setups}
    for s in setups.values():
        if args.steps:
            s.steps = args.steps
        if args.variants:
            s.variants = list(args.variants)
        for v in s.variants:
            parse_variant(v)  # fail early on a typo
    if args.seeds:
        seeds = args.seeds
    return setups, seeds


def jobs_for(setups: dict[str, SetupConfig], seeds: list[int]) -> list[tuple[SetupConfig, str, int | None, int]]:
    jobs = []
    for s in setups.values():
        for v in s.variants:
            ks = s.ks if parse_variant(v).uses_k else [None]
            for k in ks:
                for seed in seeds:
                    jobs.append((s, v, k, seed))
    return jobs


RECORD = "record.json"  # a run's metrics and settings, beside its trainer_0/ folder
SAE_FOLDER = "trainer_0"


def run_dir(out: Path, setup: str, variant: str, k: int | None, seed: int) -> Path:
    """The folder of one run: a ``trainSAE`` save_dir (``trainer_0/``) plus ``record.json``."""
    from .train import run_key

    return out / "runs" / setup / run_key(variant, k).replace("/", "_") / f"seed{seed}"


def fingerprint(setup: SetupConfig, variant: str, k: int | None, seed: int) -> dict[str, Any]:
    """The settings that determine a run's result (compared with the cache)."""
    from .train import build_toy, trainer_kwargs

    spec = parse_variant(variant)
    toy = build_toy(setup)
    kw = trainer_kwargs(setup, spec, seed, k if spec.uses_k else None, toy)
    kw = {key: v for key, v in kw.items() if key != "device"}
    return json.loads(json.dumps({"trainer": kw, "toy": dict(setup.toy, builder=setup.builder),
                                  "batch_size": setup.batch_size, "eval_samples": setup.eval_samples}))


def is_cached(folder: Path, fp: dict[str, Any]) -> bool:
    sae = folder / SAE_FOLDER
    if not (folder / RECORD).is_file() or not (sae / "ae.pt").is_file() or not (sae / "config.json").is_file():
        return False
    try:
        return json.loads((folder / RECORD).read_text()).get("fingerprint") == fp
    except (OSError, json.JSONDecodeError):
        return False


def _worker_init() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")


def _run_one(job: tuple[SetupConfig, str, int | None, int, str, dict]) -> tuple[str, float, int]:
    from matryoshka_plugin.io import atomic_write_json

    from .train import train_and_evaluate

    setup, variant, k, seed, out, fp = job
    folder = run_dir(Path(out), setup.name, variant, k, seed)
    # A run counts as cached only once its record exists: drop a stale one, save the SAE, then
    # write the record.
    (folder / RECORD).unlink(missing_ok=True)
    record, _ = train_and_evaluate(setup, variant, seed, k, save_dir=folder)
    record["fingerprint"] = fp
    atomic_write_json(record, folder / RECORD, indent=1)
    return str(folder), record["train_seconds"], setup.steps


def remeasure(out: Path, jobs) -> None:
    """Recompute the metrics of cached runs from their stored SAEs (training is untouched)."""
    from tqdm.auto import tqdm

    from matryoshka_plugin.io import atomic_write_json

    from .train import build_toy, load_sae, measure

    for setup, variant, k, seed in tqdm(jobs, desc="remeasuring", file=sys.stdout, mininterval=2.0):
        folder = run_dir(out, setup.name, variant, k, seed)
        record = json.loads((folder / RECORD).read_text())
        sae = load_sae(folder / SAE_FOLDER)
        record.update(measure(sae, build_toy(setup), setup))
        atomic_write_json(record, folder / RECORD, indent=1)


# The meta-SAE's settings for toy decoders: SAEBench's defaults, without CPU autocast (bf16 on a CPU).
META_STRUCTURE = {"autocast": False}


def add_meta_structure(out: Path, jobs) -> None:
    """SAEBench's meta-structure eval on the decoder of every run that lacks it (seeded by the
    run's seed), stored in its record as ``meta_variance_explained``."""
    from tqdm.auto import tqdm

    from matryoshka_plugin.io import atomic_write_json
    from matryoshka_plugin.saebench.meta_structure import decoder_meta_structure

    from .train import load_sae

    for setup, variant, k, seed in tqdm(jobs, desc="meta-structure", file=sys.stdout, mininterval=2.0):
        folder = run_dir(out, setup.name, variant, k, seed)
        record = json.loads((folder / RECORD).read_text())
        if record.get("meta_variance_explained") is not None:
            continue
        got = decoder_meta_structure(load_sae(folder / SAE_FOLDER), seeds=[seed], **META_STRUCTURE)
        record["meta_variance_explained"] = got["variance_explained"]
        atomic_write_json(record, folder / RECORD, indent=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toy.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/toy_benchmarks", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer steps and 2 seeds (a smoke run, minutes)")
    p.add_argument("--config", help="JSON file overriding settings (see the module docstring)")
    p.add_argument("--setups", nargs="+", help="post_tree hedging magnitude hierarchy (default: all)")
    p.add_argument("--variants", nargs="+", help="variants to run (default: each set-up's list)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2 3 4; --quick: 0 1)")
    p.add_argument("--steps", type=int, help="training steps for every selected set-up")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default: 1)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--retrain", action="store_true", help="ignore cached runs")
    p.add_argument("--remeasure", action="store_true",
                   help="recompute the metrics of cached runs from their saved SAEs (after a metric change)")
    p.add_argument("--meta-structure", action="store_true",
                   help="add SAEBench's meta-SAE variance explained on each run's decoder (a column)")
    p.add_argument("--figures-dir", help="write the figures here instead of OUT/figures")
    p.add_argument("--dpi", type=int, default=110, help="figure resolution (default: %(default)s)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    from tqdm.auto import tqdm

    from .report import write_reports

    setups, seeds = build_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(setups, seeds)
    pending = []
    for setup, variant, k, seed in jobs:
        fp = fingerprint(setup, variant, k, seed)
        if args.retrain or not is_cached(run_dir(out, setup.name, variant, k, seed), fp):
            pending.append((setup, variant, k, seed, str(out), fp))
    print(f"{len(jobs)} runs over {len(setups)} set-up(s) x seeds {seeds}: {len(jobs) - len(pending)} cached, "
          f"{len(pending)} to train -> {out}", flush=True)
    t0 = time.perf_counter()
    if pending:
        bar = tqdm(total=sum(j[0].steps for j in pending), unit="step", unit_scale=True, desc="training",
                   file=sys.stdout, mininterval=2.0)
        if args.jobs > 1:
            ctx = mp.get_context("spawn")
            with ctx.Pool(args.jobs, initializer=_worker_init) as pool:
                for folder, _, steps in pool.imap_unordered(_run_one, pending):
                    bar.update(steps)
                    bar.set_postfix_str(Path(folder).parent.name, refresh=False)
        else:
            _worker_init()
            for job in pending:
                bar.set_postfix_str(f"{job[0].name}/{job[1]}{'' if job[2] is None else '/k%d' % job[2]}/seed{job[3]}")
                _, _, steps = _run_one(job)
                bar.update(steps)
        bar.close()
    if args.remeasure:
        trained = {(j[0].name, j[1], j[2], j[3]) for j in pending}
        remeasure(out, [j for j in jobs if (j[0].name, j[1], j[2], j[3]) not in trained])
    if args.meta_structure:
        add_meta_structure(out, jobs)
    written = write_reports(out, setups, seeds, figures=not args.no_figures,
                            figures_dir=Path(args.figures_dir) if args.figures_dir else None, dpi=args.dpi)
    print(f"done in {time.perf_counter() - t0:.0f} s; wrote {', '.join(str(w) for w in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
