"""Import a published SAELens SAE and continue training it as a Matryoshka SAE with trainSAE.

A standard (ReLU) SAE continues with the log-sparsity trainer: its latents are reordered by
contribution as it trains, so that every prefix becomes a usable smaller SAE.

    python examples/continue_from_saelens.py --release gpt2-small-res-jb --sae-id blocks.8.hook_resid_pre \
        --model gpt2 --submodule transformer.h.7 --steps 5000    # block 7's output is blocks.8.hook_resid_pre
    python examples/continue_from_saelens.py --folder my_saelens_sae ...   # a local SAELens folder
"""
import argparse
import itertools

import torch
from datasets import load_dataset
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.training import trainSAE
from nnsight import LanguageModel
from sae_lens import SAE

import matryoshka_plugin
from matryoshka_plugin import MatryoshkaLogSparsitySAE, MatryoshkaLogSparsityTrainer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--release", default="gpt2-small-res-jb")
p.add_argument("--sae-id", default="blocks.8.hook_resid_pre")
p.add_argument("--folder", help="a local SAELens folder (used instead of --release/--sae-id)")
p.add_argument("--model", default="gpt2")
p.add_argument("--submodule", default="transformer.h.7", help="the nnsight module whose output the SAE reads")
p.add_argument("--dataset", default="monology/pile-uncopyrighted")
p.add_argument("--text-file", help="local text, one document a line (used instead of --dataset)")
p.add_argument("--target-l0", type=float, default=50)
p.add_argument("--steps", type=int, default=5000)
p.add_argument("--batch-size", type=int, default=2048)
p.add_argument("--save-dir", default="runs/continued")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

sae = SAE.load_from_disk(args.folder) if args.folder else SAE.from_pretrained(args.release, args.sae_id)
ae = matryoshka_plugin.import_from_saelens(sae, device=args.device)
if not isinstance(ae, MatryoshkaLogSparsitySAE):
    raise SystemExit(f"this example continues standard (ReLU) SAEs; {sae.cfg.architecture()} imports as {type(ae).__name__}")

if args.text_file:
    texts = itertools.cycle([line for line in open(args.text_file).read().splitlines() if line.strip()])
else:
    texts = (row["text"] for row in load_dataset(args.dataset, split="train", streaming=True))
model = LanguageModel(args.model, device_map=args.device, dispatch=True)
submodule = model
for part in args.submodule.split("."):
    submodule = getattr(submodule, part)
buffer = ActivationBuffer(texts, model, submodule, d_submodule=ae.activation_dim, io="out", n_ctxs=256, ctx_len=128,
                          refresh_batch_size=64, out_batch_size=args.batch_size, device=args.device)


def fvu(sae_module, x):
    with torch.no_grad():
        return ((x - sae_module(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


x = next(iter(buffer))
print(f"imported {type(ae).__name__} ({ae.activation_dim} -> {ae.dict_size}); FVU before: {fvu(ae, x):.4f}")
trainSAE(
    data=buffer,
    trainer_configs=[dict(
        trainer=MatryoshkaLogSparsityTrainer, steps=args.steps, activation_dim=ae.activation_dim,
        dict_size=ae.dict_size, target_l0=args.target_l0, prefix_mode="pareto", lr=1e-3,
        dict_class=lambda *shape: ae,  # start from the imported weights instead of a fresh SAE
        normalize_input=False,  # keep the imported SAE's input scale (1)
        lm_name=args.model, submodule_name=args.submodule, device=args.device,
        warmup_steps=min(1000, args.steps // 10),
    )],
    steps=args.steps, save_dir=args.save_dir, device=args.device,
)
trained, _ = matryoshka_plugin.load_dictionary(f"{args.save_dir}/trainer_0", device=args.device)
x = next(iter(buffer))
print(f"FVU after {args.steps} steps: {fvu(trained, x):.4f}; saved {args.save_dir}/trainer_0")
