"""Exact resume: the full state of any trainer, and the run checkpoints :func:`~matryoshka_plugin.train` writes.

A run checkpoint is a folder ``<save_dir>/resume/step_<N>/`` holding ``run.pt`` (step, batches
consumed, the activation source's position, the norm factor, RNG states, each trainer's config),
one ``trainer_<i>.pt`` per trainer (:func:`trainer_state_dict`) and ``manifest.json``, the size
of every other file, checked before anything is loaded. Every file holds tensors, numbers, strings
and plain containers only and is read with ``torch.load(weights_only=True)``: a file holding other
pickled objects (which could run code when unpickled) is refused with
:class:`~matryoshka_plugin.io.UnsafeCheckpointError`, never loaded.
It is built in a hidden sibling folder and renamed into place, so a folder named ``step_<N>``
is complete unless the disk corrupted it afterwards; :meth:`RunCheckpoints.load_latest` then falls
back to the previous one with a warning.

Trainers of this package save their own state (``state_dict``); dictionary_learning's trainers
(which have none) are saved by :func:`trainer_state_dict` as far as their state can be reached:
the SAE, optimizer, scheduler and every counter or flag stored as a plain attribute.
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .errors import CheckpointError
from .io import UnsafeCheckpointError, atomic_torch_save, atomic_write_json, fsync_dir, load_torch_file, read_json

__all__ = [
    "RUN_STATE_FORMAT",
    "rng_state",
    "set_rng_state",
    "to_cpu",
    "check_same_config",
    "config_differences",
    "trainer_state_dict",
    "load_trainer_state",
    "RunCheckpoints",
    "LoadedCheckpoint",
]

# 2: RNG states as tensors and lists (format 1 pickled numpy arrays), sizes in manifest.json.
RUN_STATE_FORMAT = 2
MANIFEST = "manifest.json"
UPSTREAM_STATE_FORMAT = 1
# Config entries that may change between the interrupted and the resumed run.
VOLATILE_CONFIG_KEYS = frozenset({"device", "wandb_name", "package_version", "norm_factor"})
# Config entries a trainer leaves at ``None`` until it resolves them itself (after construction),
# so a fresh trainer says ``None`` where the checkpoint holds the resolved value: only
# MatryoshkaLogSparsityTrainer's ``dead_feature_threshold`` (set at the first step from the batch
# size). Every other setting is resolved in the config's ``__post_init__`` (``lr``, ``top_k_aux``,
# ``controller_rate``, ``device``) or is ``None`` by the user's choice (``balance_beta``,
# ``group_weights``, ``decay_start``, ``reorder_by``, ``k_anneal_steps``, ``target_l0``...), so a
# ``None`` there that the checkpoint does not share is a different run.
AUTO_RESOLVED_CONFIG_KEYS = frozenset({"dead_feature_threshold"})
# Attributes of an upstream trainer that are not training state (objects saved separately, or
# settings fixed at construction and checked through the config).
_UPSTREAM_SKIP = frozenset({"ae", "optimizer", "scheduler", "config", "logging_parameters"})


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor (nested in dicts, lists, tuples) copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    """The global random states a training step may draw from: torch (CPU and every CUDA
    device already initialised), numpy and Python's ``random``, as tensors, numbers and lists
    only, so a checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    key, pos, has_gauss, cached = np.random.get_state(legacy=True)[1:]
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        # numpy's MT19937 words are uint32: int64 holds them exactly.
        "numpy": {"keys": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: checkpoint X, now Y"`` for every config entry that differs (volatile entries such
    as the device or the package version aside; an entry of :data:`AUTO_RESOLVED_CONFIG_KEYS` that
    is ``None`` now and resolved in the checkpoint, the automatic dead-latent threshold, counts as
    equal)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in VOLATILE_CONFIG_KEYS:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, tuple):
            a = list(a)
        if isinstance(b, tuple):
            b = list(b)
        if key in AUTO_RESOLVED_CONFIG_KEYS and b is None and a not in (None, "<absent>"):
            continue
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


def check_same_config(saved: dict[str, Any], current: dict[str, Any], what: str = "trainer") -> None:
    """Raise :class:`CheckpointError` naming every difference between the two configs."""
    diffs = config_differences(saved, current)
    if diffs:
        raise CheckpointError(
            f"cannot resume: the {what}'s configuration differs from the checkpoint's ("
            + "; ".join(diffs) + "). Resume with the same settings, or start a new run in another save_dir."
        )


