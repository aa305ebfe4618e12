"""Real text available offline: the prompts of sae-probes' shipped datasets.

``data.dataset = "sae-probes"`` trains on these texts instead of a hub data set. Every text that
also occurs in one of the probing datasets the evals use (``evals.overrides.
sparse_probing_sae_probes.dataset_names``) is left out, whichever file it comes from (the headline
datasets, for example, share their texts); of the rest, every ``heldout_every``-th text (after a
fixed shuffle) is held out for the evals that need text (core) and never trained on.

:func:`local_load_dataset` serves both shares under the names :data:`TRAIN_NAME` and
:data:`HELDOUT_NAME` with ``datasets.load_dataset``'s signature (a ``text`` column), and passes
every other name on to ``datasets.load_dataset``.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["HELDOUT_NAME", "TRAIN_NAME", "local_load_dataset", "sae_probes_files", "sae_probes_texts"]

TRAIN_NAME = "sae-probes"
HELDOUT_NAME = "sae-probes-heldout"


def sae_probes_files() -> dict[str, Path]:
    """Dataset name (file stem, e.g. ``23_headline_ischina``) -> its shipped ``.csv.zst`` file."""
    import sae_probes

    root = Path(sae_probes.__file__).parent / "data" / "cleaned_data"
    files = {p.name[: -len(".csv.zst")]: p for p in sorted(root.glob("*.csv.zst"))}
    if not files:
        raise FileNotFoundError(f"no sae-probes datasets under {root}; is sae-probes installed?")
    return files


@functools.lru_cache(maxsize=4)
def _prompts(path: Path) -> tuple[str, ...]:
    import pandas as pd

    prompts = pd.read_csv(path, usecols=["prompt"])["prompt"].dropna().astype(str)
    return tuple(p for p in prompts if p.strip())


@functools.lru_cache(maxsize=8)
def _split(exclude: tuple[str, ...], heldout_every: int, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    files = sae_probes_files()
    unknown = sorted(set(exclude) - set(files))
    if unknown:
        raise ValueError(f"unknown sae-probes dataset(s) {unknown}")
    excluded: set[str] = set()
    for name in exclude:
        excluded.update(_prompts(files[name]))
    texts: set[str] = set()
    for name, path in files.items():
        if name not in exclude:
            texts.update(t for t in _prompts(path) if t not in excluded)
    ordered = sorted(texts)
    random.Random(seed).shuffle(ordered)
    train = tuple(t for i, t in enumerate(ordered) if i % heldout_every)
    heldout = tuple(t for i, t in enumerate(ordered) if i % heldout_every == 0)
    return train, heldout


def sae_probes_texts(held_out: bool, exclude: Sequence[str] = (), heldout_every: int = 20,
                     seed: int = 0) -> tuple[str, ...]:
    """The training (or held-out) share of every sae-probes text that is in none of ``exclude``."""
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be at least 2, got {heldout_every}")
    train, heldout = _split(tuple(sorted(set(exclude))), int(heldout_every), int(seed))
    return heldout if held_out else train


def local_load_dataset(exclude: Sequence[str] = (), heldout_every: int = 20, seed: int = 0,
                       fallback: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """``datasets.load_dataset`` that serves :data:`TRAIN_NAME` and :data:`HELDOUT_NAME` locally."""

    def load_dataset(path: str, name: str | None = None, split: str | None = None, streaming: bool = False,
                     **kwargs: Any) -> Any:
        if path not in (TRAIN_NAME, HELDOUT_NAME):
            if fallback is not None:
                return fallback(path, name, split=split, streaming=streaming, **kwargs)
            from datasets import load_dataset as hub_load_dataset

            return hub_load_dataset(path, name, split=split, streaming=streaming, **kwargs)
        from datasets import Dataset, DatasetDict

        texts = sae_probes_texts(path == HELDOUT_NAME, exclude, heldout_every, seed)
        ds = DatasetDict(train=Dataset.from_dict({"text": list(texts)}))
        if split is not None:
            if split != "train":
                raise ValueError(f"{path} has only the split 'train', got {split!r}")
            return ds["train"].to_iterable_dataset() if streaming else ds["train"]
        return ds

    return load_dataset
