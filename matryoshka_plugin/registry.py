"""One architecture registry: everything the package knows about a dictionary class.

A ``trainer_i`` folder names its SAE class in ``config["trainer"]["dict_class"]``. Loading it
(:func:`~matryoshka_plugin.load_dictionary`), exporting it to SAELens, labelling it in SAEBench
records and reading its decoder rows all look the class up here, so a new SAE class needs one
:func:`register_architecture` call (SAELens' ``register_sae_class`` is the model).

dictionary_learning and this package both have a class named ``MatryoshkaBatchTopKSAE``, so
entries are keyed by name *and* origin: a folder written by this package's trainers carries
``"package": "matryoshka_plugin"`` in its trainer config; any other folder naming an
upstream class is dictionary_learning's.

This module is a leaf: it imports no SAE code, SAELens or dictionary_learning, and never calls
up into it. Built-in entries hold their names and labels; the modules that define their code
hand it over when they are imported (:func:`provide`: ``sae.py`` its loaders, which
``checkpoints`` imports, ``saelens/convert.py`` its converters).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "PACKAGE_MARK",
    "Architecture",
    "register_architecture",
    "unregister_architecture",
    "architecture_for",
    "architecture_of",
    "architectures",
    "provide",
    "decoder_rows",
    "unit_decoder_rows",
]

PACKAGE_MARK = "matryoshka_plugin"

Loader = Callable[[Path, Mapping[str, Any], Any], torch.nn.Module]
"""``(weights_path, trainer_config, device) -> module``."""
Converter = Callable[[torch.nn.Module, Mapping[str, Any]], Any]
"""``(module, trainer_config) -> SAELensWeights`` (see ``matryoshka_plugin.saelens.convert``)."""


def _rows_by_layout(sae: Any) -> torch.Tensor:
    """``W_dec [n, d]`` (this package's SAEs, dictionary_learning's Matryoshka and JumpReLU SAEs)
    or ``decoder.weight [d, n]`` transposed (an ``nn.Linear`` decoder: dictionary_learning's
    ``AutoEncoder`` family), detached."""
    w = getattr(sae, "W_dec", None)
    if isinstance(w, torch.Tensor):
        return w.detach()
    weight = getattr(getattr(sae, "decoder", None), "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.detach().T
    raise TypeError(
        f"{type(sae).__name__} has neither W_dec nor decoder.weight; cannot read its decoder rows "
        "(register its class with an Architecture whose decoder= reads them)"
    )


def decoder_rows(sae: Any) -> torch.Tensor:
    """Decoder rows ``[n_latents, d]`` of any SAE, as stored: detached, in the SAE's dtype and
    device, norms untouched (this package's log-sparsity SAE keeps free norms and decodes along
    the unit directions; see :func:`unit_decoder_rows`).

    The one accessor: the registered class's :attr:`Architecture.decoder`, else ``W_dec [n, d]``
    or ``decoder.weight [d, n]`` transposed. Raises ``TypeError`` for an SAE with neither."""
    arch = architecture_of(sae)
    return (arch.decoder if arch is not None else _rows_by_layout)(sae)


def unit_decoder_rows(sae: Any) -> torch.Tensor:
    """:func:`decoder_rows` in float32 scaled to unit norm (the latents' directions; a zero row
    stays zero)."""
    return torch.nn.functional.normalize(decoder_rows(sae).float(), dim=1)


@dataclass(frozen=True)
class Architecture:
    """One dictionary class and what the package does with it."""

    dict_class: str
    """The class name ``trainSAE`` writes as ``config["trainer"]["dict_class"]``."""
    label: str
    """Training-architecture label in SAELens metadata and SAEBench records (``"batchtopk"``)."""
    upstream: bool = False
    """A dictionary_learning class: its folders load through dictionary_learning's loader."""
    load: Loader | None = None
    """Builds the module from a weights file; ``None`` for upstream classes."""
    to_saelens: Converter | None = None
    """Stock-SAELens weights reproducing the module; ``None`` where export is unsupported."""
    decoder: Callable[[torch.nn.Module], torch.Tensor] = _rows_by_layout
    """Decoder rows ``[n_latents, d]`` (detached) of a module of this class, what
    :func:`decoder_rows` returns for it; the default reads ``W_dec`` or ``decoder.weight``."""

    @property
    def key(self) -> tuple[bool, str]:
        return self.upstream, self.dict_class


_REGISTRY: dict[tuple[bool, str], Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Register ``arch``. Registering an equal entry again is harmless; a different entry for a
    taken (name, origin) raises ``ValueError``."""
    old = _REGISTRY.get(arch.key)
    if old is not None and old != arch:
        origin = "dictionary_learning" if arch.upstream else "this package"
        raise ValueError(f"dictionary class {arch.dict_class!r} ({origin}) is already registered")
    _REGISTRY[arch.key] = arch
    return arch


def unregister_architecture(dict_class: str, upstream: bool = False) -> None:
    """Remove an entry (tests and plugins that register temporarily)."""
    _REGISTRY.pop((upstream, dict_class), None)


def architectures() -> list[Architecture]:
    """Every registered entry, this package's first."""
    return sorted(_REGISTRY.values(), key=lambda a: (a.upstream, a.dict_class))


def _is_ours(trainer_cfg: Mapping[str, Any]) -> bool:
    name = str(trainer_cfg.get("dict_class", ""))
    return trainer_cfg.get("package") == PACKAGE_MARK or (True, name) not in _REGISTRY


def architecture_for(trainer_cfg: Mapping[str, Any]) -> Architecture | None:
    """The entry for a trainer config (``config["trainer"]``), or ``None`` if unregistered."""
    name = str(trainer_cfg.get("dict_class", ""))
    return _REGISTRY.get((not _is_ours(trainer_cfg), name))


def architecture_of(module: torch.nn.Module) -> Architecture | None:
    """The entry for a module's class (dictionary_learning's classes by their module path)."""
    cls = type(module)
    upstream = cls.__module__.split(".")[0] == "dictionary_learning"
    return _REGISTRY.get((upstream, cls.__name__))


def provide(dict_class: str, *, upstream: bool = False, load: Loader | None = None,
            to_saelens: Converter | None = None) -> Architecture:
    """Give the registered entry of ``dict_class`` the code its module defines (only the parts
    passed change); returns the entry. This package's modules call it as they are imported, as
    SAELens' classes call ``register_sae_class``, so the registry holds their functions instead
    of calling up into them by import path."""
    arch = _REGISTRY.get((upstream, dict_class))
    if arch is None:
        raise ValueError(f"dictionary class {dict_class!r} (upstream={upstream}) is not registered")
    given = {"load": load, "to_saelens": to_saelens}
    arch = dataclasses.replace(arch, **{k: v for k, v in given.items() if v is not None})
    _REGISTRY[arch.key] = arch
    return arch


# The built-in entries; their loaders and converters arrive through provide().
for _name, _label, _upstream in (
    ("MatryoshkaBatchTopKSAE", "matryoshka_batchtopk", False),
    ("MatryoshkaLogSparsitySAE", "matryoshka_log_sparsity", False),
    ("MatryoshkaBatchTopKSAE", "matryoshka_batchtopk", True),
    ("BatchTopKSAE", "batchtopk", True),
    ("AutoEncoderTopK", "topk", True),
    ("AutoEncoder", "standard", True),
    ("AutoEncoderNew", "AutoEncoderNew", True),
    ("GatedAutoEncoder", "GatedAutoEncoder", True),
    ("JumpReluAutoEncoder", "jumprelu", True),
):
    register_architecture(Architecture(_name, _label, _upstream))
