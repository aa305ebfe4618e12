"""The comparison table (markdown + CSV) and one plot per metric against L0, per architecture."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Sequence

from ..harness import fmt_mean_std, markdown_table, summarise, width_label, write_csv

__all__ = ["METRIC_LABELS", "PAPER_COLUMNS", "PAPER_REFERENCE", "RESULTS_COLUMNS", "comparison_rows", "console_table",
           "paper_rows", "results_rows", "write_report"]

# column -> (label, higher is better)
METRIC_LABELS = {
    "l0": ("L0 (measured)", None),
    "explained_variance": ("Variance explained", True),
    "mse": ("MSE", False),
    "ce_loss_score": ("Loss recovered (CE score)", True),
    "kl_div_score": ("KL-divergence score", True),
    "absorption": ("Absorption (mean fraction)", False),
    "full_absorption": ("Full absorption rate", False),
    "split_features": ("Split features per letter", False),
    # SAEBench's k = 1 probe per first letter: is there a first-letter latent for absorption to act on?
    "letter_latent_f1": ("First-letter latent F1 (k=1 probe)", True),
    "sparse_probing_top1": ("Sparse probing, top-1 latent accuracy", True),
    "sparse_probing_llm": ("Probing accuracy on the LM (reference)", True),
    "sae_probes_top1": ("sae-probes sparse probing, top-1 latent accuracy", True),
    "sae_probes_llm": ("sae-probes probing accuracy on the LM (reference)", True),
    "scr_top20": ("SCR, top-20 latents", True),
    "tpp_top20": ("TPP, top-20 latents", True),
    # shared structure between latents; the paper reads lower as more disentangled
    "meta_variance_explained": ("Meta-SAE variance explained", False),
    "dead": ("Dead latents (held-out)", False),
}

# Bussmann et al. (ICML 2025), Gemma-2-2B layer 12, at L0 40: Matryoshka vs BatchTopK.
PAPER_REFERENCE = {
    "l0": 40,
    "explained_variance": {"matryoshka": 0.70, "batchtopk": 0.72},
    "absorption": {"matryoshka": 0.05, "batchtopk": 0.49},
    # appendix D.1, 65k latents
    "meta_variance_explained": {"matryoshka": 0.42, "batchtopk": 0.55},
}

_ID_COLUMNS = ["name", "architecture", "source", "width", "target_l0", "l1_penalty", "absorption_status"]


def comparison_rows(plan: Any, specs: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per SAE: identity columns and the headline metrics (None where not available)."""
    from matryoshka_plugin.saebench import SEEDED_EVALS, collect_results, headline_row, seed_dir, seeded_headline

    e = plan.cfg.evals
    names = [s.name for s in specs]
    results = collect_results(plan.eval_dir, names, e.evals)
    seeded = [ev for ev in e.evals if ev in SEEDED_EVALS] if e.seeds else []
    per_seed = {x: collect_results(seed_dir(plan.eval_dir, x), names, seeded) for x in e.seeds or ()}
    rows = []
    for s in specs:
        res = results.get(s.name, {})
        if seeded:  # absorption's status from the first seed that has it
            res = {**res, **{ev: r for x in reversed(list(per_seed)) for ev, r in per_seed[x].get(s.name, {}).items()}}
        absorption = res.get("absorption")
        row = {
            "name": s.name, "architecture": s.architecture, "source": s.source, "width": s.width,
            "target_l0": s.k, "l1_penalty": s.l1_penalty,
            "absorption_status": None if absorption is None else absorption["status"],
            **headline_row(res),
        }
        if seeded:  # mean over seeds, with <column>_std and <column>_n
            row.update(seeded_headline({x: per_seed[x].get(s.name, {}) for x in per_seed}, seeded))
        rows.append(row)
    rows.sort(key=lambda r: (r["width"] or 0, str(r["architecture"]), r["l0"] if r["l0"] is not None else math.inf,
                             r["name"]))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"
    return str(v)


@functools.cache
def _absorption_columns() -> frozenset[str]:
    """The headline columns the absorption eval gives (shown as n/e where it scored no letters)."""
    from matryoshka_plugin.saebench import HEADLINE_METRICS

    return frozenset(col for col, ev, _ in HEADLINE_METRICS if ev == "absorption")


