"""The SAELens inference architecture ``matryoshka_jumprelu``: :class:`MatryoshkaJumpReLUSAE`.

A JumpReLU SAE that keeps the nested widths and can act as any prefix of itself
(``active_width``) or hand out a truncated stock SAE (``truncated(width)``). Importing this module
registers it with SAELens (``import matryoshka_plugin`` alone does not: nothing global changes
until the SAELens adapter is used). It imports only SAELens and torch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterable

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata

__all__ = [
    "MATRYOSHKA_ARCHITECTURE",
    "MatryoshkaJumpReLUSAE",
    "MatryoshkaJumpReLUSAEConfig",
    "register_saelens_architecture",
    "check_widths",
]

MATRYOSHKA_ARCHITECTURE = "matryoshka_jumprelu"


def check_widths(widths: Iterable[int] | None, d_sae: int) -> list[int]:
    """Cumulative nested widths, strictly increasing, ending at ``d_sae`` (appended if missing)."""
    out = [] if widths is None else list(widths)
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or int(w) != w for w in out):
        raise ValueError(f"matryoshka widths must be integers, got {out}")
    out = [int(w) for w in out]
    if any(w < 1 for w in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"matryoshka widths must be positive and strictly increasing, got {out}")
    if out and out[-1] > d_sae:
        raise ValueError(f"matryoshka widths {out} exceed d_sae={d_sae}")
    if not out or out[-1] != d_sae:
        out.append(d_sae)
    return out


@dataclass
class MatryoshkaJumpReLUSAEConfig(JumpReLUSAEConfig):
    """JumpReLU config plus ``matryoshka_widths``: cumulative end indices of the nested levels."""

    matryoshka_widths: list[int] = field(default_factory=list)

    @classmethod
    def architecture(cls) -> str:
        return MATRYOSHKA_ARCHITECTURE

    def __post_init__(self) -> None:
        super().__post_init__()
        self.matryoshka_widths = check_widths(self.matryoshka_widths, self.d_sae)


class MatryoshkaJumpReLUSAE(JumpReLUSAE):
    """A SAELens JumpReLU SAE whose latents form nested dictionaries.

    ``sae.active_width = w`` makes ``encode``/``forward`` use only latents ``[0, w)`` (the
    hooks see the truncated latents); ``sae.truncated(w)`` returns an independent stock
    ``JumpReLUSAE`` with just those latents. Any ``w`` works; ``cfg.matryoshka_widths`` lists
    the widths that were trained as levels. A standard (ReLU) SAE is this with threshold 0.
    """

    cfg: MatryoshkaJumpReLUSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: MatryoshkaJumpReLUSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._active_width = cfg.d_sae

    @property
    def matryoshka_widths(self) -> list[int]:
        return list(self.cfg.matryoshka_widths)

    @property
    def active_width(self) -> int:
        return self._active_width

    @active_width.setter
    def active_width(self, width: int | None) -> None:
        width = self.cfg.d_sae if width is None else width
        if isinstance(width, bool) or int(width) != width or not (1 <= int(width) <= self.cfg.d_sae):
            raise ValueError(f"active_width must be an integer in [1, d_sae={self.cfg.d_sae}], got {width!r}")
        self._active_width = int(width)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = self.process_sae_in(x)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
        acts = self.activation_fn(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre.dtype)
        if self._active_width < self.cfg.d_sae:
            keep = torch.arange(self.cfg.d_sae, device=acts.device) < self._active_width
            acts = acts * keep.to(acts.dtype)
        return self.hook_sae_acts_post(acts)

    def truncated(self, width: int) -> JumpReLUSAE:
        """A stock SAELens ``JumpReLUSAE`` made of the first ``width`` latents (a copy)."""
        if isinstance(width, bool) or int(width) != width or not (1 <= int(width) <= self.cfg.d_sae):
            raise ValueError(f"width must be an integer in [1, d_sae={self.cfg.d_sae}], got {width!r}")
        width = int(width)
        meta = SAEMetadata(**copy.deepcopy(self.cfg.metadata.to_dict()))
        meta.matryoshka_widths = [w for w in self.cfg.matryoshka_widths if w < width] + [width]
        meta.truncated_from_d_sae = self.cfg.d_sae
        cfg = JumpReLUSAEConfig(
            d_in=self.cfg.d_in,
            d_sae=width,
            dtype=self.cfg.dtype,
            device=str(self.W_enc.device),
            apply_b_dec_to_input=self.cfg.apply_b_dec_to_input,
            normalize_activations=self.cfg.normalize_activations,
            reshape_activations=self.cfg.reshape_activations,
            metadata=meta,
        )
        sae = JumpReLUSAE(cfg)
        with torch.no_grad():
            sae.load_state_dict(
                {
                    "W_enc": self.W_enc[:, :width].clone(),
                    "b_enc": self.b_enc[:width].clone(),
                    "W_dec": self.W_dec[:width].clone(),
                    "b_dec": self.b_dec.clone(),
                    "threshold": self.threshold[:width].clone(),
                }
            )
        return sae

    def levels(self) -> list[JumpReLUSAE]:
        """One truncated stock SAE per trained nested width."""
        return [self.truncated(w) for w in self.cfg.matryoshka_widths]


def register_saelens_architecture() -> None:
    """Register ``matryoshka_jumprelu`` with SAELens; calling it again is harmless.

    SAELens raises on a second registration of a name, so this checks first; a reloaded copy of
    this module replaces its own older entry, and a name taken by another package is an error.
    """
    entry = SAE_CLASS_REGISTRY.get(MATRYOSHKA_ARCHITECTURE)
    if entry is None:
        register_sae_class(MATRYOSHKA_ARCHITECTURE, MatryoshkaJumpReLUSAE, MatryoshkaJumpReLUSAEConfig)
        return
    if entry == (MatryoshkaJumpReLUSAE, MatryoshkaJumpReLUSAEConfig):
        return
    owner = entry[0]
    if (owner.__module__, owner.__qualname__) == (__name__, MatryoshkaJumpReLUSAE.__qualname__):
        SAE_CLASS_REGISTRY[MATRYOSHKA_ARCHITECTURE] = (MatryoshkaJumpReLUSAE, MatryoshkaJumpReLUSAEConfig)
        return
    raise ValueError(
        f"the SAELens architecture name {MATRYOSHKA_ARCHITECTURE!r} is already taken by "
        f"{owner.__module__}.{owner.__qualname__}"
    )


register_saelens_architecture()
