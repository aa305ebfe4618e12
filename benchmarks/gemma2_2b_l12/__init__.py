"""Matryoshka vs standard SAEs on Gemma-2-2B layer 12, with SAEBench's evals.

    python -m benchmarks.gemma2_2b_l12 --config benchmarks/gemma2_2b_l12/config.toml [--dry-run]

See ``pipeline.py`` for the steps and ``config.toml`` for the paper settings.
"""

from pathlib import Path

from .config import BenchmarkConfig, ConfigError, load_config
from .pipeline import BenchmarkResult, HubModels, prepare, run_benchmark
from .plan import build_plan, estimate

DEFAULT_CONFIG = Path(__file__).with_name("config.toml")

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "ConfigError",
    "DEFAULT_CONFIG",
    "HubModels",
    "build_plan",
    "estimate",
    "load_config",
    "prepare",
    "run_benchmark",
]
