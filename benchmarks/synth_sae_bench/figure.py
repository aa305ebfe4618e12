"""F1 of every SAE in results.csv as a figure: one panel per protocol and L0, bars ranked by mean F1
over seeds, each seed a dot, this package's SAEs and SAELens' in two colours."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["plot_f1"]

COLOURS = {"matryoshka_plugin": "#1f77b4", "saelens": "#ff7f0e"}


def plot_f1(csv_path: Path, png_path: Path, protocols: list[str] | None = None) -> Any:
    """Write the figure to ``png_path`` and return it (``protocols``: the ``protocol`` values to show,
    in that order; default all of them, in the order of the CSV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .run import read_rows

    rows = read_rows(Path(csv_path))
    panels: dict[tuple[str, int], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        panels[(r["protocol"], int(r["l0"]))][r["sae"]].append(r)
    keys = [k for k in panels if protocols is None or k[0] in protocols]
    if protocols is not None:
        keys.sort(key=lambda k: (protocols.index(k[0]), -k[1]))
    if not keys:
        raise ValueError(f"{csv_path} holds no rows of the protocols {protocols}")
    height = max(len(panels[k]) for k in keys) * 0.28 + 1.2
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), height), squeeze=False)
    for ax, key in zip(axes[0], keys):
        saes = sorted(panels[key].items(), key=lambda kv: statistics.mean(float(r["f1"]) for r in kv[1]))
        for y, (name, rs) in enumerate(saes):
            f1s = [float(r["f1"]) for r in rs]
            colour = COLOURS.get(rs[0]["source"], "grey")
            ax.barh(y, statistics.mean(f1s), color=colour, alpha=0.55, label=rs[0]["source"])
            ax.plot(f1s, [y] * len(f1s), "o", color=colour, markersize=3)
        ax.set_yticks(range(len(saes)), [name for name, _ in saes], fontsize=7)
        ax.set_xlabel("F1 (bar: mean over seeds; dots: seeds)")
        ax.set_title(f"{key[0]}, L0 = {key[1]}", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    from matryoshka_plugin.io import atomic_open

    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    return fig
