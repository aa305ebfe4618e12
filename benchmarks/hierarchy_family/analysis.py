"""What each run's latents learned, and the family's results as distributions.

:func:`pair_report` splits absorption by (parent, child) pair and names what fires instead of
the parent's latent; :func:`tree_summaries` averages a configuration's seeds per tree;
:func:`config_summaries` turns those into distributions over trees (median, worst tree, share
cured); :func:`failures` explains each tree a configuration does not cure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from matryoshka_plugin.toy import HierarchySpec, ToyMetrics, ToyModel

from ..harness import csv_text, markdown_table, summarise
from .study import CURED_ABSORPTION, CURED_RECOVERY, cured

__all__ = ["pair_report", "tree_summaries", "config_summaries", "summary_markdown", "summary_csv", "failures",
           "failures_markdown", "runs_csv", "trees_csv", "breakdown_markdown", "learned_by_frequency", "cosine_by_role", "paired_markdown", "pairs_markdown", "latent_order_markdown", "plot_distributions", "ABSORBED_COS"]

# A child's latent whose decoder leans this far toward its parent's direction carries the parent.
ABSORBED_COS = 0.1
# A true feature whose matched latent is below this cosine counts as not learned.
UNLEARNED_COS = 0.9


def _r(v: float) -> float:
    return round(float(v), 4)


@torch.no_grad()
def pair_report(sae: torch.nn.Module, toy: ToyModel, m: ToyMetrics, spec: HierarchySpec | None = None,
                n_samples: int = 100_000, seed: int = 1234) -> list[dict[str, Any]]:
    """For every (parent, child) pair, on the evaluation samples where both fire (the same
    samples :func:`~matryoshka_plugin.toy.evaluate_sae` draws with ``seed``): how often the
    parent's matched latent is silent (``miss``), the decoder cosines of the parent's and the
    child's latents with the parent and child directions, and the latent that fires most often
    instead when the parent's latent is silent (``absorber``)."""
    feats, x = toy.sample(n_samples, torch.Generator().manual_seed(seed))
    fires = sae.encode(x).float() > 0
    cos, match = m.decoder_cosine, m.matching
    owner = {lat: f for f, lat in enumerate(match) if lat >= 0}
    names = [f.name for f in toy.features]
    out = []
    for parent, children in toy.parent_child_groups():
        lp = match[parent]
        for c in children:
            both = (feats[:, parent] > 0) & (feats[:, c] > 0)
            n = int(both.sum())
            if n == 0:
                continue
            silent = both & ~fires[:, lp]
            lc = match[c]
            row: dict[str, Any] = {
                "parent": names[parent], "child": names[c], "n": n,
                "miss": _r(silent.sum() / n),
                "parent_latent": lp, "parent_latent_cos_parent": _r(cos[lp, parent]),
                "parent_latent_cos_child": _r(cos[lp, c]),
                "child_latent": lc, "child_latent_cos_child": _r(cos[lc, c]),
                "child_latent_cos_parent": _r(cos[lc, parent]),
                "child_latent_fires": _r(fires[both, lc].float().mean()),
                "absorber": None,
            }
            if int(silent.sum()):
                rates = fires[silent].float().mean(0)
                rates[lp] = -1.0
                a = int(rates.argmax())
                row["absorber"] = {"latent": a, "fires": _r(rates[a]), "matched_to": names[owner[a]] if a in owner else None,
                                   "cos_parent": _r(cos[a, parent]), "cos_child": _r(cos[a, c])}
            out.append(row)
    return out


# -- distributions over trees ---------------------------------------------------------------------

_METRICS = ("absorption", "recovery", "fvu", "l0", "dead_latents", "mixing_parent_child_signed",
            "mixing_sibling_signed", "mean_max_cosine")


