"""``python -m benchmarks.real_model [--tokens N] [--variants ...] [--log KEY=VALUE ...]``

Builds (once) and caches MiniLM block-3 activations under /tmp/minilm_acts (or $MINILM_ACTS),
trains the trainers on them with dictionary_learning's trainSAE and prints held-out L0, dead
latents and FVU. Results land in --out/results.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..harness import option, parse_config
from .compare import DEFAULT_VARIANTS, VARIANTS, add_meta_structure, run


@dataclass
class RealModelStudy:
    """The command line of ``python -m benchmarks.real_model``."""

    out: str = option("outputs/real_model", "output folder")
    tokens: int = option(1_048_576, "training tokens")
    held_out_tokens: int = option(65_536, "held-out tokens")
    batch_size: int = option(1024, "tokens per step")
    dict_size: int = option(4096, "latents")
    k: int = option(32, "BatchTopK k and the log-sparsity target_l0")
    variants: list[Literal[VARIANTS]] = option(
        default_factory=lambda: list(DEFAULT_VARIANTS), help="trainers to compare")
    log: dict[str, Any] = option(default_factory=dict, help="extra MatryoshkaLogSparsityTrainer keyword, e.g. --log lr=3e-3")
    extra_log: list[dict[str, Any]] = option(
        default_factory=list, metavar="JSON",
        help='more log-sparsity trainers, a list of keyword dicts, e.g. \'[{"lr": 3e-3}]\'')
    meta_structure_seeds: list[int] | None = option(
        None, "also run SAEBench's meta-structure eval on every decoder, one meta-SAE per seed", metavar="SEED")
    meta_structure_steps: int | None = option(None, "meta-SAE training steps (default: SAEBench's 1500 of 1024 decoder rows)")
    meta_structure_only: bool = option(False, "skip training: add the meta-structure eval to the SAEs already in --out")
    dtype: Literal["float32", "bfloat16"] = option(
        "float32", "trainSAE's autocast_dtype (bfloat16: bf16 batches on CPU, bf16 encoder matmuls)")
    threads: int = option(2, "torch threads")
    seed: int = option(0, "training seed")


def main(argv: list[str] | None = None) -> int:
    a = parse_config(RealModelStudy, argv, prog="python -m benchmarks.real_model", description=__doc__.split("\n\n")[1])
    if a.meta_structure_only and not a.meta_structure_seeds:
        raise SystemExit("python -m benchmarks.real_model: error: --meta-structure-only needs --meta-structure-seeds")
    torch.set_num_threads(a.threads)
    if not a.meta_structure_only:
        run(a.out, a.tokens, a.held_out_tokens, a.batch_size, a.dict_size, a.k, tuple(a.variants), a.log,
            seed=a.seed, extra_log=a.extra_log, autocast_dtype=getattr(torch, a.dtype))
    if a.meta_structure_seeds:
        # SAEBench's settings; bf16 autocast is slow on a CPU
        steps = {} if a.meta_structure_steps is None else {"train_steps": a.meta_structure_steps}
        add_meta_structure(a.out, a.meta_structure_seeds, autocast=False, **steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
