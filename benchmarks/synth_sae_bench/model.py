"""Build SAELens' synthetic model once, cache it on disk, and check its fingerprint on load."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from matryoshka_plugin.io import atomic_write_json

from .config import Protocol, model_config

__all__ = ["fingerprint", "load_or_build", "Replayable", "sample_pool", "SampleStream", "SeededBatches"]

FINGERPRINT_FILE = "fingerprint.json"


def fingerprint(model: Any) -> str:
    """SHA-256 of the feature dictionary (vectors and bias, float32 bytes) and the firing probabilities."""
    h = hashlib.sha256()
    fd = model.feature_dict
    for t in (fd.feature_vectors, getattr(fd, "bias", None), model.activation_generator.firing_probabilities):
        if isinstance(t, torch.Tensor):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_or_build(p: Protocol, cache: Path, device: str = "cpu") -> Any:
    """The protocol's ``SyntheticModel`` from ``cache/<name>`` (built and saved there if absent).

    Raises ``RuntimeError`` when the cached model's fingerprint differs from the one recorded
    when it was built, or its configuration from the protocol's.
    """
    from sae_lens.synthetic import SyntheticModel

    folder = Path(cache) / f"{p.name}-{p.num_features}-d{p.hidden_dim}"
    cfg = model_config(p)
    record = folder / FINGERPRINT_FILE
    if record.exists():
        model = SyntheticModel.load_from_disk(str(folder), device=device)
        saved = json.loads(record.read_text())
        if saved.get("config") != json.loads(json.dumps(cfg.to_dict())):
            raise RuntimeError(f"{folder} holds a synthetic model of another configuration; delete it to rebuild")
        got = fingerprint(model)
        if got != saved["fingerprint"]:
            raise RuntimeError(
                f"{folder}: the feature dictionary's fingerprint {got[:16]} differs from the recorded "
                f"{saved['fingerprint'][:16]}; the cache is corrupt or was changed. Delete it to rebuild."
            )
        return model
    model = SyntheticModel(cfg, device=device)
    got = fingerprint(model)
    if p.fingerprint is not None and got != p.fingerprint:
        warnings.warn(
            f"the {p.name} model built here has fingerprint {got[:16]}, not the {p.fingerprint[:16]} of the "
            "committed results (another torch or SAELens version?): its rows get their own protocol label "
            "and are not comparable with those", stacklevel=2)
    model.save(str(folder))
    atomic_write_json({"config": cfg.to_dict(), "fingerprint": got}, record)
    return model


class Replayable:
    """Training batches that every SAE reads from the first one (``iter``), and that an interrupted
    SAE re-enters at the batch it stopped at: :func:`matryoshka_plugin.train` saves
    ``state_dict()`` in its checkpoints and calls ``load_state_dict()`` on resume; SAELens' trainer
    is handed ``from_step(step)``. Subclasses define ``steps`` and ``from_step``."""

    steps: int
    _start = 0
    _next = 0

    def from_step(self, start: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[torch.Tensor]:
        start, self._start = self._start, 0  # a position is restored once: the next SAE starts at 0
        self._next = start
        for x in self.from_step(start):
            self._next += 1
            yield x

    def state_dict(self) -> dict[str, int]:
        """The batches handed out by the current pass."""
        return {"batch": self._next}

    def load_state_dict(self, state: dict[str, int]) -> None:
        batch = int(state["batch"])
        if not 0 <= batch <= self.steps:
            raise ValueError(f"batch position {batch} is outside this source's {self.steps} batches")
        self._start = batch


class SeededBatches(Replayable):
    """``batches`` training batches drawn on the fly (:class:`SampleStream`); every iteration replays
    the same ones. For models too large to cache a pool of samples (the full protocol, on a GPU)."""

    def __init__(self, model: Any, batch_size: int, batches: int, seed: int, device: str = "cpu"):
        self.args = (model, batch_size, batches, seed, device)
        self.batch_size, self.steps, self.samples = batch_size, batches, batch_size * batches

    def from_step(self, start: int) -> "SampleStream":
        stream = SampleStream(*self.args)
        stream.i = start  # batch i depends on i alone: no need to draw the earlier ones
        return stream


class SampleStream:
    """Batches of the synthetic model's activations, batch ``i`` drawn with seed ``seed * 1_000_003 + i``,
    so every SAE trained on ``(seed, batches)`` sees the same samples, whichever trainer reads them."""

    def __init__(self, model: Any, batch_size: int, batches: int, seed: int, device: str = "cpu"):
        self.model, self.batch_size, self.batches, self.seed, self.device = model, batch_size, batches, seed, device
        self.i = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.i >= self.batches:
            raise StopIteration
        devices = [torch.device(self.device)] if torch.device(self.device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed * 1_000_003 + self.i)
            x = self.model.sample(self.batch_size)
        self.i += 1
        return x.to(self.device)


def sample_pool(model: Any, n: int, seed: int, path: Path, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples as ``(hidden activations [n, d], feature activations, sparse COO [n, F])``, drawn
    once with ``seed`` and cached at ``path`` (keyed by the model's fingerprint).

    Sampling costs more than a training step on the CPU model (figures: docs/synth_sae_bench.md,
    "Protocols"), so every SAE of a run reads this one pool.
    """
    path = Path(path)
    key = {"fingerprint": fingerprint(model), "n": int(n), "seed": int(seed)}
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["key"] == json.dumps(key, sort_keys=True):
            return saved["hidden"], saved["features"]
    hidden, feats = [], []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        done = 0
        while done < n:
            b = min(batch_size, n - done)
            h, f = model.sample_with_features(b)
            hidden.append(h.float().cpu())
            feats.append(f.float().cpu().to_sparse())
            done += b
    hidden_t, feats_t = torch.cat(hidden), torch.cat(feats).coalesce()
    from matryoshka_plugin.io import atomic_torch_save

    atomic_torch_save({"key": json.dumps(key, sort_keys=True), "hidden": hidden_t, "features": feats_t}, path)
    return hidden_t, feats_t
