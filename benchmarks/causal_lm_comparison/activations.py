"""One on-disk activation cache per configuration: built once, resumable, read by every SAE.

The cache folder (``data.cache_dir``; the ``CAUSAL_LM_CACHE_DIR`` environment variable or
``--cache-dir`` override it) holds two splits, ``train`` and ``heldout``, each a list of shards:

    manifest.json                 what the activations are (below) and the shards written so far
    train/shard_00000.pt ...      [tokens, d_model] activations of data.cache_shard_texts texts each
    heldout/shard_00000.pt ...    the same for the held-out texts (metrics only, never trained on)

A shard holds every token of a fixed run of texts (BOS and padding dropped), run through the model
in batches of ``data.refresh_batch_size`` texts sorted by length (padding otherwise wastes most of
the forward passes on sae-probes' texts), then shuffled with a generator seeded by the shard's
index. A shard depends on nothing but its texts, so a build that stops anywhere and is started
again continues after the last complete shard and ends bit for bit where an uninterrupted build
ends. Each shard is written to a temporary file and renamed, and only then listed in the
manifest (also replaced atomically): a shard file that the manifest does not list is rewritten.

The manifest records what determines the activations: the model source's fingerprint (a hash of
its file(s), or of the loaded weights where the model is handed in), the submodule, layer, io,
forward dtype, stored dtype, context size, BOS handling, the text split and the shard layout. A
cache whose manifest differs from the configuration is refused, naming the key.

:class:`CachedActivations` serves the training split in batches, in the same order for every SAE,
with the ``state_dict``/``load_state_dict`` position :func:`matryoshka_plugin.train` saves in its
checkpoints; :func:`load_split` reads a whole split (the held-out set).

Massive-activation tokens are filtered when the cache is read, not when it is built: with
``data.max_norm_ratio`` set, :func:`norm_threshold` is that multiple of the held-out split's median
activation norm, and both readers drop every token above it (the cache itself keeps all tokens,
so the rule can change without running the model again).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import SAE_PROBES_TEXT, BenchmarkConfig, ConfigError

__all__ = ["CACHE_ENV", "SPLITS", "CachedActivations", "build_cache", "cache_dir", "expected_manifest",
           "load_split", "norm_threshold", "read_manifest", "split_tokens", "split_texts", "weights_fingerprint"]

CACHE_ENV = "CAUSAL_LM_CACHE_DIR"
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"
_FORMAT = 1
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir(cfg: BenchmarkConfig) -> Path:
    """The cache folder: ``$CAUSAL_LM_CACHE_DIR`` if set, else ``data.cache_dir`` (``~`` expanded),
    else ``<run_dir>/activations``."""
    path = os.environ.get(CACHE_ENV) or cfg.data.cache_dir or str(Path(cfg.run_dir) / "activations")
    return Path(path).expanduser()


# ----------------------------------------------------------------------------------------------
# What the cache holds
# ----------------------------------------------------------------------------------------------


def weights_fingerprint(model: Any, tokenizer: Any = None) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``model``'s parameters and buffers, and
    the tokenizer's vocabulary: what the activations depend on when no source file can be hashed."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if tokenizer is not None:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return "weights:" + h.hexdigest()


def expected_manifest(cfg: BenchmarkConfig, fingerprint: str) -> dict[str, Any]:
    """The manifest's settings for ``cfg`` (everything but the shards)."""
    m, d = cfg.model, cfg.data
    text = {"dataset": d.dataset, "split": d.split, "text_column": d.text_column, "heldout_every": d.heldout_every}
    if d.dataset == SAE_PROBES_TEXT:
        text["excluded"] = sorted(cfg.probing_datasets) if d.exclude_probing_texts else []
    return {
        "format": _FORMAT,
        "model_fingerprint": fingerprint,
        "model_name": m.name,
        "submodule": m.submodule,
        "layer": m.layer,
        "io": m.io,
        "d_model": m.d_model,
        "forward_dtype": m.dtype,
        "stored_dtype": d.cache_dtype,
        "add_bos_token": m.add_bos_token,
        "ctx_len": d.ctx_len,
        "remove_bos": d.remove_bos,
        "text": text,
        "shard_texts": d.cache_shard_texts,
        "refresh_batch_size": d.refresh_batch_size,
    }


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); delete {folder} to rebuild the activation cache") from None


