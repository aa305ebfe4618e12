"""Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda; ICML 2025).

A drop-in replacement for dictionary_learning's ``MatryoshkaBatchTopKTrainer``: every keyword
of that trainer has the same meaning, so swapping the import is the only change.

Differences, all deliberate:

* the reconstruction term is the sparse prefix loss (``prefix_loss``), a *weighted mean* of
  the prefix MSEs (weights sum to 1; upstream's default is the mean times 1/G);
* ``prefix_mode``: ``"groups"`` (default), ``"every"`` prefix exactly, ``"pareto"`` random
  prefixes, their exact expectation ``"pareto_expected"``, or ``"none"`` (plain BatchTopK);
* ``balance_beta``: inner levels weighted ``beta**depth`` (feature-hedging remedy);
* upstream defects avoided: no dense encoding before a threshold exists (falls back to
  BatchTopK), bf16 input works, counters live on the trainer's device, ``loss(logging=True)``
  changes no state, and ``effective_l0`` is measured.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..kernels import BACKENDS
from ..prefix_loss import prefix_mse
from ..prefixes import PrefixSampler, group_sizes_from_fractions
from ..sae import MatryoshkaBatchTopKSAE
from ..sparse_encoder import encoder_entries
from ..sparse_latents import SparseLatents
from ..threads import threads_by_work
from .common import (
    LossLog,
    MatryoshkaTrainerBase,
    check_positive,
    constant_warmup_decay_schedule,
    geometric_median,
    make_adam,
    project_out_radial_,
)

__all__ = ["MatryoshkaBatchTopKTrainer"]


class MatryoshkaBatchTopKTrainer(MatryoshkaTrainerBase):
    """Train a :class:`MatryoshkaBatchTopKSAE` with ``dictionary_learning.training.trainSAE``."""

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        k: int,
        layer: int | None = None,
        lm_name: str | None = None,
        group_fractions: Sequence[float] | None = None,
        group_weights: Sequence[float] | None = None,
        dict_class: type = MatryoshkaBatchTopKSAE,
        lr: float | None = None,
        auxk_alpha: float = 1 / 32,
        warmup_steps: int = 1000,
        decay_start: int | None = None,
        threshold_beta: float = 0.999,
        threshold_start_step: int = 1000,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "MatryoshkaBatchTopKSAE",
        submodule_name: str | None = None,
        prefix_mode: str = "groups",
        balance_beta: float | None = None,
        n_prefixes: int = 10,
        pareto_power: float = 0.5,
        dead_feature_threshold: int = 10_000_000,
        top_k_aux: int | None = None,
        backend: str = "auto",
    ):
        super().__init__(steps, activation_dim, dict_size, layer, lm_name, seed, device, wandb_name, submodule_name)
        if isinstance(k, bool) or int(k) != k or not (0 < int(k) <= dict_size):
            raise ValueError(f"k must be an integer in [1, dict_size={dict_size}], got {k!r}")
        self.k = int(k)
        if group_fractions is None:
            if prefix_mode == "groups":
                raise ValueError("group_fractions is required with prefix_mode='groups'")
            group_fractions = [1.0]
        self.group_fractions = [float(f) for f in group_fractions]
        self.group_sizes = group_sizes_from_fractions(dict_size, self.group_fractions)
        if group_weights is not None and len(group_weights) != len(self.group_sizes):
            raise ValueError(
                f"{len(group_weights)} group_weights for {len(self.group_sizes)} groups "
                f"(group_fractions {self.group_fractions})"
            )
        self.group_weights = None if group_weights is None else [float(w) for w in group_weights]
        self.prefix_mode = prefix_mode
        self.balance_beta = balance_beta
        self.n_prefixes, self.pareto_power = int(n_prefixes), float(pareto_power)
        self.prefixes = PrefixSampler(
            prefix_mode,
            dict_size,
            group_sizes=self.group_sizes,
            group_weights=self.group_weights,
            balance_beta=balance_beta,
            n_prefixes=self.n_prefixes,
            pareto_power=self.pareto_power,
        )
        check_positive("auxk_alpha", auxk_alpha, allow_zero=True)
        if not (0.0 <= threshold_beta < 1.0):
            raise ValueError(f"threshold_beta must lie in [0, 1), got {threshold_beta}")
        self.auxk_alpha = float(auxk_alpha)
        self.threshold_beta = float(threshold_beta)
        self.threshold_start_step = int(threshold_start_step)
        self.warmup_steps, self.decay_start = int(warmup_steps), decay_start
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.backend = backend

        self.dict_class = dict_class
        self.ae = dict_class(activation_dim, dict_size, self.k, self.group_sizes).to(self.device)
        # Auto-selected like upstream: 1/sqrt(dict size) scaling from 2e-4 at 2^14 latents.
        self.lr = float(lr) if lr is not None else 2e-4 / (dict_size / 2**14) ** 0.5
        check_positive("lr", self.lr)
        self.dead_feature_threshold = int(dead_feature_threshold)
        self.top_k_aux = int(top_k_aux) if top_k_aux is not None else activation_dim // 2

        self.optimizer = make_adam(self.ae.parameters(), self.lr, (0.9, 0.999))
        schedule = constant_warmup_decay_schedule(self.steps, self.warmup_steps, decay_start)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=schedule)

        self.num_tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=self.device)
        self._b_dec_initialised = False
        self.logging_parameters = ["effective_l0", "threshold_l0", "dead_features", "pre_norm_auxk_loss"]
        self.effective_l0 = -1.0
        self.threshold_l0 = -1.0
        self.dead_features = -1
        self.pre_norm_auxk_loss = -1.0

    # -- the loss ---------------------------------------------------------------------------

    def _dead_mask(self, latents: SparseLatents) -> tuple[torch.Tensor, torch.Tensor]:
        """Counters after this batch (without storing them) and the resulting dead mask."""
        fired = torch.zeros_like(self.num_tokens_since_fired, dtype=torch.bool)
        fired[latents.indices[latents.values > 0]] = True
        since = torch.where(fired, 0, self.num_tokens_since_fired + latents.batch_size)
        return since, since >= self.dead_feature_threshold

    def _auxk_loss(self, x, residual: torch.Tensor, post_relu: torch.Tensor, dead: torch.Tensor):
        n_dead = int(dead.sum())
        if n_dead == 0 or self.auxk_alpha == 0:
            return residual.new_zeros(()), -1.0
        k_aux = min(self.top_k_aux, n_dead)
        with torch.no_grad():
            masked = post_relu.masked_fill(~dead[None, :], float("-inf"))
            vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
        rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
        ae = self.ae
        vals = encoder_entries(x, ae.W_enc, ae.b_enc, ae.b_dec, rows, idx.reshape(-1), vals.reshape(-1), self.backend)
        recon = F.embedding_bag(idx, ae.W_dec, per_sample_weights=vals.view(-1, k_aux), mode="sum")
        l2 = (residual.float() - recon.float()).pow(2).sum(-1).mean()
        denom = (residual.float() - residual.float().mean(0)).pow(2).sum(-1).mean()
        return (l2 / denom).nan_to_num(0.0), float(l2)

    def _forward(self, x: torch.Tensor, step: int | None, training: bool):
        latents, post_relu = self.ae.encode_training(x, self.backend)
        weights = self.prefixes.sample(self.generator) if training else self.prefixes.expected()
        recon = prefix_mse(
            x, latents, self.ae.W_dec, self.ae.b_dec, weights, backend=self.backend, consume_grads=training
        )
        since, dead = self._dead_mask(latents)
        auxk, pre_norm_auxk = self._auxk_loss(x, recon.residual, post_relu, dead)
        loss = recon.loss + self.auxk_alpha * auxk
        parts = {"l2_loss": recon.loss.item(), "auxk_loss": auxk.item()}
        self._check_loss(loss, step, parts)
        stats = {"since": since, "dead": dead, "pre_norm_auxk": pre_norm_auxk}
        return loss, latents, recon, post_relu, parts, stats

    @threads_by_work
    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        """The training loss on ``x`` without changing any state (threshold, counters, RNG).

        Random prefix modes use their exact expectation here.
        """
        x = self._prepare(x, step)
        loss, latents, recon, _, parts, _ = self._forward(x, step, training=False)
        if not logging:
            return loss
        f = latents._replace(values=latents.values.detach()).to_dense()
        x_hat = x - recon.residual
        return LossLog(x, x_hat, f, {**parts, "loss": loss.item()})

    # -- one optimisation step ----------------------------------------------------------------

    @torch.no_grad()
    def _update_threshold(self, latents: SparseLatents) -> None:
        active = latents.values[latents.values > 0]
        smallest = float(active.min()) if active.numel() else 0.0
        thr = self.ae.threshold
        if float(thr) < 0:
            thr.fill_(smallest)
        else:
            thr.mul_(self.threshold_beta).add_((1 - self.threshold_beta) * smallest)

    @threads_by_work
    def update(self, step: int, x: torch.Tensor) -> float:
        x = self._prepare(x, step)
        if not self._b_dec_initialised:
            self.ae.b_dec.data.copy_(geometric_median(x).to(self.ae.b_dec.dtype))
            self._b_dec_initialised = True
        loss, latents, _, post_relu, _, stats = self._forward(x, step, training=True)

        with torch.no_grad():
            if step > self.threshold_start_step:
                self._update_threshold(latents)
            self.num_tokens_since_fired.copy_(stats["since"])
            self.dead_features = int(stats["dead"].sum())
            self.pre_norm_auxk_loss = stats["pre_norm_auxk"]
            self.effective_l0 = float((latents.values > 0).sum()) / x.shape[0]
            thr = float(self.ae.threshold)
            # Estimated on up to 256 tokens: a full pass over [B, n] would cost a tenth of a step.
            sample = post_relu[:256]
            self.threshold_l0 = float((sample > thr).sum()) / sample.shape[0] if thr >= 0 else -1.0
        del post_relu, stats  # the dense [B, n] activations are not needed for backward

        loss.backward()
        W = self.ae.W_dec
        project_out_radial_(W.grad, W)
        torch.nn.utils.clip_grad_norm_(self.ae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            W.div_(W.norm(dim=1, keepdim=True).clamp_min(torch.finfo(W.dtype).eps))
        return loss.item()

    @property
    def config(self) -> dict:
        return {
            "trainer_class": "MatryoshkaBatchTopKTrainer",
            "dict_class": self.dict_class.__name__,
            "lr": self.lr,
            "steps": self.steps,
            "auxk_alpha": self.auxk_alpha,
            "warmup_steps": self.warmup_steps,
            "decay_start": self.decay_start,
            "threshold_beta": self.threshold_beta,
            "threshold_start_step": self.threshold_start_step,
            "top_k_aux": self.top_k_aux,
            "dead_feature_threshold": self.dead_feature_threshold,
            "activation_dim": self.ae.activation_dim,
            "dict_size": self.ae.dict_size,
            "group_fractions": self.group_fractions,
            "group_weights": self.group_weights,
            "group_sizes": self.group_sizes,
            "k": self.k,
            "prefix_mode": self.prefix_mode,
            "balance_beta": self.balance_beta,
            "n_prefixes": self.n_prefixes,
            "pareto_power": self.pareto_power,
            "backend": self.backend,
            "loss_convention": "weighted mean of prefix MSEs (prefix weights sum to 1)",
            **self._metadata(),
        }
