"""Toy models with known features and the ground-truth metrics SAEs are judged by.

* :mod:`.models` — feature forests (:class:`ToyModel`: the post's, the hedging critique's and
  the loud-child trees; :class:`SyntheticHierarchyToy`: a hierarchy in superposition).
* :mod:`.hierarchies` — random feature forests (:func:`random_hierarchy` from
  :class:`HierarchyParams`, each a :class:`HierarchySpec` with a fingerprint that builds a
  :class:`ToyModel`) and the fixed family of trees the trainers are scored on
  (:func:`hierarchy_family`).
* :mod:`.metrics` — absorption, recovery, L0/FVU (:func:`evaluate_sae`), parent/child mixing
  (:func:`mixing_metrics`) and SAELens's synthetic-data evaluation.
* :mod:`.plots` — the figures (imports matplotlib; not imported here).
"""

from .hierarchies import (
    HierarchyParams,
    HierarchySpec,
    family_table,
    hierarchy_family,
    random_hierarchy,
)
from .metrics import (
    DecoderView,
    MixingMetrics,
    ToyMetrics,
    eval_sae_lens_synthetic,
    evaluate_sae,
    match_latents,
    mixing_metrics,
)
from .models import Feature, SyntheticHierarchyToy, ToyModel

__all__ = [
    "Feature",
    "ToyModel",
    "SyntheticHierarchyToy",
    "HierarchyParams",
    "HierarchySpec",
    "random_hierarchy",
    "hierarchy_family",
    "family_table",
    "ToyMetrics",
    "evaluate_sae",
    "match_latents",
    "MixingMetrics",
    "mixing_metrics",
    "DecoderView",
    "eval_sae_lens_synthetic",
]
