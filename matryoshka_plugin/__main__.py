"""Command line: ``python -m matryoshka_plugin <command>``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(out_dir=args.out, steps=args.steps, seed=args.seed, saes=args.saes)
    run_demo(cfg)
    return 0


def _load_tensor(path: str):
    """A tensor from a ``.safetensors`` file (key ``activations`` or its only tensor) or a ``torch.save`` file."""
    import os

    import torch

    if not os.path.isfile(path):
        raise ValueError(f"--activations: no such file: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = {"activations": torch.load(path, map_location="cpu", weights_only=True)}
    except Exception as e:  # noqa: BLE001 - safetensors, pickle and OS errors for unreadable files
        raise ValueError(f"--activations: cannot read {path}: {type(e).__name__}: {e}") from None
    if "activations" in tensors:
        obj = tensors["activations"]
    elif len(tensors) == 1:
        obj = next(iter(tensors.values()))
    else:
        raise ValueError(f"--activations: {path} holds {sorted(tensors)}; name the tensor 'activations'")
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"--activations: {path} does not hold a tensor")
    return obj


def _export(args: argparse.Namespace) -> int:
    from .saelens import export_to_saelens

    out = export_to_saelens(
        args.checkpoint_dir,
        args.out_dir,
        model_name=args.model_name,
        hook_name=args.hook_name,
        context_size=args.context_size,
        dataset_path=args.dataset_path,
        prepend_bos=args.prepend_bos,
        activations=_load_tensor(args.activations) if args.activations else None,
        architecture=args.architecture,
        dtype=args.dtype,
        checkpoint=args.checkpoint,
        overwrite=args.overwrite,
        verify=not args.no_verify,
    )
    first = "import matryoshka_plugin.saelens, then " if args.architecture != "auto" else ""
    print(f"wrote {out}; load it with: {first}SAE.load_from_disk({str(out)!r})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from .saelens import import_from_saelens

    widths = [int(w) for w in args.widths.split(",")] if args.widths else None
    ae = import_from_saelens(args.saelens_dir, k=args.k, widths=widths, out_dir=args.out_dir, overwrite=args.overwrite)
    print(f"wrote {args.out_dir} ({type(ae).__name__}); load it with: matryoshka_plugin.load_dictionary({args.out_dir!r})")
    return 0


def _pairs(items: list[str], form: str) -> dict[str, str]:
    """``["a=b", ...]`` -> ``{"a": "b", ...}``; anything without ``=`` is an error naming ``form``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected {form}, got {item!r}")
        out[key] = value
    return out


def _publish(args: argparse.Namespace) -> int:
    from .saelens import publish_to_huggingface

    folders = _pairs(args.saes, "SAE_ID=FOLDER")
    plan = publish_to_huggingface(
        folders, args.repo_id, revision=args.revision, dry_run=args.dry_run, staging_dir=args.staging_dir
    )
    print(("uploaded to " if plan.uploaded else f"staged in {plan.staging_dir} for ") + plan.repo_id)
    print("load with:\n  from sae_lens import SAE\n" + "\n".join(f"  sae = {line}" for line in plan.load_lines))
    return 0


