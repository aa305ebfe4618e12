"""Evaluate SAEs with SAEBench: its core metrics and sparse probing by default (any of core,
absorption, sparse_probing, scr, tpp), one result JSON per SAE and eval in SAEBench's layout.

    python examples/evaluate_saebench.py matryoshka=runs/matryoshka/trainer_0 --out eval_results
    python examples/evaluate_saebench.py m=runs/x/trainer_0 b=saelens:RELEASE:SAE_ID --evals core absorption
"""
import argparse
import json
from pathlib import Path

import torch
from datasets import load_from_disk

import matryoshka_plugin

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("saes", nargs="+", help="NAME=SOURCE: a trainSAE folder, a SAELens folder or saelens:RELEASE:SAE_ID")
p.add_argument("--out", default="eval_results")
p.add_argument("--evals", nargs="+", default=["core", "sparse_probing"])
p.add_argument("--overrides", help='JSON file {eval: {field: value}} over SAEBench\'s settings')
p.add_argument("--datasets-dir", help="offline data: DIR/<owner>__<name> saved with datasets' save_to_disk, "
                                      "served under the hub names SAEBench asks for")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()


def local_dataset(path, name=None, split=None, streaming=False, **kwargs):
    """datasets.load_dataset's signature, reading from --datasets-dir."""
    ds = load_from_disk(str(Path(args.datasets_dir) / path.replace("/", "__")))
    if split is not None:
        ds = ds[split]
    return ds.to_iterable_dataset() if streaming and split is not None else ds


run = matryoshka_plugin.run_saebench(
    dict(s.split("=", 1) for s in args.saes),
    args.out,
    evals=args.evals,
    eval_overrides=json.loads(Path(args.overrides).read_text()) if args.overrides else None,
    load_dataset=local_dataset if args.datasets_dir else None,
    device=args.device,
)
for row in run.rows():
    print(json.dumps(row))
print(f"SAEBench result files under {args.out}/<eval>/")
