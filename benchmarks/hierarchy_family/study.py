"""One run (tree x configuration x seed) and the resumable family run.

A run trains with a plain ``trainer.update(step, x)`` loop (what ``trainSAE`` does without
logging; the trainers are built by ``benchmarks.toy.train.make_trainer``), measures the SAE with
``benchmarks.toy.train.measure`` (absorption, recovery, mixing, FVU, L0, dead latents) plus
:func:`.analysis.pair_report` (absorption per parent and child and what the latents learned),
and writes one JSON record ``<out>/runs/<tree>_<fingerprint>/<config>/seed<s>.json``. A record
whose stored settings match is not rerun, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import torch

from matryoshka_plugin.toy import HierarchySpec, evaluate_sae, hierarchy_family, mixing_metrics

from .configs import CONFIGS, StudyConfig, config_by_name, settings_key, trainer_kwargs

__all__ = ["StudySettings", "run_one", "record_path", "is_done", "pending_jobs", "run_family", "load_records",
           "measure_run", "cured"]

CURED_ABSORPTION, CURED_RECOVERY = 0.05, 0.95


def cured(absorption: float | None, recovery: float | None) -> bool:
    """The issue's bar for one run: absorption <= 0.05 and recovery >= 0.95 (a tree without
    parent samples counts as absorption 0)."""
    a = 0.0 if absorption is None else absorption
    return recovery is not None and a <= CURED_ABSORPTION and recovery >= CURED_RECOVERY


class StudySettings(SimpleNamespace):
    """Steps, batch size and evaluation samples shared by every run."""

    def __init__(self, steps: int = 2000, batch_size: int = 200, eval_samples: int = 100_000, n_trees: int = 24,
                 family_seed: int = 0):
        super().__init__(steps=int(steps), batch_size=int(batch_size), eval_samples=int(eval_samples),
                         n_trees=int(n_trees), family_seed=int(family_seed))


_FAMILIES: dict[tuple[int, int], dict[str, HierarchySpec]] = {}


def family(n_trees: int = 24, seed: int = 0) -> dict[str, HierarchySpec]:
    """``hierarchy_family(n_trees, seed)`` by tree name (built once per process)."""
    if (n_trees, seed) not in _FAMILIES:
        _FAMILIES[(n_trees, seed)] = {s.name: s for s in hierarchy_family(n_trees, seed)}
    return _FAMILIES[(n_trees, seed)]


def record_path(out: Path, spec: HierarchySpec, config: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{spec.name}_{spec.fingerprint}" / config / f"seed{seed}.json"


def is_done(path: Path, key: str) -> bool:
    """A record exists and was made with the same settings."""
    try:
        return json.loads(path.read_text()).get("settings_key") == key
    except (OSError, json.JSONDecodeError):
        return False


def measure_run(sae: torch.nn.Module, spec: HierarchySpec, toy, eval_samples: int) -> dict[str, Any]:
    """Every metric of one trained SAE on its tree (JSON-ready): the toy benchmark's record
    (``benchmarks.toy.train.measure``'s keys, from one evaluation pass), the matched cosine per
    feature, the per-pair report and whether the run is cured."""
    from benchmarks.toy.train import _dead_latents

    from .analysis import pair_report

    m = evaluate_sae(sae, toy, n_samples=eval_samples)
    mix = mixing_metrics(m, toy)
    out = {
        "absorption": m.absorption, "absorption_per_parent": m.absorption_per_parent,
        "absorption_best": m.absorption_best, "recovery": m.recovery, "mean_max_cosine": m.mean_max_cosine,
        "l0": m.l0, "fvu": m.fvu, "matching": m.matching,
        "mixing_parent_child": mix.parent_child, "mixing_parent_child_signed": mix.parent_child_signed,
        "mixing_sibling": mix.sibling, "mixing_sibling_signed": mix.sibling_signed,
        "mixing_child_parent_signed": mix.child_parent_signed,
        "dead_latents": int(_dead_latents(sae, toy)),
    }
    out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
    out["matched_cosine"] = [round(float(m.decoder_cosine[lat, f]), 4) if lat >= 0 else None
                             for f, lat in enumerate(m.matching)]
    out["pairs"] = pair_report(sae, toy, m, spec, n_samples=eval_samples)
    out["cured"] = cured(out["absorption"], out["recovery"])
    return out


def run_one(spec: HierarchySpec, cfg: StudyConfig, seed: int, settings: StudySettings) -> dict[str, Any]:
    """Train ``cfg`` on ``spec`` with training seed ``seed`` and measure it: the run's record."""
    from benchmarks.toy.config import VariantSpec
    from benchmarks.toy.train import make_trainer

    kw = trainer_kwargs(cfg, spec, seed, settings.steps)
    toy = spec.build()
    torch.manual_seed(seed)
    trainer = make_trainer(VariantSpec(cfg.name, cfg.family), kw)
    if "group_fractions" in kw:  # the realised groups must be the tree's levels
        got = list(getattr(trainer, "group_sizes", None) or trainer.config.get("group_sizes") or [])
        from .configs import level_sizes

        if got and got != level_sizes(spec):
            raise RuntimeError(f"{cfg.name} on {spec.name}: group sizes {got} differ from the levels {level_sizes(spec)}")
    data = toy.batches(settings.batch_size, seed=10_000 + seed)
    t0 = time.perf_counter()
    losses = []
    for step in range(settings.steps):
        loss = trainer.update(step, next(data))
        if step >= settings.steps - 100:
            losses.append(float(loss))
    train_s = time.perf_counter() - t0
    sae = trainer.ae.eval()
    record = {
        "tree": spec.name,
        "fingerprint": spec.fingerprint,
        "config": cfg.name,
        "seed": seed,
        "settings_key": settings_key(kw, settings.eval_samples, settings.batch_size),
        "trainer": {k: v for k, v in kw.items() if k != "device"},
        "tree_info": spec.describe(),
        "train_seconds": round(train_s, 2),
        "final_loss": float(sum(losses) / max(len(losses), 1)),
        **measure_run(sae, spec, toy, settings.eval_samples),
    }
    return json.loads(json.dumps(record, default=_json_default))


def _json_default(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, type):
        return v.__name__
    return str(v)


def pending_jobs(out: Path, configs: Iterable[StudyConfig], seeds: Iterable[int], settings: StudySettings,
                 trees: Iterable[str] | None = None) -> tuple[list[tuple], int]:
    """Runs still to do, seed-major (every configuration gets its first seed on every tree before
    any gets a second), and the number of finished ones skipped."""
    fam = family(settings.n_trees, settings.family_seed)
    names = list(trees) if trees else list(fam)
    unknown = [t for t in names if t not in fam]
    if unknown:
        raise ValueError(f"unknown tree(s) {unknown}; the family has {', '.join(fam)}")
    todo, done = [], 0
    for seed in seeds:
        for t in names:
            for cfg in configs:
                spec = fam[t]
                key = settings_key(trainer_kwargs(cfg, spec, seed, settings.steps), settings.eval_samples,
                                   settings.batch_size)
                if is_done(record_path(out, spec, cfg.name, seed), key):
                    done += 1
                else:
                    todo.append((str(out), t, cfg.name, seed, vars(settings).copy()))
    return todo, done


def _worker_init(niceness: int) -> None:
    torch.set_num_threads(1)
    if niceness:
        os.nice(niceness)  # below the machine's other work; capped at 19


def _run_job(job: tuple) -> tuple[str, float]:
    from matryoshka_plugin.io import atomic_write_json

    out, tree, config, seed, st = job
    settings = StudySettings(**st)
    spec = family(settings.n_trees, settings.family_seed)[tree]
    record = run_one(spec, config_by_name(config), seed, settings)
    path = record_path(Path(out), spec, config, seed)
    atomic_write_json(record, path, indent=1)
    return str(path), record["train_seconds"]


def run_family(out: Path, configs: list[StudyConfig] | None = None, seeds: Iterable[int] = (0, 1),
               settings: StudySettings | None = None, jobs: int = 2, trees: Iterable[str] | None = None,
               niceness: int = 19, log=print) -> tuple[int, int]:
    """Train every pending (tree, configuration, seed) run; returns ``(trained, skipped)``."""
    settings = settings or StudySettings()
    configs = configs or CONFIGS
    todo, done = pending_jobs(out, configs, seeds, settings, trees)
    log(f"{len(todo) + done} runs: {done} finished, {len(todo)} to train -> {out}")
    t0 = time.perf_counter()
    if todo:
        if jobs > 1:
            with mp.get_context("spawn").Pool(jobs, initializer=_worker_init, initargs=(niceness,)) as pool:
                for i, (path, _) in enumerate(pool.imap_unordered(_run_job, todo), 1):
                    if i % 20 == 0 or i == len(todo):
                        log(f"  {i}/{len(todo)} in {time.perf_counter() - t0:.0f} s ({Path(path).parent.parent.name})")
        else:
            _worker_init(0)
            for i, job in enumerate(todo, 1):
                _run_job(job)
                if i % 20 == 0 or i == len(todo):
                    log(f"  {i}/{len(todo)} in {time.perf_counter() - t0:.0f} s")
    sys.stdout.flush()
    return len(todo), done


def load_records(out: Path) -> list[dict[str, Any]]:
    """Every stored record under ``out/runs``."""
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "runs").glob("*/*/seed*.json"))]
