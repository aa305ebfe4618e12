"""Import cost and the SAELens registration that importing the package promises."""

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
def test_import_loads_no_heavy_library_and_registers_saelens_on_its_import():
    got = run(f"""
        import json, sys
        import matryoshka_plugin
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        from sae_lens.registry import SAE_CLASS_REGISTRY
        from sae_lens import SAE
        cls = SAE_CLASS_REGISTRY.get("matryoshka_jumprelu", (None,))[0]
        print(json.dumps({{"loaded": loaded, "cls": getattr(cls, "__qualname__", None),
                          "public": sorted(n for n in matryoshka_plugin.__all__
                                           if getattr(matryoshka_plugin, n, None) is None)}}))
    """)
    assert got["loaded"] == []
    assert got["cls"] == "MatryoshkaJumpReLUSAE"
    assert got["public"] == []  # every public name resolves


@pytest.mark.slow  # a fresh process imports SAELens
def test_registers_at_once_when_saelens_came_first():
    got = run("""
        import json
        import sae_lens
        from sae_lens.registry import SAE_CLASS_REGISTRY
        before = "matryoshka_jumprelu" in SAE_CLASS_REGISTRY
        import matryoshka_plugin
        print(json.dumps({"before": before, "after": "matryoshka_jumprelu" in SAE_CLASS_REGISTRY}))
    """)
    assert got == {"before": False, "after": True}


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
        from matryoshka_plugin import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer, MatryoshkaBatchTopKSAE
        loaded = [m for m in {DEFERRED!r} if m in sys.modules]
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
        }}))
    """)
    assert got == {"loaded": [], "trainer": True, "dictionary": True, "same_module": True}


def test_dictionary_learning_imported_first_is_used_as_is():
    got = run("""
        import json, sys
        import dictionary_learning.trainers.trainer as upstream
        from matryoshka_plugin import MatryoshkaBatchTopKTrainer
        print(json.dumps({"same": issubclass(MatryoshkaBatchTopKTrainer, upstream.SAETrainer)}))
    """)
    assert got == {"same": True}
