"""Per-class converters: stock-SAELens weights that reproduce a dictionary's ``encode``/``decode``.

Each converter is registered as ``to_saelens`` of its class in :mod:`matryoshka_plugin.registry`
and takes ``(module, trainer_config)``; :func:`converter_for` finds the one for a module.

==========================================================  ============  =====================
dictionary class                                            SAELens       notes
==========================================================  ============  =====================
``MatryoshkaBatchTopKSAE`` (ours or dictionary_learning's)  ``jumprelu``  scalar threshold
``BatchTopKSAE`` (dictionary_learning)                      ``jumprelu``  broadcast per latent
``AutoEncoderTopK`` (dictionary_learning)                   ``topk``      per-token top-k
``AutoEncoder`` (dictionary_learning)                       ``standard``  unit decoder rows
``JumpReluAutoEncoder`` (dictionary_learning)               ``jumprelu``  learned per latent
``MatryoshkaLogSparsitySAE`` (ours)                         ``standard``  scale, norms folded
==========================================================  ============  =====================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import CheckpointError
from ..registry import architecture_for, architecture_of, architectures, provide

__all__ = [
    "SAELensWeights",
    "converter_for",
    "matryoshka_batch_topk",
    "matryoshka_log_sparsity",
    "batch_topk",
    "top_k",
    "standard",
    "jump_relu",
]


@dataclass
class SAELensWeights:
    """A dictionary expressed as a stock SAELens SAE (what a registered converter returns)."""

    architecture: str
    """SAELens inference architecture: ``"jumprelu"``, ``"topk"`` or ``"standard"``."""
    training_architecture: str
    """The ``training_architecture`` metadata label (``"matryoshka_batchtopk"``)."""
    weights: dict[str, torch.Tensor]
    """SAELens state dict (``W_enc [d, n]``, ``b_enc``, ``W_dec [n, d]``, ``b_dec``, and
    ``threshold [n]`` for ``jumprelu``), float32 on the CPU."""
    apply_b_dec_to_input: bool
    """Whether SAELens subtracts ``b_dec`` from the input before encoding."""
    extra_cfg: dict[str, Any] = field(default_factory=dict)
    """More ``cfg.json`` keys the architecture needs (``k`` for ``topk``)."""
    k: int | None = None
    """The trained (Batch)TopK target L0, recorded in metadata; ``None`` if there is none."""
    widths: list[int] | None = None
    """Cumulative nested widths of a Matryoshka SAE; ``None`` for a flat one."""


Converter = Callable[[torch.nn.Module, Mapping[str, Any]], SAELensWeights]


def converter_for(ae: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> Converter:
    """The registered converter of ``ae``'s class (else of the config's ``dict_class``); raises
    :class:`CheckpointError` listing the supported classes when there is none."""
    arch = architecture_of(ae) or architecture_for(trainer_cfg)
    if arch is None or arch.to_saelens is None:
        supported = list(dict.fromkeys(a.dict_class for a in architectures() if a.to_saelens is not None))
        raise CheckpointError(
            f"export does not support {type(ae).__name__} (dict_class {trainer_cfg.get('dict_class')!r}); "
            f"supported: {', '.join(supported)}"
        )
    return arch.to_saelens


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).clone().contiguous()


def _threshold_or_raise(ae: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> float:
    thr = float(ae.threshold)
    if not math.isfinite(thr) or thr < 0:
        start = trainer_cfg.get("threshold_start_step", "threshold_start_step")
        raise CheckpointError(
            f"this {type(ae).__name__} has no inference threshold yet (threshold={thr}): the threshold is only "
            f"estimated after threshold_start_step={start} and this SAE was trained for {trainer_cfg.get('steps', '?')} "
            "steps (or saved earlier). Until then it can only encode by BatchTopK over a whole batch, which SAELens "
            "cannot represent per token. Train past threshold_start_step (or export a later checkpoint)."
        )
    return thr


def _linear_weights(ae: torch.nn.Module, b_dec: torch.Tensor) -> dict[str, torch.Tensor]:
    """dictionary_learning's ``encoder``/``decoder`` ``nn.Linear`` layers in SAELens' layout."""
    return {"W_enc": _f32(ae.encoder.weight.T), "b_enc": _f32(ae.encoder.bias), "W_dec": _f32(ae.decoder.weight.T),
            "b_dec": _f32(b_dec)}


def _param_weights(ae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``W_enc``/``b_enc``/``W_dec``/``b_dec`` parameters, already in SAELens' layout."""
    return {"W_enc": _f32(ae.W_enc), "b_enc": _f32(ae.b_enc), "W_dec": _f32(ae.W_dec), "b_dec": _f32(ae.b_dec)}