# ----------------------------------------------------------------------------------------------
# Any trainer's state
# ----------------------------------------------------------------------------------------------


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


def _upstream_config(trainer: Any) -> dict[str, Any]:
    cfg = dict(trainer.config)
    return {k: v for k, v in cfg.items() if _plain(v) or isinstance(v, dict)}


def trainer_state_dict(trainer: Any) -> dict[str, Any]:
    """The full training state of ``trainer``: its own ``state_dict()`` if it has one (this
    package's trainers), otherwise (dictionary_learning's trainers) the SAE, optimizer, scheduler and
    every plain attribute (tensors, numbers, flags) besides them, on the CPU."""
    if hasattr(trainer, "state_dict"):
        return trainer.state_dict()
    attributes = {
        name: to_cpu(value)
        for name, value in vars(trainer).items()
        if name not in _UPSTREAM_SKIP and not name.startswith("__") and _plain(value)
    }
    state = {
        "format": UPSTREAM_STATE_FORMAT,
        "trainer_class": type(trainer).__name__,
        "config": _upstream_config(trainer),
        "ae": to_cpu(trainer.ae.state_dict()),
        "attributes": attributes,
        "rng": rng_state(),
    }
    if getattr(trainer, "optimizer", None) is not None:
        state["optimizer"] = to_cpu(trainer.optimizer.state_dict())
    if getattr(trainer, "scheduler", None) is not None:
        state["scheduler"] = trainer.scheduler.state_dict()
    return state


def load_trainer_state(trainer: Any, state: dict[str, Any], restore_rng: bool = True) -> None:
    """Restore what :func:`trainer_state_dict` returned into a freshly built ``trainer`` of the same
    class and configuration (differences raise :class:`CheckpointError`)."""
    if hasattr(trainer, "load_state_dict"):
        trainer.load_state_dict(state, restore_rng=restore_rng)
        return
    if state.get("trainer_class") != type(trainer).__name__:
        raise CheckpointError(
            f"the checkpoint holds a {state.get('trainer_class')} state; this trainer is a {type(trainer).__name__}"
        )
    check_same_config(state["config"], _upstream_config(trainer))
    trainer.ae.load_state_dict(state["ae"])
    if "optimizer" in state:
        trainer.optimizer.load_state_dict(state["optimizer"])
    if "scheduler" in state:
        trainer.scheduler.load_state_dict(state["scheduler"])
    for name, saved in state["attributes"].items():
        current = getattr(trainer, name, None)
        if isinstance(current, torch.Tensor) and isinstance(saved, torch.Tensor):
            saved = saved.to(device=current.device, dtype=current.dtype)
        setattr(trainer, name, saved)
    if restore_rng:
        set_rng_state(state["rng"])


# ----------------------------------------------------------------------------------------------
# Run checkpoints
# ----------------------------------------------------------------------------------------------


class LoadedCheckpoint:
    """A complete run checkpoint found by :meth:`RunCheckpoints.load_latest`."""

    def __init__(self, path: Path, run: dict[str, Any], trainers: dict[int, dict[str, Any]]):
        self.path = path
        """The ``step_<N>`` folder."""
        self.run = run
        """``run.pt``: step, data position, norm factor, RNG states, configs."""
        self.trainers = trainers
        """Trainer index -> its state (only the indices asked for)."""

    @property
    def step(self) -> int:
        return int(self.run["step"])


