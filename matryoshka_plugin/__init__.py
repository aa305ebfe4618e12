"""Matryoshka sparse autoencoders for dictionary_learning, SAELens and SAEBench.

    from dictionary_learning.training import trainSAE
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer
    trainSAE(data=buffer, trainer_configs=[dict(trainer=MatryoshkaBatchTopKTrainer, ...)], ...)
    ae, cfg = matryoshka_plugin.load_dictionary("runs/x/trainer_0")
    matryoshka_plugin.export_to_saelens("runs/x/trainer_0", "saelens/x")  # stock SAELens folder
    matryoshka_plugin.run_saebench({"x": "runs/x/trainer_0"}, "eval_results")  # SAEBench's evals

The public names load on first use: ``import matryoshka_plugin`` imports neither torch nor
dictionary_learning, nnsight, SAELens or SAEBench, and changes nothing outside the package (no
import hook, no allocator setting). The SAELens architecture ``matryoshka_jumprelu`` is
registered by ``import matryoshka_plugin.saelens`` or ``matryoshka_plugin.register_saelens_architecture()``
(the package's own SAELens and SAEBench functions do it themselves): do one of them before
``SAE.load_from_disk`` on a folder exported with ``architecture="matryoshka_jumprelu"``.
``matryoshka_plugin.reuse_host_memory()`` opts in to faster CPU steps (docs/speed.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "MatryoshkaBatchTopKTrainer": "trainers",
    "MatryoshkaLogSparsityTrainer": "trainers",
    "MatryoshkaBatchTopKConfig": "trainers",
    "MatryoshkaLogSparsityConfig": "trainers",
    "MatryoshkaBatchTopKSAE": "sae",
    "MatryoshkaLogSparsitySAE": "sae",
    "train": "training",
    "ActivationSource": "activation_source",
    "load_dictionary": "checkpoints",
    "register_dictionary_class": "checkpoints",
    "Architecture": "registry",
    "register_architecture": "registry",
    "export_to_saelens": "saelens",
    "import_from_saelens": "saelens",
    "load_matryoshka_saelens": "saelens",
    "publish_to_huggingface": "saelens",
    "register_saelens_architecture": "saelens",
    "MatryoshkaJumpReLUSAE": "saelens",
    "MatryoshkaJumpReLUSAEConfig": "saelens",
    "run_saebench": "saebench",
    "PrefixWeights": "prefixes",
    "PrefixSampler": "prefixes",
    "prefix_mse": "prefix_loss",
    "PrefixLoss": "prefix_loss",
    "SparseLatents": "sparse_latents",
    "mean_max_correlation": "analysis",
    "prefix_fvu": "analysis",
    "cofiring_edges": "analysis",
    "write_tree_view": "tree_view",
    "ActivationError": "errors",
    "CheckpointError": "errors",
    "TrainingError": "errors",
    "SAEBenchError": "errors",
    "reuse_host_memory": "host_memory",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'matryoshka_plugin' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .activation_source import ActivationSource
    from .analysis import cofiring_edges, mean_max_correlation, prefix_fvu
    from .checkpoints import load_dictionary, register_dictionary_class
    from .errors import ActivationError, CheckpointError, SAEBenchError, TrainingError
    from .host_memory import reuse_host_memory
    from .prefix_loss import PrefixLoss, prefix_mse
    from .prefixes import PrefixSampler, PrefixWeights
    from .registry import Architecture, register_architecture
    from .sae import MatryoshkaBatchTopKSAE, MatryoshkaLogSparsitySAE
    from .tree_view import write_tree_view
    from .saebench import run_saebench
    from .saelens import (
        MatryoshkaJumpReLUSAE,
        MatryoshkaJumpReLUSAEConfig,
        export_to_saelens,
        import_from_saelens,
        load_matryoshka_saelens,
        publish_to_huggingface,
        register_saelens_architecture,
    )
    from .sparse_latents import SparseLatents
    from .trainers import (
        MatryoshkaBatchTopKConfig,
        MatryoshkaBatchTopKTrainer,
        MatryoshkaLogSparsityConfig,
        MatryoshkaLogSparsityTrainer,
    )
    from .training import train