def tree_summaries(records: list[dict]) -> dict[tuple[str, str], dict[str, Any]]:
    """``(config, tree) -> {metric: mean over seeds, metric_std, "seeds": n, "cured": bool,
    "runs_cured": n}`` (``benchmarks.harness.summarise``). A tree without parent samples counts
    as absorption 0."""
    recs = [{**r, "absorption": 0.0 if r.get("absorption") is None else r["absorption"],
             "runs_cured": int(bool(r["cured"])), **{f"tree_{k}": r["tree_info"][k] for k in ("k", "true_l0")}}
            for r in records]
    out = {}
    for row in summarise(recs, ["config", "tree"], list(_METRICS) + ["runs_cured", "tree_k", "tree_true_l0"]):
        row["runs_cured"] = round(row["runs_cured"] * row["seeds"])
        row["k"], row["true_l0"] = row.pop("tree_k"), row.pop("tree_true_l0")
        row["cured"] = cured(row["absorption"], row["recovery"])
        out[(row["config"], row["tree"])] = row
    return out


def config_summaries(records: list[dict], order: list[str] | None = None) -> list[dict[str, Any]]:
    """Per configuration: trees, runs, share of trees cured (seed means meet the bar), share of
    runs cured, median and worst tree of absorption and recovery, medians of the rest."""
    per_tree = tree_summaries(records)
    configs = order or sorted({c for c, _ in per_tree})
    rows = []
    for c in configs:
        trees = {t: s for (cc, t), s in per_tree.items() if cc == c}
        if not trees:
            continue
        ab = {t: s["absorption"] for t, s in trees.items()}
        rec = {t: s["recovery"] for t, s in trees.items()}
        worst_a = max(ab, key=lambda t: ab[t])
        worst_r = min(rec, key=lambda t: rec[t])
        n_runs = sum(s["seeds"] for s in trees.values())
        rows.append({
            "config": c, "trees": len(trees), "runs": n_runs,
            "trees_cured": sum(s["cured"] for s in trees.values()) / len(trees),
            "runs_cured": sum(s["runs_cured"] for s in trees.values()) / n_runs,
            "trees_absorption_ok": sum(s["absorption"] <= CURED_ABSORPTION for s in trees.values()) / len(trees),
            "trees_recovery_ok": sum(s["recovery"] >= CURED_RECOVERY for s in trees.values()) / len(trees),
            "absorption_median": float(np.median(list(ab.values()))),
            "absorption_worst": ab[worst_a], "absorption_worst_tree": worst_a,
            "recovery_median": float(np.median(list(rec.values()))),
            "recovery_worst": rec[worst_r], "recovery_worst_tree": worst_r,
            **{f"{m}_median": float(np.nanmedian([s[m] for s in trees.values()]))
               for m in ("fvu", "l0", "dead_latents", "mixing_parent_child_signed", "mixing_sibling_signed")},
            "l0_over_k_median": float(np.median([s["l0"] / s["k"] for s in trees.values()])),
        })
    return rows


def summary_markdown(rows: list[dict], notes: dict[str, str] | None = None) -> str:
    header = ["configuration", "trees (runs)", "trees cured", "runs cured", f"trees abs <= {CURED_ABSORPTION}",
              f"trees rec >= {CURED_RECOVERY}", "absorption median", "worst tree",
              "recovery median", "worst tree", "FVU median", "L0/k median", "dead median", "mixing p-c", "mixing sib"]
    body = []
    for r in rows:
        name = r["config"] + (f" ({notes[r['config']]})" if notes and r["config"] in notes else "")
        body.append([
            name, f"{r['trees']} ({r['runs']})", f"{r['trees_cured']:.0%}", f"{r['runs_cured']:.0%}",
            f"{r['trees_absorption_ok']:.0%}", f"{r['trees_recovery_ok']:.0%}",
            f"{r['absorption_median']:.3f}", f"{r['absorption_worst']:.3f} ({r['absorption_worst_tree']})",
            f"{r['recovery_median']:.3f}", f"{r['recovery_worst']:.3f} ({r['recovery_worst_tree']})",
            f"{r['fvu_median']:.3f}", f"{r['l0_over_k_median']:.2f}", f"{r['dead_latents_median']:.0f}",
            f"{r['mixing_parent_child_signed_median']:+.3f}", f"{r['mixing_sibling_signed_median']:+.3f}"])
    return markdown_table(header, body) + "\n"


