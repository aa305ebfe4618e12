"""Import hooks: a callback right after a module is first imported, and a leaf module imported
without its package.

``import matryoshka_plugin`` must make SAELens able to load ``matryoshka_jumprelu`` folders, but
importing SAELens costs seconds. So the package registers its architecture at once if SAELens
is already imported, and otherwise the moment anything imports it, before that import returns.

The trainers and SAEs subclass two classes of dictionary_learning modules that import only torch
and einops, but ``dictionary_learning/__init__`` imports nnsight and with it transformers (seconds).
:func:`import_leaf` loads such a module alone, under its own name, so the classes are the very ones
dictionary_learning uses once it is imported.
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
    """Finds ``name`` with the other finders and wraps its loader to call back once it ran."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callbacks = name, [callback]

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib protocol
        if fullname != self.name:
            return None
        spec = None
        for finder in sys.meta_path:
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


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` now if ``name`` is imported, else right after its first import."""
    if name in sys.modules:
        callback()
        return
    with _lock:
        for finder in sys.meta_path:
            if isinstance(finder, _AfterImportFinder) and finder.name == name:
                finder.callbacks.append(callback)  # one finder per name: they would find each other
                return
        sys.meta_path.insert(0, _AfterImportFinder(name, callback))


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
