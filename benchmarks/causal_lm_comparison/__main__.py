"""``python -m benchmarks.causal_lm_comparison --config NAME|FILE [--dry-run] [--set KEY=VALUE ...]``"""

from __future__ import annotations

import argparse
import os
import sys

from .config import CONFIGS, ConfigError, load_config, parse_override
from .pipeline import run_benchmark


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.causal_lm_comparison",
        description="Train Matryoshka and standard SAEs on a causal language model's residual stream, run "
        "SAEBench's evals (absorption, sparse probing, core, ...) on every SAE, and write a comparison table and "
        "plots. Re-running the same command continues an interrupted run.",
    )
    p.add_argument("--config", default="quick",
                   help=f"a named configuration ({', '.join(CONFIGS)}; a unique prefix will do) or a TOML file "
                   "(default: %(default)s, Matryoshka against BatchTopK on SmolLM2 in about 15 minutes on a CPU, "
                   "offline; smollm2_135m is the full comparison, gemma2_2b_l12 the paper's settings)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (TOML syntax; bare words are strings), e.g. --set training.tokens=10_000_000 "
                   "--set 'training.widths=[16384]'")
    p.add_argument("--run-dir", help="shortcut for --set run_dir=...")
    p.add_argument("--device", help="shortcut for --set device=...")
    p.add_argument("--cache-dir", help="the activation cache folder (shortcut for --set data.cache_dir=...; the "
                   "CAUSAL_LM_CACHE_DIR environment variable also overrides the config's)")
    p.add_argument("--activations-only", action="store_true",
                   help="build (or finish) the activation cache, training and held-out splits, then stop")
    p.add_argument("--sweep-only", action="store_true",
                   help="build the activation cache and run the lr sweep (training.lr_sweep), then stop")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the estimates, then stop")
    p.add_argument("--published-baselines", action="store_true",
                   help="evaluate SAEBench's published suites (through SAELens) instead of training the baselines")
    p.add_argument("--skip-training", action="store_true", help="only evaluate SAEs that are already trained")
    p.add_argument("--skip-evals", action="store_true", help="train, then report what is already evaluated")
    p.add_argument("--force-evals", action="store_true", help="recompute eval results that exist")
    p.add_argument("--nproc", type=int, help="spread each group's SAEs over this many GPUs (relaunches itself "
                   "under torchrun; shortcut for --set training.nproc=N)")
    args = p.parse_args(argv)
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ and not args.dry_run:
        # Relaunch as N processes; each sees WORLD_SIZE and trains its share of every group.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "benchmarks.causal_lm_comparison", *(argv if argv is not None else sys.argv[1:])]
        os.execv(sys.executable, cmd)
    try:
        overrides = dict(parse_override(s) for s in args.overrides)
        if args.run_dir:
            overrides["run_dir"] = args.run_dir
        if args.device:
            overrides["device"] = args.device
        if args.cache_dir:
            overrides["data.cache_dir"] = args.cache_dir
            os.environ.pop("CAUSAL_LM_CACHE_DIR", None)  # the flag wins over the environment
        if args.nproc is not None:
            overrides["training.nproc"] = args.nproc
        if args.published_baselines:
            overrides["training.baselines"] = "published"
        cfg = load_config(args.config, overrides)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.activations_only:
            from .pipeline import ConfiguredModels, default_load_dataset, prepare_activations

            prepare_activations(cfg, ConfiguredModels(), default_load_dataset(cfg))
            return 0
        run_benchmark(cfg, dry_run=args.dry_run, skip_training=args.skip_training, skip_evals=args.skip_evals,
                      force_evals=args.force_evals, sweep_only=args.sweep_only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
