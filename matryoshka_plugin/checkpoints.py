"""Reading ``trainSAE`` output folders: ``load_dictionary`` and ``register_dictionary_class``.

A ``trainer_i`` folder written by dictionary_learning's ``trainSAE`` holds ``config.json``
(``{"trainer": trainer.config, "buffer": ...}``), the final ``ae.pt`` and optionally
``checkpoints/ae_{step}.pt``. Its ``dict_class`` is looked up in :mod:`~matryoshka_plugin.registry`:
this package's classes (their configs carry ``"package": "matryoshka_plugin"``) and registered
ones load with their own loader, dictionary_learning's classes with dictionary_learning's loader.
"""

from __future__ import annotations

import operator
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from . import sae as _sae  # noqa: F401  # the package's SAE classes hand the registry their loaders
from .errors import CheckpointError
from .io import UnsafeCheckpointError, read_json, read_state_dict
from .registry import Architecture, architecture_for, architectures, register_architecture

__all__ = [
    "load_dictionary",
    "register_dictionary_class",
    "read_config",
    "other_folder_kind",
    "CheckpointError",
]


def register_dictionary_class(name: str, loader: Callable[[Path, dict, Any], torch.nn.Module]) -> None:
    """Register how to load folders whose ``config["trainer"]["dict_class"] == name``: an
    :class:`~matryoshka_plugin.registry.Architecture` labelled ``name`` with this loader and no
    SAELens converter (register an ``Architecture`` yourself to add one).

    Registering the same loader twice is harmless; a different loader for a taken name raises.
    """
    register_architecture(Architecture(name, name, load=loader))


_TRAINER_FOLDER = re.compile(r"^trainer_(\d+)$")
# SAELens' file names (sae_lens.constants), here without importing sae_lens.
_SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")


def other_folder_kind(folder: str | Path, expected: str) -> str | None:
    """What ``folder`` holds when it is not the kind of folder a loader ``expected``
    (``"trainer"``: a ``trainer_i`` folder; ``"saelens"``: a SAELens SAE folder), and what to call
    instead; ``None`` when it is none of the kinds known here."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    trainers = sorted(
        (p.name for p in folder.iterdir()
         if p.is_dir() and _TRAINER_FOLDER.match(p.name) and (p / "config.json").is_file()),
        key=lambda name: int(name[8:]),
    )
    if trainers:
        shown = ", ".join(trainers[:8]) + (f", ... ({len(trainers) - 8} more)" if len(trainers) > 8 else "")
        return (f"{folder} is a training run's folder, not one SAE's: it holds {shown}; pass one of them, "
                f"e.g. {folder / trainers[0]}")
    if expected != "saelens" and all((folder / name).is_file() for name in _SAELENS_FILES):
        return (f"{folder} is a SAELens SAE folder ({', '.join(_SAELENS_FILES)}), not a trainSAE one: load it with "
                f"matryoshka_plugin.import_from_saelens({str(folder)!r}) (or sae_lens.SAE.load_from_disk)")
    if expected != "trainer" and (folder / "config.json").is_file():
        return (f"{folder} is a trainSAE folder (config.json, ae.pt), not a SAELens one: load it with "
                f"matryoshka_plugin.load_dictionary({str(folder)!r}), or make a SAELens folder of it with "
                "matryoshka_plugin.export_to_saelens")
    return None


def read_config(folder: str | Path) -> dict:
    """Read ``config.json`` of a ``trainer_i`` folder."""
    path = Path(folder) / "config.json"
    config = read_json(path, "config file")
    if not isinstance(config, dict) or not isinstance(config.get("trainer"), dict):
        raise CheckpointError(f"{path} has no 'trainer' section; is it a trainSAE output folder?")
    if "dict_class" not in config["trainer"]:
        raise CheckpointError(f"{path} does not name a dict_class under 'trainer'")
    return config


def load_dictionary(
    path: str | Path, device: str | torch.device = "cpu", checkpoint: int | str | None = None
) -> tuple[torch.nn.Module, dict]:
    """Load the SAE of a ``trainer_i`` folder written by ``trainSAE``; returns ``(ae, config)``.

    Args:
        path: the ``trainer_i`` folder.
        device: where to put the SAE.
        checkpoint: a step saved under ``checkpoints/ae_{step}.pt`` instead of the final ``ae.pt``,
            or ``"latest"`` for the newest complete one there: files cut short (a run killed
            while writing them) are skipped with a warning.

    This package's SAE classes (and any registered with :func:`register_dictionary_class`)
    load here; dictionary_learning's own classes are handed to its ``load_dictionary``.
    ``activation_dim`` and ``dict_size`` in ``config.json`` must match the weights.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"no such SAE folder: {folder}")
    if not (folder / "config.json").is_file():
        hint = other_folder_kind(folder, "trainer")
        if hint is not None:
            raise CheckpointError(hint)
    config = read_config(folder)
    trainer_cfg = config["trainer"]
    dict_class = trainer_cfg["dict_class"]
    arch = architecture_for(trainer_cfg)
    upstream = arch is not None and arch.upstream
    if upstream and checkpoint is not None:
        raise CheckpointError("checkpoint= is only supported for this package's SAE classes")
    weights = _weights_path(folder, checkpoint)
    if not upstream:
        if arch is None or arch.load is None:
            known = sorted({a.dict_class for a in architectures()})
            raise CheckpointError(f"unknown dict_class {dict_class!r} in {folder}/config.json; known: {known}")
        ae = arch.load(weights, trainer_cfg, device)
    else:
        from dictionary_learning.utils import load_dictionary as upstream_load

        read_state_dict(weights)  # a clear error for a missing or corrupt file first
        try:
            ae, config = upstream_load(str(folder), device=str(device))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"dictionary_learning could not load {folder}: {e}") from None
    _check_shapes(ae, trainer_cfg, folder)
    return ae, config


