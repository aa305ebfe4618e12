"""Matryoshka sparse autoencoders for dictionary_learning, SAELens and SAEBench.

    from dictionary_learning.training import trainSAE
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer
    trainSAE(data=buffer, trainer_configs=[dict(trainer=MatryoshkaBatchTopKTrainer, ...)], ...)
    ae, cfg = matryoshka_plugin.load_dictionary("runs/x/trainer_0")
    matryoshka_plugin.export_to_saelens("runs/x/trainer_0", "saelens/x")  # stock SAELens folder
    matryoshka_plugin.run_saebench({"x": "runs/x/trainer_0"}, "eval_results")  # SAEBench's evals

Importing the package registers the SAELens architecture ``matryoshka_jumprelu``.
"""

from .checkpoints import load_dictionary, register_dictionary_class
from .errors import ActivationError, CheckpointError, TrainingError
from .prefix_loss import PrefixLoss, prefix_mse
from .prefixes import PrefixSampler, PrefixWeights
from .sae import MatryoshkaBatchTopKSAE, MatryoshkaLogSparsitySAE
from .saelens import (
    MatryoshkaJumpReLUSAE,
    MatryoshkaJumpReLUSAEConfig,
    export_to_saelens,
    import_from_saelens,
    load_matryoshka_saelens,
    publish_to_huggingface,
    register_saelens_architecture,
)
from .saebench import SAEBenchError, run_saebench
from .sparse_latents import SparseLatents
from .trainers import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer

__version__ = "0.1.0"

__all__ = [
    "MatryoshkaBatchTopKTrainer",
    "MatryoshkaLogSparsityTrainer",
    "MatryoshkaBatchTopKSAE",
    "MatryoshkaLogSparsitySAE",
    "load_dictionary",
    "register_dictionary_class",
    "export_to_saelens",
    "import_from_saelens",
    "load_matryoshka_saelens",
    "publish_to_huggingface",
    "register_saelens_architecture",
    "MatryoshkaJumpReLUSAE",
    "MatryoshkaJumpReLUSAEConfig",
    "run_saebench",
    "SAEBenchError",
    "PrefixWeights",
    "PrefixSampler",
    "prefix_mse",
    "PrefixLoss",
    "SparseLatents",
    "ActivationError",
    "CheckpointError",
    "TrainingError",
]
