"""Lower modules do not call back up (issue 27, item 8; docs/development.md, "Two walks"): the
version lives in a leaf, io hands out its temporary folder instead of calling its caller's
writer, and the registry is handed its loaders and converters by the modules that define them."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

import matryoshka_plugin
from matryoshka_plugin import io
from matryoshka_plugin.io import FolderKind

PACKAGE = pathlib.Path(matryoshka_plugin.__file__).parent
KIND = FolderKind("test", "test folder", files=frozenset({"a.json", "b.json"}), is_ours=lambda d: True)


def _imports_from_root(path: pathlib.Path) -> list[int]:
    """Lines importing a name defined in the package root (``from .. import __version__``); importing
    a submodule (``from . import sae``) is not that."""
    depth = len(path.relative_to(PACKAGE).parts)  # 1: a top-level module, 2: in a subpackage
    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    return [n.lineno for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
            and ((n.level == depth and not n.module) or n.module == "matryoshka_plugin")
            and any(a.name not in submodules for a in n.names)]


def test_the_version_is_a_leaf_and_nothing_imports_the_package_root():
    from matryoshka_plugin._version import __version__

    assert matryoshka_plugin.__version__ == __version__
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert f'version = "{__version__}"' in pyproject
    found = {str(p.relative_to(PACKAGE)): _imports_from_root(p) for p in sorted(PACKAGE.rglob("*.py"))
             if p.name != "__init__.py" or p.parent != PACKAGE}
    assert not any(found.values()), found


def test_atomic_folder_publishes_on_success_and_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with io.atomic_folder(out, False, KIND) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "a.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "a.json").read_text() == "{}"
    with pytest.raises(ZeroDivisionError):
        with io.atomic_folder(tmp_path / "other", False, KIND) as tmp:
            (tmp / "a.json").write_text("{}")
            1 / 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary folder is gone
    with pytest.raises(RuntimeError, match=r"unexpected files \['c.txt'\]"):
        with io.atomic_folder(tmp_path / "other", False, KIND) as tmp:
            (tmp / "c.txt").write_text("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with io.atomic_folder(out, True, KIND) as tmp:  # overwrite: the new folder replaces the old
        (tmp / "b.json").write_text("[]")
    assert sorted(p.name for p in out.iterdir()) == ["b.json"]
    assert not hasattr(io, "write_folder_atomically")  # no writer handed down to call back


def test_the_registry_holds_the_loaders_and_converters_it_was_handed():
    from matryoshka_plugin import registry
    from matryoshka_plugin.sae import MatryoshkaBatchTopKSAE, load_matryoshka_batch_topk
    from matryoshka_plugin.saelens import convert

    ours = registry.architecture_for({"dict_class": "MatryoshkaBatchTopKSAE", "package": registry.PACKAGE_MARK})
    assert ours.load is load_matryoshka_batch_topk  # the function itself, not a wrapper importing it
    assert ours.to_saelens is convert.matryoshka_batch_topk
    assert registry.architecture_for({"dict_class": "AutoEncoder"}).to_saelens is convert.standard
    assert registry.architecture_of(MatryoshkaBatchTopKSAE(4, 8, 2, [2, 6])) is ours
    source = (PACKAGE / "registry.py").read_text()
    assert "import_module" not in source and "matryoshka_plugin.sae:" not in source
    with pytest.raises(ValueError, match="not registered"):
        registry.provide("NoSuchSAE", load=load_matryoshka_batch_topk)


def test_loading_needs_no_converter_and_the_registry_stays_light(tmp_path):
    import subprocess
    import sys

    code = ("import json, sys\nimport matryoshka_plugin.registry as r\n"
            "light = [m for m in ('matryoshka_plugin.sae', 'matryoshka_plugin.saelens.convert') if m in sys.modules]\n"
            "from matryoshka_plugin import load_dictionary\n"
            "arch = r.architecture_for({'dict_class': 'MatryoshkaBatchTopKSAE', 'package': r.PACKAGE_MARK})\n"
            "print(json.dumps({'light': light, 'load': arch.load.__module__,"
            " 'convert': 'matryoshka_plugin.saelens.convert' in sys.modules}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.splitlines()[-1]) == {"light": [], "load": "matryoshka_plugin.sae", "convert": False}


def test_the_collectives_reduce_and_call_no_selection_back():
    """sparse_encoder selects this rank's top entries and hands them down to the collective, which
    only reduces: distributed.py imports nothing of the encoder."""
    tree = ast.parse((PACKAGE / "distributed.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
    assert "sparse_encoder" not in imported, imported
