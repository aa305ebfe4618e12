"""``python -m benchmarks.hierarchy_family``: train every pending (tree, configuration, seed) run
of the random hierarchy family and write the distributions.

Records go to ``--out`` (default ``outputs/hierarchy_family/runs/...``, one JSON per run in a
``benchmarks.harness.RunStore``; finished runs are skipped), the report to ``--results``
(default ``docs/results/hierarchy_family``): ``summary.md``/``summary.csv`` (per configuration:
share of trees cured, median and worst tree), ``trees.csv`` (per configuration and tree, mean and
std over seeds), ``runs.csv`` (one row per run), ``failures.md`` (why each tree is not cured), ``breakdown.md``
(by k regime, superposition and exclusivity, and failures by mechanism) and
``distribution.png``. Settings also come from ``--config FILE`` (TOML/JSON) or ``--set key=value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..harness import option, parse_config, results_dir, write_csv
from .configs import CONFIGS, config_by_name
from .study import StudySettings, load_records, run_family


@dataclass
class HierarchyFamilyStudy:
    """The command line of ``python -m benchmarks.hierarchy_family``."""

    out: str = option("outputs/hierarchy_family", "run records")
    results: str = option(str(results_dir("hierarchy_family")), "report folder")
    configs: list[str] | None = option(None, "configurations (default: all): " + " ".join(c.name for c in CONFIGS))
    trees: list[str] | None = option(None, "tree names, e.g. h00 h05 (default: the whole family)")
    seeds: list[int] = option(default_factory=lambda: [0, 1], help="training seeds")
    steps: int = option(2000, "training steps of batch 200")
    jobs: int = option(2, "worker processes, one thread each")
    nice: int = option(19, "niceness added to the workers")
    train: bool = option(True, "train pending runs (--no-train: only rewrite the report)")
    report: bool = option(True, "write the report")


def write_report(out: Path, results: Path, order: list[str], dpi: int = 110,
                 trees: list[str] | None = None) -> list[Path]:
    from .analysis import (breakdown_markdown, config_summaries, failures, failures_markdown, plot_distributions,
                           runs_csv, summary_markdown, trees_csv)
    from .analysis import _round

    records = [r for r in load_records(out) if r["config"] in order and (not trees or r["tree"] in trees)]
    if not records:
        raise SystemExit(f"no records under {out}/runs")
    results.mkdir(parents=True, exist_ok=True)
    rows = config_summaries(records, order)
    notes = {c.name: c.note for c in CONFIGS}
    written = [write_csv(results / "summary.csv", _round(rows))]
    for name, text in (("summary.md", summary_markdown(rows, notes)), ("trees.csv", trees_csv(records)),
                       ("runs.csv", runs_csv(records)),
                       ("failures.md", failures_markdown(failures(records), order)),
                       ("breakdown.md", breakdown_markdown(records, order))):
        (results / name).write_text(text)
        written.append(results / name)
    written.append(plot_distributions(records, order, results / "distribution.png", dpi=dpi))
    return written


def main(argv: list[str] | None = None) -> int:
    study = parse_config(HierarchyFamilyStudy, argv, prog="python -m benchmarks.hierarchy_family", description=__doc__)
    try:
        configs = [config_by_name(c) for c in study.configs] if study.configs else list(CONFIGS)
    except ValueError as e:
        raise SystemExit(f"python -m benchmarks.hierarchy_family: error: {e}") from None
    out, results = Path(study.out), Path(study.results)
    if study.train:
        run_family(out, configs, study.seeds, StudySettings(steps=study.steps), jobs=study.jobs, trees=study.trees,
                   niceness=study.nice)
    if study.report:
        for w in write_report(out, results, [c.name for c in configs], trees=study.trees):
            print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
