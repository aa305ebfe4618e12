"""The ground-truth metrics SAEs are judged by on a toy model (:mod:`.models`).

:func:`evaluate_sae` measures absorption, feature recovery (Hungarian-matched decoder
cosines), L0 and FVU; :func:`mixing_metrics` the parent/child mixing the feature-hedging
critique names; :func:`eval_sae_lens_synthetic` runs SAELens's own ground-truth evaluation on a
:class:`~.models.SyntheticHierarchyToy`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..registry import unit_decoder_rows
from .models import SyntheticHierarchyToy, ToyModel

__all__ = [
    "ToyMetrics",
    "evaluate_sae",
    "match_latents",
    "MixingMetrics",
    "mixing_metrics",
    "DecoderView",
    "eval_sae_lens_synthetic",
]


class ToyMetrics(NamedTuple):
    """Ground-truth metrics of one SAE on a toy model."""

    absorption: float
    """Mean over parents of the fraction of samples with the parent and one of its children
    active in which the parent's matched latent does not fire."""
    absorption_per_parent: list[float]
    """The same fraction for each parent (in ``parent_child_groups`` order)."""
    recovery: float
    """Mean decoder cosine between each true feature and its Hungarian-matched latent."""
    mean_max_cosine: float
    """Mean over true features of the largest decoder cosine with any latent."""
    l0: float
    """Mean number of active latents per sample."""
    fvu: float
    """Fraction of variance unexplained."""
    matching: list[int]
    """``matching[f]`` = latent matched to true feature ``f`` (-1 if none)."""
    decoder_cosine: np.ndarray
    """``[latents, features]`` cosine between decoder rows and true directions."""
    absorption_best: float = float("nan")
    """Like ``absorption`` but each parent is judged by the latent with the largest decoder
    cosine to it (not one-to-one). Differs from ``absorption`` when Hungarian matching hands
    a parent to another latent because some child has no latent of its own."""
    absorption_best_per_parent: list[float] = []
    """The same for each parent."""


