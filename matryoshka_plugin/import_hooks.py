"""A leaf module imported without its package (:func:`import_leaf`).

The trainers and SAEs subclass two classes of dictionary_learning modules that import only torch
and einops, but ``dictionary_learning/__init__`` imports nnsight and with it transformers (seconds).
:func:`import_leaf` loads such a module alone, under its own name, so the classes are the very ones
dictionary_learning uses once it is imported.

Why an import hook (:func:`when_imported`) and nothing simpler: a module found in ``sys.modules``
is not set as an attribute of its parent package when that package is imported later, so after
``import dictionary_learning`` the name ``dictionary_learning.trainers.trainer`` would be missing.
Only the import system sees that later import, whoever makes it (the user, trainSAE), and only a
``sys.meta_path`` finder can act right after it. The finder is installed only by
:func:`import_leaf`, only while the package is not imported yet; it stands just before the finder
that finds the package (the others keep their places and see every other import first), answers
for that one name, and removes itself once it has fired.

SAELens' architecture registration needs no hook: ``matryoshka_plugin.saelens`` registers when
imported, and the package's own SAELens and SAEBench functions import it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable

__all__ = ["when_imported", "import_leaf"]

_lock = threading.Lock()


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the finders behind it and wraps its loader to call back once it ran."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callbacks = name, [callback]

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib protocol
        if fullname != self.name:
            return None
        spec = None
        behind = sys.meta_path[sys.meta_path.index(self) + 1:] if self in sys.meta_path else sys.meta_path
        for finder in behind:
            if isinstance(finder, _AfterImportFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        finder = self

        def exec_then_call(module):
            exec_module(module)
            with _lock:
                if finder in sys.meta_path:
                    sys.meta_path.remove(finder)
            for callback in finder.callbacks:
                callback()

        spec.loader.exec_module = exec_then_call  # loaders are per module: nothing else is wrapped
        return spec


def _owner_index(name: str) -> int:
    """Position in ``sys.meta_path`` of the finder that finds top-level module ``name`` now
    (the end if none does)."""
    for i, finder in enumerate(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None or isinstance(finder, _AfterImportFinder):
            continue
        try:
            if find_spec(name, None) is not None:
                return i
        except Exception:  # a third-party finder that fails here would fail the import too
            continue
    return len(sys.meta_path)


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` now if top-level module ``name`` is imported, else right after its
    first import (a finder placed just before the one that finds ``name``; see the module docs)."""
    if name in sys.modules:
        callback()
        return
    with _lock:
        for finder in sys.meta_path:
            if isinstance(finder, _AfterImportFinder) and finder.name == name:
                finder.callbacks.append(callback)  # one finder per name: they would find each other
                return
        sys.meta_path.insert(_owner_index(name), _AfterImportFinder(name, callback))


def import_leaf(name: str) -> ModuleType:
    """Import the module ``name`` (``"pkg.sub.leaf"``, a ``.py`` file that imports nothing of its
    package) without running its packages' ``__init__``, if they are not imported yet.

    The module is registered in ``sys.modules`` under ``name``, so the package's own modules reuse
    it (the same classes, ``isinstance`` holds). When the top package is imported later, the leaf's
    parent packages are imported with it, so ``pkg.sub.leaf`` resolves as attributes as usual.
    """
    module = sys.modules.get(name)
    if module is not None:
        return module
    top, _, _ = name.partition(".")
    parent, _, leaf = name.rpartition(".")
    if not parent or top in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.find_spec(top)  # a top-level name is found without being imported
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0], *name.split(".")[1:-1], f"{leaf}.py") if locations else None
    if path is None or not path.is_file():
        return importlib.import_module(name)
    leaf_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(leaf_spec)
    sys.modules[name] = module
    try:
        leaf_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise

    def attach() -> None:
        # `import pkg` alone does not import pkg.sub; with the leaf already in sys.modules,
        # `import pkg.sub.leaf` would not either, and `pkg.sub.leaf` would be missing.
        importlib.import_module(parent)
        setattr(sys.modules[parent], leaf, module)

    when_imported(top, attach)
    return module
