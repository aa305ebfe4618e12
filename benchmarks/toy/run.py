"""Run the toy benchmarks: ``python -m benchmarks.toy.run [--quick] [--out DIR] ...``.

Every (set-up, variant, k, seed) run is cached in its folder ``DIR/runs/<setup>/<variant>/seed<s>/``:
``trainer_0/`` holds the trained SAE as ``trainSAE`` saves it (``ae.pt`` + ``config.json``; load
it with ``matryoshka_plugin.load_dictionary``) and ``record.json`` its metrics and the exact
settings. A rerun skips runs whose cached settings match and retrains the others, so an
interrupted benchmark resumes where it stopped. At the end ``results.csv`` (one row per run),
``summary.csv`` and ``results.md`` (mean ± std over seeds) and the figures under ``DIR/figures``
are (re)written; ``--report docs/results/toy`` writes tables and figures there instead.

Settings: defaults in ``config.py``; ``--config file.json`` (or .toml) sets any option below and
``overrides`` per set-up, e.g.
``{"seeds": [0, 1, 2], "overrides": {"post_tree": {"steps": 40000, "log": {"sparsity": "l1"}}}}``
(or ``--set overrides.post_tree.steps=40000``); overrides about some set-ups run only those
unless ``--setups`` is given; ``--setups/--variants/--seeds/--steps`` override both.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..harness import RunStore, add_meta_structure as _meta_structure, option, parse_config
from .config import QUICK, SetupConfig, default_setups, merge_overrides, parse_variant

DEFAULT_SEEDS = [0, 1, 2, 3, 4]


@dataclass
class ToyStudy:
    """The command line of ``python -m benchmarks.toy.run``."""

    out: str = option("outputs/toy_benchmarks", "output folder")
    quick: bool = option(False, "fewer steps and 2 seeds (a smoke run, minutes)")
    setups: list[str] | None = option(None, "post_tree hedging hedging_x2 magnitude hierarchy (default: all)")
    variants: list[str] | None = option(None, "variants to run (default: each set-up's list)")
    seeds: list[int] | None = option(None, "seeds (default: 0 1 2 3 4; --quick: 0 1)")
    steps: int | None = option(None, "training steps for every selected set-up")
    jobs: int = option(1, "parallel worker processes")
    figures: bool = option(True, "write the PNG figures")
    retrain: bool = option(False, "ignore cached runs")
    remeasure: bool = option(False, "recompute the metrics of cached runs from their saved SAEs (after a metric change)")
    meta_structure: bool = option(False, "add SAEBench's meta-SAE variance explained on each run's decoder (a column)")
    report: str | None = option(None, "write the tables and figures here instead of OUT (the published study: "
                                      "docs/results/toy)")
    figures_dir: str | None = option(None, "write the figures here instead of OUT/figures (or REPORT)")
    dpi: int = option(110, "figure resolution")
    overrides: dict[str, dict[str, Any]] = option(default_factory=dict, help="per set-up settings (config file or --set)")


def build_config(study: ToyStudy) -> tuple[dict[str, SetupConfig], list[int]]:
    setups = default_setups()
    seeds = list(DEFAULT_SEEDS) if study.seeds is None else list(study.seeds)
    if study.quick:
        setups = {n: merge_overrides(s, QUICK.get(n, {})) for n, s in setups.items()}
        seeds = [0, 1] if study.seeds is None else seeds
    for name, over in study.overrides.items():
        if name not in setups:
            raise ValueError(f"unknown set-up {name!r} in overrides; known: {sorted(setups)}")
        setups[name] = merge_overrides(setups[name], over)
    selected = study.setups or list(study.overrides)  # overrides about some set-ups run just those
    if selected:
        missing = [s for s in selected if s not in setups]
        if missing:
            raise ValueError(f"unknown set-up(s) {missing}; known: {sorted(setups)}")
        setups = {n: setups[n] for n in selected}
    for s in setups.values():
        if study.steps:
            s.steps = study.steps
        if study.variants:
            s.variants = list(study.variants)
        for v in s.variants:
            parse_variant(v)  # fail early on a typo
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


SAE_FOLDER = "trainer_0"  # beside the run's record.json


def run_key(setup: str, variant: str, k: int | None, seed: int) -> str:
    """A run's key in the store: ``<setup>/<variant>[_k<k>]/seed<seed>``."""
    from .train import run_key as variant_key

    return f"{setup}/{variant_key(variant, k).replace('/', '_')}/seed{seed}"


def store(out: Path) -> RunStore:
    """The finished runs of a study folder: ``out/runs/<run_key>/record.json``."""
    return RunStore(Path(out) / "runs")


def run_dir(out: Path, setup: str, variant: str, k: int | None, seed: int) -> Path:
    """The folder of one run: a ``trainSAE`` save_dir (``trainer_0/``) plus ``record.json``."""
    return store(out).root / run_key(setup, variant, k, seed)