def match_latents(cos: np.ndarray) -> list[int]:
    """Hungarian matching maximising total cosine; ``out[f]`` is feature f's latent (or -1)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-cos)
    out = [-1] * cos.shape[1]
    for r, c in zip(rows, cols):
        out[c] = int(r)
    return out


@torch.no_grad()
def evaluate_sae(
    sae: torch.nn.Module,
    toy: ToyModel | SyntheticHierarchyToy,
    n_samples: int = 20_000,
    seed: int = 1234,
    fire_threshold: float = 0.0,
) -> ToyMetrics:
    """Absorption, recovery, L0 and FVU of ``sae`` on fresh samples of ``toy``."""
    gen = torch.Generator().manual_seed(seed)
    feats, x = toy.sample(n_samples, gen)
    dev = next(sae.parameters()).device
    z = sae.encode(x.to(dev))
    f = z.float().cpu()
    x_hat = sae.decode(z).float().cpu()
    cos = (unit_decoder_rows(sae).cpu() @ toy.unit_directions.T).numpy()
    matching = match_latents(cos)
    fires = f > fire_threshold
    per_parent, per_parent_best = [], []
    for parent, children in toy.parent_child_groups():
        both = (feats[:, parent] > 0) & (feats[:, children] > 0).any(1)
        latent = matching[parent]
        if int(both.sum()) == 0:
            continue
        per_parent_best.append(float((~fires[both, int(cos[:, parent].argmax())]).float().mean()))
        if latent < 0:
            per_parent.append(1.0)
            continue
        per_parent.append(float((~fires[both, latent]).float().mean()))
    matched = [cos[m, i] for i, m in enumerate(matching) if m >= 0]
    var = (x - x.mean(0)).pow(2).sum()
    return ToyMetrics(
        absorption=float(np.mean(per_parent)) if per_parent else float("nan"),
        absorption_per_parent=per_parent,
        recovery=float(np.mean(matched)) if matched else 0.0,
        mean_max_cosine=float(cos.max(0).mean()),
        l0=float((f != 0).float().sum(1).mean()),
        fvu=float((x - x_hat).pow(2).sum() / var),
        matching=matching,
        decoder_cosine=cos,
        absorption_best=float(np.mean(per_parent_best)) if per_parent_best else float("nan"),
        absorption_best_per_parent=per_parent_best,
    )


# -- mixing (feature hedging) ------------------------------------------------------------------


class MixingMetrics(NamedTuple):
    """Decoder cosines between latents and *other* true features of the same family.

    Feature hedging (Chanin) shows as a parent latent with positive cosine to its children's
    features and child latents with negative cosine to their siblings' features.
    """

    parent_child: float
    """Mean |cos(parent's matched latent, child feature)| over all (parent, child) pairs."""
    parent_child_signed: float
    """The same mean without the absolute value (hedging makes it positive)."""
    sibling: float
    """Mean |cos(child's matched latent, sibling feature)| over ordered sibling pairs."""
    sibling_signed: float
    """The same mean without the absolute value (hedging makes it negative)."""
    child_parent_signed: float
    """Mean cos(child's matched latent, parent feature)."""
    per_parent: list[dict]
    """For each parent: ``{"parent", "latent", "child_cos": [...], "sibling_cos": [[...]]}``."""


def _nanmean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def mixing_metrics(metrics: ToyMetrics, toy: ToyModel | SyntheticHierarchyToy) -> MixingMetrics:
    """Parent/child and sibling mixing of one SAE, from its decoder cosines and matching.

    Pairs whose latent is unmatched (a narrow SAE has fewer latents than features) are
    skipped; a summary with no pairs is NaN.
    """
    cos, match = metrics.decoder_cosine, metrics.matching
    pc, sib, cp, per_parent = [], [], [], []
    for parent, children in toy.parent_child_groups():
        lat = match[parent]
        child_cos = [float(cos[lat, c]) for c in children] if lat >= 0 else []
        pc += child_cos
        sibling_cos = []
        for c in children:
            lc = match[c]
            if lc < 0:
                sibling_cos.append([])
                continue
            row = [float(cos[lc, s]) for s in children if s != c]
            sibling_cos.append(row)
            sib += row
            cp.append(float(cos[lc, parent]))
        per_parent.append({"parent": parent, "latent": lat, "child_cos": child_cos, "sibling_cos": sibling_cos})
    return MixingMetrics(
        parent_child=_nanmean([abs(v) for v in pc]),
        parent_child_signed=_nanmean(pc),
        sibling=_nanmean([abs(v) for v in sib]),
        sibling_signed=_nanmean(sib),
        child_parent_signed=_nanmean(cp),
        per_parent=per_parent,
    )


class DecoderView(torch.nn.Module):
    """Any SAE seen as ``encode``/``decode`` plus unit-norm ``W_dec [n, d]`` (what SAELens's
    synthetic-data evaluation reads)."""

    def __init__(self, sae: torch.nn.Module):
        super().__init__()
        self.sae = sae

    @property
    def W_dec(self) -> torch.Tensor:
        return unit_decoder_rows(self.sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(f)


@torch.no_grad()
def eval_sae_lens_synthetic(
    sae: torch.nn.Module, toy: SyntheticHierarchyToy, n_samples: int = 20_000, seed: int = 1234
) -> dict[str, float]:
    """``sae_lens.synthetic.eval_sae_on_synthetic_data`` (MCC, uniqueness, classification
    precision/recall/F1, explained variance, shrinkage, dead latents, L0), flattened."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    view = DecoderView(sae)
    was_training = sae.training
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        res = eval_sae_on_synthetic_data(
            view, toy.feature_dict, toy.activation_generator, num_samples=n_samples, batch_size=n_samples
        )
    sae.train(was_training)
    out = {}
    for k, v in res.to_dict().items():
        if isinstance(v, dict):
            out.update({f"{k}_{kk}": float(vv) for kk, vv in v.items()})
        else:
            out[k] = float(v)
    return out
