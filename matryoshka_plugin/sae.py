"""The Matryoshka SAE modules.

* :class:`MatryoshkaBatchTopKSAE` — BatchTopK encoder with nested groups; its state dict is
  identical to dictionary_learning's class of the same name (``W_enc [d, n]``, ``b_enc``,
  ``W_dec [n, d]``, ``b_dec``, ``k``, ``threshold``, ``group_sizes``), so checkpoints move
  freely between the two and SAEBench's dictionary_learning loaders read ours.
* :class:`MatryoshkaLogSparsitySAE` — the original post's ReLU SAE with free decoder norms
  and a running input scale. Its public ``encode``/``decode`` fold the scale and decoder
  norms in: latents are activation magnitudes along unit-norm decoder directions, in the
  units of the raw input.

Both accept ``[..., d]`` input (2-D batches or 3-D ``[batch, seq, d]``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import LOCAL, LocalCollective, ProcessGroupCollective
from .errors import CheckpointError, check_activations
from .import_hooks import import_leaf
from .io import check_keys, read_state_dict
from .prefix_loss import PrefixLoss, detached_level_mse, level_residuals, prefix_mse
from .prefixes import PrefixWeights
from .registry import provide
from .sparse_encoder import TopKEncoding, batch_topk_encode, batch_topk_select, top_dead_entries
from .sparse_latents import SparseLatents, sparse_decode, sparse_from_dense, sparse_from_flat

# Without dictionary_learning/__init__, which imports nnsight and transformers (import_hooks).
Dictionary = import_leaf("dictionary_learning.dictionary").Dictionary

__all__ = [
    "BatchTopKForward",
    "LogSparsityForward",
    "MatryoshkaBatchTopKSAE",
    "MatryoshkaLogSparsitySAE",
    "load_matryoshka_batch_topk",
    "load_matryoshka_log_sparsity",
]


def _tokens(x: torch.Tensor, d: int) -> torch.Tensor:
    """``x`` as ``[tokens, d]``; non-finite values raise :class:`~.errors.ActivationError` (the
    trainers' input check), since NaN would otherwise win every top-k and spread silently."""
    if x.shape[-1] != d:
        raise ValueError(f"expected activations with last dimension {d}, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, d)
    if x2.shape[0]:
        check_activations(x2, d)
    return x2


class BatchTopKForward(NamedTuple):
    """One training forward pass of :class:`MatryoshkaBatchTopKSAE`
    (:meth:`~MatryoshkaBatchTopKSAE.training_forward`): what the trainer's loss terms need."""

    latents: SparseLatents
    """The batch's selected activations (``values`` differentiable, sparse backward)."""
    pre_activations: torch.Tensor
    """``[B, n]`` dense ReLU pre-activations, no graph (AuxK's candidates, the threshold's L0)."""
    recon: PrefixLoss
    """The prefix reconstruction loss (with graph) and the full SAE's residual (detached; AuxK fits it)."""


class LogSparsityForward(NamedTuple):
    """One training forward pass of :class:`MatryoshkaLogSparsitySAE`
    (:meth:`~MatryoshkaLogSparsitySAE.training_forward`) on scaled input."""

    activations: torch.Tensor
    """ReLU activations ``[B, n]`` of the scaled input (decoder norms not folded in)."""
    magnitudes: torch.Tensor
    """Activations times decoder-row norms: what the sparsity penalty acts on."""
    recon: PrefixLoss
    """The prefix reconstruction loss (with graph) and the full SAE's residual (detached)."""


def _resolve_weights_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "ae.pt" if path.is_dir() else path


class _SAEBase(Dictionary, nn.Module):
    activation_dim: int
    dict_size: int

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def forward(self, x: torch.Tensor, output_features: bool = False):
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    @classmethod
    def _read_state_dict(cls, path: str | Path) -> dict[str, torch.Tensor]:
        return read_state_dict(_resolve_weights_path(path))


class MatryoshkaBatchTopKSAE(_SAEBase):
    """BatchTopK SAE whose latents form nested groups (widths ``cumsum(group_sizes)``).

    ``encode`` uses the learned inference threshold once it exists; before that (an SAE
    trained for fewer than ``threshold_start_step`` steps) it falls back to BatchTopK over
    the given tokens instead of encoding densely. Set ``active_groups`` to use only the
    first groups as a smaller, nested SAE.
    """

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: Sequence[int]):
        super().__init__()
        group_sizes = [int(s) for s in group_sizes]
        if sum(group_sizes) != dict_size:
            raise ValueError(f"group sizes {group_sizes} sum to {sum(group_sizes)}, not dict_size={dict_size}")
        if any(s <= 0 for s in group_sizes):
            raise ValueError(f"every group needs at least one latent, got group sizes {group_sizes}")
        if isinstance(k, bool) or int(k) != k or not (0 < int(k) <= dict_size):
            raise ValueError(f"k must be an integer in [1, dict_size={dict_size}], got {k}")
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.register_buffer("k", torch.tensor(int(k), dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.register_buffer("group_sizes", torch.tensor(group_sizes))
        self.active_groups = len(group_sizes)
        self.group_indices = [0] + torch.cumsum(torch.tensor(group_sizes), 0).tolist()

        w = torch.empty(dict_size, activation_dim)
        nn.init.kaiming_uniform_(w)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # Registration order as upstream (W_enc, b_enc, W_dec, b_dec), so optimizer states line up.
        # W_enc is [d, n] and contiguous, as upstream: fused Adam steps a transposed view only
        # through a contiguous copy of it, its gradient and moments, every step (docs/speed.md).
        self.W_enc = nn.Parameter(w.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(w)
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))

    @property
    def widths(self) -> list[int]:
        """Cumulative nested widths (the end index of each group)."""
        return self.group_indices[1:]

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``relu((x - b_dec) @ W_enc + b_enc)`` for ``[tokens, d]`` input."""
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def batch_topk(self, post_relu: torch.Tensor) -> SparseLatents:
        """The ``k * tokens`` largest entries of ``post_relu`` over the whole batch."""
        rows, n = post_relu.shape
        flat = batch_topk_select(post_relu.detach(), min(int(self.k) * rows, post_relu.numel()))
        return sparse_from_flat(flat, post_relu.reshape(-1)[flat], rows, n, presorted=True)

    def encode_training(
        self, x: torch.Tensor, backend: str = "auto", matmul_dtype: torch.dtype | None = None,
        collective: LocalCollective | ProcessGroupCollective = LOCAL,
    ) -> TopKEncoding:
        """BatchTopK latents of ``[tokens, d]`` input for training and the dense pre-activations
        (``sparse_encoder.batch_topk_encode`` with this SAE's weights and ``k``)."""
        return batch_topk_encode(x, self.W_enc, self.b_enc, self.b_dec, int(self.k), backend, matmul_dtype, collective)

    def training_forward(
        self,
        x: torch.Tensor,
        weights: PrefixWeights,
        backend: str = "auto",
        matmul_dtype: torch.dtype | None = None,
        collective: LocalCollective | ProcessGroupCollective = LOCAL,
        consume_grads: bool = False,
        detach_level_ends: Sequence[int] | None = None,
    ) -> BatchTopKForward:
        """Encode ``[tokens, d]`` input (:meth:`encode_training`) and score its prefix
        reconstructions under ``weights`` (``prefix_loss.prefix_mse``; with ``detach_level_ends``
        a stop-gradient between those levels, ``prefix_loss.detached_level_mse``).
        ``consume_grads``: the loss allows one backward pass (see ``prefix_mse``)."""
        latents, pre = self.encode_training(x, backend, matmul_dtype, collective)
        if detach_level_ends is not None:
            recon = detached_level_mse(x, latents, self.W_dec, self.b_dec, weights, detach_level_ends)
        else:
            recon = prefix_mse(x, latents, self.W_dec, self.b_dec, weights, backend=backend, consume_grads=consume_grads)
        return BatchTopKForward(latents, pre, recon)

    def dead_latent_decode(
        self, x: torch.Tensor, pre_activations: torch.Tensor, dead: torch.Tensor, k_aux: int, backend: str = "auto"
    ) -> torch.Tensor:
        """``[tokens, d]``: each token decoded from its ``k_aux`` largest dead latents alone, without
        the bias (the AuxK reconstruction; differentiable through the sparse encoder backward)."""
        vals, idx = top_dead_entries(x, self.W_enc, self.b_enc, self.b_dec, pre_activations, dead, k_aux, backend)
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")

    def level_residuals(self, x: torch.Tensor, latents: SparseLatents, level_ends: Sequence[int]) -> list[torch.Tensor]:
        """The residual left by each nested level of ``latents`` (``prefix_loss.level_residuals``)."""
        return level_residuals(x, latents, self.W_dec, self.b_dec, level_ends)

    def encode(self, x: torch.Tensor, return_active: bool = False, use_threshold: bool = True):
        shape = x.shape
        x2 = _tokens(x, self.activation_dim)
        post_relu = self.pre_activations(x2)
        if use_threshold and float(self.threshold) >= 0:
            f = post_relu * (post_relu > self.threshold)
        else:
            f = self.batch_topk(post_relu).to_dense()
        end = self.group_indices[self.active_groups]
        if end < self.dict_size:
            f = torch.cat([f[:, :end], f.new_zeros(f.shape[0], self.dict_size - end)], 1)
        f = f.reshape(*shape[:-1], self.dict_size)
        if return_active:
            active = f.reshape(-1, self.dict_size).sum(0) > 0
            return f, active, post_relu.reshape(*shape[:-1], self.dict_size)
        return f

    def decode(self, f: torch.Tensor | SparseLatents) -> torch.Tensor:
        if isinstance(f, SparseLatents):
            return sparse_decode(f, self.W_dec, self.b_dec)
        return f @ self.W_dec + self.b_dec

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        self.b_enc.mul_(scale)
        self.b_dec.mul_(scale)
        if float(self.threshold) >= 0:
            self.threshold.mul_(scale)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, k: int | None = None, device: str | torch.device | None = None, **kwargs
    ) -> "MatryoshkaBatchTopKSAE":
        """Load from an ``ae.pt`` file (or a folder holding one)."""
        state = cls._read_state_dict(path)
        check_keys(state, ["W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"], path)
        d, n = state["W_enc"].shape
        saved_k = int(state["k"])
        if k is not None and int(k) != saved_k:
            raise CheckpointError(f"k={k} was asked for but {path} was trained with k={saved_k}")
        sae = cls(d, n, saved_k, state["group_sizes"].tolist())
        try:
            sae.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not hold a valid {cls.__name__}: {e}") from None
        return sae.to(device) if device is not None else sae


class MatryoshkaLogSparsitySAE(_SAEBase):
    """ReLU SAE from the original Matryoshka post (log sparsity penalty, free decoder norms).

    Raw parameters act on scaled input ``x * sqrt(d) / input_norm`` (``input_norm`` is a
    running mean of ``||x||`` kept by the trainer): ``a = relu(x_s @ W_enc + b_enc)``,
    ``x_s_hat = a @ W_dec + b_dec``. ``encode`` returns ``a * ||w|| * input_norm / sqrt(d)``,
    the latent's magnitude in input units along its unit decoder direction, and ``decode``
    maps those back to the input's units.
    """

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        if dict_size < 1 or activation_dim < 1:
            raise ValueError(f"need positive sizes, got activation_dim={activation_dim}, dict_size={dict_size}")
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.W_enc = nn.Parameter(torch.randn(activation_dim, dict_size) / math.sqrt(activation_dim))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        w = self.W_enc.detach()
        self.W_dec = nn.Parameter((0.1 * w / w.norm(dim=0, keepdim=True)).T.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        # 0 means "not measured yet": the input is then used unscaled.
        self.register_buffer("input_norm", torch.tensor(0.0))
        self.prefix_length = dict_size

    def input_scale(self) -> torch.Tensor:
        """``input_norm / sqrt(d)``: raw input = scaled input * this."""
        norm = self.input_norm.to(self.W_enc.dtype)
        return torch.where(norm > 0, norm / math.sqrt(self.activation_dim), torch.ones_like(norm))

    def raw_encode(self, x_scaled: torch.Tensor, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Training-time activations ``a`` on scaled input (decoder norms not folded in).

        With ``matmul_dtype`` (bf16/fp16, see ``sparse_encoder.encoder_matmul_dtype``) the matmul
        and its backward run in that dtype under autocast (fp32 accumulation) on copies of the fp32
        master weights; the bias, the ReLU and everything downstream stay in ``W_enc``'s dtype.
        """
        if matmul_dtype is None or matmul_dtype == self.W_enc.dtype:
            return torch.relu(x_scaled @ self.W_enc + self.b_enc)
        with torch.autocast(x_scaled.device.type, dtype=matmul_dtype):
            pre = x_scaled @ self.W_enc
        return torch.relu(pre.to(self.W_enc.dtype) + self.b_enc)

    def training_forward(
        self,
        x_scaled: torch.Tensor,
        weights: PrefixWeights,
        backend: str = "auto",
        matmul_dtype: torch.dtype | None = None,
        consume_grads: bool = False,
    ) -> LogSparsityForward:
        """Activations of scaled input (:meth:`raw_encode`), their magnitudes, and the prefix
        reconstruction loss under ``weights`` (``prefix_loss.prefix_mse`` on the active entries)."""
        a = self.raw_encode(x_scaled, matmul_dtype)
        recon = prefix_mse(x_scaled, sparse_from_dense(a), self.W_dec, self.b_dec, weights,
                           backend=backend, consume_grads=consume_grads)
        return LogSparsityForward(a, a * self.W_dec.norm(dim=1), recon)

    def folded_weights(self) -> dict[str, torch.Tensor]:
        """Weights of the equivalent plain ReLU SAE on raw input with unit-norm decoder rows.

        ``f = relu(x @ W_enc + b_enc)``, ``x_hat = f @ W_dec + b_dec`` reproduces
        ``encode``/``decode`` exactly (used for export and by ``encode`` itself).
        """
        c = self.input_scale()
        norms = self.W_dec.norm(dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        return {
            "W_enc": self.W_enc * norms[None, :],
            "b_enc": self.b_enc * norms * c,
            "W_dec": self.W_dec / safe[:, None],
            "b_dec": self.b_dec * c,
        }

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = _tokens(x, self.activation_dim)
        c = self.input_scale()
        norms = self.W_dec.norm(dim=1)
        f = self.raw_encode(x2 / c) * (norms * c)
        if self.prefix_length < self.dict_size:
            f = torch.cat([f[:, : self.prefix_length], f.new_zeros(f.shape[0], self.dict_size - self.prefix_length)], 1)
        return f.reshape(*shape[:-1], self.dict_size)

    def decode(self, f: torch.Tensor | SparseLatents) -> torch.Tensor:
        c = self.input_scale()
        norms = self.W_dec.norm(dim=1)
        unit = self.W_dec / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
        if isinstance(f, SparseLatents):
            return sparse_decode(f, unit, self.b_dec * c)
        return f @ unit + self.b_dec * c

    @torch.no_grad()
    def scale_biases(self, scale: float) -> None:
        # The SAE normalises its own input, so raw inputs `scale` times larger only need a
        # correspondingly larger input norm.
        if float(self.input_norm) > 0:
            self.input_norm.mul_(scale)
        elif scale != 1.0:
            self.input_norm.fill_(scale * math.sqrt(self.activation_dim))

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None, **kwargs
    ) -> "MatryoshkaLogSparsitySAE":
        """Load from an ``ae.pt`` file (or a folder holding one)."""
        state = cls._read_state_dict(path)
        check_keys(state, ["W_enc", "b_enc", "W_dec", "b_dec", "input_norm"], path)
        d, n = state["W_enc"].shape
        sae = cls(d, n)
        try:
            sae.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not hold a valid {cls.__name__}: {e}") from None
        return sae.to(device) if device is not None else sae


def load_matryoshka_batch_topk(
    weights_path: Path, trainer_cfg: Mapping[str, Any], device: str | torch.device | None
) -> MatryoshkaBatchTopKSAE:
    """The registry's loader for ``MatryoshkaBatchTopKSAE`` folders: ``k`` must match the config's."""
    return MatryoshkaBatchTopKSAE.from_pretrained(weights_path, k=trainer_cfg.get("k"), device=device)


def load_matryoshka_log_sparsity(
    weights_path: Path, trainer_cfg: Mapping[str, Any], device: str | torch.device | None
) -> MatryoshkaLogSparsitySAE:
    """The registry's loader for ``MatryoshkaLogSparsitySAE`` folders."""
    return MatryoshkaLogSparsitySAE.from_pretrained(weights_path, device=device)


# This module's classes hand the registry their loaders (registry.provide).
provide("MatryoshkaBatchTopKSAE", load=load_matryoshka_batch_topk)
provide("MatryoshkaLogSparsitySAE", load=load_matryoshka_log_sparsity)
