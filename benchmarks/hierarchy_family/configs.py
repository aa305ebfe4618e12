"""The configurations scored on every tree of the family, and their trainer keywords.

A configuration is a trainer family (this package's BatchTopK ``"btk"`` or log-sparsity
``"log"`` trainer, dictionary_learning's ``"up_btk"`` / ``"up_mbtk"``), a prefix mode and a few
options on top of the toy benchmark's defaults (``benchmarks.toy.config``: BatchTopK lr 3e-3,
AuxK after 50k silent samples; log-sparsity the post's toy settings). ``groups="levels"`` gives
fixed nested groups that match the tree: one group per depth (roots and singletons first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.toy.config import BTK_DEFAULTS, LOG_DEFAULTS
from matryoshka_plugin.toy import HierarchySpec

__all__ = ["StudyConfig", "CONFIGS", "PAIRED_WITH", "config_by_name", "level_sizes", "trainer_kwargs"]


@dataclass(frozen=True)
class StudyConfig:
    """One configuration: ``options`` are trainer keywords applied last."""

    name: str
    family: str  # "btk", "log", "up_btk", "up_mbtk"
    prefix_mode: str | None = None  # None for the upstream trainers
    groups: str | None = None  # "levels": one fixed group per depth of the tree
    options: dict[str, Any] = field(default_factory=dict)
    log_settings: str = "post"  # log family: "post" (the post's toy settings) or "defaults"
    note: str = ""


def _btk(name: str, mode: str, note: str, groups: str | None = None, **options: Any) -> StudyConfig:
    return StudyConfig(name, "btk", mode, groups, dict(options), note=note)


CONFIGS: list[StudyConfig] = [
    _btk("btk_none", "none", "plain BatchTopK (this package, no prefixes)"),
    _btk("btk_groups", "groups", "fixed groups, one per tree level", groups="levels"),
    _btk("btk_every", "every", "every prefix"),
    _btk("btk_pareto", "pareto", "random Pareto prefixes"),
    _btk("btk_groups_auxk", "groups", "fixed groups + AuxK per level", groups="levels", matryoshka_aux_loss=True),
    _btk("btk_groups_detach", "groups", "fixed groups + detached levels", groups="levels", detach_inner_levels=True),
    _btk("btk_groups_b0.5", "groups", "fixed groups + balance beta 0.5", groups="levels", balance_beta=0.5),
    _btk("btk_every_reorder", "every", "every prefix + reorder by frequency", reorder_by="frequency"),
    _btk("btk_every_kanneal", "every", "every prefix + k anneal over the first quarter", k_anneal_steps="quarter"),
    # b_dec "zeros" equals the default here: the geometric median of sparse toy samples is about 0
    _btk("btk_every_bdec_mean", "every", "every prefix + b_dec starts at the batch mean", b_dec_init="mean"),
    _btk("btk_every_lr1e-3", "every", "every prefix, lr 1e-3", lr=1e-3),
    _btk("btk_every_lr1e-2", "every", "every prefix, lr 1e-2", lr=1e-2),
    _btk("btk_pareto_lr1e-2", "pareto", "random Pareto prefixes, lr 1e-2", lr=1e-2),
    StudyConfig("log_default", "log", "pareto", log_settings="defaults",
                note="log sparsity, trainer defaults (Pareto prefixes)"),
    StudyConfig("log_post", "log", "pareto", note="log sparsity, the post's toy settings (Pareto prefixes)"),
    StudyConfig("log_post_every", "log", "every", note="log sparsity, post settings, every prefix"),
    StudyConfig("log_post_groups", "log", "groups", groups="levels", note="log sparsity, post settings, fixed groups"),
    # not a user's choice (the tree's k is); measures what the k / true L0 mismatch costs
    _btk("btk_every_k_true_l0", "every", "every prefix, k = round(true L0) instead of the tree's k", k="true_l0"),
    _btk("btk_pareto_expected", "pareto_expected", "the exact expectation of the Pareto prefixes"),
    StudyConfig("log_post_expected", "log", "pareto_expected",
                note="log sparsity, post settings, the exact expectation of the Pareto prefixes"),
    StudyConfig("up_btk", "up_btk", note="dictionary_learning BatchTopK"),
    StudyConfig("up_mbtk", "up_mbtk", groups="levels", note="dictionary_learning Matryoshka BatchTopK, level groups"),
]


# Each option against the configuration it changes (paired by tree in breakdown.md).
PAIRED_WITH = {
    "btk_groups": "btk_none", "btk_every": "btk_none", "btk_pareto": "btk_none",
    "btk_groups_auxk": "btk_groups", "btk_groups_detach": "btk_groups", "btk_groups_b0.5": "btk_groups",
    "btk_every_reorder": "btk_every", "btk_every_kanneal": "btk_every", "btk_every_bdec_mean": "btk_every",
    "btk_every_lr1e-3": "btk_every", "btk_every_lr1e-2": "btk_every", "btk_every_k_true_l0": "btk_every",
    "btk_pareto_lr1e-2": "btk_pareto", "btk_pareto_expected": "btk_pareto",
    "log_default": "log_post", "log_post_every": "log_post", "log_post_groups": "log_post",
    "log_post_expected": "log_post", "up_mbtk": "btk_groups", "up_btk": "btk_none",
}


def config_by_name(name: str) -> StudyConfig:
    for c in CONFIGS:
        if c.name == name:
            return c
    raise ValueError(f"unknown configuration {name!r}; known: {', '.join(c.name for c in CONFIGS)}")


def level_sizes(spec: HierarchySpec) -> list[int]:
    """Features per depth of the tree (depth 0: roots and singletons), deepest last."""
    depth = max(spec.depths)
    return [sum(1 for d in spec.depths if d == lv) for lv in range(depth + 1)]


def _fractions(sizes: list[int]) -> list[float]:
    """Fractions whose ``int(f * n)`` (both trainers' rule) gives exactly ``sizes``."""
    n = sum(sizes)
    # a small excess keeps int() off the boundary; the last group (the remainder) stays within 0.5
    inner = [(s + 0.1) / n for s in sizes[:-1]]
    return inner + [1.0 - sum(inner)]


def trainer_kwargs(cfg: StudyConfig, spec: HierarchySpec, seed: int, steps: int) -> dict[str, Any]:
    """The trainer keywords of ``cfg`` on ``spec`` (dict size = number of true features, the
    tree's ``k``); everything that defines the run, so it is stored with the result."""
    n = spec.n_features
    base: dict[str, Any] = dict(steps=int(steps), activation_dim=spec.d, dict_size=n, seed=int(seed), device="cpu")
    sizes = level_sizes(spec) if cfg.groups == "levels" else None
    if cfg.groups not in (None, "levels"):
        raise ValueError(f"unknown groups {cfg.groups!r} in {cfg.name}")
    if cfg.family == "log":
        settings = LOG_DEFAULTS if cfg.log_settings == "post" else {}
        kw = {**base, **settings, "target_l0": round(1.1 * spec.true_l0, 6), "prefix_mode": cfg.prefix_mode}
        if cfg.prefix_mode == "groups":
            kw["reorder_latents"] = False  # fixed groups are fixed positions
            kw["group_fractions"] = _fractions(sizes)
    else:
        warm = min(1000, steps // 10)
        kw = {**base, **BTK_DEFAULTS, "k": spec.k, "warmup_steps": warm, "threshold_start_step": warm,
              "decay_start": int(0.8 * steps)}
        if cfg.family == "btk":
            kw["prefix_mode"] = cfg.prefix_mode
        elif cfg.family in ("up_btk", "up_mbtk"):
            kw.update(layer=0, lm_name=f"toy:{spec.name}")
        else:
            raise ValueError(f"unknown family {cfg.family!r} in {cfg.name}")
        if sizes is not None:
            kw["group_fractions"] = _fractions(sizes)
    for key, value in cfg.options.items():
        if key == "k_anneal_steps" and value == "quarter":
            value = steps // 4
        if key == "k" and value == "true_l0":
            value = max(1, round(spec.true_l0))
        kw[key] = value
    return kw
