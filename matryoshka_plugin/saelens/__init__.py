"""SAELens export, import, a registered Matryoshka architecture, and publishing.

* :func:`export_to_saelens` (:mod:`.export`) turns a ``trainer_i`` folder written by
  dictionary_learning's ``trainSAE`` into a SAELens folder (``cfg.json``,
  ``sae_weights.safetensors`` and, when firing frequencies are known, ``sparsity.safetensors``)
  that stock SAELens loads with ``SAE.load_from_disk`` and that computes the same latents and
  reconstructions. Each dictionary class has its converter (:mod:`.convert`), registered in
  :mod:`matryoshka_plugin.registry`.
* Importing this package registers the SAELens inference architecture ``matryoshka_jumprelu``
  (:class:`MatryoshkaJumpReLUSAE`, :mod:`.architecture`): a JumpReLU SAE that keeps the nested
  widths and can act as any prefix of itself (``active_width``) or hand out a truncated stock SAE
  (``truncated(width)``). Only that module loads at once; the others load on first use.
* :func:`import_from_saelens` and :func:`load_matryoshka_saelens` (:mod:`.load`) read a SAELens
  folder or ``SAE`` object back; :func:`publish_to_huggingface` (:mod:`.publish`) uploads
  exported folders with SAELens' own uploader.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .architecture import (
    MATRYOSHKA_ARCHITECTURE,
    MatryoshkaJumpReLUSAE,
    MatryoshkaJumpReLUSAEConfig,
    register_saelens_architecture,
)

# public name -> the submodule that defines it (imported on first use)
_LAZY = {
    "SAELensWeights": "convert",
    "export_to_saelens": "export",
    "import_from_saelens": "load",
    "load_matryoshka_saelens": "load",
    "publish_to_huggingface": "publish",
    "PublishPlan": "publish",
}

__all__ = [
    "MATRYOSHKA_ARCHITECTURE",
    "MatryoshkaJumpReLUSAE",
    "MatryoshkaJumpReLUSAEConfig",
    "register_saelens_architecture",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .convert import SAELensWeights
    from .export import export_to_saelens
    from .load import import_from_saelens, load_matryoshka_saelens
    from .publish import PublishPlan, publish_to_huggingface
