"""Trainers with dictionary_learning's contract: pass the class as ``trainer=`` to ``trainSAE``."""

from .matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
from .matryoshka_log_sparsity import MatryoshkaLogSparsityTrainer

__all__ = ["MatryoshkaBatchTopKTrainer", "MatryoshkaLogSparsityTrainer"]
