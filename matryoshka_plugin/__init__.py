"""Matryoshka sparse autoencoders for dictionary_learning, SAELens and SAEBench.

    from dictionary_learning.training import trainSAE
    from matryoshka_plugin import MatryoshkaBatchTopKTrainer
    trainSAE(data=buffer, trainer_configs=[dict(trainer=MatryoshkaBatchTopKTrainer, ...)], ...)
    ae, cfg = matryoshka_plugin.load_dictionary("runs/x/trainer_0")
"""

from .checkpoints import load_dictionary, register_dictionary_class
from .errors import ActivationError, CheckpointError, TrainingError
from .prefix_loss import PrefixLoss, SparseLatents, prefix_mse
from .prefixes import PrefixSampler, PrefixWeights
from .sae import MatryoshkaBatchTopKSAE, MatryoshkaLogSparsitySAE
from .trainers import MatryoshkaBatchTopKTrainer, MatryoshkaLogSparsityTrainer

__version__ = "0.1.0"

__all__ = [
    "MatryoshkaBatchTopKTrainer",
    "MatryoshkaLogSparsityTrainer",
    "MatryoshkaBatchTopKSAE",
    "MatryoshkaLogSparsitySAE",
    "load_dictionary",
    "register_dictionary_class",
    "PrefixWeights",
    "PrefixSampler",
    "prefix_mse",
    "PrefixLoss",
    "SparseLatents",
    "ActivationError",
    "CheckpointError",
    "TrainingError",
]