def fingerprint(setup: SetupConfig, variant: str, k: int | None, seed: int) -> dict[str, Any]:
    """The settings that determine a run's result (compared with the cache)."""
    from .train import build_toy, trainer_kwargs

    spec = parse_variant(variant)
    toy = build_toy(setup)
    kw = trainer_kwargs(setup, spec, seed, k if spec.uses_k else None, toy)
    kw = {key: v for key, v in kw.items() if key != "device"}
    return {"trainer": kw, "toy": dict(setup.toy, builder=setup.builder), "batch_size": setup.batch_size,
            "eval_samples": setup.eval_samples}


def is_cached(out: Path, key: str, fp: dict[str, Any]) -> bool:
    sae = store(out).root / key / SAE_FOLDER
    return store(out).is_done(key, fp) and (sae / "ae.pt").is_file() and (sae / "config.json").is_file()


def _worker_init() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")


def _run_one(job: tuple[SetupConfig, str, int | None, int, str, dict]) -> tuple[str, float, int]:
    from .train import train_and_evaluate

    setup, variant, k, seed, out, fp = job
    runs, key = store(Path(out)), run_key(setup.name, variant, k, seed)
    # A run counts as cached only once its record exists: drop a stale one, save the SAE, then
    # write the record.
    runs.path(key).unlink(missing_ok=True)
    record, _ = train_and_evaluate(setup, variant, seed, k, save_dir=runs.root / key)
    runs.save(key, record, fp)
    return str(runs.root / key), record["train_seconds"], setup.steps


def _progress(jobs, desc: str):
    from tqdm.auto import tqdm

    return tqdm(jobs, desc=desc, file=sys.stdout, mininterval=2.0)


def remeasure(out: Path, jobs) -> None:
    """Recompute the metrics of cached runs from their stored SAEs (training is untouched)."""
    from .train import build_toy, load_sae, measure

    runs = store(out)
    for setup, variant, k, seed in _progress(jobs, "remeasuring"):
        key = run_key(setup.name, variant, k, seed)
        sae = load_sae(runs.root / key / SAE_FOLDER)
        runs.save(key, {**runs.load(key), **measure(sae, build_toy(setup), setup)})


# The meta-SAE's settings for toy decoders: SAEBench's defaults, without CPU autocast (bf16 on a CPU).
META_STRUCTURE = {"autocast": False}


def add_meta_structure(out: Path, jobs) -> None:
    """SAEBench's meta-structure eval on the decoder of every run that lacks it (seeded by the
    run's seed), stored in its record as ``meta_variance_explained``."""
    from .train import load_sae

    runs = store(out)
    keys = [(run_key(s.name, v, k, seed), seed) for s, v, k, seed in jobs]
    _meta_structure(
        ((key, lambda key=key: load_sae(runs.root / key / SAE_FOLDER), [seed]) for key, seed in _progress(keys, "meta-structure")),
        have=lambda key: runs.load(key).get("meta_variance_explained") is not None,
        put=lambda key, got: runs.save(key, {**runs.load(key), "meta_variance_explained": got["variance_explained"]}),
        **META_STRUCTURE)


def main(argv: list[str] | None = None) -> int:
    study = parse_config(ToyStudy, argv, prog="python -m benchmarks.toy.run", description=__doc__)
    try:
        setups, seeds = build_config(study)
    except ValueError as e:
        raise SystemExit(f"python -m benchmarks.toy.run: error: {e}") from None
    torch.set_num_threads(1)
    from tqdm.auto import tqdm

    from .report import write_reports

    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(setups, seeds)
    pending = []
    for setup, variant, k, seed in jobs:
        fp = fingerprint(setup, variant, k, seed)
        if study.retrain or not is_cached(out, run_key(setup.name, variant, k, seed), fp):
            pending.append((setup, variant, k, seed, str(out), fp))
    print(f"{len(jobs)} runs over {len(setups)} set-up(s) x seeds {seeds}: {len(jobs) - len(pending)} cached, "
          f"{len(pending)} to train -> {out}", flush=True)
    t0 = time.perf_counter()
    if pending:
        bar = tqdm(total=sum(j[0].steps for j in pending), unit="step", unit_scale=True, desc="training",
                   file=sys.stdout, mininterval=2.0)
        if study.jobs > 1:
            ctx = mp.get_context("spawn")
            with ctx.Pool(study.jobs, initializer=_worker_init) as pool:
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
    if study.remeasure:
        trained = {(j[0].name, j[1], j[2], j[3]) for j in pending}
        remeasure(out, [j for j in jobs if (j[0].name, j[1], j[2], j[3]) not in trained])
    if study.meta_structure:
        add_meta_structure(out, jobs)
    written = write_reports(out, setups, seeds, figures=study.figures,
                            figures_dir=Path(study.figures_dir) if study.figures_dir else None, dpi=study.dpi,
                            report_dir=Path(study.report) if study.report else None)
    print(f"done in {time.perf_counter() - t0:.0f} s; wrote {', '.join(str(w) for w in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
