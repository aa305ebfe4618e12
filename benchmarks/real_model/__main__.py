"""``python -m benchmarks.real_model [--tokens N] [--variants ...] [--log KEY=VALUE ...]``

Builds (once) and caches MiniLM block-3 activations under /tmp/minilm_acts (or $MINILM_ACTS),
trains the trainers on them with dictionary_learning's trainSAE and prints held-out L0, dead
latents and FVU. Results land in --out/results.json.
"""

from __future__ import annotations

import argparse
import ast
import json

import torch

from .compare import DEFAULT_VARIANTS, VARIANTS, add_meta_structure, run


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_model", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", default="outputs/real_model")
    p.add_argument("--tokens", type=int, default=1_048_576, help="training tokens (default: %(default)s)")
    p.add_argument("--held-out-tokens", type=int, default=65_536)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--dict-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="BatchTopK k and the log-sparsity target_l0")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    p.add_argument("--log", action="append", default=[], metavar="KEY=VALUE",
                   help="extra MatryoshkaLogSparsityTrainer keyword, e.g. --log lr=3e-3")
    p.add_argument("--extra-log", default="[]", metavar="JSON",
                   help='more log-sparsity trainers, a JSON list of keyword dicts, e.g. \'[{"lr": 3e-3}]\'')
    p.add_argument("--meta-structure-seeds", nargs="+", type=int, metavar="SEED",
                   help="also run SAEBench's meta-structure eval on every decoder, one meta-SAE per seed")
    p.add_argument("--meta-structure-steps", type=int,
                   help="meta-SAE training steps (default: SAEBench's 1500 of 1024 decoder rows)")
    p.add_argument("--meta-structure-only", action="store_true",
                   help="skip training: add the meta-structure eval to the SAEs already in --out")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="trainSAE's autocast_dtype (bfloat16: bf16 batches on CPU, bf16 encoder matmuls)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    log_kwargs = {}
    for item in a.log:
        key, sep, val = item.partition("=")
        if not sep:
            p.error(f"--log expects KEY=VALUE, got {item!r}")
        log_kwargs[key] = _value(val)
    if a.meta_structure_only and not a.meta_structure_seeds:
        p.error("--meta-structure-only needs --meta-structure-seeds")
    if not a.meta_structure_only:
        run(a.out, a.tokens, a.held_out_tokens, a.batch_size, a.dict_size, a.k, tuple(a.variants), log_kwargs,
            seed=a.seed, extra_log=json.loads(a.extra_log), autocast_dtype=getattr(torch, a.dtype))
    if a.meta_structure_seeds:
        # SAEBench's settings; bf16 autocast is slow on a CPU
        steps = {} if a.meta_structure_steps is None else {"train_steps": a.meta_structure_steps}
        add_meta_structure(a.out, a.meta_structure_seeds, autocast=False, **steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