class RunCheckpoints:
    """The ``resume/`` folder of a run: writes checkpoints atomically, keeps the newest ``keep``,
    finds the newest complete one.

    With several processes each writes the trainers it owns into the same hidden folder and the
    caller-provided ``barrier`` separates the writes from rank 0's publication, so the folder
    appears complete or not at all (a shared file system is assumed).
    """

    def __init__(self, root: str | Path, keep: int = 2):
        if int(keep) < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = int(keep)

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:09d}"

    def staging(self, step: int) -> Path:
        return self.root / f".{self.name(step)}.partial"

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)

    # -- writing ----------------------------------------------------------------------------

    def write_trainers(self, step: int, states: dict[int, dict[str, Any]]) -> None:
        """Write this process's trainer states into the step's hidden folder."""
        folder = self.staging(step)
        folder.mkdir(parents=True, exist_ok=True)
        for i, state in states.items():
            atomic_torch_save(state, folder / f"trainer_{i}.pt")

    def publish(self, step: int, run: dict[str, Any], n_trainers: int) -> Path:
        """Write ``run.pt`` and ``manifest.json`` (the sizes of ``run.pt`` and the trainer files)
        and rename the folder into place; then drop all but the newest ``keep`` checkpoints.
        Called by one process."""
        folder = self.staging(step)
        manifest = {}
        for i in range(n_trainers):
            f = folder / f"trainer_{i}.pt"
            if not f.is_file():
                raise CheckpointError(f"checkpoint at step {step}: {f} was not written")
            manifest[f.name] = f.stat().st_size
        atomic_torch_save({**run, "format": RUN_STATE_FORMAT, "step": step, "manifest": manifest}, folder / "run.pt")
        manifest["run.pt"] = (folder / "run.pt").stat().st_size
        atomic_write_json(manifest, folder / MANIFEST)
        return self.promote(step)

    def promote(self, step: int) -> Path:
        """Rename the step's hidden folder, once fully written, into place (replacing a folder of
        that step left by an earlier pass); then drop all but the newest ``keep`` checkpoints and
        any other hidden folder."""
        folder = self.staging(step)
        final = self.root / self.name(step)
        if final.exists():
            shutil.rmtree(final)
        folder.rename(final)
        fsync_dir(self.root)
        for old in self.complete()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

    # -- reading ----------------------------------------------------------------------------

    def _read(self, folder: Path, indices: Iterable[int]) -> LoadedCheckpoint:
        sizes = read_json(folder / MANIFEST, "checkpoint manifest") if (folder / MANIFEST).is_file() else None
        if sizes is not None:
            if not isinstance(sizes, dict) or "run.pt" not in sizes:
                raise CheckpointError(f"{folder / MANIFEST} does not list the checkpoint's files")
            _check_sizes(folder, sizes)
        try:
            run = load_torch_file(folder / "run.pt", "run state")
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(
                f"{e}. (Checkpoints written before RNG states were stored as tensors, run format 1, "
                "are all refused this way: start such a run again in a new save_dir.)"
            ) from None
        if not isinstance(run, dict) or run.get("format") != RUN_STATE_FORMAT:
            raise CheckpointError(f"{folder / 'run.pt'} is not a run checkpoint of format {RUN_STATE_FORMAT}")
        if sizes is None:
            raise CheckpointError(f"{folder} lacks {MANIFEST} (incomplete checkpoint?)")
        missing = sorted(set(run["manifest"]) - set(sizes))
        if missing:
            raise CheckpointError(f"{folder / MANIFEST} does not list {missing}")
        trainers = {i: load_torch_file(folder / f"trainer_{i}.pt", "trainer state") for i in indices}
        return LoadedCheckpoint(folder, run, trainers)

    def load_latest(
        self, indices: Iterable[int], agree: Callable[[bool], bool] = lambda ok: ok,
        folders: Iterable[Path] | None = None,
    ) -> LoadedCheckpoint | None:
        """The newest checkpoint whose files read back (``indices``: the trainers this process
        needs), falling back past unreadable ones with a warning; ``None`` if there is none. A file
        refused as unsafe (pickled objects besides tensors) raises
        :class:`~matryoshka_plugin.io.UnsafeCheckpointError` instead of being skipped.

        ``agree(ok)`` returns whether every process read the candidate (identity for one process),
        so all processes settle on the same step; ``folders`` (default :meth:`complete`) are the
        candidates, newest first: with several processes, rank 0's listing, so that every process
        tries the same ones whatever its own view of a shared file system.
        """
        indices = list(indices)
        for folder in self.complete() if folders is None else folders:
            unsafe = None
            try:
                found = self._read(folder, indices)
                ok = True
            except UnsafeCheckpointError as e:
                found, ok, unsafe = None, False, e
            except CheckpointError as e:
                found, ok, reason = None, False, str(e)
            if agree(ok):
                return found
            # A file refused as unsafe is not skipped like a damaged one: someone wrote it on purpose,
            # or the run is of an older format; either way the user must see it. Every process stops.
            if not agree(unsafe is None):
                if unsafe is not None:
                    raise unsafe
                raise UnsafeCheckpointError(f"another process refused a file of {folder} as unsafe")
            warnings.warn(
                f"skipping the unusable checkpoint {folder}: "
                + (reason if not ok else "another process could not read its part")
                + "; falling back to the previous one",
                stacklevel=2,
            )
        return None


def _check_sizes(folder: Path, sizes: dict[str, Any]) -> None:
    for name, size in sizes.items():
        f = folder / name
        if Path(name).name != name:
            raise CheckpointError(f"{folder}: the manifest names a file outside the folder: {name!r}")
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{f} is missing or has the wrong size (truncated?)")