def _round(rows: list[dict]) -> list[dict]:
    return [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def summary_csv(rows: list[dict]) -> str:
    return csv_text(_round(rows))


def trees_csv(records: list[dict]) -> str:
    """One row per (configuration, tree): seed means and standard deviations, cured or not."""
    rows = sorted(tree_summaries(records).values(), key=lambda r: (r["config"], r["tree"]))
    return csv_text(_round(rows))


def runs_csv(records: list[dict]) -> str:
    """One row per run: the metrics behind every table and figure."""
    keys = ("tree", "tree_fingerprint", "config", "seed", "absorption", "recovery", "fvu", "l0", "dead_latents",
            "mixing_parent_child_signed", "mixing_sibling_signed", "mean_max_cosine", "cured", "train_seconds")
    rows = [{k: r.get(k) for k in keys} | {"k": r["tree_info"]["k"], "true_l0": round(r["tree_info"]["true_l0"], 4)}
            for r in sorted(records, key=lambda r: (r["config"], r["tree"], r["seed"]))]
    return csv_text(_round(rows))


# -- why a tree is not cured -------------------------------------------------------------------------


def failures(records: list[dict]) -> dict[str, list[dict[str, Any]]]:
    """Per configuration, every tree whose seed means miss the bar, with the measured reason:
    the worst (parent, child) pair of the worst seed and what its latents learned, and the true
    features without a latent above cosine 0.9."""
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        by[(r["config"], r["tree"])].append(r)
    per_tree = tree_summaries(records)
    out: dict[str, list[dict]] = defaultdict(list)
    for (c, t), s in sorted(per_tree.items()):
        if s["cured"]:
            continue
        rs = by[(c, t)]
        worst = max(rs, key=lambda r: (r["absorption"] or 0.0, -r["recovery"]))
        pair = max(worst["pairs"], key=lambda p: p["miss"] * math.log1p(p["n"]), default=None)
        names = _feature_names(worst)
        unlearned = [(names[f], cosv) for f, cosv in enumerate(worst["matched_cosine"])
                     if cosv is not None and cosv < UNLEARNED_COS]
        absorbing = [p for p in worst["pairs"] if p["miss"] > CURED_ABSORPTION]
        out[c].append({
            "tree": t, "absorption": s["absorption"], "recovery": s["recovery"], "seed": worst["seed"],
            "k": s["k"], "true_l0": s["true_l0"], "l0": s["l0"],
            "pair": pair, "n_absorbing_pairs": len(absorbing), "n_pairs": len(worst["pairs"]),
            "n_child_carries_parent": sum(p["child_latent_cos_parent"] >= ABSORBED_COS for p in absorbing),
            "unlearned": sorted(unlearned, key=lambda u: u[1]),
            "why": _why(s, worst, absorbing, unlearned),
        })
    return dict(out)


def _feature_names(record: dict) -> list[str]:
    """Feature names in ToyModel order, rebuilt from the family (records store the tree's name)."""
    from .study import family

    info = record["tree_info"]
    spec = family(24, 0).get(record["tree"])
    if spec is None or spec.fingerprint != record["tree_fingerprint"]:
        return [f"f{i}" for i in range(info["n_features"])]
    return [f.name for f in spec.build().features]


def _why(s: dict, worst: dict, absorbing: list[dict], unlearned: list) -> str:
    parts = []
    if s["absorption"] > CURED_ABSORPTION:
        carried = [p for p in absorbing if p["child_latent_cos_parent"] >= ABSORBED_COS]
        if carried:
            parts.append(f"absorption: in {len(carried)} of {len(absorbing)} pairs that miss, the child's latent "
                         f"carries the parent (decoder cos with parent >= {ABSORBED_COS})")
        elif absorbing:
            parts.append(f"parent latent silent without the child's latent carrying the parent "
                         f"({len(absorbing)} pairs; L0 {s['l0']:.2f} vs k {s['k']}, true L0 {s['true_l0']:.2f})")
    if s["recovery"] < CURED_RECOVERY:
        parts.append(f"{len(unlearned)} features without a latent above cos {UNLEARNED_COS}")
    return "; ".join(parts)


def failures_markdown(fails: dict[str, list[dict]], order: list[str]) -> str:
    lines = ["# Trees each configuration does not cure (generated)", "",
             f"A tree is cured when its seed means have absorption <= {CURED_ABSORPTION} and recovery >= "
             f"{CURED_RECOVERY}. For each tree that is not: the seed with the worst absorption, its worst "
             "(parent, child) pair (`miss`: share of the n evaluation samples with both firing where the "
             "parent's latent is silent), the decoder cosines of the parent's latent (P) and the child's "
             "latent (C) with the parent (p) and child (c) directions, the latent firing most often "
             "instead, and the features whose best-matched latent is below cosine "
             f"{UNLEARNED_COS}.", ""]
    for c in order:
        rows = fails.get(c, [])
        lines += [f"## {c}: {len(rows)} tree(s) not cured", ""]
        for f in rows:
            p = f["pair"]
            line = (f"- **{f['tree']}** absorption {f['absorption']:.3f}, recovery {f['recovery']:.3f} "
                    f"(k {f['k']:g}, true L0 {f['true_l0']:.2f}, SAE L0 {f['l0']:.2f}); seed {f['seed']}: "
                    f"{f['n_absorbing_pairs']}/{f['n_pairs']} pairs miss > {CURED_ABSORPTION}")
            if p and p["miss"] > 0:
                line += (f"; worst {p['parent']} -> {p['child']}: miss {p['miss']:.2f} of n={p['n']}, "
                         f"P.p {p['parent_latent_cos_parent']:.2f} P.c {p['parent_latent_cos_child']:.2f}, "
                         f"C.c {p['child_latent_cos_child']:.2f} C.p {p['child_latent_cos_parent']:.2f}")
                a = p.get("absorber")
                if a:
                    line += (f", instead latent {a['latent']} (matched to {a['matched_to']}) fires {a['fires']:.2f} "
                             f"(cos p {a['cos_parent']:.2f}, c {a['cos_child']:.2f})")
            if f["unlearned"]:
                shown = ", ".join(f"{n} {v:.2f}" for n, v in f["unlearned"][:6])
                more = len(f["unlearned"]) - 6
                line += f"; unlearned: {shown}" + (f" (+{more})" if more > 0 else "")
            line += f". Why: {f['why']}."
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def paired_markdown(records: list[dict], order: list[str]) -> str:
    """Each configuration against the one it changes (``configs.PAIRED_WITH``), on the trees
    both have: median per-tree change of absorption and recovery, and on how many trees the
    absorption is lower / higher by more than 0.02."""
    from .configs import PAIRED_WITH

    per_tree = tree_summaries(records)
    rows = []
    for c in order:
        base = PAIRED_WITH.get(c)
        if base is None:
            continue
        common = sorted(t for (cc, t) in per_tree if cc == c and (base, t) in per_tree)
        if not common:
            continue
        da = [per_tree[(c, t)]["absorption"] - per_tree[(base, t)]["absorption"] for t in common]
        dr = [per_tree[(c, t)]["recovery"] - per_tree[(base, t)]["recovery"] for t in common]
        rows.append([c, base, len(common), f"{np.median(da):+.3f}", f"{np.median(dr):+.3f}",
                     sum(d < -0.02 for d in da), sum(d > 0.02 for d in da),
                     sum(per_tree[(c, t)]["absorption"] <= CURED_ABSORPTION for t in common),
                     sum(per_tree[(base, t)]["absorption"] <= CURED_ABSORPTION for t in common)])
    header = ["configuration", "against", "trees", "median change in absorption", "median change in recovery",
              "trees abs lower", "trees abs higher", f"trees abs <= {CURED_ABSORPTION}", "... for the other"]
    return ("### Each option against the configuration it changes, paired by tree\n\n"
            "Seed means per tree; lower / higher: by more than 0.02.\n\n" + markdown_table(header, rows) + "\n")


def prefix_effect_by_exclusivity(records: list[dict], order: list[str], base: str = "btk_none") -> str:
    """Every configuration against plain BatchTopK (``base``) per tree, split by whether the
    trees' children are mutually exclusive: median change of absorption, trees lower / higher."""
    per_tree = tree_summaries(records)
    excl = {r["tree"]: _regimes(r)["exclusive children"] for r in records}
    values = ("all", "some", "none")
    rows = []
    for c in order:
        if c == base:
            continue
        cells = [c]
        for v in values:
            ts = [t for t in sorted(excl) if excl[t] == v and (c, t) in per_tree and (base, t) in per_tree]
            d = [per_tree[(c, t)]["absorption"] - per_tree[(base, t)]["absorption"] for t in ts]
            cells.append(f"{np.median(d):+.3f} ({sum(x < -0.02 for x in d)} lower, {sum(x > 0.02 for x in d)} higher "
                         f"of {len(d)})" if d else "–")
        rows.append(cells)
    header = ["configuration"] + [f"children exclusive: {v}" for v in values]
    return (f"### Absorption against {base}, by whether the children are mutually exclusive\n\n"
            f"Median per-tree change of absorption against `{base}` (seed means; lower / higher: by more than "
            "0.02), on trees whose parents all / some / none have mutually exclusive children.\n\n"
            + markdown_table(header, rows) + "\n")


def pairs_markdown(records: list[dict], order: list[str]) -> str:
    """Over every (parent, child) pair of every run: the share whose parent latent misses on
    > 0.05 of the co-firing samples, and for those and for the others the median decoder cosines
    of the parent's latent with the parent (P.p), of the child's latent with the parent (C.p) and
    with the child (C.c)."""
    rows = []
    for c in order:
        allp = [p for r in records if r["config"] == c for p in r["pairs"]]
        if not allp:
            continue
        bad = [p for p in allp if p["miss"] > CURED_ABSORPTION]
        ok = [p for p in allp if p["miss"] <= CURED_ABSORPTION]

        def med(ps: list[dict], key: str) -> str:
            return f"{np.median([p[key] for p in ps]):.2f}" if ps else "–"

        rows.append([c, len(allp), f"{len(bad) / len(allp):.0%}",
                     f"{np.mean([p['parent_latent_cos_parent'] < 0.5 for p in bad]):.0%}" if bad else "–",
                     f"{np.mean([p['child_latent_cos_parent'] >= 0.3 for p in bad]):.0%}" if bad else "–",
                     med(bad, "parent_latent_cos_parent"), med(bad, "child_latent_cos_parent"),
                     med(bad, "child_latent_cos_child"), med(ok, "parent_latent_cos_parent"),
                     med(ok, "child_latent_cos_parent"), med(ok, "child_latent_cos_child")])
    header = ["configuration", "pairs", f"miss > {CURED_ABSORPTION}", "... parent latent P.p < 0.5",
              "... child latent C.p >= 0.3", "... P.p", "... C.p", "... C.c", "other pairs: P.p", "C.p", "C.c"]
    return ("### Parent-child pairs: what the latents learned\n\n"
            "Every (parent, child) pair of every run; `miss`: share of the samples with both firing where the "
            "parent's matched latent is silent. P.p: decoder cosine of the parent's latent with the parent's "
            "direction; C.p, C.c: of the child's latent with the parent's and the child's direction (medians).\n\n"
            + markdown_table(header, rows) + "\n")


def latent_order_markdown(records: list[dict], order: list[str]) -> str:
    """Over every (parent, child) pair of every run, split by the latents' order (the parent's
    matched latent before or after the child's): how many pairs and the share absorbed (parent
    latent silent on > 0.05 of the co-firing samples); and of the absorbed pairs with a latent
    firing in the parent's place, the share where that latent comes before the parent's. A prefix
    loss rewards an early latent for carrying what later latents would add, so a child's latent
    ahead of its parent's is free to absorb it."""
    rows = []
    for c in order:
        allp = [p for r in records if r["config"] == c for p in r["pairs"]]
        if not allp:
            continue
        cells = [c]
        for first in (True, False):
            ps = [p for p in allp if (p["parent_latent"] < p["child_latent"]) == first]
            bad = sum(p["miss"] > CURED_ABSORPTION for p in ps)
            cells += [len(ps), f"{bad / len(ps):.2f}" if ps else "–"]
        ab = [p for p in allp if p["miss"] > CURED_ABSORPTION and p.get("absorber")]
        cells.append(f"{np.mean([p['absorber']['latent'] < p['parent_latent'] for p in ab]):.0%} of {len(ab)}" if ab else "–")
        rows.append(cells)
    header = ["configuration", "pairs, parent's latent first", "... absorbed", "pairs, child's latent first",
              "... absorbed", "absorbed pairs whose absorber precedes the parent's latent"]
    # the same split within each regime of the tree's children (exclusive or not)
    kinds = ("all", "some", "none")
    by_kind = []
    for c in order:
        runs = [r for r in records if r["config"] == c and r["pairs"]]
        if not runs:
            continue
        cells = [c]
        for first in (True, False):
            for kind in kinds:
                ps = [p for r in runs if _regimes(r)["exclusive children"] == kind for p in r["pairs"]
                      if (p["parent_latent"] < p["child_latent"]) == first]
                cells.append(f"{np.mean([p['miss'] > CURED_ABSORPTION for p in ps]):.2f} ({len(ps)})" if ps else "–")
        by_kind.append(cells)
    kind_header = ["configuration"] + [f"{o} first, exclusive children: {k}" for o in ("parent", "child") for k in kinds]
    return ("### Latent order and absorption\n\n"
            "Every (parent, child) pair of every run, split by whether the parent's Hungarian-matched latent has a "
            "lower index than the child's; absorbed: the parent's latent is silent on more than "
            f"{CURED_ABSORPTION} of the samples where both fire. The absorber is the latent that fires in the "
            "parent's place. Without prefixes the order carries no meaning.\n\n" + markdown_table(header, rows)
            + "\n\nShare absorbed (pairs) by order and by whether the tree's children are mutually exclusive for "
            "all, some or none of its parents:\n\n" + markdown_table(kind_header, by_kind) + "\n")


def _regimes(record: dict) -> dict[str, str]:
    info = record["tree_info"]
    excl = info["n_exclusive_parents"] / max(info["n_parents"], 1)
    return {"k regime": info["k_regime"], "directions": "superposed" if info["n_features"] > info["d"] else "orthogonal",
            "exclusive children": "all" if excl == 1 else "none" if excl == 0 else "some"}


def breakdown_markdown(records: list[dict], order: list[str]) -> str:
    """Share of trees cured and median absorption / recovery per configuration within each
    regime of the family (k vs true L0, superposition, exclusive children), and how the
    failures split by measured mechanism."""
    per_tree = tree_summaries(records)
    regimes = {r["tree"]: _regimes(r) for r in records}
    order = [c for c in order if any(cc == c for cc, _ in per_tree)]
    out = [paired_markdown(records, order), prefix_effect_by_exclusivity(records, order), pairs_markdown(records, order),
           latent_order_markdown(records, order)]
    for axis in ("k regime", "directions", "exclusive children"):
        values = sorted({g[axis] for g in regimes.values()})
        header = ["configuration"] + [f"{v} (n)" for v in values]
        rows = []
        for c in order:
            cells = [c]
            for v in values:
                ts = [s for (cc, t), s in per_tree.items() if cc == c and regimes[t][axis] == v]
                if not ts:
                    cells.append("–")
                    continue
                cells.append(f"{sum(s['cured'] for s in ts)}/{len(ts)} cured, abs {np.median([s['absorption'] for s in ts]):.2f}, "
                             f"rec {np.median([s['recovery'] for s in ts]):.2f}")
            rows.append(cells)
        out += [f"### By {axis}", "", "Trees cured / trees, median absorption, median recovery (seed means).", "",
                markdown_table(header, rows), ""]
    fails = failures(records)
    header = ["configuration", "trees not cured", "absorption > 0.05", "... child latent carries the parent",
              "... parent latent silent, child latent clean", "recovery < 0.95", "median features unlearned (cos < 0.9)",
              "median dead latents (failing trees)"]
    rows = []
    for c in order:
        fs = fails.get(c, [])
        ab = [f for f in fs if f["absorption"] > CURED_ABSORPTION]
        carried = [f for f in ab if f["n_child_carries_parent"] > 0]
        dead = [per_tree[(c, f["tree"])]["dead_latents"] for f in fs]
        rows.append([c, len(fs), len(ab), len(carried), len(ab) - len(carried),
                     sum(f["recovery"] < CURED_RECOVERY for f in fs),
                     f"{np.median([len(f['unlearned']) for f in fs]):.0f}" if fs else "–",
                     f"{np.median(dead):.1f}" if dead else "–"])
    out += ["### Failures by mechanism", "",
            "Per configuration, trees not cured, split by what the worst seed's latents did: a failing pair "
            f"(parent latent silent on > {CURED_ABSORPTION} of the samples with parent and child) where the child's "
            f"latent has decoder cosine >= {ABSORBED_COS} with the parent's direction (absorption proper), or "
            "where it does not (the parent latent is silent without the child carrying it); and trees whose "
            f"recovery misses {CURED_RECOVERY}, with the number of true features whose matched latent is below "
            f"cosine {UNLEARNED_COS}.", "", markdown_table(header, rows), "", learned_by_frequency(records, order),
            cosine_by_role(records, order)]
    return "\n".join(out)


# expected firings of a feature during training: bin edges
FIRING_BINS = (0, 300, 1000, 3000, 10_000, 30_000, math.inf)


def _marginal_probs(tree: str, tree_fingerprint: str) -> list[float] | None:
    from matryoshka_plugin.toy.hierarchies import _marginals

    from .study import family

    spec = family(24, 0).get(tree)
    if spec is None or spec.fingerprint != tree_fingerprint:
        return None
    return [p for _, p, _ in _marginals(spec.roots)]


def learned_by_frequency(records: list[dict], order: list[str], batch_size: int = 200) -> str:
    """Share of true features whose matched latent reaches cosine 0.9, binned by how often the
    feature fired during training (marginal probability x steps x batch), over every run."""
    probs = {}
    counts: dict[str, list[list[int]]] = {}
    for r in records:
        key = (r["tree"], r["tree_fingerprint"])
        if key not in probs:
            probs[key] = _marginal_probs(*key)
        if probs[key] is None:
            continue
        n_train = r["trainer"]["steps"] * batch_size
        bins = counts.setdefault(r["config"], [[0, 0] for _ in FIRING_BINS[:-1]])
        for p, c in zip(probs[key], r["matched_cosine"]):
            i = int(np.searchsorted(FIRING_BINS, p * n_train, side="right")) - 1
            bins[i][0] += c is not None and c >= UNLEARNED_COS
            bins[i][1] += 1
    labels = [f"{lo:g}-{hi:g}" if hi != math.inf else f">= {lo:g}" for lo, hi in zip(FIRING_BINS[:-1], FIRING_BINS[1:])]
    rows = [[c] + [f"{a / n:.0%} ({n})" if n else "–" for a, n in counts[c]] for c in order if c in counts]
    return ("### Features learned, by how often they fired in training\n\n"
            f"Share of true features (all trees and seeds; count in brackets) whose matched latent has decoder "
            f"cosine >= {UNLEARNED_COS}, binned by the feature's expected firings during training (its marginal "
            "probability x steps x batch).\n\n" + markdown_table(["configuration"] + labels, rows) + "\n")


def _roles(tree: str, tree_fingerprint: str) -> list[str] | None:
    """Each feature's role in ToyModel order: "parent" (has children), "child" (a leaf below a
    parent) or "singleton" (a root without children)."""
    from matryoshka_plugin.toy.hierarchies import _marginals

    from .study import family

    spec = family(24, 0).get(tree)
    if spec is None or spec.fingerprint != tree_fingerprint:
        return None
    return ["parent" if f.children else "child" if depth > 0 else "singleton" for f, _, depth in _marginals(spec.roots)]


def cosine_by_role(records: list[dict], order: list[str]) -> str:
    """Median matched decoder cosine and the share of features at >= 0.9, for parents, children
    and singletons, over every run: which features hold recovery down."""
    roles_of: dict[tuple, list[str] | None] = {}
    vals: dict[str, dict[str, list[float]]] = {}
    for r in records:
        key = (r["tree"], r["tree_fingerprint"])
        if key not in roles_of:
            roles_of[key] = _roles(*key)
        if roles_of[key] is None:
            continue
        per = vals.setdefault(r["config"], {"parent": [], "child": [], "singleton": []})
        for role, c in zip(roles_of[key], r["matched_cosine"]):
            per[role].append(0.0 if c is None else c)
    header = ["configuration"] + [f"{role}: median cos, share >= {UNLEARNED_COS}" for role in ("parent", "child", "singleton")]
    rows = [[c] + [f"{np.median(v):.2f}, {np.mean(np.array(v) >= UNLEARNED_COS):.0%} ({len(v)})" if v else "–"
                   for v in (vals[c][role] for role in ("parent", "child", "singleton"))]
            for c in order if c in vals]
    return ("### Matched decoder cosine by the feature's role\n\nOver every run (feature count in brackets): "
            "parents (features with children), children (leaves below a parent), singletons.\n\n"
            + markdown_table(header, rows) + "\n")


def plot_distributions(records: list[dict], order: list[str], path: Path, dpi: int = 110) -> Path:
    """Absorption and recovery per tree (seed means) for each configuration: one dot per tree,
    the median as a bar, the cure thresholds as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_tree = tree_summaries(records)
    order = [c for c in order if any(cc == c for cc, _ in per_tree)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(order) + 1.6), sharey=True)
    rng = np.random.default_rng(0)
    for ax, metric, thr in ((axes[0], "absorption", CURED_ABSORPTION), (axes[1], "recovery", CURED_RECOVERY)):
        for i, c in enumerate(order):
            vals = np.array([s[metric] for (cc, _), s in per_tree.items() if cc == c])
            ok = np.array([s["cured"] for (cc, _), s in per_tree.items() if cc == c])
            y = i + rng.uniform(-0.22, 0.22, len(vals))
            ax.scatter(vals[ok], y[ok], s=9, color="tab:green", alpha=0.8, lw=0)
            ax.scatter(vals[~ok], y[~ok], s=9, color="tab:red", alpha=0.8, lw=0)
            ax.plot([np.median(vals)] * 2, [i - 0.35, i + 0.35], color="black", lw=1.5)
        ax.axvline(thr, ls="--", color="grey", lw=0.8)
        ax.set_xlabel(f"{metric} per tree (mean over seeds)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(order)), order, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_title("absorption (green: tree cured, black: median)", fontsize=9)
    axes[1].set_title(f"recovery (cured: absorption <= {CURED_ABSORPTION}, recovery >= {CURED_RECOVERY})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
