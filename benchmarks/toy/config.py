"""Set-ups, SAE variants and their defaults (everything here can be overridden from the CLI
or a JSON/TOML config: see ``run.py``).

Set-ups
  post_tree   the original post's tree: 3 parents (p 0.15) with 3 mutually exclusive children
              (0.2 each), 8 singletons (p 0.05), orthonormal in d = 20, norms 1 + N(0, 0.05)
  hedging     the hedging critique: 1 parent (p 0.3), 2 exclusive children (0.4 each given the
              parent), orthogonal in d = 20, magnitude 1; log-family SAEs use an L1 penalty here
  hedging_x2  two independent copies of that tree (true L0 1.08), so that BatchTopK's integer
              k = 1 roughly matches the true L0 (on one copy, k = 1 is twice the true L0)
  magnitude   the comments' counter-example: parent p 0.3 magnitude 2, child p 0.15 magnitude 10
  hierarchy   a 2-level forest plus singletons in superposition, built with sae_lens.synthetic

Variants (``/k<k>`` is appended to BatchTopK variants, one per ``k`` of the set-up)
  vanilla        log-sparsity SAE without prefixes (the post's "vanilla")
  mat_pareto     Matryoshka log sparsity, full SAE + 9 sampled truncated-Pareto prefixes per step
  mat_expected   ... the exact expectation of those prefixes
  mat_every      ... every prefix, exactly
  mat_groups     ... fixed nested groups (``group_sizes`` of the set-up); ``mat_groups_b<beta>``
                 adds balance weighting
  btk            this package's BatchTopK without prefixes (prefix_mode "none")
  btk_groups     this package's Matryoshka BatchTopK, fixed groups; ``btk_groups_b<beta>`` balance
  btk_every      this package's Matryoshka BatchTopK, every prefix
  up_btk         dictionary_learning's BatchTopKTrainer (upstream baseline)
  up_mbtk        dictionary_learning's MatryoshkaBatchTopKTrainer (upstream baseline)
  vanilla_1      a 1-latent log-sparsity SAE (the hedging demonstration)
  btk_1          a 1-latent BatchTopK SAE (k = 1: a plain ReLU SAE with no sparsity penalty)
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from typing import Any

from ..harness import apply_overrides

LOG_FAMILY = {"vanilla": "none", "mat_pareto": "pareto", "mat_expected": "pareto_expected",
              "mat_every": "every", "mat_groups": "groups", "vanilla_1": "none"}
BTK_FAMILY = {"btk": "none", "btk_groups": "groups", "btk_every": "every", "btk_1": "none"}
UPSTREAM = ("up_btk", "up_mbtk")
_BALANCE = re.compile(r"^(mat|btk)_groups_b([0-9]*\.?[0-9]+)$")


@dataclass
class VariantSpec:
    """How to build one SAE variant."""

    name: str
    family: str  # "log", "btk", "up_btk", "up_mbtk"
    prefix_mode: str | None = None
    balance_beta: float | None = None
    dict_size: int | None = None  # None: the set-up's
    uses_k: bool = False


def parse_variant(name: str) -> VariantSpec:
    """``"mat_groups_b0.5"`` -> a VariantSpec; raises ValueError naming the known variants."""
    m = _BALANCE.match(name)
    if m:
        beta = float(m.group(2))
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"balance beta in {name!r} must lie in [0, 1]")
        fam = "log" if m.group(1) == "mat" else "btk"
        return VariantSpec(name, fam, "groups", beta, uses_k=fam == "btk")
    if name in LOG_FAMILY:
        return VariantSpec(name, "log", LOG_FAMILY[name], dict_size=1 if name == "vanilla_1" else None)
    if name in BTK_FAMILY:
        return VariantSpec(name, "btk", BTK_FAMILY[name], dict_size=1 if name == "btk_1" else None, uses_k=True)
    if name in UPSTREAM:
        return VariantSpec(name, name, "groups" if name == "up_mbtk" else "none", uses_k=True)
    known = sorted(list(LOG_FAMILY) + list(BTK_FAMILY) + list(UPSTREAM)) + ["mat_groups_b<beta>", "btk_groups_b<beta>"]
    raise ValueError(f"unknown variant {name!r}; known: {', '.join(known)}")


COMPARE = ["vanilla", "mat_pareto", "mat_expected", "mat_every", "btk_groups", "btk_every",
           "btk_groups_b0.25", "btk_groups_b0.5", "btk_groups_b0.75", "up_btk", "up_mbtk"]


@dataclass
class SetupConfig:
    """One toy set-up and how its SAEs are trained and evaluated."""

    name: str
    title: str
    builder: str  # "post_tree", "hedging_tree", "magnitude_tree", "synthetic_hierarchy"
    toy: dict[str, Any] = field(default_factory=dict)  # builder keyword arguments
    variants: list[str] = field(default_factory=lambda: list(COMPARE))
    steps: int = 20_000
    batch_size: int = 200
    dict_size: int | None = None  # None: number of true features
    group_sizes: list[int] | None = None  # nested groups for *_groups and up_mbtk
    ks: list[int] = field(default_factory=lambda: [1])  # BatchTopK k values
    target_l0: float | None = None  # log-sparsity controller target; None: 1.1 x true L0
    log: dict[str, Any] = field(default_factory=dict)  # extra MatryoshkaLogSparsityTrainer kwargs
    btk: dict[str, Any] = field(default_factory=dict)  # extra kwargs for all BatchTopK trainers
    eval_samples: int = 20_000
    figure_variants: list[str] | None = None  # heatmaps / activations; None: a default choice


# Log-sparsity settings of the post's reference code (toy): lr 3e-2, coefficient 0.2, free
# decoder norms (the trainer's unit-norm default, made for language-model activations, changes
# the toy dynamics: absorption 1.0 for mat_groups on the hedging tree, seed 0).
LOG_DEFAULTS = dict(sparsity="log", sparsity_coeff=0.2, lr=3e-2, normalize_decoder=False)
# BatchTopK settings shared by this package's trainer and both upstream trainers. AuxK's
# default dead-latent threshold (10M tokens) is never reached in a toy run of 1-4M samples;
# 50k samples (250 steps of 200) lets it revive dead latents here.
BTK_DEFAULTS = dict(lr=3e-3, auxk_alpha=1 / 32, dead_feature_threshold=50_000)


# The critique's tree: 1 parent, 2 mutually exclusive children, orthogonal, magnitude 1.
HEDGING_TREE = dict(d=20, parent_prob=0.3, child_probs=[0.4, 0.4], exclusive=True, magnitude=1.0, magnitude_noise=0.0)
# As in the critique: an L1 penalty (coefficient started at the reference 1.2).
HEDGING_LOG = dict(sparsity="l1", sparsity_coeff=1.2)


def default_setups() -> dict[str, SetupConfig]:
    hedging = SetupConfig(
        name="hedging",
        title="2. Feature hedging (1 parent, 2 exclusive children; d = 20)",
        builder="hedging_tree",
        toy=dict(HEDGING_TREE),
        variants=["vanilla_1", "btk_1", "vanilla", "mat_groups", "mat_groups_b0.75", "mat_groups_b0.5",
                  "mat_groups_b0.25", "mat_groups_b0.1", "mat_groups_b0.05", "mat_pareto", "mat_expected",
                  "mat_every", "btk", "btk_groups", "btk_every", "btk_groups_b0.75", "btk_groups_b0.5",
                  "btk_groups_b0.25", "up_btk", "up_mbtk"],
        steps=5_000,
        group_sizes=[1, 2],
        log=dict(HEDGING_LOG),
        ks=[1],
        figure_variants=["vanilla_1", "mat_groups", "btk_groups/k1", "btk_groups_b0.25/k1"],
    )
    return {
        "post_tree": SetupConfig(
            name="post_tree",
            title="1. The post's tree (3 parents x 3 exclusive children, 8 singletons; d = 20)",
            builder="post_tree",
            toy=dict(d=20, n_parents=3, parent_prob=0.15, child_probs=[0.2, 0.2, 0.2], n_singletons=8,
                     singleton_prob=0.05, magnitude_noise=0.05),
            target_l0=1.2338,
            # k = 2: BatchTopK needs a budget above the true L0 (1.12) to keep parent and child
            # together; at k = 1 it must drop one of them on most parent+child samples.
            ks=[2],
            group_sizes=[3, 17],
            figure_variants=["vanilla", "mat_pareto", "mat_every", "btk_groups/k2", "up_mbtk/k2"],
        ),
        "hedging": hedging,
        # the same tree twice, with groups and variants to match
        "hedging_x2": replace(
            copy.deepcopy(hedging),
            name="hedging_x2",
            title="2b. Feature hedging, two independent copies (true L0 1.08, so BatchTopK k = 1 fits)",
            toy=dict(HEDGING_TREE, n_copies=2),
            variants=["vanilla", "mat_groups", "mat_groups_b0.75", "mat_groups_b0.5", "mat_groups_b0.25",
                      "mat_groups_b0.1", "btk", "btk_groups", "btk_every", "btk_groups_b0.75", "btk_groups_b0.5",
                      "btk_groups_b0.25", "btk_groups_b0.1", "up_btk", "up_mbtk"],
            group_sizes=[2, 4],
            figure_variants=["btk/k1", "btk_groups/k1", "btk_groups_b0.25/k1", "mat_groups"],
        ),
        "magnitude": SetupConfig(
            name="magnitude",
            title="3. Loud child (parent p 0.3 magnitude 2; child p 0.15 magnitude 10; d = 20)",
            builder="magnitude_tree",
            toy=dict(d=20, parent_prob=0.3, parent_magnitude=2.0, child_prob=0.15, child_magnitude=10.0,
                     n_children=1, magnitude_noise=0.0),
            steps=5_000,
            group_sizes=[1, 1],
            ks=[1],
            figure_variants=["vanilla", "mat_pareto", "btk_groups/k1", "up_mbtk/k1"],
        ),
        "hierarchy": SetupConfig(
            name="hierarchy",
            title="4. A 2-level forest in superposition (sae_lens.synthetic)",
            builder="synthetic_hierarchy",
            toy=dict(d=32, n_roots=4, branching=[2, 3], max_depth=2, n_singletons=8, root_prob=0.15,
                     child_prob=0.3, singleton_prob=0.05, mutually_exclusive_portion=0.5, magnitude_std=0.05),
            steps=6_000,
            # Fewer variants than the others: on 2 CPU cores this set-up is the costliest.
            variants=["vanilla", "mat_pareto", "mat_every", "btk_groups", "btk_groups_b0.5", "up_btk", "up_mbtk"],
            ks=[2],
            group_sizes=None,  # filled from the hierarchy: one group per level
            figure_variants=["vanilla", "mat_pareto", "btk_groups/k2", "up_mbtk/k2"],
        ),
    }


def merge_overrides(setup: SetupConfig, overrides: dict[str, Any]) -> SetupConfig:
    """A copy of ``setup`` with ``overrides`` applied (dicts ``toy``/``log``/``btk`` merged);
    a ValueError names an unknown setting or a value of the wrong type."""
    return apply_overrides(copy.deepcopy(setup), overrides, prefix=f"{setup.name}.")


QUICK = {
    "post_tree": dict(steps=3000),
    "hedging": dict(steps=2000),
    "hedging_x2": dict(steps=2000),
    "magnitude": dict(steps=2000),
    "hierarchy": dict(steps=3000),
}
