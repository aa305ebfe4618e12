"""Trainers with dictionary_learning's contract: pass the class as ``trainer=`` to ``trainSAE``.

Each takes the keywords of its typed configuration (a dataclass with a docstring per field).
"""

from .common import TrainerConfig
from .matryoshka_batch_top_k import MatryoshkaBatchTopKConfig, MatryoshkaBatchTopKTrainer
from .matryoshka_log_sparsity import MatryoshkaLogSparsityConfig, MatryoshkaLogSparsityTrainer

__all__ = [
    "MatryoshkaBatchTopKTrainer",
    "MatryoshkaBatchTopKConfig",
    "MatryoshkaLogSparsityTrainer",
    "MatryoshkaLogSparsityConfig",
    "TrainerConfig",
]
