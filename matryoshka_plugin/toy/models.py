"""Toy models with known features: feature forests and the activations they generate.

Features form a forest: a child can only fire when its parent fires (mutually exclusive
children pick at most one). Each feature has a fixed direction (orthonormal when there are
at most ``d`` features) and a fixed norm ``magnitude * (1 + N(0, magnitude_noise))``;
activations are binary. ``ToyModel.post_tree()`` is the original Matryoshka post's tree,
``ToyModel.hedging_tree()`` the feature-hedging critique's parent with two children and
``ToyModel.magnitude_tree()`` the large-magnitude-child counter-example from the post's
comments. :class:`SyntheticHierarchyToy` builds a larger hierarchy in superposition with
``sae_lens.synthetic`` and exposes the same interface, so the metrics (:mod:`.metrics`) and
the plots (:mod:`.plots`) work on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

__all__ = ["Feature", "ToyModel", "SyntheticHierarchyToy"]


@dataclass
class Feature:
    """A node of the feature forest. ``prob`` is conditional on the parent firing."""

    prob: float
    children: list["Feature"] = field(default_factory=list)
    exclusive: bool = False
    magnitude: float = 1.0
    name: str = ""


class _ForestSampler:
    """What every toy model shares, given ``sample``, ``sample_features`` and ``parent``."""

    parent: list[int]

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample_features(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

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
        """Mean number of active features per sample (Monte Carlo, fixed seed)."""
        feats = self.sample_features(n, torch.Generator().manual_seed(seed))
        return float((feats > 0).float().sum(1).mean())


class ToyModel(_ForestSampler):
    """Samples ``(features [B, F], x [B, d])`` from a feature forest."""

    def __init__(
        self,
        roots: list[Feature],
        d: int,
        magnitude_noise: float = 0.05,
        seed: int = 0,
        directions: torch.Tensor | None = None,
        firing_noise: float = 0.0,
    ):
        """``directions`` (``[F, d]``, normalised here) replaces the drawn ones, e.g. a mildly
        superposed set with bounded overlaps; ``firing_noise`` scales each firing by
        ``1 + N(0, firing_noise)`` per sample (clamped positive), so ``sample`` then returns
        the firing magnitudes instead of 0/1 features. Both off by default (the draws of the
        standard trees are unchanged)."""
        if firing_noise < 0:
            raise ValueError(f"firing_noise must be >= 0, got {firing_noise}")
        self.firing_noise = float(firing_noise)
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
        if directions is not None:
            if tuple(directions.shape) != (self.n_features, d):
                raise ValueError(f"directions have shape {tuple(directions.shape)}, expected {(self.n_features, d)}")
            dirs = directions.to(torch.float64)
            dirs = dirs / dirs.norm(dim=1, keepdim=True)
        elif self.n_features <= d:
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

    @classmethod
    def hedging_tree(
        cls,
        d: int = 20,
        parent_prob: float = 0.3,
        child_probs: tuple[float, ...] = (0.4, 0.4),
        exclusive: bool = True,
        magnitude: float = 1.0,
        magnitude_noise: float = 0.0,
        n_copies: int = 1,
        seed: int = 0,
    ) -> "ToyModel":
        """The feature-hedging critique's set-up: one parent and its children, all orthogonal.

        Defaults: parent p = 0.3, two mutually exclusive children with conditional
        probabilities 0.4 each (0.2: no child), magnitude 1, no magnitude noise, d = 20
        (true features: 3; expected L0 0.54). ``n_copies`` independent copies of the tree
        multiply the expected L0 (useful for BatchTopK, whose ``k`` is an integer >= 1).
        """
        roots = []
        for i in range(n_copies):
            tag = "" if n_copies == 1 else str(i)
            kids = [Feature(c, magnitude=magnitude, name=f"child{tag}{'.' if tag else ''}{j}")
                    for j, c in enumerate(child_probs)]
            roots.append(Feature(parent_prob, kids, exclusive=exclusive and len(kids) > 1, magnitude=magnitude,
                                 name=f"parent{tag}"))
        return cls(roots, d, magnitude_noise, seed)

    @classmethod
    def magnitude_tree(
        cls,
        d: int = 20,
        parent_prob: float = 0.3,
        parent_magnitude: float = 2.0,
        child_prob: float = 0.15,
        child_magnitude: float = 10.0,
        n_children: int = 1,
        magnitude_noise: float = 0.0,
        seed: int = 0,
    ) -> "ToyModel":
        """The counter-example from the post's comments: a child much louder than its parent.

        ``parent_prob`` and ``child_prob`` are *marginal* firing probabilities (parent 0.3
        with magnitude 2, child 0.15 with magnitude 10, so the child fires in half of the
        parent's samples). With several children they are mutually exclusive, each with
        marginal probability ``child_prob``.
        """
        if not 0 < parent_prob <= 1 or not 0 <= n_children * child_prob <= parent_prob:
            raise ValueError(
                f"need 0 < n_children * child_prob ({n_children} * {child_prob}) <= parent_prob ({parent_prob})"
            )
        cond = child_prob / parent_prob
        kids = [Feature(cond, magnitude=child_magnitude, name=f"child{j}") for j in range(n_children)]
        root = Feature(parent_prob, kids, exclusive=n_children > 1, magnitude=parent_magnitude, name="parent")
        return cls([root], d, magnitude_noise, seed)

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
        """``(features [B, F], x [B, d])`` with ``x = features @ directions`` (features are 0/1,
        or the firing magnitudes with ``firing_noise``)."""
        acts = self.sample_features(batch, generator)
        if self.firing_noise > 0:
            scale = 1.0 + self.firing_noise * torch.randn(acts.shape, generator=generator)
            acts = acts * scale.clamp_min(0.05)  # a firing feature stays on
        return acts, acts @ self.directions


# -- a larger hierarchy in superposition, built with sae_lens.synthetic --------------------------


class SyntheticHierarchyToy(_ForestSampler):
    """A feature forest in superposition generated with ``sae_lens.synthetic``.

    ``generate_hierarchy`` builds ``n_roots`` trees (``branching`` children per node, down to
    ``max_depth``; a share ``mutually_exclusive_portion`` of parents get mutually exclusive
    children), ``n_singletons`` independent features follow, ``ActivationGenerator`` samples
    them (roots with ``root_prob``, deeper features with ``child_prob`` given their parent,
    singletons with ``singleton_prob``; magnitudes ``1 + N(0, magnitude_std)``), and a
    ``FeatureDictionary`` (random unit vectors, orthogonalised as far as ``d`` allows) maps
    them to ``d`` dimensions. Same interface as :class:`ToyModel` (``sample``, ``batches``,
    ``parent_child_groups``, ``unit_directions``, ``features``, ``expected_l0``).
    """

    def __init__(
        self,
        d: int = 24,
        n_roots: int = 4,
        branching: int | tuple[int, int] = (2, 3),
        max_depth: int = 2,
        n_singletons: int = 8,
        root_prob: float = 0.15,
        child_prob: float = 0.3,
        singleton_prob: float = 0.05,
        mutually_exclusive_portion: float = 0.5,
        magnitude_std: float = 0.05,
        seed: int = 0,
    ):
        from sae_lens.synthetic import (
            ActivationGenerator,
            FeatureDictionary,
            HierarchyConfig,
            generate_hierarchy,
            orthogonal_initializer,
        )

        cfg = HierarchyConfig(
            total_root_nodes=n_roots,
            branching_factor=branching,
            max_depth=max_depth,
            mutually_exclusive_portion=mutually_exclusive_portion,
        )
        # Feature indices are handed out breadth-first until the budget runs out; a budget
        # this large never runs out, so the tree does not depend on it.
        self.hierarchy = generate_hierarchy(10**9, cfg, seed=seed)
        n_tree = len(self.hierarchy.feature_indices_used)
        self.n_features = n_tree + n_singletons
        self.d = d
        self.parent = [-1] * self.n_features
        self.depth = [0] * self.n_features
        probs = torch.full((self.n_features,), float(singleton_prob))
        names = [f"single{i - n_tree}" for i in range(self.n_features)]
        nodes: dict[int, Feature] = {}

        def visit(node, parent: int, depth: int, name: str) -> Feature:
            i = node.feature_index
            self.parent[i], self.depth[i] = parent, depth
            probs[i] = root_prob if depth == 0 else child_prob
            names[i] = name
            kids = [visit(c, i, depth + 1, f"{name}.{j}") for j, c in enumerate(node.children)]
            nodes[i] = Feature(float(probs[i]), kids, bool(node.mutually_exclusive_children), 1.0, name)
            return nodes[i]

        for r, root in enumerate(self.hierarchy.roots):
            visit(root, -1, 0, f"r{r}")
        self.features = [nodes.get(i) or Feature(float(probs[i]), name=names[i]) for i in range(self.n_features)]
        self.roots = [nodes[root.feature_index] for root in self.hierarchy.roots]
        self.activation_generator = ActivationGenerator(
            self.n_features,
            probs,
            std_firing_magnitudes=float(magnitude_std),
            mean_firing_magnitudes=1.0,
            modify_activations=self.hierarchy.modifier,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.feature_dict = FeatureDictionary(
                self.n_features, d, initializer=orthogonal_initializer(), seed=seed
            )
        self.feature_dict.requires_grad_(False)
        self.unit_directions = self.feature_dict.feature_vectors.detach().float().clone()
        self.directions = self.unit_directions  # magnitudes live in the activations

    @torch.no_grad()
    def sample_features(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Feature activations ``[batch, F]`` (sae_lens draws from the global RNG; a seed
        taken from ``generator`` makes it reproducible without touching the global state)."""
        if generator is None:
            return self.activation_generator.sample(batch)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.activation_generator.sample(batch)

    @torch.no_grad()
    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.sample_features(batch, generator)
        return feats, self.feature_dict(feats).float()

    def level_sizes(self) -> list[int]:
        """Number of tree features at each depth, then the singletons as a last level."""
        tree = [dep for i, dep in enumerate(self.depth) if self.parent[i] >= 0 or self.features[i].children]
        sizes = [tree.count(k) for k in range(max(tree) + 1)] if tree else []
        singles = self.n_features - sum(sizes)
        return sizes + ([singles] if singles else [])

    def superposition(self) -> float:
        """Largest |cosine| between two distinct feature directions."""
        g = (self.unit_directions @ self.unit_directions.T).abs()
        g.fill_diagonal_(0)
        return float(g.max())
