"""Random feature hierarchies: a seeded generator and a fixed family of trees drawn from it.

:class:`HierarchyParams` says what kind of forest to draw (number of trees, depth,
branching, parent firing probabilities, mutually exclusive children or not, child-given-parent
probabilities, magnitudes and their per-sample noise, singletons, features per dimension —
orthogonal at most 1, mildly superposed above with a bound on the overlaps — and the SAE's
``k`` relative to the true L0). :func:`random_hierarchy` realises one forest from it and a
seed as a :class:`HierarchySpec`, whose :meth:`~HierarchySpec.build` gives an ordinary
:class:`~.models.ToyModel` (the same sampler as the hand-made trees). The spec's
``fingerprint`` is a short hash of the parameters, the seed and the realised forest and
directions, so a result names its tree and a code change that changes the tree changes it.
:func:`hierarchy_family` is the fixed family of trees the trainers are scored on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, field

import torch

from .models import Feature, ToyModel

__all__ = [
    "HierarchyParams",
    "HierarchySpec",
    "random_hierarchy",
    "hierarchy_family",
    "family_table",
    "spread_directions",
    "k_regime",
]

# k / true L0 bands that name a tree's sparsity regime
_BELOW, _ABOVE = 0.8, 1.25


def k_regime(k: int, true_l0: float) -> str:
    """``"below"`` (k/L0 < 0.8), ``"around"`` or ``"above"`` (k/L0 > 1.25)."""
    ratio = k / true_l0
    return "below" if ratio < _BELOW else "above" if ratio > _ABOVE else "around"


def _check_range(name: str, rng: tuple[float, float], lo: float, hi: float) -> None:
    if len(rng) != 2 or not (lo <= rng[0] <= rng[1] <= hi):
        raise ValueError(f"{name} must be a range (low, high) with {lo} <= low <= high <= {hi}, got {rng}")


@dataclass(frozen=True)
class HierarchyParams:
    """What kind of feature forest to draw. Ranges are ``(low, high)``, drawn per feature.

    * ``n_trees`` roots, each with ``depth`` levels below it; every non-leaf node gets a number
      of children drawn from ``branching``.
    * Roots fire with a probability drawn log-uniformly from ``parent_prob``; each child
      fires given its parent with a probability drawn from ``child_prob``.
    * A share ``exclusive_share`` of the parents (with at least two children) have mutually
      exclusive children; their children's probabilities are scaled down to sum to at most
      ``max_exclusive_total`` when they would exceed it.
    * Each feature's magnitude is drawn from ``magnitude``; every firing is scaled by
      ``1 + N(0, firing_noise)``.
    * ``n_singletons`` independent features fire with probabilities drawn from ``singleton_prob``.
    * ``d = ceil(n_features / features_per_dim)``: at most 1 gives orthonormal directions,
      above 1 random directions spread until no two overlap by more than ``max_cos``.
    * The SAE's ``k = max(1, round(k_ratio * true L0))``.
    """

    n_trees: int = 3
    depth: int = 1
    branching: tuple[int, int] = (2, 3)
    parent_prob: tuple[float, float] = (0.05, 0.25)
    child_prob: tuple[float, float] = (0.15, 0.5)
    exclusive_share: float = 1.0
    max_exclusive_total: float = 0.95
    magnitude: tuple[float, float] = (1.0, 1.0)
    firing_noise: float = 0.05
    n_singletons: int = 4
    singleton_prob: tuple[float, float] = (0.02, 0.1)
    features_per_dim: float = 1.0
    max_cos: float = 0.3
    k_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.n_trees < 0 or self.n_singletons < 0 or self.n_trees + self.n_singletons == 0:
            raise ValueError(
                f"need n_trees >= 0, n_singletons >= 0 and some features, got {self.n_trees}, {self.n_singletons}"
            )
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}")
        if len(self.branching) != 2 or not (1 <= self.branching[0] <= self.branching[1]):
            raise ValueError(f"branching must be (low, high) with 1 <= low <= high, got {self.branching}")
        _check_range("parent_prob", self.parent_prob, 1e-6, 1.0)
        _check_range("child_prob", self.child_prob, 0.0, 1.0)
        _check_range("singleton_prob", self.singleton_prob, 0.0, 1.0)
        _check_range("magnitude", self.magnitude, 1e-6, math.inf)
        if not 0.0 <= self.exclusive_share <= 1.0:
            raise ValueError(f"exclusive_share must be in [0, 1], got {self.exclusive_share}")
        if not 0.0 < self.max_exclusive_total <= 1.0:
            raise ValueError(f"max_exclusive_total must be in (0, 1], got {self.max_exclusive_total}")
        if self.firing_noise < 0:
            raise ValueError(f"firing_noise must be >= 0, got {self.firing_noise}")
        if self.features_per_dim <= 0:
            raise ValueError(f"features_per_dim must be > 0, got {self.features_per_dim}")
        if not 0.0 < self.max_cos < 1.0:
            raise ValueError(f"max_cos must be in (0, 1), got {self.max_cos}")
        if self.k_ratio <= 0:
            raise ValueError(f"k_ratio must be > 0, got {self.k_ratio}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _tree_dict(node: Feature) -> dict:
    """The realised node, rounded so the fingerprint does not hang on the last float bit."""
    return {
        "name": node.name,
        "prob": round(node.prob, 6),
        "magnitude": round(node.magnitude, 6),
        "exclusive": node.exclusive,
        "children": [_tree_dict(c) for c in node.children],
    }


def _marginals(roots: list[Feature]) -> list[tuple[Feature, float, int]]:
    """``(feature, marginal firing probability, depth)`` in preorder (ToyModel's order)."""
    out: list[tuple[Feature, float, int]] = []

    def visit(node: Feature, p_parent: float, depth: int) -> None:
        p = p_parent * node.prob
        out.append((node, p, depth))
        for c in node.children:
            visit(c, p, depth + 1)

    for r in roots:
        visit(r, 1.0, 0)
    return out


def spread_directions(n: int, d: int, max_cos: float, seed: int, max_iter: int = 20_000) -> torch.Tensor:
    """``n`` unit vectors in ``d`` dimensions: orthonormal when ``n <= d``, otherwise random
    directions pushed apart until no two have ``|cos| > max_cos`` (float64, ``[n, d]``)."""
    gen = torch.Generator().manual_seed(seed)
    if n <= d:
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
        return q[:, :n].T.contiguous()
    welch = math.sqrt((n - d) / (d * (n - 1)))
    if max_cos <= welch:
        raise ValueError(
            f"{n} directions in {d} dimensions cannot all overlap by at most {max_cos} (Welch bound {welch:.3f})"
        )
    dirs = torch.randn(n, d, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    # push towards 0.8 of the bound and stop inside 0.9 of it (the push only approaches its target)
    target, accept = 0.8 * max_cos, 0.9 * max_cos
    for _ in range(max_iter):
        g = dirs @ dirs.T
        g.fill_diagonal_(0)
        if float(g.abs().max()) <= accept:
            return dirs
        # push each pair that overlaps too much apart by its excess overlap
        excess = torch.where(g.abs() > target, g - target * g.sign(), torch.zeros_like(g))
        dirs = dirs - 0.5 * excess @ dirs
        dirs = dirs / dirs.norm(dim=1, keepdim=True)
    raise ValueError(f"could not spread {n} directions in {d} dimensions to |cos| <= {max_cos}")


@dataclass
class HierarchySpec:
    """One realised forest: its parameters, seed, features, directions, SAE ``k`` and fingerprint."""

    name: str
    params: HierarchyParams
    seed: int
    roots: list[Feature]
    directions: torch.Tensor  # [n_features, d], unit rows, float64
    k: int
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        marg = _marginals(self.roots)
        self.n_features = len(marg)
        self.d = int(self.directions.shape[1])
        self.true_l0 = float(sum(p for _, p, _ in marg))  # the expected number of firing features
        self.depths = [dep for _, _, dep in marg]
        gram = self.directions @ self.directions.T
        gram.fill_diagonal_(0)
        self.max_cos = float(gram.abs().max()) if self.n_features > 1 else 0.0
        payload = {
            "params": self.params.to_dict(),
            "seed": self.seed,
            "roots": [_tree_dict(r) for r in self.roots],
            "d": self.d,
            "k": self.k,
            # the overlaps, not the directions: a rotation changes nothing an SAE can see
            "gram": [[round(float(v), 2) for v in row] for row in (gram if self.n_features > self.d else [])],
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def k_regime(self) -> str:
        return k_regime(self.k, self.true_l0)

    def build(self) -> ToyModel:
        """A fresh :class:`ToyModel` sampling this forest (per-feature magnitudes are realised
        already, so the toy's own magnitude noise is off)."""
        return ToyModel(
            copy.deepcopy(self.roots),
            self.d,
            magnitude_noise=0.0,
            seed=self.seed,
            directions=self.directions.clone(),
            firing_noise=self.params.firing_noise,
        )

    def parents(self) -> list[Feature]:
        return [f for f, _, _ in _marginals(self.roots) if f.children]

    def describe(self) -> dict:
        """A JSON-able summary: what a result records to name its tree."""
        marg = _marginals(self.roots)
        roots = [r for r in self.roots if r.children]
        parents = self.parents()
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "params": self.params.to_dict(),
            "n_features": self.n_features,
            "d": self.d,
            "depth": max(self.depths) if self.depths else 0,
            "n_parents": len(parents),
            "n_exclusive_parents": sum(p.exclusive for p in parents),
            "root_prob_min": min((r.prob for r in roots), default=None),
            "root_prob_max": max((r.prob for r in roots), default=None),
            "n_singletons": sum(1 for f, _, dep in marg if dep == 0 and not f.children),
            "true_l0": self.true_l0,
            "k": self.k,
            "k_regime": self.k_regime,
            "max_cos": self.max_cos,
        }


def random_hierarchy(params: HierarchyParams, seed: int, name: str = "") -> HierarchySpec:
    """Draw one forest from ``params`` (Python's seeded RNG for the tree, torch's for the
    directions, so the same seed gives the same tree everywhere)."""
    rng = random.Random(seed)

    def draw(rng_: tuple[float, float], log: bool = False) -> float:
        lo, hi = rng_
        if log and lo > 0:
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return rng.uniform(lo, hi)

    def node(prob: float, level: int, label: str) -> Feature:
        f = Feature(prob, magnitude=draw(params.magnitude), name=label)
        if level < params.depth:
            n_kids = rng.randint(*params.branching)
            kids = [node(draw(params.child_prob), level + 1, f"{label}.{j}") for j in range(n_kids)]
            f.exclusive = n_kids > 1 and rng.random() < params.exclusive_share
            total = sum(c.prob for c in kids)
            if f.exclusive and total > params.max_exclusive_total:
                for c in kids:
                    c.prob *= params.max_exclusive_total / total
            f.children = kids
        return f

    roots = [node(draw(params.parent_prob, log=True), 0, f"t{t}") for t in range(params.n_trees)]
    roots += [Feature(draw(params.singleton_prob), magnitude=draw(params.magnitude), name=f"s{s}")
              for s in range(params.n_singletons)]
    n = len(_marginals(roots))
    d = max(1, math.ceil(n / params.features_per_dim - 1e-9))
    directions = spread_directions(n, d, params.max_cos, seed)
    true_l0 = sum(p for _, p, _ in _marginals(roots))
    k = max(1, round(params.k_ratio * true_l0))
    return HierarchySpec(name or f"seed{seed}", params, seed, roots, directions, k)


# -- the fixed family ---------------------------------------------------------------------------

_K_RATIOS = {"below": (0.4, 0.7), "around": (0.85, 1.15), "above": (1.5, 2.5)}
_EXCLUSIVE = (1.0, 0.0, 0.5)
_MAX_FEATURES = 40  # keeps the whole family quick to train on a CPU


def _family_params(i: int, n: int, rng: random.Random) -> HierarchyParams:
    """The ``i``-th member's parameters: regimes cycled so every combination of k regime,
    exclusivity and superposition appears, the rest drawn; root probabilities stratified over
    0.02-0.3 (log scale) across the family so both ends are covered."""
    regime = ("below", "around", "above")[i % 3]
    exclusive_share = _EXCLUSIVE[(i // 3) % 3]
    superposed = (i // 9 + i) % 2 == 1
    depth = rng.choice((1, 1, 2, 2, 3))
    branching = {1: (rng.randint(2, 3), 4), 2: (2, 3), 3: (2, 2)}[depth]
    per_tree = sum(branching[1] ** lv for lv in range(depth + 1))  # at most
    n_trees = rng.randint(1, max(1, min(4, (_MAX_FEATURES - 2) // per_tree)))
    stratum = ((i * 7) % n + rng.random()) / n  # a permutation of the strata, jittered
    centre = 0.02 * (0.3 / 0.02) ** stratum
    parent_prob = (max(0.02, centre / 1.4), min(0.3, centre * 1.4))
    lo = rng.uniform(0.1, 0.4)
    child_prob = (lo, min(0.9, lo + rng.uniform(0.1, 0.4)))
    magnitude = rng.choice(((1.0, 1.0), (0.5, 2.0), (1.0, 4.0)))
    firing_noise = rng.choice((0.0, 0.05, 0.1, 0.2))
    # k below the true L0 needs an L0 well above 1 (k >= 1): more and busier singletons there
    room = min(8, _MAX_FEATURES - n_trees * per_tree)
    n_singletons = rng.randint(min(4, room) if regime == "below" else 0, room)
    singleton_prob = (0.1, 0.3) if regime == "below" else rng.choice(((0.02, 0.1), (0.05, 0.2), (0.1, 0.3)))
    features_per_dim = rng.uniform(1.1, 1.5) if superposed else rng.uniform(0.6, 1.0)
    return HierarchyParams(
        n_trees=n_trees,
        depth=depth,
        branching=branching,
        parent_prob=parent_prob,
        child_prob=child_prob,
        exclusive_share=exclusive_share,
        magnitude=magnitude,
        firing_noise=firing_noise,
        n_singletons=n_singletons,
        singleton_prob=singleton_prob,
        features_per_dim=features_per_dim,
        max_cos=0.3,
        k_ratio=rng.uniform(*_K_RATIOS[regime]),
    )


def hierarchy_family(n: int = 24, seed: int = 0) -> list[HierarchySpec]:
    """``n`` trees named ``h00``, ``h01``, ...; the same ``(n, seed)`` gives the same trees.

    A draw whose rounded ``k`` lands outside its intended regime (a small true L0 leaves
    no integer ``k`` below it) is redrawn.
    """
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    family = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        for attempt in range(100):
            params = _family_params(i, n, rng)
            spec = random_hierarchy(params, seed=seed * 1_000_003 + 1000 * i + attempt, name=f"h{i:02d}")
            if spec.k_regime == ("below", "around", "above")[i % 3]:
                break
        else:
            raise RuntimeError(f"family member {i}: no draw in its k regime")
        family.append(spec)
    return family


def family_table(specs: list[HierarchySpec]) -> str:
    """A markdown table of the trees' parameters and fingerprints (docs/toy/hierarchies.md)."""
    head = ("| tree | fingerprint | seed | trees x depth | branching | root p | P(child\\|parent) "
            "| exclusive | magnitude | firing noise | singletons | F | d | max \\|cos\\| | true L0 | k | k regime |")
    n_cols = head.replace("\\|", "").count("|") - 1
    rows = [head, "|" + "---|" * n_cols]
    for s in specs:
        p, desc = s.params, s.describe()
        rows.append(
            f"| {s.name} | `{s.fingerprint}` | {s.seed} | {p.n_trees} x {p.depth} | {p.branching[0]}-{p.branching[1]} "
            f"| {p.parent_prob[0]:.3f}-{p.parent_prob[1]:.3f} | {p.child_prob[0]:.2f}-{p.child_prob[1]:.2f} "
            f"| {desc['n_exclusive_parents']}/{desc['n_parents']} | {p.magnitude[0]:g}-{p.magnitude[1]:g} "
            f"| {p.firing_noise:g} | {desc['n_singletons']} | {s.n_features} | {s.d} | {s.max_cos:.2f} "
            f"| {s.true_l0:.2f} | {s.k} | {s.k_regime} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m matryoshka_plugin.toy.hierarchies: the docs table
    print(family_table(hierarchy_family()), end="")
