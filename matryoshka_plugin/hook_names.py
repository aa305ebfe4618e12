"""TransformerLens names for dictionary_learning's models and submodules.

SAELens and SAEBench address activations by TransformerLens hook (``blocks.12.hook_resid_post``)
and model name (``gemma-2-2b``); dictionary_learning by HF submodule path and HF id. The export,
the SAEBench adapter and the benchmarks translate with these functions.
"""

from __future__ import annotations

import re

__all__ = ["tl_hook_name", "tl_model_name", "default_prepend_bos"]


# HF submodule prefix -> model family. Gemma-2 ("model.layers", also Llama-style models),
# GPT-2 ("transformer.h") and Pythia ("gpt_neox.layers").
_SUBMODULE = re.compile(
    r"^(?P<prefix>model\.layers|transformer\.h|gpt_neox\.layers)\.(?P<layer>\d+)"
    r"(?:\.(?P<part>mlp|self_attn|attn|attention))?$"
)


def _post_norm_family(lm_name: str | None) -> bool:
    # Gemma-2/3 normalise attention and MLP outputs before adding them to the residual; the
    # TransformerLens hooks hook_attn_out/hook_mlp_out sit after that norm, the HF modules before.
    name = (lm_name or "").lower()
    return bool(re.search(r"gemma[-_]?[23]", name))


def tl_hook_name(
    submodule_name: str | None, io: str | None = "out", layer: int | None = None, lm_name: str | None = None
) -> str:
    """The TransformerLens hook for a dictionary_learning submodule and buffer ``io``.

    ``model.layers.12`` / ``transformer.h.5`` / ``gpt_neox.layers.3`` with ``io="out"`` give
    ``blocks.N.hook_resid_post`` (``io="in"``: ``hook_resid_pre``); the attention and MLP modules'
    outputs give ``hook_attn_out`` / ``hook_mlp_out`` (GPT-2, Pythia, Llama-style models). With no
    submodule the residual stream after ``layer`` is assumed. Anything without an exact
    TransformerLens counterpart raises ``ValueError``: pass ``hook_name=`` explicitly then.
    """
    io = io or "out"
    if submodule_name is None:
        if layer is None:
            raise ValueError("the trainer config names neither submodule_name nor layer; pass hook_name=")
        return f"blocks.{int(layer)}.hook_resid_post"
    m = _SUBMODULE.match(submodule_name)
    if m is None:
        raise ValueError(
            f"cannot derive a TransformerLens hook name from submodule {submodule_name!r} (known: Gemma-2 "
            "'model.layers.N', GPT-2 'transformer.h.N', Pythia 'gpt_neox.layers.N', optionally with "
            ".mlp/.self_attn/.attn/.attention); pass hook_name="
        )
    n, part = int(m.group("layer")), m.group("part")
    if io not in ("in", "out"):
        raise ValueError(f"buffer io={io!r} has no single TransformerLens hook; pass hook_name=")
    if part is None:
        return f"blocks.{n}.hook_resid_{'post' if io == 'out' else 'pre'}"
    if io == "in":
        # The module input is a layer-norm output; TransformerLens' ln hooks precede the norm's
        # weights (and fold_ln moves them), so there is no exact hook.
        raise ValueError(f"the input of {submodule_name!r} has no exact TransformerLens hook; pass hook_name=")
    if m.group("prefix") == "model.layers" and _post_norm_family(lm_name):
        raise ValueError(
            f"{lm_name}'s {submodule_name!r} output precedes its post-norm, but TransformerLens' "
            "hook_attn_out/hook_mlp_out follow it; pass hook_name="
        )
    return f"blocks.{n}.hook_{'mlp' if part == 'mlp' else 'attn'}_out"


def tl_model_name(lm_name: str | None) -> str | None:
    """TransformerLens model name: the HF id without its organisation (``google/gemma-2-2b`` ->
    ``gemma-2-2b``, ``EleutherAI/pythia-70m-deduped`` -> ``pythia-70m-deduped``, ``gpt2``)."""
    if lm_name is None:
        return None
    name = str(lm_name).rstrip("/").split("/")[-1]
    return "gpt2" if name == "gpt2-small" else name


def default_prepend_bos(lm_name: str | None) -> bool:
    # dictionary_learning's buffers tokenise with the model's tokenizer defaults: GPT-2 and
    # Pythia add no BOS token, Gemma (and SAELens' default) do.
    name = (lm_name or "").lower()
    return not ("gpt2" in name or "pythia" in name)