def _saebench(args: argparse.Namespace) -> int:
    from .saebench import EVAL_NAMES, run_saebench

    saes = _pairs(args.saes, "NAME=SOURCE")
    run = run_saebench(
        saes, args.output_dir, args.evals or EVAL_NAMES, model_name=args.model_name, hook_name=args.hook_name,
        device=args.device, llm_dtype=args.llm_dtype, llm_batch_size=args.llm_batch_size, force=args.force,
        seeds=args.seeds,
    )
    for rec in run.records:
        print(f"{rec.name:<30} {rec.eval:<26} {rec.status:<14} {rec.path}")
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

    ex = sub.add_parser("export", help="export a trainSAE trainer_i folder as a SAELens SAE folder")
    ex.add_argument("checkpoint_dir", help="trainer_i folder with config.json and ae.pt")
    ex.add_argument("out_dir", help="SAELens folder to create (cfg.json, sae_weights.safetensors)")
    ex.add_argument("--model-name", help="TransformerLens model name (default: from lm_name)")
    ex.add_argument("--hook-name", help="TransformerLens hook (default: from submodule_name and the buffer's io)")
    ex.add_argument("--context-size", type=int, help="default: the buffer's ctx_len")
    ex.add_argument("--dataset-path", help="training data set, recorded in the metadata")
    ex.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                    help="default: no for GPT-2/Pythia, yes otherwise")
    ex.add_argument("--activations", help="tensor file ([..., d]) to measure firing frequencies for sparsity.safetensors")
    ex.add_argument("--architecture", default="auto", choices=["auto", "matryoshka_jumprelu"],
                    help="auto: stock SAELens (default); matryoshka_jumprelu loads after import matryoshka_plugin.saelens")
    ex.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ex.add_argument("--checkpoint", type=int, help="export checkpoints/ae_STEP.pt instead of ae.pt")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace an out_dir holding an earlier export (atomically); other files are never deleted")
    ex.add_argument("--no-verify", action="store_true", help="skip loading the result with SAELens to compare")
    ex.set_defaults(func=_export)

    im = sub.add_parser("import", help="convert a SAELens SAE folder into a folder load_dictionary reads")
    im.add_argument("saelens_dir")
    im.add_argument("out_dir")
    im.add_argument("--k", type=int, help="BatchTopK k, when the SAELens metadata lacks it")
    im.add_argument("--widths", help="nested widths, comma-separated cumulative ends (default: from metadata)")
    im.add_argument("--overwrite", action="store_true", help="replace an out_dir holding an earlier import")
    im.set_defaults(func=_import)

    pub = sub.add_parser("publish", help="upload exported folders with SAELens' upload_saes_to_huggingface")
    pub.add_argument("repo_id", help="org/repo")
    pub.add_argument("saes", nargs="+", metavar="SAE_ID=FOLDER")
    pub.add_argument("--revision", default="main")
    pub.add_argument("--dry-run", action="store_true", help="only stage the upload tree (no network)")
    pub.add_argument("--staging-dir", help="where to stage (default: a temporary folder)")
    pub.set_defaults(func=_publish)
    ev = sub.add_parser("saebench", help="run SAEBench evals on trainer_i or SAELens folders")
    ev.add_argument("output_dir", help="results: OUTPUT_DIR/<eval>/<name>_custom_sae_eval_results.json")
    ev.add_argument("saes", nargs="+", metavar="NAME=SOURCE",
                    help="a trainer_i folder, a SAELens folder or saelens:RELEASE:SAE_ID")
    ev.add_argument("--evals", nargs="+", help="core absorption sparse_probing sparse_probing_sae_probes scr tpp "
                    "meta_structure (default: all)")
    ev.add_argument("--seeds", nargs="+", type=int, help="repeat the evals that sample once per seed")
    ev.add_argument("--model-name", help="TransformerLens model name (default: from the SAEs; must match them)")
    ev.add_argument("--hook-name", help="require every SAE to be trained on this hook")
    ev.add_argument("--device", help="default: cuda if available")
    ev.add_argument("--llm-dtype", choices=["float32", "bfloat16", "float16"], help="default: SAEBench's for the model")
    ev.add_argument("--llm-batch-size", type=int, help="default: SAEBench's for the model")
    ev.add_argument("--force", action="store_true", help="recompute results that exist")
    ev.set_defaults(func=_saebench)
    args = parser.parse_args(argv)
    # Bad input (missing/corrupt files, an occupied out_dir, unknown names, ...) is reported in one
    # line with exit code 2, as argparse reports bad arguments, instead of a traceback.
    try:
        return args.func(args)
    except (ValueError, FileExistsError) as e:
        print(f"{parser.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
