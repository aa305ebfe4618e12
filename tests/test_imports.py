"""Import cost, and that importing the package changes nothing global (no import hook, no SAELens
registration until asked)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

HEAVY = ["torch", "sae_lens", "sae_bench", "nnsight", "dictionary_learning", "transformer_lens", "numba",
         "matplotlib", "transformers"]


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh process imports SAELens
def test_import_loads_no_heavy_library_and_registers_with_saelens_only_when_asked():
    got = run(f"""
        import json, sys
        hooks = list(sys.meta_path)
        import matryoshka_plugin
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        same_hooks = sys.meta_path == hooks
        from sae_lens.registry import SAE_CLASS_REGISTRY
        from sae_lens import SAE
        after_saelens = "matryoshka_jumprelu" in SAE_CLASS_REGISTRY
        matryoshka_plugin.register_saelens_architecture()
        cls = SAE_CLASS_REGISTRY.get("matryoshka_jumprelu", (None,))[0]
        print(json.dumps({{"loaded": loaded, "same_hooks": same_hooks, "after_saelens": after_saelens,
                          "cls": getattr(cls, "__qualname__", None),
                          "public": sorted(n for n in matryoshka_plugin.__all__
                                           if getattr(matryoshka_plugin, n, None) is None)}}))
    """)
    assert got["loaded"] == []
    assert got["same_hooks"] is True  # no finder added to sys.meta_path
    assert got["after_saelens"] is False  # importing SAELens afterwards registers nothing either
    assert got["cls"] == "MatryoshkaJumpReLUSAE"
    assert got["public"] == []  # every public name resolves


def test_import_adds_no_import_hook():
    got = run("""
        import json, sys
        hooks = list(sys.meta_path)
        import matryoshka_plugin
        print(json.dumps({"same": sys.meta_path == hooks}))
    """)
    assert got == {"same": True}


def test_cli_help_does_not_import_the_libraries():
    got = run(f"""
        import json, sys, contextlib, io
        from matryoshka_plugin.__main__ import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["--help"])
            except SystemExit:
                pass
        print(json.dumps({{"loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert got["loaded"] == []


@pytest.mark.slow  # a fresh process imports SAELens
def test_importing_the_adapter_first_registers_once():
    """The adapter imports SAELens itself: the hook must not re-enter the half-imported adapter."""
    got = run("""
        import json
        from matryoshka_plugin.saelens import MatryoshkaJumpReLUSAE
        from sae_lens.registry import SAE_CLASS_REGISTRY
        print(json.dumps({"same": SAE_CLASS_REGISTRY["matryoshka_jumprelu"][0] is MatryoshkaJumpReLUSAE}))
    """)
    assert got == {"same": True}


# What dictionary_learning/__init__ pulls in (nnsight, then transformers, scipy, datasets...).
DEFERRED = ["dictionary_learning", "dictionary_learning.trainers", "nnsight", "transformers", "scipy", "datasets",
            "numba", "sae_lens"]


def test_importing_a_trainer_loads_torch_but_not_dictionary_learnings_package():
    got = run(f"""
        import json, sys
        from importlib.machinery import PathFinder
        hooks = list(sys.meta_path)
        from matryoshka_plugin import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer, MatryoshkaBatchTopKSAE
        loaded = [m for m in {DEFERRED!r} if m in sys.modules]
        # import_leaf's one finder: just before the path finder that finds dictionary_learning
        added = [type(f).__name__ for f in sys.meta_path if f not in hooks]
        at = [i for i, f in enumerate(sys.meta_path) if f not in hooks]
        just_before = [sys.meta_path[i + 1] is PathFinder for i in at]
        # the classes subclassed are the ones dictionary_learning uses once it is imported
        from dictionary_learning.training import trainSAE
        import dictionary_learning.trainers.trainer, dictionary_learning.dictionary
        from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE as Upstream
        trainer_module = dictionary_learning.trainers.trainer
        print(json.dumps({{
            "loaded": loaded,
            "trainer": issubclass(MatryoshkaBatchTopKTrainer, trainer_module.SAETrainer)
                       and issubclass(MatryoshkaLogSparsityTrainer, trainer_module.SAETrainer),
            "dictionary": issubclass(MatryoshkaBatchTopKSAE, dictionary_learning.dictionary.Dictionary)
                          and issubclass(Upstream, dictionary_learning.dictionary.Dictionary),
            "same_module": sys.modules["dictionary_learning.trainers.trainer"] is trainer_module,
            "hook": [added, at, just_before],
            # the finder removed itself once it fired (the libraries may add their own)
            "hooks_after": not any(type(f).__name__ == "_AfterImportFinder" for f in sys.meta_path),
        }}))
    """)
    added, at, just_before = got.pop("hook")
    assert added == ["_AfterImportFinder"] and at[0] > 0 and just_before == [True]  # not at the front
    assert got == {"loaded": [], "trainer": True, "dictionary": True, "same_module": True, "hooks_after": True}


def test_dictionary_learning_imported_first_is_used_as_is():
    got = run("""
        import json, sys
        import dictionary_learning.trainers.trainer as upstream
        from matryoshka_plugin import MatryoshkaBatchTopKTrainer
        print(json.dumps({"same": issubclass(MatryoshkaBatchTopKTrainer, upstream.SAETrainer)}))
    """)
    assert got == {"same": True}
