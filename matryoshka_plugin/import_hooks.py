"""Run a callback right after a module is first imported (a post-import hook).

``import matryoshka_plugin`` must make SAELens able to load ``matryoshka_jumprelu`` folders, but
importing SAELens costs seconds. So the package registers its architecture at once if SAELens
is already imported, and otherwise the moment anything imports it, before that import returns.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from typing import Callable

__all__ = ["when_imported"]

_lock = threading.Lock()


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the other finders and wraps its loader to call back once it ran."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib protocol
        if fullname != self.name:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
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
            finder.callback()

        spec.loader.exec_module = exec_then_call  # loaders are per module: nothing else is wrapped
        return spec


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` now if ``name`` is imported, else right after its first import."""
    if name in sys.modules:
        callback()
        return
    with _lock:
        sys.meta_path.insert(0, _AfterImportFinder(name, callback))