def _check_shapes(ae: torch.nn.Module, trainer_cfg: dict, folder: Path) -> None:
    # The loaders size the SAE from the weights; a config that disagrees describes another SAE.
    for key in ("activation_dim", "dict_size"):
        said, actual = trainer_cfg.get(key), getattr(ae, key, None)
        if said is None or actual is None:
            continue
        if isinstance(said, bool) or not isinstance(said, (int, float)) or int(said) != int(actual):
            raise CheckpointError(
                f"shape mismatch in {folder}: config.json says {key}={said} but the weights have {int(actual)}"
            )


_CHECKPOINT_NAME = re.compile(r"^ae_(\d+)\.pt$")


def _weights_path(folder: Path, checkpoint: int | str | None) -> Path:
    if checkpoint is None:
        return folder / "ae.pt"
    if checkpoint == "latest":
        return _latest_checkpoint(folder)
    try:
        step = operator.index(checkpoint)
    except TypeError:
        raise CheckpointError(f"checkpoint must be a step (an integer) or 'latest', got {checkpoint!r}") from None
    return folder / "checkpoints" / f"ae_{step}.pt"


def _latest_checkpoint(folder: Path) -> Path:
    """The newest ``checkpoints/ae_{step}.pt`` that was written to the end."""
    ckpt_dir = folder / "checkpoints"
    steps = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _CHECKPOINT_NAME.match(p.name)
            if m and p.is_file():
                steps.append((int(m.group(1)), p))
    if not steps:
        raise CheckpointError(f"no checkpoints (checkpoints/ae_STEP.pt) in {folder}")
    skipped = []
    for _, p in sorted(steps, reverse=True):
        if _is_complete(p):
            return p
        warnings.warn(f"skipping {p}: truncated or corrupt (was the run killed while writing it?)", stacklevel=4)
        skipped.append(p.name)
    raise CheckpointError(f"every checkpoint in {ckpt_dir} is truncated or corrupt: {skipped}")


def _is_complete(path: Path) -> bool:
    # torch.save writes a zip archive whose central directory comes last, so a file cut short has
    # none; reading just the directory avoids loading the tensors twice. Other formats are read fully.
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return bool(z.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    try:
        read_state_dict(path)
    except UnsafeCheckpointError:
        raise  # refused, not damaged: never skipped as a truncated file
    except CheckpointError:
        return False
    return True
