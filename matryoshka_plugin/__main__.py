"""Command line: ``python -m matryoshka_plugin <command>``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(out_dir=args.out, steps=args.steps, seed=args.seed, saes=args.saes)
    run_demo(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m matryoshka_plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="vanilla vs Matryoshka SAEs on the post's toy tree (CPU, ~2 min)")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=12_000, help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--saes",
        nargs="+",
        default=["vanilla", "matryoshka"],
        help="which SAEs: vanilla, matryoshka, matryoshka_expected, matryoshka_every",
    )
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
