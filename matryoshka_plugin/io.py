"""File reading and writing shared by the whole package: state dicts, JSON, atomic files and folders.

Readers raise :class:`~matryoshka_plugin.errors.CheckpointError` naming the file and what is wrong
with it. Writers never leave a half-written file or folder behind: :func:`atomic_open` (and
:func:`atomic_torch_save`, :func:`atomic_write_json`) replace one file in a single rename;
:func:`atomic_folder` builds a whole folder in a temporary sibling and renames it into
place, replacing an existing folder only if it holds what an earlier run of the same writer put
there. New files and folders get the modes the umask gives them.

This module is a leaf: it imports only the standard library, torch, safetensors and ``errors``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import torch
from safetensors.torch import save_file

from .errors import CheckpointError

__all__ = [
    "UnsafeCheckpointError",
    "load_torch_file",
    "read_state_dict",
    "check_keys",
    "read_json",
    "read_json_object",
    "atomic_open",
    "atomic_torch_save",
    "atomic_write_json",
    "write_safetensors",
    "default_file_mode",
    "default_dir_mode",
    "fsync_dir",
    "FolderKind",
    "check_out_dir",
    "publish_folder",
    "atomic_folder",
]


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class UnsafeCheckpointError(CheckpointError):
    """``torch.load(weights_only=True)`` refused a file: besides tensors and plain containers it
    holds pickled Python objects, and unpickling those can run arbitrary code. Such a file is never
    loaded any other way."""


def _unsafe_globals(path: Path) -> list[str]:
    # Lists the pickle's imports without unpickling anything.
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a file that is not a zip archive, or a damaged one
        return []


def load_torch_file(path: str | Path, what: str = "torch file") -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU: tensors, numbers, strings and plain
    containers only. Raises :class:`UnsafeCheckpointError` for a file holding other pickled objects
    (refused, not run) and :class:`CheckpointError` for a missing or unreadable one (calling it
    ``what``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch raises this, and only this, when its restricted unpickler meets anything but
        # tensors and plain containers; its message suggests weights_only=False, which we never do.
        found = _unsafe_globals(path)
        holds = f"pickled Python objects ({', '.join(found)})" if found else "pickled data it cannot read safely"
        raise UnsafeCheckpointError(
            f"{path} was refused as unsafe: it holds {holds} besides tensors and plain containers, and "
            "unpickling those could run code. Files are loaded with torch.load(weights_only=True) only; "
            "do not load this one unless you wrote it yourself"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {e}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save``; raises :class:`CheckpointError` if unusable
    (:class:`UnsafeCheckpointError` if it holds pickled objects besides tensors)."""
    path = Path(path)
    state = load_torch_file(path, "weights file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def check_keys(state: dict, required: Iterable[str], path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the keys of ``required`` that ``state`` (read from
    ``path``) lacks."""
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; it holds {sorted(state)}")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; a missing or unparsable one raises :class:`CheckpointError` that calls
    it ``what`` (``"config file"``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {what}: {path}")
    try:
        text = path.read_text()
    except OSError as e:
        raise CheckpointError(f"{path} is not readable: {e}") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None


def read_json_object(path: str | Path) -> dict:
    """The JSON object in ``path``, or ``{}`` if the file is missing, unreadable or not an object
    (for checks that only ask whether a file says something)."""
    try:
        obj = read_json(path)
    except (CheckpointError, OSError):
        return {}
    return obj if isinstance(obj, dict) else {}


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


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


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` with safetensors and flush the file to disk. Not atomic by itself: it
    writes into the temporary folder of :func:`atomic_folder`."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (new names, renames) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderKind:
    """What a folder written by :func:`atomic_folder` holds. Only a folder of this kind
    written earlier is replaced on ``overwrite``."""

    writer: str
    """Who writes it, for error messages (``"matryoshka_plugin"``)."""
    what: str
    """What it is, for error messages (``"SAELens export"``)."""
    files: frozenset[str]
    """The only file names such a folder may hold."""
    is_ours: Callable[[Path], bool]
    """Whether a folder carries the writer's mark (it was not merely given the same file names)."""


def _listing(names: list[str], most: int = 12) -> str:
    shown = repr(names[:most])
    return shown if len(names) <= most else f"{shown[:-1]}, ... ({len(names) - most} more)]"


