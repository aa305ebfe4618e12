"""Figures for toy models: activations with absorption holes, decoder-cosine heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .toy import ToyMetrics, ToyModel  # noqa: E402

__all__ = ["plot_activations", "plot_decoder_cosine"]


def _ordered_latents(metrics: ToyMetrics, n_latents: int) -> list[int]:
    """Matched latents in feature order, then the unmatched ones."""
    matched = [m for m in metrics.matching if m >= 0]
    return matched + [i for i in range(n_latents) if i not in set(matched)]


@torch.no_grad()
def plot_activations(
    toy: ToyModel,
    saes: Mapping[str, torch.nn.Module],
    metrics: Mapping[str, ToyMetrics],
    path: str | Path,
    n_rows: int = 80,
    seed: int = 7,
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
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 6), squeeze=False)
    for ax, (title, data, labels) in zip(axes[0], panels):
        vmax = max(float(np.percentile(data[data > 0], 99)) if (data > 0).any() else 1.0, 1e-6)
        ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(title)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_ylabel("sample")
    axes[0][0].set_xlabel("true feature")
    for ax in axes[0][1:]:
        ax.set_xlabel("latent (matched to the feature above)")
    fig.suptitle("Feature vs latent activations: holes in a parent's column are absorption")
    fig.tight_layout()
    return _save(fig, path)


def plot_decoder_cosine(
    toy: ToyModel, metrics: Mapping[str, ToyMetrics], path: str | Path
) -> Path:
    """Heatmaps of decoder-row cosine with the true directions (latents in matched order)."""
    names = list(metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.8), squeeze=False)
    labels = [f.name for f in toy.features]
    for ax, name in zip(axes[0], names):
        m = metrics[name]
        rows = _ordered_latents(m, m.decoder_cosine.shape[0])
        im = ax.imshow(m.decoder_cosine[rows], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\nabsorption {m.absorption:.2f}, recovery {m.recovery:.3f}")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([str(r) for r in rows], fontsize=6)
        ax.set_xlabel("true feature")
        ax.set_ylabel("latent")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
