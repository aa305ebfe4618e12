"""Train a Matryoshka BatchTopK SAE on a language model's residual stream with dictionary_learning's
trainSAE: an ActivationBuffer over an nnsight LanguageModel feeds this package's trainer.

    python examples/train_trainsae.py --model gpt2 --layer 6 --steps 20000 --save-dir runs/gpt2_l6
    python examples/train_trainsae.py --text-file my_corpus.txt ...   # local text, one document a line
"""
import argparse
import itertools

import torch
from datasets import load_dataset
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.training import trainSAE
from nnsight import LanguageModel

import matryoshka_plugin
from matryoshka_plugin import MatryoshkaBatchTopKTrainer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="gpt2", help="Hugging Face model id")
p.add_argument("--layer", type=int, default=6)
p.add_argument("--submodule", default="transformer.h.{layer}", help="GPT-2 naming; Pythia: gpt_neox.layers.{layer}")
p.add_argument("--dataset", default="monology/pile-uncopyrighted", help="Hugging Face text data set (streamed)")
p.add_argument("--text-file", help="local text, one document a line (used instead of --dataset)")
p.add_argument("--dict-size", type=int, default=16384)
p.add_argument("--k", type=int, default=40)
p.add_argument("--steps", type=int, default=20_000)
p.add_argument("--batch-size", type=int, default=2048)
p.add_argument("--ctx-len", type=int, default=128)
p.add_argument("--n-ctxs", type=int, default=1000, help="contexts held in the activation buffer")
p.add_argument("--save-dir", default="runs/matryoshka")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

if args.text_file:
    texts = itertools.cycle([line for line in open(args.text_file).read().splitlines() if line.strip()])
else:
    texts = (row["text"] for row in load_dataset(args.dataset, split="train", streaming=True))

model = LanguageModel(args.model, device_map=args.device, dispatch=True)
submodule_name = args.submodule.format(layer=args.layer)
submodule = model
for part in submodule_name.split("."):
    submodule = getattr(submodule, part)
d = model.config.hidden_size
buffer = ActivationBuffer(texts, model, submodule, d_submodule=d, io="out", n_ctxs=args.n_ctxs, ctx_len=args.ctx_len,
                          refresh_batch_size=min(64, args.n_ctxs), out_batch_size=args.batch_size, device=args.device)

trainSAE(
    data=buffer,
    trainer_configs=[dict(
        trainer=MatryoshkaBatchTopKTrainer, steps=args.steps, activation_dim=d, dict_size=args.dict_size, k=args.k,
        group_fractions=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32],  # nested widths: 1/32, 3/32, 7/32, 15/32, all
        layer=args.layer, lm_name=args.model, submodule_name=submodule_name, device=args.device,
        warmup_steps=min(1000, args.steps // 10), threshold_start_step=min(1000, args.steps // 4),
    )],
    steps=args.steps, save_dir=args.save_dir, device=args.device,
)

ae, cfg = matryoshka_plugin.load_dictionary(f"{args.save_dir}/trainer_0", device=args.device)
x = next(iter(buffer))
with torch.no_grad():
    latents = ae.encode(x)
    fvu = ((x - ae.decode(latents)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
print(f"saved {args.save_dir}/trainer_0: {cfg['trainer']['dict_class']}, d={d}, dict_size={ae.dict_size}")
print(f"held-out batch: L0 {(latents != 0).float().sum(-1).mean().item():.2f} (k={args.k}), FVU {fvu:.4f}")
