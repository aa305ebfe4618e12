"""Toy models with known features and the ground-truth metrics SAEs are judged by.

* :mod:`.models` — feature forests (:class:`ToyModel`: the post's, the hedging critique's and
  the loud-child trees; :class:`SyntheticHierarchyToy`: a hierarchy in superposition).
* :mod:`.metrics` — absorption, recovery, L0/FVU (:func:`evaluate_sae`), parent/child mixing
  (:func:`mixing_metrics`) and SAELens's synthetic-data evaluation.
* :mod:`.plots` — the figures (imports matplotlib; not imported here).
"""

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
    "ToyMetrics",
    "evaluate_sae",
    "match_latents",
    "MixingMetrics",
    "mixing_metrics",
    "DecoderView",
    "eval_sae_lens_synthetic",
]
