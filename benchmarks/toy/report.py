"""Tables and figures from the cached runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matryoshka_plugin.io import atomic_open
from matryoshka_plugin.toy import evaluate_sae
from matryoshka_plugin.toy.plots import plot_activations, plot_decoder_cosine, plot_seed_metrics, plot_tradeoff

from .. import harness
from ..harness import fmt_mean_std, markdown_table, write_csv
from .config import SetupConfig, parse_variant

# (record key, column title, decimals)
COLUMNS = [
    ("absorption", "absorption", 3),
    ("absorption_best", "absorption (best-cosine latent)", 3),
    ("recovery", "recovery", 3),
    ("mixing_parent_child", "parent-child mixing", 3),
    ("mixing_parent_child_signed", "parent→child cos", 3),
    ("mixing_sibling_signed", "child→sibling cos", 3),
    ("l0", "L0", 3),
    ("fvu", "FVU", 4),
    ("dead_latents", "dead", 1),
]
SAELENS_COLUMNS = [
    ("saelens_mcc", "MCC", 3),
    ("saelens_classification_f1_score", "F1", 3),
    ("saelens_uniqueness", "uniqueness", 3),
    ("saelens_explained_variance", "expl. var.", 3),
]
# With --meta-structure: SAEBench's meta-SAE variance explained on the decoder rows (one meta-SAE
# per run, seeded by the run's seed, so the std is over SAE and meta-SAE seeds together).
META_COLUMNS = [("meta_variance_explained", "meta-SAE var. expl.", 3)]
CLEAN = 0.01  # a seed counts as free of absorption at or below this rate


def load_records(out: Path, setups: dict[str, SetupConfig], seeds: list[int]) -> list[dict[str, Any]]:
    from .run import jobs_for, run_key, store

    return store(out).records(run_key(s.name, v, k, seed) for s, v, k, seed in jobs_for(setups, seeds))


def variant_key(rec: dict[str, Any]) -> str:
    return rec["variant"] if rec.get("k") is None else f"{rec['variant']}/k{rec['k']}"


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (set-up, variant/k): mean and sample std over seeds of every column."""
    cols = [c for c, _, _ in COLUMNS + SAELENS_COLUMNS + META_COLUMNS]
    rows = harness.summarise(records, by=["setup", ("variant", variant_key)], metrics=cols + ["train_seconds"])
    for row in rows:
        recs = [r for r in records if r["setup"] == row["setup"] and variant_key(r) == row["variant"]]
        row["steps"] = recs[0]["trainer"]["steps"]
        row["clean_seeds"] = sum(1 for r in recs if r["absorption"] is not None and r["absorption"] <= CLEAN)
    return rows


SUMMARY_FIELDS = (["setup", "variant", "seeds", "steps", "clean_seeds"]
                  + [f"{c}{s}" for c, _, _ in COLUMNS + SAELENS_COLUMNS + META_COLUMNS for s in ("", "_std")]
                  + ["train_seconds"])


def markdown(rows: list[dict[str, Any]], setups: dict[str, SetupConfig], true_l0: dict[str, float]) -> str:
    lines = []
    for name, setup in setups.items():
        sub = [r for r in rows if r["setup"] == name]
        if not sub:
            continue
        cols = COLUMNS + (SAELENS_COLUMNS if setup.builder == "synthetic_hierarchy" else [])
        cols += [c for c in META_COLUMNS if any(not math.isnan(r[c[0]]) for r in sub)]
        lines.append(f"### {setup.title}\n")
        lines.append(f"{setup.steps} steps, batch {setup.batch_size}, true L0 {true_l0.get(name, float('nan')):.3f}; "
                     f"mean ± std over {max(r['seeds'] for r in sub)} seeds; 'clean' = seeds with absorption ≤ {CLEAN:.0%}.\n")
        lines.append(markdown_table(
            ["SAE", "clean"] + [title for _, title, _ in cols],
            ([f"`{r['variant']}`", f"{r['clean_seeds']}/{r['seeds']}"] + [fmt_mean_std(r[c], r[c + "_std"], d) for c, _, d in cols]
             for r in sub)))
        lines.append("")
    return "\n".join(lines)