def _cell(r: dict[str, Any], m: str) -> str:
    """``m``'s value (± its std over seeds), or "n/e" for absorption's figures where SAEBench
    scored no letters."""
    if m in _absorption_columns() and r["absorption_status"] == "not_evaluated":
        return "n/e"
    std = r.get(f"{m}_std")
    return _fmt(r[m]) + ("" if std is None else f" ± {_fmt(std)}")


def _markdown(rows: list[dict[str, Any]], metrics: list[str], plan: Any, paper: list[dict[str, Any]]) -> str:
    cfg = plan.cfg
    header = ["SAE", "architecture", "width", "target L0"] + [METRIC_LABELS[m][0] for m in metrics]
    lines = [
        f"# Matryoshka vs standard SAEs: {cfg.model.name}, {cfg.hook_name}",
        "",
        f"SAEBench evals: {', '.join(cfg.evals.evals)}. L0 is measured by the core eval; "
        "absorption and meta-SAE variance explained: lower is better; all other scores: higher is better "
        "(except MSE). SCR and TPP are unreliable at these settings (Chanin 2026, arXiv:2605.18229); "
        "sae-probes sparse probing is the most reliable metric that study tested."
        + (f" Seeded evals: mean ± sample std over seeds {cfg.evals.seeds}." if cfg.evals.seeds else ""),
        "",
    ]
    table = []
    for r in rows:
        target = r["target_l0"] if r["target_l0"] is not None else (f"l1 {r['l1_penalty']:g}" if r["l1_penalty"] else "–")
        table.append([r["name"], str(r["architecture"]), _fmt(r["width"]), str(target)] + [_cell(r, m) for m in metrics])
    lines += [
        "## By SAE type and L0",
        "",
        "Mean ± sample std over training seeds (the `seeds` column; one value where one seed ran). "
        "Dead latents: the fraction that never fires on the held-out activations. First-letter latent "
        "F1: the mean over scored letters of SAEBench's k = 1 probe on the SAE's latents (the latent "
        "absorption is measured against); near 0 the SAE has no first-letter latents and absorption is "
        "near 1 whatever the SAE. Figure: `absorption_and_variance_vs_l0.png`.",
        "",
        _paper_markdown(paper),
        "",
        "## Every SAE",
        "",
    ]
    lines.append(markdown_table(header, table))
    if any(r["absorption_status"] == "not_evaluated" for r in rows):
        lines += ["", "n/e: SAEBench computed no absorption score because too few first letters have a "
                      "ground-truth probe above its F1 threshold (see evals/absorption/*_not_evaluated.json)."]
    ref = PAPER_REFERENCE
    lines += [
        "",
        f"Paper reference (Bussmann et al., ICML 2025; Gemma-2-2B layer 12, L0 {ref['l0']}): variance explained "
        f"{ref['explained_variance']['matryoshka']:.2f} (Matryoshka) vs {ref['explained_variance']['batchtopk']:.2f} "
        f"(BatchTopK); absorption {ref['absorption']['matryoshka']:.2f} vs {ref['absorption']['batchtopk']:.2f}; "
        f"meta-SAE variance explained (65k latents) {ref['meta_variance_explained']['matryoshka']:.2f} vs "
        f"{ref['meta_variance_explained']['batchtopk']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


# The columns the command prints when it ends (the headline of the comparison), short labels.
_CONSOLE = {"l0": "L0", "explained_variance": "var. explained", "ce_loss_score": "CE loss recovered",
            "absorption": "absorption", "full_absorption": "full absorption", "sae_probes_top1": "probing top-1",
            "sparse_probing_top1": "sparse probing top-1", "meta_variance_explained": "meta-SAE var. expl."}


def console_table(rows: list[dict[str, Any]], evals: Sequence[str]) -> str:
    """The headline columns of ``rows`` that the evals ``evals`` produce, as a markdown table."""
    from matryoshka_plugin.saebench import HEADLINE_METRICS

    made = {col for col, ev, _ in HEADLINE_METRICS if ev in set(evals)}
    cols = [c for c in _CONSOLE if c in made]
    body = [[r["name"]] + [_cell(r, m) for m in cols] for r in rows]
    return markdown_table(["SAE"] + [_CONSOLE[c] for c in cols], body)


# results.csv: one row per SAE and seed, metrics as SAEBench names them (empty where not run);
# dead and heldout_fvu come from the held-out activations (pipeline.heldout_metrics).
_RESULT_METRICS = ["l0", "explained_variance", "ce_loss_score", "absorption", "full_absorption", "sae_probes_top1",
                   "meta_variance_explained", "letter_latent_f1"]
RESULTS_COLUMNS = ["sae", "architecture", "width", "target_l0", "seed", "lr", *_RESULT_METRICS, "dead", "heldout_fvu",
                   "l1_penalty"]


def results_rows(rows: list[dict[str, Any]], specs: Sequence[Any], heldout: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """``rows`` (:func:`comparison_rows`) as results.csv rows: the SAE's seed and lr from its spec,
    ``dead`` and ``heldout_fvu`` from ``heldout`` (name -> :func:`pipeline.heldout_metrics`)."""
    by_name = {s.name: s for s in specs}
    out = []
    for r in rows:
        s = by_name[r["name"]]
        h = heldout.get(r["name"], {})
        out.append({"sae": r["name"], "architecture": r["architecture"], "width": r["width"],
                    "target_l0": r["target_l0"] if r["target_l0"] is not None else "", "seed": s.seed, "lr": s.lr,
                    **{m: r.get(m) for m in _RESULT_METRICS}, "dead": h.get("dead"), "heldout_fvu": h.get("fvu"),
                    "l1_penalty": s.l1_penalty if s.l1_penalty is not None else ""})
    return out


# The paper's table (Bussmann et al., table 1): one row per SAE type and L0, mean ± std over training seeds.
PAPER_COLUMNS = ["absorption", "full_absorption", "letter_latent_f1", "sae_probes_top1", "explained_variance", "ce_loss_score", "l0", "dead",
                 "meta_variance_explained"]


def paper_rows(results: list[dict[str, Any]], metrics: Sequence[str] = PAPER_COLUMNS) -> list[dict[str, Any]]:
    """``results`` (one row per SAE and seed, as :func:`results_rows`) grouped by SAE type
    (architecture, width, target L0 or ReLU penalty): per metric the mean over the group's training
    seeds as ``<metric>``, the sample std as ``<metric>_std`` and the values counted as
    ``<metric>_n``; ``seeds`` is the group's number of SAEs."""
    return summarise(results, ["architecture", "width", "target_l0", "l1_penalty"], metrics, counts=True)


def _paper_markdown(paper: list[dict[str, Any]]) -> str:
    header = ["architecture", "width", "target L0", "seeds"] + [METRIC_LABELS[m][0] for m in PAPER_COLUMNS]
    body = []
    for r in paper:
        target = str(r["target_l0"]) if r["target_l0"] not in (None, "") else f"l1 {r['l1_penalty']:g}"
        body.append([str(r["architecture"]), width_label(r["width"]) if isinstance(r["width"], int) else _fmt(r["width"]),
                     target, str(r["seeds"])]
                    + [fmt_mean_std(r[m], r[f"{m}_std"] if r[f"{m}_n"] > 1 else None,
                                    decimals=1 if m == "l0" else 3) for m in PAPER_COLUMNS])
    return markdown_table(header, body)


def _draw(ax: Any, paper: list[dict[str, Any]], metric: str, title: str) -> None:
    """``metric`` against measured L0 on ``ax``: one line per architecture and width through its
    seed means, the seeds' std as error bars."""
    series: dict[tuple[str, Any], list[tuple[float, float, float]]] = {}
    for r in paper:
        x, y = r["l0"], r[metric]
        if x is None or not math.isfinite(float(x)):  # no core eval: the target L0
            x = r["target_l0"] if r["target_l0"] not in (None, "") else None
        if x is None or y is None or not (math.isfinite(float(x)) and math.isfinite(float(y))):
            continue
        err = r[f"{metric}_std"] if r[f"{metric}_n"] > 1 else 0.0
        series.setdefault((str(r["architecture"]), r["width"]), []).append((float(x), float(y), float(err)))
    archs = sorted({a for a, _ in series})
    widths = sorted({w for _, w in series}, key=lambda w: (w is None, w or 0))
    colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    markers = ["o", "s", "^", "D", "v", "P"]
    for (arch, width), pts in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        pts.sort()
        xs, ys, errs = zip(*pts)
        label = f"{arch} {width_label(width)}" if isinstance(width, int) else arch
        ax.errorbar(xs, ys, yerr=errs, marker=markers[widths.index(width) % len(markers)], capsize=3,
                    color=colors[archs.index(arch) % len(colors)], linestyle="-" if widths.index(width) == 0 else "--",
                    label=label.strip())
    if series:
        xs_all = [x for pts in series.values() for x, _, _ in pts]
        if min(xs_all) > 0 and max(xs_all) / min(xs_all) > 3:
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("L0 (measured by the core eval; target L0 where missing)")
    ax.set_ylabel(title)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    from matryoshka_plugin.io import atomic_open

    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def _plots(paper: list[dict[str, Any]], metrics: list[str], out: Path) -> list[Path]:
    """The paper's figure (absorption and variance explained against L0, side by side) and one plot
    per other metric, from the seed means of ``paper``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    pair = [m for m in ("absorption", "explained_variance") if m in metrics]
    if pair:
        fig, axes = plt.subplots(1, len(pair), figsize=(5.5 * len(pair), 4.2), squeeze=False)
        for ax, m in zip(axes[0], pair):
            _draw(ax, paper, m, METRIC_LABELS[m][0])
        files.append(out / "absorption_and_variance_vs_l0.png")
        _save(fig, files[-1])
    for m in metrics:
        if m == "l0":
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        _draw(ax, paper, m, METRIC_LABELS[m][0])
        files.append(out / f"{m}_vs_l0.png")
        _save(fig, files[-1])
    return files


def write_report(plan: Any, specs: Sequence[Any], heldout: dict[str, dict[str, float]] | None = None,
                 out: str | Path | None = None) -> tuple[list[dict[str, Any]], list[Path]]:
    """Write ``comparison.md`` (the table by SAE type and L0, then every SAE), ``comparison.csv``,
    ``results.csv`` (:func:`results_rows`, with ``dead`` and ``heldout_fvu`` from ``heldout``, name ->
    :func:`pipeline.heldout_metrics`), the paper's figure and one ``<metric>_vs_l0.png`` per metric
    into ``out`` (default ``plan.report_dir``; a study's published copy belongs under
    ``harness.results_dir("causal_lm_comparison")``, e.g. ``docs/results/causal_lm_comparison/smollm2_135m``).
    Returns the per-SAE rows and the files, the two tables and results.csv first."""
    from matryoshka_plugin.io import atomic_open
    from matryoshka_plugin.saebench import HEADLINE_METRICS

    out = Path(plan.report_dir if out is None else out)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(plan, specs)
    results = results_rows(rows, specs, heldout or {})
    paper = paper_rows(results)
    # the plots: every headline metric's seed means (results.csv keeps only the columns)
    plotted = paper_rows([{**r, **res} for r, res in zip(rows, results)],
                         [col for col, _, _ in HEADLINE_METRICS] + ["dead"])
    evals = set(plan.cfg.evals.evals)
    metrics = [col for col, ev, _ in HEADLINE_METRICS if ev in evals]
    md = out / "comparison.md"
    with atomic_open(md) as f:
        f.write(_markdown(rows, metrics, plan, paper))
    seeded = [col for col, _, _ in HEADLINE_METRICS if any(f"{col}_std" in r for r in rows)]
    stds = [f"{col}_{x}" for col in seeded for x in ("std", "n")]
    csv_path = write_csv(out / "comparison.csv", rows, _ID_COLUMNS + [col for col, _, _ in HEADLINE_METRICS] + stds)
    results_path = write_csv(out / "results.csv", results, RESULTS_COLUMNS)
    return rows, [md, csv_path, results_path, *_plots(plotted, metrics + ["dead"], out)]
