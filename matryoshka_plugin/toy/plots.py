"""Figures for toy models: activations with absorption holes, decoder-cosine heatmaps,
metric trade-offs and per-seed spreads.

Figures are built as ``matplotlib.figure.Figure`` objects and written to files, never shown,
so no pyplot backend is chosen or needed (this works headless and leaves the caller's
matplotlib state alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure

from .metrics import ToyMetrics
from .models import SyntheticHierarchyToy, ToyModel

__all__ = ["plot_activations", "plot_decoder_cosine", "plot_tradeoff", "plot_seed_metrics"]


def _ordered_latents(metrics: ToyMetrics, n_latents: int) -> list[int]:
    """Matched latents in feature order, then the unmatched ones."""
    matched = [m for m in metrics.matching if m >= 0]
    return matched + [i for i in range(n_latents) if i not in set(matched)]


@torch.no_grad()
def plot_activations(
    toy: ToyModel | SyntheticHierarchyToy,
    saes: Mapping[str, torch.nn.Module],
    metrics: Mapping[str, ToyMetrics],
    path: str | Path,
    n_rows: int = 80,
    seed: int = 7,
    dpi: int = 120,
    title: str | None = None,
) -> Path:
    """Ground-truth features vs each SAE's latents on one batch (all-zero rows dropped).

    Latent columns follow the Hungarian matching, so a latent sits under its feature and an
    absorbed parent shows as a hole where its children fire.
    """
    gen = torch.Generator().manual_seed(seed)
    feats, x = toy.sample(n_rows * 4, gen)
    keep = feats.sum(1) > 0
    feats, x = feats[keep][:n_rows], x[keep][:n_rows]
    order = torch.argsort(feats.argmax(1), stable=True)
    feats, x = feats[order], x[order]
    panels = [("ground truth", feats.numpy(), [f.name for f in toy.features])]
    for name, sae in saes.items():
        dev = next(sae.parameters()).device
        f = sae.encode(x.to(dev)).float().cpu()
        cols = _ordered_latents(metrics[name], f.shape[1])
        panels.append((name, f[:, cols].numpy(), [str(c) for c in cols]))
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels), 6), squeeze=False)
    for ax, (panel_title, data, labels) in zip(axes[0], panels):
        vmax = max(float(np.percentile(data[data > 0], 99)) if (data > 0).any() else 1.0, 1e-6)
        ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(panel_title)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_ylabel("sample")
    axes[0][0].set_xlabel("true feature")
    for ax in axes[0][1:]:
        ax.set_xlabel("latent (matched to the feature above)")
    fig.suptitle(title or "Feature vs latent activations: holes in a parent's column are absorption")
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_decoder_cosine(
    toy: ToyModel | SyntheticHierarchyToy,
    metrics: Mapping[str, ToyMetrics],
    path: str | Path,
    dpi: int = 120,
    annotate: bool | None = None,
) -> Path:
    """Heatmaps of decoder-row cosine with the true directions (latents in matched order).

    ``annotate`` writes the values in the cells (default: when there are at most 6 features).
    """
    names = list(metrics)
    n_feat = len(toy.features)
    if annotate is None:
        annotate = n_feat <= 6
    scale = 1.0 if n_feat > 6 else 0.6
    fig, axes = _subplots(1, len(names), figsize=(5.2 * len(names) * scale, 4.8 * scale + 0.9), squeeze=False)
    labels = [f.name for f in toy.features]
    for ax, name in zip(axes[0], names):
        m = metrics[name]
        rows = _ordered_latents(m, m.decoder_cosine.shape[0])
        im = ax.imshow(m.decoder_cosine[rows], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        if scale < 1:
            ax.set_title(f"{name}\nabsorption {m.absorption:.2f}\nrecovery {m.recovery:.3f}", fontsize=9)
        else:
            ax.set_title(f"{name}\nabsorption {m.absorption:.2f}, recovery {m.recovery:.3f}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([str(r) for r in rows], fontsize=6)
        ax.set_xlabel("true feature")
        ax.set_ylabel("latent")
        if annotate:
            block = m.decoder_cosine[rows]
            for r in range(block.shape[0]):
                for c in range(block.shape[1]):
                    ax.text(c, r, f"{block[r, c]:+.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(block[r, c]) > 0.6 else "black")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    return _save(fig, path, dpi)


def plot_tradeoff(
    points: list[dict],
    path: str | Path,
    x: str = "absorption",
    y: str = "mixing",
    title: str = "",
    dpi: int = 120,
) -> Path:
    """Mean ± std of two metrics per configuration; points sharing a ``"series"`` are joined
    in list order (e.g. a balance-beta sweep).

    Each point: ``{"label", "series" (or None), "x", "x_std", "y", "y_std"}``.
    """
    fig, ax = _subplots(figsize=(6.4, 4.6))
    series: dict[str, list[dict]] = {}
    for pt in points:
        if pt.get("series"):
            series.setdefault(pt["series"], []).append(pt)
    colors = {}
    for i, (name, pts) in enumerate(series.items()):
        (line,) = ax.plot([p["x"] for p in pts], [p["y"] for p in pts], "-", alpha=0.6, label=name,
                          color=f"C{i}")
        colors[name] = line.get_color()
    for pt in points:
        color = colors.get(pt.get("series"), "black")
        ax.errorbar(pt["x"], pt["y"], xerr=pt.get("x_std", 0.0), yerr=pt.get("y_std", 0.0), fmt="o", ms=4,
                    capsize=2, color=color, ecolor=color, elinewidth=0.8, alpha=0.85)
        ax.annotate(pt["label"], (pt["x"], pt["y"]), textcoords="offset points", xytext=(4, 3), fontsize=7,
                    color=color)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if title:
        ax.set_title(title, fontsize=10)
    if series:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_seed_metrics(
    values: Mapping[str, Mapping[str, list[float]]],
    path: str | Path,
    title: str = "",
    dpi: int = 120,
) -> Path:
    """One panel per metric: every seed's value (dots) and the mean (bar) per variant.

    ``values[metric][variant]`` is the list of per-seed values.
    """
    metrics = list(values)
    variants = list(next(iter(values.values()))) if metrics else []
    fig, axes = _subplots(len(metrics), 1, figsize=(max(6.0, 0.55 * len(variants) + 2), 2.1 * len(metrics)),
                             squeeze=False, sharex=True)
    for ax, metric in zip(axes[:, 0], metrics):
        for i, v in enumerate(variants):
            vals = [u for u in values[metric].get(v, []) if u is not None and np.isfinite(u)]
            if vals:
                ax.bar(i, float(np.mean(vals)), color="#9ecae1", width=0.7)
                ax.plot([i] * len(vals), vals, "o", color="#08519c", ms=3)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(range(len(variants)))
    axes[-1, 0].set_xticklabels(variants, rotation=60, ha="right", fontsize=7)
    if title:
        axes[0, 0].set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def _subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None, **kwargs):
    """``pyplot.subplots`` without pyplot: a new ``Figure`` and its axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