def matryoshka_batch_topk(ae: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> SAELensWeights:
    """``MatryoshkaBatchTopKSAE`` (ours or dictionary_learning's, same state dict) -> ``jumprelu``."""
    thr = _threshold_or_raise(ae, trainer_cfg)
    widths = [int(w) for w in torch.cumsum(ae.group_sizes.detach().cpu(), 0).tolist()]
    active = getattr(ae, "active_groups", len(widths))
    if active != len(widths):
        raise CheckpointError(f"export the full SAE: active_groups={active} of {len(widths)}")
    w = _param_weights(ae)
    w["threshold"] = torch.full((int(ae.dict_size),), thr, dtype=torch.float32)
    return SAELensWeights("jumprelu", "matryoshka_batchtopk", w, True, {}, int(ae.k), widths)


def batch_topk(ae: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> SAELensWeights:
    """dictionary_learning's ``BatchTopKSAE`` -> ``jumprelu`` with its scalar threshold per latent."""
    thr = _threshold_or_raise(ae, trainer_cfg)
    w = _linear_weights(ae, ae.b_dec)
    w["threshold"] = torch.full((int(ae.dict_size),), thr, dtype=torch.float32)
    return SAELensWeights("jumprelu", "batchtopk", w, True, {}, int(ae.k))


def top_k(ae: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> SAELensWeights:
    """dictionary_learning's ``AutoEncoderTopK`` -> ``topk``. Both relu-then-topk (dictionary_learning)
    and topk-then-relu (SAELens) keep the k largest pre-activations and zero the non-positive ones:
    the same latents."""
    extra = {"k": int(ae.k), "rescale_acts_by_decoder_norm": False}
    return SAELensWeights("topk", "topk", _linear_weights(ae, ae.b_dec), True, extra, int(ae.k))


def standard(ae: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> SAELensWeights:
    """dictionary_learning's ``AutoEncoder`` -> ``standard``: the decoder-normalised SAE that
    ``load_dictionary`` hands out, exactly."""
    return SAELensWeights("standard", "standard", _linear_weights(ae, ae.bias), True, {})


def jump_relu(ae: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> SAELensWeights:
    """dictionary_learning's ``JumpReluAutoEncoder`` -> ``jumprelu``. Its ``relu(pre * (pre > t))``
    and SAELens' ``relu(pre) * (pre > t)`` fire the same latents with the same values for any ``t``."""
    w = {**_param_weights(ae), "threshold": _f32(ae.threshold)}
    return SAELensWeights("jumprelu", "jumprelu", w, bool(getattr(ae, "apply_b_dec_to_input", False)), {})


def matryoshka_log_sparsity(ae: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> SAELensWeights:
    """``MatryoshkaLogSparsitySAE`` -> ``standard`` with input scale and decoder norms folded in."""
    with torch.no_grad():
        w = {k: _f32(v) for k, v in ae.folded_weights().items()}
    groups = trainer_cfg.get("group_sizes")
    widths = [int(x) for x in torch.cumsum(torch.tensor(groups), 0).tolist()] if groups else [int(ae.dict_size)]
    return SAELensWeights("standard", "matryoshka_log_sparsity", w, False, {}, None, widths)


# Each converter is handed to its class's registry entry (registry.provide).
for _name, _upstream, _convert in (
    ("MatryoshkaBatchTopKSAE", False, matryoshka_batch_topk),
    ("MatryoshkaLogSparsitySAE", False, matryoshka_log_sparsity),
    ("MatryoshkaBatchTopKSAE", True, matryoshka_batch_topk),
    ("BatchTopKSAE", True, batch_topk),
    ("AutoEncoderTopK", True, top_k),
    ("AutoEncoder", True, standard),
    ("JumpReluAutoEncoder", True, jump_relu),
):
    provide(_name, upstream=_upstream, to_saelens=_convert)