def write_reports(out: Path, setups: dict[str, SetupConfig], seeds: list[int], figures: bool = True,
                  figures_dir: Path | None = None, dpi: int = 110, report_dir: Path | None = None) -> list[Path]:
    """The tables (and figures) of the runs cached under ``out`` into ``report_dir`` (default
    ``out``; figures default to ``out/figures``, or ``report_dir`` itself when one is given)."""
    from .train import build_toy

    report = Path(report_dir) if report_dir is not None else out
    if report_dir is not None and figures_dir is None:
        figures_dir = report

    records = load_records(out, setups, seeds)
    flat_keys = ["setup", "variant", "k", "seed", "absorption", "absorption_best", "recovery", "mean_max_cosine", "l0", "fvu",
                 "mixing_parent_child", "mixing_parent_child_signed", "mixing_sibling", "mixing_sibling_signed",
                 "mixing_child_parent_signed", "dead_latents", "train_seconds", "final_sparsity_coeff",
                 "meta_variance_explained"]
    extra = sorted({k for r in records for k in r if k.startswith("saelens_")})
    flat = [{**{k: r.get(k) for k in flat_keys + extra}, "absorption_per_parent": json.dumps(r["absorption_per_parent"])}
            for r in records]
    written = [write_csv(report / "results.csv", flat, flat_keys + ["absorption_per_parent"] + extra)]
    rows = summarise(records)
    written.append(write_csv(report / "summary.csv", rows, SUMMARY_FIELDS if rows else []))
    true_l0 = {name: build_toy(s).true_l0 for name, s in setups.items()}
    with atomic_open(report / "results.md") as f:
        f.write(markdown(rows, setups, true_l0) + "\n")
    written.append(report / "results.md")
    if figures and records:
        written += make_figures(out, setups, seeds, records, rows, figures_dir or out / "figures", dpi)
    return written


def _load_run(out: Path, setup: str, key: str, seed: int):
    from .run import SAE_FOLDER, run_dir
    from .train import load_sae

    variant, _, k = key.partition("/k")
    folder = run_dir(out, setup, variant, int(k) if k else None, seed) / SAE_FOLDER
    if not (folder / "ae.pt").is_file():
        return None
    return load_sae(folder)


def make_figures(out: Path, setups: dict[str, SetupConfig], seeds: list[int], records, rows,
                 fig_dir: Path, dpi: int) -> list[Path]:
    from .train import build_toy

    written = []
    for name, setup in setups.items():
        toy = build_toy(setup)
        keys = setup.figure_variants or []
        saes, metrics = {}, {}
        for key in keys:
            sae = _load_run(out, name, key, seeds[0])
            if sae is not None:
                saes[key] = sae
                metrics[key] = evaluate_sae(sae, toy, n_samples=setup.eval_samples)
        if saes:
            written.append(plot_activations(toy, saes, metrics, fig_dir / f"{name}_activations.png", dpi=dpi,
                                            title=f"{setup.title}: ground truth vs latents (seed {seeds[0]})"))
            written.append(plot_decoder_cosine(toy, metrics, fig_dir / f"{name}_decoder_cosine.png", dpi=dpi))
        sub = [r for r in records if r["setup"] == name]
        if sub:
            order = list(dict.fromkeys(variant_key(r) for r in sub))
            vals = {m: {v: [r.get(m) for r in sub if variant_key(r) == v] for v in order}
                    for m in ("absorption", "recovery", "mixing_parent_child", "l0")}
            written.append(plot_seed_metrics(vals, fig_dir / f"{name}_seeds.png", title=setup.title, dpi=dpi))
        if name == "hedging":
            written.append(tradeoff_figure([r for r in rows if r["setup"] == name], fig_dir / "hedging_tradeoff.png", dpi))
    return written


def tradeoff_figure(rows: list[dict[str, Any]], path: Path, dpi: int) -> Path:
    """Parent-child mixing vs absorption on the hedging set-up: the balance-beta sweeps of both
    families joined (beta = 1 is standard Matryoshka) and the non-Matryoshka references;
    bars are standard errors of the mean over seeds."""
    by_key = {r["variant"]: r for r in rows}
    references = ("vanilla", "vanilla_1", "btk/k1", "btk_1/k1", "up_btk/k1", "up_mbtk/k1", "mat_every")

    def series_of(key: str) -> str | None:
        spec = parse_variant(key.split("/")[0])
        if spec.prefix_mode == "groups" and spec.family in ("log", "btk"):
            return "log-sparsity groups [1, 2], beta sweep" if spec.family == "log" else "BatchTopK groups [1, 2], beta sweep"
        return None

    def beta_of(key: str) -> float:
        spec = parse_variant(key.split("/")[0])
        return 1.0 if spec.balance_beta is None else spec.balance_beta

    points = []
    for key in sorted(by_key, key=lambda k: (series_of(k) or "", -beta_of(k))):
        r, series = by_key[key], series_of(key)
        if math.isnan(r["mixing_parent_child"]) or (series is None and key not in references):
            continue
        sem = 1.0 / math.sqrt(max(r["seeds"], 1))
        label = f"β={beta_of(key):g}" if series else key
        points.append({"label": label, "series": series, "x": r["absorption"], "x_std": r["absorption_std"] * sem,
                       "y": r["mixing_parent_child"], "y_std": r["mixing_parent_child_std"] * sem})
    return plot_tradeoff(points, path, x="absorption (mean over seeds ± s.e.m.)",
                         y="mean |cos(parent latent, child feature)|",
                         title="Hedging set-up: parent-child mixing vs absorption", dpi=dpi)