def check_out_dir(
    out_dir: Path,
    overwrite: bool,
    kind: FolderKind | None = None,
    *,
    counts: Callable[[str], bool] | None = None,
    remedy: str = "pass overwrite=True (--overwrite) to replace it",
) -> None:
    """Raise :class:`FileExistsError`, naming what the folder holds, unless ``out_dir`` is absent,
    an empty folder, or (with ``overwrite``) a folder that holds only what an earlier ``kind``
    written here put there.

    ``counts(name)`` picks the entries that make the folder taken (default: every entry; ``train``
    counts only what a run writes), ``remedy`` is the advice the error ends with.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if not out_dir.is_dir():
        return
    names = sorted(p.name for p in out_dir.iterdir() if counts is None or counts(p.name))
    if not names:
        return
    if not overwrite or kind is None:
        raise FileExistsError(f"{out_dir} already exists and is not empty: it holds {_listing(names)}; {remedy}")
    foreign = [n for n in names if n not in kind.files or not (out_dir / n).is_file()]
    if foreign:
        raise FileExistsError(
            f"refusing to overwrite {out_dir}: it holds files that no {kind.writer} {kind.what} writes: {foreign}; "
            "move them away or choose another folder"
        )
    if not kind.is_ours(out_dir):
        raise FileExistsError(
            f"refusing to overwrite {out_dir}: it was not written by {kind.writer}'s {kind.what} ({names}); "
            "remove it yourself or choose another folder"
        )


def _apply_umask(folder: Path) -> None:
    """Give a folder made by ``mkdtemp`` (0700) and its files the modes the umask gives new ones."""
    dir_mode, file_mode = default_dir_mode(), default_file_mode()
    for p in folder.rglob("*"):
        os.chmod(p, dir_mode if p.is_dir() else file_mode)
    os.chmod(folder, dir_mode)


def _rename_into_place(src: Path, dst: Path) -> None:
    """``rename(src, dst)``, failing if ``dst`` holds anything. POSIX rename checks that atomically:
    it replaces only an empty folder, so of two writers to the same new folder exactly one wins."""
    if os.name == "nt" and dst.is_dir() and not any(dst.iterdir()):
        os.rmdir(dst)  # Windows renames onto nothing existing
    try:
        os.rename(src, dst)
    except OSError as e:
        if isinstance(e, FileExistsError) or e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise FileExistsError(
                f"{dst} was written by someone else while this export ran; it was left as it is and nothing of "
                "this one was kept"
            ) from None
        raise


def publish_folder(tmp: Path, out_dir: Path, overwrite: bool, kind: FolderKind | None) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``; with ``overwrite`` an existing one is first
    renamed aside and only deleted once the new folder is in place, so ``out_dir`` is always absent
    or complete, and a folder that appeared meanwhile is never replaced unseen."""
    fsync_dir(tmp)
    old = None
    if overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        check_out_dir(out_dir, overwrite, kind)  # again: files may have been added meanwhile
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        try:
            os.rename(out_dir, old)
        except FileNotFoundError:  # another writer moved it first
            old = None
    try:
        _rename_into_place(tmp, out_dir)
    except BaseException:
        if old is not None:
            if out_dir.exists():  # another writer's folder is there now; ours is superseded too
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, out_dir)
        raise
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(out_dir: str | Path, overwrite: bool, kind: FolderKind) -> Iterator[Path]:
    """Create ``out_dir`` atomically: ``with atomic_folder(out_dir, overwrite, kind) as tmp:``
    hands out a temporary sibling folder for the caller to fill, and on leaving the block without
    an error renames it into place (:func:`publish_folder`). The caller keeps control while it
    writes; nothing here calls back into it.

    ``out_dir`` must be absent or empty, or with ``overwrite`` a folder of this ``kind``
    (:func:`check_out_dir`, checked on entry and again before the rename). On any error or
    interrupt the temporary folder is removed and ``out_dir`` keeps what it held. Of two writers
    racing to create the same folder one fails with :class:`FileExistsError`.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite, kind)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        extra = sorted(p.name for p in tmp.iterdir() if p.name not in kind.files)
        if extra:  # a folder holding these could not be overwritten later
            raise RuntimeError(f"internal error: the {kind.what} wrote unexpected files {extra}")
        _apply_umask(tmp)
        check_out_dir(out_dir, overwrite, kind)  # fail early if something appeared meanwhile
        publish_folder(tmp, out_dir, overwrite, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
