"""Import a published SAELens SAE and continue training it as a Matryoshka SAE with trainSAE.

A standard (ReLU) SAE continues with the log-sparsity trainer: its latents are reordered by
contribution as it trains, so that every prefix becomes a usable smaller SAE.

    python examples/continue_from_saelens.py --release gpt2-small-res-jb --sae-id blocks.8.hook_resid_pre \
        --model gpt2 --submodule transformer.h.7 --steps 5000    # block 7's output is blocks.8.hook_resid_pre
    python examples/continue_from_saelens.py --folder my_saelens_sae --model my_model.gguf \
        --submodule model.layers.7 --text-file my_corpus.txt ...   # offline: local SAE, model and text

The release and the model come from the Hugging Face hub; offline, pass a SAELens folder
(--folder) and the model as a local folder or .gguf file (--model). The text defaults to the
texts the sae-probes package ships.
"""
import argparse

import torch
from _offline import MODEL_HELP, TEXT_HELP, load_model, module_at, texts
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.training import trainSAE
from sae_lens import SAE

import matryoshka_plugin
from matryoshka_plugin import MatryoshkaLogSparsitySAE, MatryoshkaLogSparsityTrainer
from matryoshka_plugin.threads import cpu_threads, threads_for

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--release", default="gpt2-small-res-jb")
p.add_argument("--sae-id", default="blocks.8.hook_resid_pre")
p.add_argument("--folder", help="a local SAELens folder (used instead of --release/--sae-id)")
p.add_argument("--model", default="gpt2", help=MODEL_HELP.split("; default")[0])
p.add_argument("--submodule", default="transformer.h.7", help="the decoder layer whose output the SAE reads")
p.add_argument("--dataset", help="a Hugging Face text data set, streamed (needs the hub)")
p.add_argument("--text-file", help=TEXT_HELP)
p.add_argument("--target-l0", type=float, default=50)
p.add_argument("--steps", type=int, default=5000)
p.add_argument("--batch-size", type=int, default=2048)
p.add_argument("--save-dir", default="runs/continued")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

try:
    sae = SAE.load_from_disk(args.folder) if args.folder else SAE.from_pretrained(args.release, args.sae_id)
except OSError as e:  # no hub: huggingface_hub's errors are OSErrors
    raise SystemExit(f"cannot download {args.release}/{args.sae_id} ({type(e).__name__}: {e}).\n"
                     "Offline, pass --folder <a SAELens folder> and --model <a local model folder or .gguf file>.") from None
ae = matryoshka_plugin.import_from_saelens(sae, device=args.device)
if not isinstance(ae, MatryoshkaLogSparsitySAE):
    raise SystemExit(f"this example continues standard (ReLU) SAEs; {sae.cfg.architecture()} imports as {type(ae).__name__}")

text = texts(args.text_file, args.dataset)  # before the model: a missing data set fails at once
model, layers, bos = load_model(args.model, int(args.submodule.split(".")[-1]), args.device)
if not args.submodule.startswith(layers.rsplit(".", 1)[0] + "."):
    raise SystemExit(f"--submodule {args.submodule}: this model's layers are {layers.rsplit('.', 1)[0]}.N")
buffer = ActivationBuffer(text, model, module_at(model, args.submodule),
                          d_submodule=ae.activation_dim, io="out", n_ctxs=256, ctx_len=128, refresh_batch_size=64,
                          out_batch_size=args.batch_size, device=args.device, remove_bos=bos)


def fvu(sae_module, x):
    with torch.no_grad():
        return ((x - sae_module(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


x = next(iter(buffer))
print(f"imported {type(ae).__name__} ({ae.activation_dim} -> {ae.dict_size}); FVU before: {fvu(ae, x):.4f}")
with cpu_threads(threads_for(args.batch_size * ae.activation_dim * ae.dict_size)):  # the demo's thread rule
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
