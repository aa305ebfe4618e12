"""One run (tree x configuration x seed) and the resumable family run.

A run trains with a plain ``trainer.update(step, x)`` loop (what ``trainSAE`` does without
logging; the trainers are built by ``benchmarks.toy.train.make_trainer``), measures the SAE with
``benchmarks.toy.train.measure`` (absorption, recovery, mixing, FVU, L0, dead latents) plus
:func:`.analysis.pair_report` (absorption per parent and child and what the latents learned),
and saves one JSON record in a :class:`benchmarks.harness.RunStore` under
``<out>/runs/<tree>_<tree fingerprint>/<config>/seed<s>/record.json``, with the settings that
determine it as its fingerprint: a finished run is not rerun, a changed setting reruns it, and
an interrupted run resumes where it stopped.
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

from ..harness import RunStore
from .configs import CONFIGS, StudyConfig, config_by_name, trainer_kwargs

__all__ = ["StudySettings", "run_one", "store", "run_key", "run_fingerprint", "record_path", "pending_jobs",
           "run_family", "load_records", "measure_run", "cured"]

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


def store(out: str | Path) -> RunStore:
    """The study's finished runs: ``<out>/runs/<key>/record.json``."""
    return RunStore(Path(out) / "runs")


def run_key(spec: HierarchySpec, config: str, seed: int) -> str:
    return f"{spec.name}_{spec.fingerprint}/{config}/seed{seed}"


def record_path(out: str | Path, spec: HierarchySpec, config: str, seed: int) -> Path:
    return store(out).path(run_key(spec, config, seed))


def run_fingerprint(cfg: StudyConfig, spec: HierarchySpec, seed: int, settings: "StudySettings") -> dict[str, Any]:
    """What determines a run's result: the trainer keywords, the tree, the batch and evaluation sizes."""
    kw = trainer_kwargs(cfg, spec, seed, settings.steps)
    return {"trainer": {k: v for k, v in kw.items() if k != "device"}, "tree": spec.fingerprint,
            "batch_size": settings.batch_size, "eval_samples": settings.eval_samples}


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
        "tree_fingerprint": spec.fingerprint,
        "config": cfg.name,
        "seed": seed,
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
    todo, done, runs = [], 0, store(out)
    for seed in seeds:
        for t in names:
            for cfg in configs:
                spec = fam[t]
                if runs.is_done(run_key(spec, cfg.name, seed), run_fingerprint(cfg, spec, seed, settings)):
                    done += 1
                else:
                    todo.append((str(out), t, cfg.name, seed, vars(settings).copy()))
    return todo, done


def _worker_init(niceness: int) -> None:
    torch.set_num_threads(1)
    if niceness:
        os.nice(niceness)  # below the machine's other work; capped at 19


def _run_job(job: tuple) -> tuple[str, float]:
    out, tree, config, seed, st = job
    settings = StudySettings(**st)
    spec = family(settings.n_trees, settings.family_seed)[tree]
    cfg = config_by_name(config)
    record = run_one(spec, cfg, seed, settings)
    path = store(out).save(run_key(spec, config, seed), record, run_fingerprint(cfg, spec, seed, settings))
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
                        log(f"  {i}/{len(todo)} in {time.perf_counter() - t0:.0f} s ({Path(path).parent.parent.parent.name})")
        else:  # in this process: --nice applies to it (before: ignored with one job)
            _worker_init(niceness)
            for i, job in enumerate(todo, 1):
                _run_job(job)
                if i % 20 == 0 or i == len(todo):
                    log(f"  {i}/{len(todo)} in {time.perf_counter() - t0:.0f} s")
    sys.stdout.flush()
    return len(todo), done


def load_records(out: Path) -> list[dict[str, Any]]:
    """Every stored record under ``out/runs``."""
    return store(out).records()
