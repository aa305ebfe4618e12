"""Activations of a language model over a text stream, resumable by document offset.

:class:`ActivationSource` plays the part of dictionary_learning's ``ActivationBuffer`` (same
arguments: ``n_ctxs``, ``ctx_len``, ``refresh_batch_size``, ``out_batch_size``, ``io``,
``d_submodule``, ``remove_bos``) with a position that can be saved: it reads the text in blocks of
``n_ctxs`` documents, runs the model over a block, shuffles the block's tokens with a generator
seeded by the block's index and hands out batches. Its ``state_dict()`` is the document offset of
the current block, the number of batches already handed out from it and the few tokens carried
over from the previous block, so :func:`~matryoshka_plugin.train` resumes it by skipping the
documents already used (reading them, not running the model on them) and recomputing one block.

Unlike ``ActivationBuffer``, which refills half its buffer and mixes old and new tokens, tokens
from different blocks are not mixed (save the few carried over); make ``n_ctxs`` large enough
that a block spans many documents.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

__all__ = ["ActivationSource"]

_STATE_FORMAT = 1


class ActivationSource:
    """Batches of ``[out_batch_size, d_submodule]`` activations of ``submodule`` of an nnsight
    ``LanguageModel`` over ``texts`` (strings, or records with a ``text_field``; a ``datasets``
    dataset is skipped with its own ``skip``)."""

    def __init__(
        self,
        texts: Iterable[Any],
        model: Any,
        submodule: Any,
        d_submodule: int,
        *,
        io: str = "out",
        n_ctxs: int = 3000,
        ctx_len: int = 128,
        refresh_batch_size: int = 512,
        out_batch_size: int = 8192,
        device: str = "cpu",
        remove_bos: bool = False,
        text_field: str = "text",
        seed: int = 0,
    ):
        if io not in ("in", "out"):
            raise ValueError(f"io must be 'in' or 'out', got {io!r}")
        for name, value in (("n_ctxs", n_ctxs), ("ctx_len", ctx_len), ("refresh_batch_size", refresh_batch_size),
                            ("out_batch_size", out_batch_size), ("d_submodule", d_submodule)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.texts, self.model, self.submodule = texts, model, submodule
        self.d_submodule, self.io = int(d_submodule), io
        self.n_ctxs, self.ctx_len = int(n_ctxs), int(ctx_len)
        self.refresh_batch_size, self.out_batch_size = int(refresh_batch_size), int(out_batch_size)
        self.device, self.remove_bos, self.text_field, self.seed = device, bool(remove_bos), text_field, int(seed)
        # Position: documents before the current block, batches handed out from it, and the tokens
        # carried into it from the previous block.
        self._block_start = 0
        self._block_index = 0
        self._served = 0
        self._carry = torch.empty(0, self.d_submodule)
        self._docs: Iterator[Any] | None = None
        self._block: torch.Tensor | None = None
        self._n_docs = 0  # documents in the current block
        self._exhausted = False

    @property
    def config(self) -> dict[str, Any]:
        """What ``train``/``trainSAE`` save as ``config.json["buffer"]``."""
        return {
            "d_submodule": self.d_submodule, "io": self.io, "n_ctxs": self.n_ctxs, "ctx_len": self.ctx_len,
            "refresh_batch_size": self.refresh_batch_size, "out_batch_size": self.out_batch_size,
            "device": str(self.device), "source": "matryoshka_plugin.ActivationSource", "seed": self.seed,
        }

    # -- position ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position: enough to continue with the next batch after :meth:`load_state_dict`."""
        return {
            "format": _STATE_FORMAT, "block_start": self._block_start, "block_index": self._block_index,
            "served": self._served, "carry": self._carry.cpu(), "config": self.config,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (call before iterating; ``texts`` from its start)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not an ActivationSource position (format {state.get('format')!r})")
        mine = {k: v for k, v in self.config.items() if k != "device"}
        theirs = {k: v for k, v in state["config"].items() if k != "device"}
        if mine != theirs:
            diffs = [f"{k}: saved {theirs.get(k)!r}, now {mine.get(k)!r}" for k in sorted(set(mine) | set(theirs))
                     if mine.get(k) != theirs.get(k)]
            raise ValueError("the activation source's settings differ from the saved position's: " + "; ".join(diffs))
        if self._docs is not None:
            raise RuntimeError("load_state_dict must be called before the source is iterated")
        self._block_start, self._block_index = int(state["block_start"]), int(state["block_index"])
        self._served, self._carry = int(state["served"]), state["carry"].clone()

    # -- reading --------------------------------------------------------------------------------------

    def _documents(self) -> Iterator[Any]:
        texts = self.texts
        if self._block_start and hasattr(texts, "skip"):
            return iter(texts.skip(self._block_start))  # datasets: drops records without decoding work
        return itertools.islice(iter(texts), self._block_start, None)

    def _text(self, doc: Any) -> str:
        return doc[self.text_field] if isinstance(doc, dict) else doc

    @torch.no_grad()
    def _activations(self, texts: list[str]) -> torch.Tensor:
        with self.model.trace(texts, invoker_args={"truncation": True, "max_length": self.ctx_len}):
            hidden = self.submodule.inputs[0].save() if self.io == "in" else self.submodule.output.save()
            inputs = self.model.inputs.save()
            self.submodule.output.stop()
        hidden = hidden.value
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        mask = inputs.value[1]["attention_mask"]
        if self.remove_bos:
            hidden, mask = hidden[:, 1:], mask[:, 1:]
        return hidden[mask != 0].to(device="cpu", dtype=torch.float32)

    def _build_block(self) -> bool:
        """Read the current block's documents and compute its shuffled tokens; False at the end."""
        docs = list(itertools.islice(self._docs, self.n_ctxs))
        if not docs:
            return False
        parts = [self._carry]
        for s in range(0, len(docs), self.refresh_batch_size):
            parts.append(self._activations([self._text(d) for d in docs[s : s + self.refresh_batch_size]]))
        tokens = torch.cat(parts)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._block_index)
        self._block = tokens[torch.randperm(tokens.shape[0], generator=g)]
        self._n_docs = len(docs)
        return True

    def __iter__(self) -> "ActivationSource":
        return self

    def __next__(self) -> torch.Tensor:
        if self._docs is None:
            self._docs = self._documents()
        while True:
            if self._block is None:
                if self._exhausted or not self._build_block():
                    self._exhausted = True
                    raise StopIteration
            b = self.out_batch_size
            lo = self._served * b
            if lo + b <= self._block.shape[0]:
                self._served += 1
                return self._block[lo : lo + b].to(self.device)
            # The block is used up: its remainder moves into the next block.
            self._carry = self._block[lo:].clone()
            self._block_start += self._n_docs
            self._block_index += 1
            self._served = 0
            self._block = None
