"""Toy models with known features, and the ground-truth metrics SAEs are judged by.

Features form a forest: a child can only fire when its parent fires (mutually exclusive
children pick at most one). Each feature has a fixed direction (orthonormal when there are
at most ``d`` features) and a fixed norm ``magnitude * (1 + N(0, magnitude_noise))``;
activations are binary. ``ToyModel.post_tree()`` is the original Matryoshka post's tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["Feature", "ToyModel", "ToyMetrics", "evaluate_sae", "decoder_directions", "match_latents"]


@dataclass
class Feature:
    """A node of the feature forest. ``prob`` is conditional on the parent firing."""

    prob: float
    children: list["Feature"] = field(default_factory=list)
    exclusive: bool = False
    magnitude: float = 1.0
    name: str = ""


class ToyModel:
    """Samples ``(features [B, F], x [B, d])`` from a feature forest."""

    def __init__(self, roots: list[Feature], d: int, magnitude_noise: float = 0.05, seed: int = 0):
        self.roots = roots
        self.features: list[Feature] = []
        self.parent: list[int] = []
        self._flatten(roots, -1)
        self.n_features = len(self.features)
        self.d = d
        for i, f in enumerate(self.features):
            if not (0.0 <= f.prob <= 1.0):
                raise ValueError(f"feature {i} ({f.name}) has probability {f.prob} outside [0, 1]")
            if f.exclusive and sum(c.prob for c in f.children) > 1.0 + 1e-9:
                raise ValueError(f"exclusive children of feature {i} ({f.name}) have probabilities summing above 1")
        gen = torch.Generator().manual_seed(seed)
        if self.n_features <= d:
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
            dirs = q[:, : self.n_features].T
        else:  # superposition: random unit directions
            dirs = torch.randn(self.n_features, d, generator=gen, dtype=torch.float64)
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
        mags = torch.tensor([f.magnitude for f in self.features], dtype=torch.float64)
        noise = 1.0 + magnitude_noise * torch.randn(self.n_features, generator=gen, dtype=torch.float64)
        self.unit_directions = dirs.float()
        self.directions = (dirs * (mags * noise)[:, None]).float()

    def _flatten(self, nodes: list[Feature], parent: int) -> None:
        for node in nodes:
            idx = len(self.features)
            if not node.name:
                node.name = f"f{idx}"
            self.features.append(node)
            self.parent.append(parent)
            self._flatten(node.children, idx)

    # -- the standard trees -------------------------------------------------------------------

    @classmethod
    def post_tree(
        cls,
        d: int = 20,
        n_parents: int = 3,
        parent_prob: float = 0.15,
        child_probs: tuple[float, ...] = (0.2, 0.2, 0.2),
        n_singletons: int = 8,
        singleton_prob: float = 0.05,
        magnitude_noise: float = 0.05,
        seed: int = 0,
    ) -> "ToyModel":
        """The original post's tree: parents with mutually exclusive children, plus singletons."""
        roots = []
        for p in range(n_parents):
            kids = [Feature(c, name=f"child{p}.{j}") for j, c in enumerate(child_probs)]
            roots.append(Feature(parent_prob, kids, exclusive=True, name=f"parent{p}"))
        roots += [Feature(singleton_prob, name=f"single{s}") for s in range(n_singletons)]
        return cls(roots, d, magnitude_noise, seed)

    # -- sampling -----------------------------------------------------------------------------

    def sample_features(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary feature activations ``[batch, F]`` (features are in preorder: parents first)."""
        acts = torch.zeros(batch, self.n_features)
        draws: dict[int, tuple[torch.Tensor, float]] = {}  # exclusive parent -> (uniform, offset)
        for i, (node, parent) in enumerate(zip(self.features, self.parent)):
            on = torch.ones(batch, dtype=torch.bool) if parent < 0 else acts[:, parent] > 0
            if parent >= 0 and self.features[parent].exclusive:
                if parent not in draws:
                    draws[parent] = (torch.rand(batch, generator=generator), 0.0)
                u, lo = draws[parent]
                on = on & (u >= lo) & (u < lo + node.prob)
                draws[parent] = (u, lo + node.prob)
            else:
                on = on & (torch.rand(batch, generator=generator) < node.prob)
            acts[:, i] = on.float()
        return acts

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [B, F], x [B, d])`` with ``x = features @ directions``."""
        acts = self.sample_features(batch, generator)
        return acts, acts @ self.directions

    def batches(self, batch: int, seed: int = 0, device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
        """An endless iterator of activation batches (what ``trainSAE`` consumes)."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch, gen)[1].to(device)

    def parent_child_groups(self) -> list[tuple[int, list[int]]]:
        """``(parent, [children])`` for every feature with children."""
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(self.parent):
            if p >= 0:
                groups.setdefault(p, []).append(i)
        return sorted(groups.items())

    def expected_l0(self, n: int = 200_000, seed: int = 0) -> float:
        return float(self.sample_features(n, torch.Generator().manual_seed(seed)).sum(1).mean())


# -- metrics -----------------------------------------------------------------------------------


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


def decoder_directions(sae: torch.nn.Module) -> torch.Tensor:
    """Unit-norm decoder rows ``[n_latents, d]`` of any SAE with ``W_dec [n, d]``."""
    W = sae.W_dec.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def match_latents(cos: np.ndarray) -> list[int]:
    """Hungarian matching maximising total cosine; ``out[f]`` is feature f's latent (or -1)."""
    rows, cols = linear_sum_assignment(-cos)
    out = [-1] * cos.shape[1]
    for r, c in zip(rows, cols):
        out[c] = int(r)
    return out


@torch.no_grad()
def evaluate_sae(
    sae: torch.nn.Module,
    toy: ToyModel,
    n_samples: int = 20_000,
    seed: int = 1234,
    fire_threshold: float = 0.0,
) -> ToyMetrics:
    """Absorption, recovery, L0 and FVU of ``sae`` on fresh samples of ``toy``."""
    gen = torch.Generator().manual_seed(seed)
    feats, x = toy.sample(n_samples, gen)
    dev = next(sae.parameters()).device
    f = sae.encode(x.to(dev)).float().cpu()
    x_hat = sae.decode(sae.encode(x.to(dev))).float().cpu()
    cos = (decoder_directions(sae).cpu() @ toy.unit_directions.T).numpy()
    matching = match_latents(cos)
    fires = f > fire_threshold
    per_parent = []
    for parent, children in toy.parent_child_groups():
        both = (feats[:, parent] > 0) & (feats[:, children] > 0).any(1)
        latent = matching[parent]
        if int(both.sum()) == 0:
            continue
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
    )
