"""Reading ``trainSAE`` output folders: ``load_dictionary`` and the dictionary-class registry.

A ``trainer_i`` folder written by dictionary_learning's ``trainSAE`` holds ``config.json``
(``{"trainer": trainer.config, "buffer": ...}``), the final ``ae.pt`` and optionally
``checkpoints/ae_{step}.pt``. Our trainers mark their config with ``"package":
"matryoshka_plugin"``; every other folder is handed to dictionary_learning's own loader.
"""

from __future__ import annotations

import json
import operator
import os
import re
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import torch

from .errors import CheckpointError
from .sae import MatryoshkaBatchTopKSAE, MatryoshkaLogSparsitySAE

__all__ = [
    "load_dictionary",
    "register_dictionary_class",
    "DICTIONARY_CLASSES",
    "read_state_dict",
    "read_config",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_json",
    "default_file_mode",
    "default_dir_mode",
    "CheckpointError",
]

PACKAGE_MARK = "matryoshka_plugin"

# dict_class name -> loader(weights_path, trainer_config, device) -> nn.Module
DICTIONARY_CLASSES: dict[str, Callable[[Path, dict, Any], torch.nn.Module]] = {}


def register_dictionary_class(name: str, loader: Callable[[Path, dict, Any], torch.nn.Module]) -> None:
    """Register how to load folders whose ``config["trainer"]["dict_class"] == name``.

    Registering the same loader twice is harmless; a different loader for a taken name raises.
    """
    old = DICTIONARY_CLASSES.get(name)
    if old is not None and old is not loader:
        raise ValueError(f"dictionary class {name!r} is already registered")
    DICTIONARY_CLASSES[name] = loader


def _load_batch_topk(path: Path, cfg: dict, device) -> torch.nn.Module:
    return MatryoshkaBatchTopKSAE.from_pretrained(path, k=cfg.get("k"), device=device)


def _load_log_sparsity(path: Path, cfg: dict, device) -> torch.nn.Module:
    return MatryoshkaLogSparsitySAE.from_pretrained(path, device=device)


register_dictionary_class("MatryoshkaBatchTopKSAE", _load_batch_topk)
register_dictionary_class("MatryoshkaLogSparsitySAE", _load_log_sparsity)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save``; raises :class:`CheckpointError` if unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weights file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def check_keys(state: dict, required: Iterable[str], path: str | Path) -> None:
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it holds {sorted(state)}")


def read_config(folder: str | Path) -> dict:
    """Read ``config.json`` of a ``trainer_i`` folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"missing config file: {path}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
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
    config = read_config(folder)
    trainer_cfg = config["trainer"]
    dict_class = trainer_cfg["dict_class"]
    ours = trainer_cfg.get("package") == PACKAGE_MARK or dict_class not in _UPSTREAM_CLASSES
    if not ours and checkpoint is not None:
        raise CheckpointError("checkpoint= is only supported for this package's SAE classes")
    weights = _weights_path(folder, checkpoint)
    if ours:
        loader = DICTIONARY_CLASSES.get(dict_class)
        if loader is None:
            known = sorted(set(DICTIONARY_CLASSES) | _UPSTREAM_CLASSES)
            raise CheckpointError(f"unknown dict_class {dict_class!r} in {folder}/config.json; known: {known}")
        ae = loader(weights, trainer_cfg, device)
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
    except CheckpointError:
        return False
    return True


_UPSTREAM_CLASSES = {
    "AutoEncoder",
    "GatedAutoEncoder",
    "AutoEncoderNew",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
}


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """``open`` a temporary file beside ``path``; on success flush it to disk and rename it
    over ``path``, on any error (or interrupt) delete it. Readers see the old file or the
    complete new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; a new file follows the umask
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_json(obj: Any, path: str | Path, *, indent: int = 2, default: Callable[[Any], Any] | None = None) -> None:
    """``json.dump`` through :func:`atomic_open`."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, default=default)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, so not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open`` gives a new file under the current umask (``0o644`` for umask 022)."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder under the current umask (``0o755`` for umask 022)."""
    return 0o777 & ~_umask()
