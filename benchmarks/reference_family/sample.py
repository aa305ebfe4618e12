"""A small held-out sample of MiniLM block-3 activations with the text around each token.

The cached activations (``benchmarks/real_model/activations.py``) are shuffled by dictionary_learning's
``ActivationBuffer``, so they no longer say which token they came from. The tree view needs that,
so this module runs the same model (``load_minilm``), submodule and tokenisation (the buffer's
``truncation`` and ``max_length``, ``[CLS]`` dropped, padding dropped) over held-out texts
(``load_texts(held_out=True)``) and keeps each activation with its token and context.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.real_model.activations import LAYER, load_minilm, load_texts

__all__ = ["aligned_sample", "snippet"]


def _join(tokens: list[str]) -> str:
    """WordPiece tokens back to text: ``##`` pieces attach to the previous token."""
    out = ""
    for t in tokens:
        out += t[2:] if t.startswith("##") else (" " + t if out else t)
    return out


def snippet(tokens: list[str], i: int, left: int = 10, right: int = 4) -> tuple[str, str, str]:
    """``(left context, token, right context)`` around position ``i`` of one text's tokens."""
    tok = tokens[i]
    lead = _join(tokens[max(0, i - left): i])
    tail = _join(tokens[i + 1: i + 1 + right])
    glue_left = "" if tok.startswith("##") else " "
    glue_right = " " if i + 1 < len(tokens) and not tokens[i + 1].startswith("##") else ""
    return (lead + glue_left if lead else ""), tok.removeprefix("##"), (glue_right + tail if tail else "")


@torch.no_grad()
def aligned_sample(n_tokens: int, path: str | Path | None = None, ctx_len: int = 128, batch: int = 32,
                   first_text: int = 0) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """``n_tokens`` float32 activations ``[n_tokens, 384]`` of held-out texts from ``first_text`` on,
    in text order, and one ``(left, token, right)`` snippet per row. Cached at ``path`` if given."""
    if path is not None and Path(path).is_file():
        saved = torch.load(path, weights_only=True)  # tensors and strings only
        if saved["acts"].shape[0] >= n_tokens:
            return saved["acts"][:n_tokens], saved["snippets"][:n_tokens]
    lm = load_minilm()
    texts = load_texts(held_out=True)[first_text:]
    acts: list[torch.Tensor] = []
    snips: list[tuple[str, str, str]] = []
    done = 0
    for start in range(0, len(texts), batch):
        if done >= n_tokens:
            break
        with lm.trace(texts[start: start + batch], scan=False, validate=False,
                      invoker_args={"truncation": True, "max_length": ctx_len}):
            hidden = lm.encoder.layer[LAYER].output.output.save()  # the BertOutput submodule's output
            inputs = lm.inputs.save()
        h = hidden.value[0] if isinstance(hidden.value, tuple) else hidden.value
        ids, mask = inputs.value[1]["input_ids"], inputs.value[1]["attention_mask"]
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            toks = lm.tokenizer.convert_ids_to_tokens(ids[row, :n].tolist())
            # Position 0 is [CLS], dropped as the buffer drops it (and left out of the context).
            snips.extend(snippet(toks[1:], pos) for pos in range(n - 1))
            acts.append(h[row, 1:n].float())
            done += n - 1
    out = torch.cat(acts)[:n_tokens]
    snips = snips[:n_tokens]
    if path is not None:
        from matryoshka_plugin.io import atomic_torch_save

        atomic_torch_save({"acts": out, "snippets": snips}, path)
    return out, snips