def _check_settings(folder: Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    for key in sorted(set(saved) | set(expected)):
        if key == "splits":
            continue
        if saved.get(key) != expected.get(key):
            raise ConfigError(
                f"the activation cache {folder} was built with {key} = {saved.get(key)!r}, the configuration asks "
                f"for {expected.get(key)!r}; use another data.cache_dir (or --cache-dir) or delete {folder}"
            )


def split_tokens(manifest: dict[str, Any], split: str) -> int:
    return sum(s["tokens"] for s in manifest.get("splits", {}).get(split, []))


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    from matryoshka_plugin.io import atomic_write_json

    atomic_write_json(manifest, folder / MANIFEST, indent=1)


# ----------------------------------------------------------------------------------------------
# Texts
# ----------------------------------------------------------------------------------------------


def split_texts(cfg: BenchmarkConfig, split: str, load_dataset: Callable[..., Any] | None = None) -> Iterator[str]:
    """The texts of one split, in a fixed order, once. ``data.dataset = "sae-probes"``: its
    training or held-out share (``text.py``); any other data set: every ``data.heldout_every``-th
    non-empty text of the stream is held out, the rest is the training split."""
    d = cfg.data
    if d.dataset == SAE_PROBES_TEXT:
        from .text import HELDOUT_NAME, TRAIN_NAME

        name = HELDOUT_NAME if split == "heldout" else TRAIN_NAME
        if load_dataset is None:
            from .pipeline import default_load_dataset

            load_dataset = default_load_dataset(cfg)
        for row in load_dataset(name, split="train", streaming=True):
            yield row["text"]
        return
    if load_dataset is None:
        from datasets import load_dataset
    i = 0
    for row in load_dataset(d.dataset, split=d.split, streaming=True):
        if d.text_column not in row:
            raise ConfigError(f"{d.dataset} has no column {d.text_column!r} (columns: {sorted(row)})")
        text = row[d.text_column]
        if not (isinstance(text, str) and text.strip()):
            continue
        if (i % d.heldout_every == 0) == (split == "heldout"):
            yield text
        i += 1


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _forward(lm: Any, submodule: Any, texts: list[str], ctx_len: int, io: str, remove_bos: bool) -> torch.Tensor:
    """Activations of ``texts`` (one batch), BOS and padding dropped, in text order."""
    with lm.trace(texts, invoker_args={"truncation": True, "max_length": ctx_len}):
        hidden = submodule.inputs[0].save() if io == "in" else submodule.output.save()
        inputs = lm.inputs.save()
        submodule.output.stop()
    hidden = hidden.value
    if isinstance(hidden, tuple):
        hidden = hidden[0]
    mask = inputs.value[1]["attention_mask"]
    if remove_bos:
        hidden, mask = hidden[:, 1:], mask[:, 1:]
    return hidden[mask != 0]


def _shard(lm: Any, submodule: Any, cfg: BenchmarkConfig, texts: list[str], index: int) -> torch.Tensor:
    """One shard: the texts sorted by length, forwarded in batches of ``refresh_batch_size``,
    shuffled by a generator seeded with ``index``."""
    d = cfg.data
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    parts = []
    for s in range(0, len(order), d.refresh_batch_size):
        batch = [texts[i] for i in order[s : s + d.refresh_batch_size]]
        acts = _forward(lm, submodule, batch, d.ctx_len, cfg.model.io, d.remove_bos)
        parts.append(acts.to(device="cpu", dtype=_TORCH_DTYPES[d.cache_dtype]))
    tokens = torch.cat(parts) if parts else torch.empty(0, cfg.model.d_model, dtype=_TORCH_DTYPES[d.cache_dtype])
    if not torch.isfinite(tokens).all():
        raise RuntimeError(f"shard {index}: activations are not finite in {d.cache_dtype}")
    g = torch.Generator().manual_seed(1_000_003 * (index + 1))
    return tokens[torch.randperm(tokens.shape[0], generator=g)].contiguous()


def _shard_path(folder: Path, split: str, index: int) -> Path:
    return folder / split / f"shard_{index:05d}.pt"


def build_cache(
    cfg: BenchmarkConfig,
    lm_factory: Callable[[], Any],
    fingerprint: str | Callable[[Any], str],
    *,
    load_dataset: Callable[..., Any] | None = None,
    targets: dict[str, int] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict[str, Any]:
    """Make the cache hold at least ``targets[split]`` tokens per split (default:
    ``training.tokens`` and ``data.heldout_tokens``), continuing from the last complete shard.

    ``lm_factory()`` returns the nnsight ``LanguageModel`` (called only when a shard is missing);
    ``fingerprint`` is the model source's fingerprint, or a function of the loaded model that
    computes it. ``stop_after_shards`` (tests) raises after that many new shards, as a kill would.
    Returns the manifest.
    """
    folder = cache_dir(cfg)
    targets = targets if targets is not None else {"train": cfg.training.tokens, "heldout": cfg.data.heldout_tokens}
    saved = read_manifest(folder)
    if saved is not None and saved.get("format") != _FORMAT:
        raise ConfigError(f"{folder / MANIFEST} has format {saved.get('format')!r}, not {_FORMAT}; delete {folder}")
    known = isinstance(fingerprint, str)
    if saved is not None:
        _check_settings(folder, saved, expected_manifest(cfg, fingerprint if known else saved["model_fingerprint"]))
    todo = {s: n for s, n in targets.items() if split_tokens(saved or {}, s) < n}
    if not todo:
        return saved
    folder.mkdir(parents=True, exist_ok=True)
    with _BuildLock(folder):
        return _build(cfg, folder, saved, todo, lm_factory, fingerprint, known, load_dataset, log, progress,
                      stop_after_shards)


class _BuildLock:
    """One builder per cache folder: a second process is refused while the first one lives."""

    def __init__(self, folder: Path):
        self.path = folder / ".build.lock"

    def __enter__(self) -> "_BuildLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    self.path.unlink(missing_ok=True)  # left by a process that is gone
                    continue
                except PermissionError:
                    pass
                raise ConfigError(f"process {pid} is building the activation cache {self.path.parent}; wait for it "
                                  f"(or delete {self.path} if it is not running)") from None
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return self
        raise ConfigError(f"cannot take {self.path}")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _build(cfg: BenchmarkConfig, folder: Path, saved: dict[str, Any] | None, todo: dict[str, int],
           lm_factory: Callable[[], Any], fingerprint: Any, known: bool, load_dataset: Callable[..., Any] | None,
           log: Callable[[str], None], progress: bool, stop_after_shards: int | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from matryoshka_plugin.io import atomic_torch_save

    from .pipeline import resolve_submodule

    saved = read_manifest(folder)  # as the lock holder sees it
    lm = lm_factory()
    if not known:
        fingerprint = fingerprint(lm)
    manifest = expected_manifest(cfg, fingerprint)
    if saved is not None:
        _check_settings(folder, saved, manifest)
        manifest["splits"] = saved.get("splits", {})
    manifest.setdefault("splits", {})
    _write_manifest(folder, manifest)
    if cfg.data.remove_bos:
        lm.tokenizer.padding_side = "right"  # position 0 must be the BOS token, not padding
    submodule = resolve_submodule(lm, cfg.model.submodule)
    written = 0
    for split, target in todo.items():
        shards = manifest["splits"].setdefault(split, [])
        (folder / split).mkdir(exist_ok=True)
        have = split_tokens(manifest, split)
        texts = split_texts(cfg, split, load_dataset)
        start = shards[-1]["text_end"] if shards else 0
        texts = itertools.islice(texts, start, None)
        bar = tqdm(total=target, initial=min(have, target), unit="tok", disable=not progress,
                   desc=f"activations ({split}) -> {folder}")
        t0, new_tokens = time.time(), 0
        while have < target:
            chunk = list(itertools.islice(texts, cfg.data.cache_shard_texts))
            if not chunk:
                log(f"warning: the {split} texts ran out at {have:,} tokens ({target:,} asked for)")
                break
            if stop_after_shards is not None and written >= stop_after_shards:
                raise KeyboardInterrupt(f"stopped after {written} shards (stop_after_shards)")
            index = len(shards)
            acts = _shard(lm, submodule, cfg, chunk, index)
            path = _shard_path(folder, split, index)
            atomic_torch_save(acts, str(path))
            shards.append({"file": str(path.relative_to(folder)), "text_start": start, "text_end": start + len(chunk),
                           "tokens": int(acts.shape[0])})
            _write_manifest(folder, manifest)
            start += len(chunk)
            have += int(acts.shape[0])
            new_tokens += int(acts.shape[0])
            written += 1
            bar.update(min(int(acts.shape[0]), max(0, target - bar.n)))
            rate = new_tokens / max(time.time() - t0, 1e-9)
            bar.set_postfix(shards=len(shards), rate=f"{rate:.0f} tok/s")
        bar.close()
        log(f"activation cache {split}: {have:,} tokens in {len(shards)} shards"
            + (f" ({new_tokens:,} new at {new_tokens / max(time.time() - t0, 1e-9):.0f} tokens/s)" if new_tokens else ""))
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _load_shard(folder: Path, entry: dict[str, Any]) -> torch.Tensor:
    return torch.load(folder / entry["file"], weights_only=True, mmap=True)


def _kept(x: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """``x`` without the rows whose norm exceeds ``max_norm`` (None: all rows)."""
    if max_norm is None:
        return x
    return x[x.float().norm(dim=1) <= max_norm]


def _open(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is None:
        raise ConfigError(f"no activation cache in {folder} (no {MANIFEST})")
    return manifest


def norm_threshold(folder: str | Path, ratio: float | None) -> float | None:
    """``ratio`` times the median activation norm of the cache's held-out split (None: no filter).

    Some tokens of a language model's residual stream are attention sinks with norms far beyond
    the rest (SmolLM2's layer 15: a few first tokens of a text at up to ~150 times the median);
    a handful of them dominate the variance, the trainers' norm factor and every FVU, so they are
    left out of training and of the metrics alike."""
    if ratio is None:
        return None
    if not ratio > 1:
        raise ConfigError(f"data.max_norm_ratio must be > 1 (a multiple of the median norm), got {ratio!r}")
    shards = _open(Path(folder))["splits"].get("heldout", [])
    return float(ratio) * _median_norm(str(folder), tuple((e["file"], e["tokens"]) for e in shards))


@functools.lru_cache(maxsize=8)
def _median_norm(folder: str, shards: tuple[tuple[str, int], ...]) -> float:
    """The median activation norm of the held-out split, once per process and shard list (every
    training group, the sweep's and the report's metrics and core ask for the same threshold)."""
    x = load_split(folder, "heldout")
    if x.shape[0] == 0:
        raise ConfigError(f"the activation cache {folder} has no held-out tokens to take the median norm of")
    return float(x.norm(dim=1).median())


def load_split(folder: str | Path, split: str, n_tokens: int | None = None,
               dtype: torch.dtype = torch.float32, max_norm: float | None = None) -> torch.Tensor:
    """The first ``n_tokens`` (None: all) activations of a split whose norm is at most ``max_norm``
    (None: every token), as ``dtype``."""
    folder = Path(folder)
    manifest = _open(folder)
    parts, got = [], 0
    for entry in manifest["splits"].get(split, []):
        if n_tokens is not None and got >= n_tokens:
            break
        x = _kept(_load_shard(folder, entry).to(dtype), max_norm)
        parts.append(x)
        got += x.shape[0]
    if n_tokens is not None and got < n_tokens:
        kept = "" if max_norm is None else f" of norm <= {max_norm:.1f}"
        raise ConfigError(f"the activation cache {folder} holds {got:,} {split} tokens{kept}, {n_tokens:,} asked for")
    out = torch.cat(parts) if parts else torch.empty(0, manifest["d_model"], dtype=dtype)
    return out if n_tokens is None else out[:n_tokens]


class CachedActivations:
    """Batches of ``batch_size`` activations of a cached split, in the cache's order (the same for
    every SAE), as float32 on ``device``, without the tokens whose norm exceeds ``max_norm`` (None:
    every token). Iterating starts at the loaded position (0 by default), so the norm factor and
    then the training each read from the start, as with a re-iterable buffer; ``state_dict()`` is
    the position of the current iteration."""

    def __init__(self, folder: str | Path, batch_size: int, split: str = "train", device: str = "cpu",
                 n_batches: int | None = None, max_norm: float | None = None):
        self.folder, self.split, self.batch_size, self.device = Path(folder), split, int(batch_size), device
        self.max_norm = None if max_norm is None else float(max_norm)
        self.manifest = _open(self.folder)
        self.shards = list(self.manifest["splits"].get(split, []))
        # Tokens per shard after the filter: what positions and the batch count are measured in.
        self.kept = [entry["tokens"] if self.max_norm is None else _kept(_load_shard(self.folder, entry), self.max_norm).shape[0]
                     for entry in self.shards]
        available = sum(self.kept) // self.batch_size
        if n_batches is not None and n_batches > available:
            kept = "" if self.max_norm is None else f" (tokens of norm <= {self.max_norm:.1f})"
            raise ConfigError(f"the activation cache {self.folder} holds {available} {split} batches of "
                              f"{self.batch_size}{kept}, {n_batches} asked for; build it further first")
        self.n_batches = available if n_batches is None else int(n_batches)
        self._start = 0
        self._position = 0

    @property
    def config(self) -> dict[str, Any]:
        """What ``train`` saves as ``config.json["buffer"]``."""
        m = self.manifest
        return {"source": "benchmarks.causal_lm_comparison.activations.CachedActivations", "split": self.split,
                "ctx_len": m["ctx_len"], "io": m["io"], "d_submodule": m["d_model"], "remove_bos": m["remove_bos"],
                "max_norm": self.max_norm, "out_batch_size": self.batch_size, "forward_dtype": m["forward_dtype"],
                "stored_dtype": m["stored_dtype"], "device": str(self.device)}

    def state_dict(self) -> dict[str, Any]:
        return {"batch": self._position, "batch_size": self.batch_size, "split": self.split, "max_norm": self.max_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("batch_size") != self.batch_size or state.get("split") != self.split
                or state.get("max_norm") != self.max_norm):
            raise ValueError(f"the saved position is for {state.get('split')!r} batches of {state.get('batch_size')} "
                             f"(max_norm {state.get('max_norm')}), not {self.split!r} batches of {self.batch_size} "
                             f"(max_norm {self.max_norm})")
        self._start = self._position = int(state["batch"])

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._position = self._start
        return self._batches(self._start)

    def _batches(self, first: int) -> Iterator[torch.Tensor]:
        b = self.batch_size
        skip = first * b  # kept tokens before the first batch
        pending: list[torch.Tensor] = []
        have = 0
        batch = first
        for entry, kept in zip(self.shards, self.kept):
            if batch >= self.n_batches:
                return
            if skip >= kept:
                skip -= kept
                continue
            x = _kept(_load_shard(self.folder, entry), self.max_norm)[skip:]
            skip = 0
            pending.append(x)
            have += x.shape[0]
            while have >= b and batch < self.n_batches:
                cat = torch.cat(pending) if len(pending) > 1 else pending[0]
                out, rest = cat[:b], cat[b:]
                pending, have = [rest], rest.shape[0]
                batch += 1
                self._position = batch
                yield out.to(device=self.device, dtype=torch.float32)
