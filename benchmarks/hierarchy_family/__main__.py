"""``python -m benchmarks.hierarchy_family``: train every pending (tree, configuration, seed) run
of the random hierarchy family and write the distributions.

Records go to ``--out`` (default ``outputs/hierarchy_family/runs/...``, one JSON per run; finished
runs are skipped), the report to ``--results`` (default ``docs/results/hierarchy_family``):
``summary.md``/``summary.csv`` (per configuration: share of trees cured, median and worst tree),
``runs.csv`` (one row per run), ``failures.md`` (why each tree is not cured) and
``distribution.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .configs import CONFIGS, config_by_name
from .study import StudySettings, load_records, run_family


def write_report(out: Path, results: Path, order: list[str], dpi: int = 110) -> list[Path]:
    from .analysis import (config_summaries, failures, failures_markdown, plot_distributions, runs_csv,
                           summary_csv, summary_markdown)

    records = [r for r in load_records(out) if r["config"] in order]
    if not records:
        raise SystemExit(f"no records under {out}/runs")
    results.mkdir(parents=True, exist_ok=True)
    rows = config_summaries(records, order)
    notes = {c.name: c.note for c in CONFIGS}
    written = []
    for name, text in (("summary.md", summary_markdown(rows, notes)), ("summary.csv", summary_csv(rows)),
                       ("runs.csv", runs_csv(records)),
                       ("failures.md", failures_markdown(failures(records), order))):
        (results / name).write_text(text)
        written.append(results / name)
    written.append(plot_distributions(records, order, results / "distribution.png", dpi=dpi))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hierarchy_family", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/hierarchy_family", help="run records (default: %(default)s)")
    p.add_argument("--results", default="docs/results/hierarchy_family", help="report folder (default: %(default)s)")
    p.add_argument("--configs", nargs="+", help="configurations (default: all): " + " ".join(c.name for c in CONFIGS))
    p.add_argument("--trees", nargs="+", help="tree names, e.g. h00 h05 (default: all of the family)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (default: 0 1)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of batch 200 (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default: %(default)s)")
    p.add_argument("--nice", type=int, default=19, help="niceness added to the workers (default: %(default)s)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from the stored records")
    p.add_argument("--no-report", action="store_true", help="train only")
    args = p.parse_args(argv)
    configs = [config_by_name(c) for c in args.configs] if args.configs else list(CONFIGS)
    out, results = Path(args.out), Path(args.results)
    if not args.report_only:
        run_family(out, configs, args.seeds, StudySettings(steps=args.steps), jobs=args.jobs, trees=args.trees,
                   niceness=args.nice)
    if not args.no_report:
        for w in write_report(out, results, [c.name for c in configs]):
            print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
