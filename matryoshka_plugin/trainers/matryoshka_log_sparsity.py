"""Matryoshka SAEs as in the original post (Nabeshima, Dec 2024).

ReLU encoder ``a = relu(x_s W_enc + b_enc)`` on input scaled to norm ``sqrt(d)``; free decoder
norms; a log sparsity penalty on ``a_i * ||w_i||``; each step the full SAE plus ``n - 1``
distinct truncated-Pareto prefixes (or their exact expectation, every prefix, fixed groups);
latents reordered every step by an EMA of their squared contribution (optimizer moments and
per-latent statistics permuted too); an L0 controller steering the sparsity coefficient
toward ``target_l0``; Adam with warm-up and a final linear decay.

``prefix_mode="none"`` is the post's "vanilla" baseline: the same SAE and penalty, no prefixes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..kernels import BACKENDS
from ..prefix_loss import prefix_mse
from ..prefixes import PrefixSampler, group_sizes_from_fractions
from ..sae import MatryoshkaLogSparsitySAE
from ..sparse_latents import sparse_from_dense
from ..sparsity import SPARSITY_KINDS, L0Controller, sparsity_penalty
from ..threads import threads_by_work
from .common import (
    LossLog,
    MatryoshkaTrainerBase,
    check_positive,
    make_adam,
    permute_latents_,
    warmup_stable_decay_schedule,
)

__all__ = ["MatryoshkaLogSparsityTrainer"]


class MatryoshkaLogSparsityTrainer(MatryoshkaTrainerBase):
    """Train a :class:`MatryoshkaLogSparsitySAE` with ``dictionary_learning.training.trainSAE``.

    Defaults follow the post's reference code (toy settings: lr 3e-2, Adam betas
    (0.5, 0.9375), 100 warm-up steps, decay to 0.1x over the last 20%, coefficient 1.2
    with a controller warm-up of 20% of steps). For language-model activations a smaller
    ``lr`` (around 1e-3) is usually needed.
    """

    def __init__(
        self,
        steps: int,
        activation_dim: int,
        dict_size: int,
        layer: int | None = None,
        lm_name: str | None = None,
        target_l0: float | None = None,
        prefix_mode: str = "pareto",
        n_prefixes: int = 10,
        pareto_power: float = 0.5,
        min_prefix_length: int = 1,
        group_fractions: Sequence[float] | None = None,
        group_weights: Sequence[float] | None = None,
        balance_beta: float | None = None,
        sparsity: str = "log",
        log_eps: float = 0.1,
        sparsity_coeff: float = 1.2,
        controller_rate: float = 3e-4,
        controller_warmup_fraction: float = 0.2,
        reorder_latents: bool = True,
        reorder_decay: float = 0.95,
        normalize_input: bool = True,
        input_norm_decay: float = 0.99,
        lr: float = 3e-2,
        betas: Sequence[float] = (0.5, 0.9375),
        warmup_steps: int = 100,
        decay_fraction: float = 0.2,
        end_lr_factor: float = 0.1,
        grad_clip: float = 1.0,
        dict_class: type = MatryoshkaLogSparsitySAE,
        seed: int | None = None,
        device: str | None = None,
        wandb_name: str = "MatryoshkaLogSparsitySAE",
        submodule_name: str | None = None,
        backend: str = "auto",
    ):
        super().__init__(steps, activation_dim, dict_size, layer, lm_name, seed, device, wandb_name, submodule_name)
        if sparsity not in SPARSITY_KINDS:
            raise ValueError(f"unknown sparsity {sparsity!r}; choose one of {SPARSITY_KINDS}")
        check_positive("log_eps", log_eps)
        check_positive("lr", lr)
        check_positive("grad_clip", grad_clip)
        for name, v in (("reorder_decay", reorder_decay), ("input_norm_decay", input_norm_decay)):
            if not (0.0 <= v < 1.0):
                raise ValueError(f"{name} must lie in [0, 1), got {v}")
        if not (0.0 <= controller_warmup_fraction < 1.0):
            raise ValueError(f"controller_warmup_fraction must lie in [0, 1), got {controller_warmup_fraction}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self.backend = backend
        self.group_fractions = None if group_fractions is None else [float(f) for f in group_fractions]
        group_sizes = None
        if self.group_fractions is not None:
            group_sizes = group_sizes_from_fractions(dict_size, self.group_fractions)
        self.group_weights = None if group_weights is None else [float(w) for w in group_weights]
        self.prefix_mode, self.balance_beta = prefix_mode, balance_beta
        self.n_prefixes, self.pareto_power = int(n_prefixes), float(pareto_power)
        self.min_prefix_length = int(min_prefix_length)
        self.prefixes = PrefixSampler(
            prefix_mode,
            dict_size,
            group_sizes=group_sizes,
            group_weights=self.group_weights,
            balance_beta=balance_beta,
            n_prefixes=self.n_prefixes,
            pareto_power=self.pareto_power,
            min_prefix_length=self.min_prefix_length,
        )
        self.group_sizes = group_sizes
        self.sparsity, self.log_eps = sparsity, float(log_eps)
        self.target_l0 = None if target_l0 is None else float(target_l0)
        self.controller_warmup_fraction = float(controller_warmup_fraction)
        self.controller = L0Controller(
            sparsity_coeff,
            self.target_l0,
            rate=controller_rate,
            warmup_steps=int(self.controller_warmup_fraction * self.steps),
        )
        self.sparsity_coeff, self.controller_rate = float(sparsity_coeff), float(controller_rate)
        self.reorder_latents, self.reorder_decay = bool(reorder_latents), float(reorder_decay)
        self.normalize_input, self.input_norm_decay = bool(normalize_input), float(input_norm_decay)
        self.lr, self.betas, self.grad_clip = float(lr), tuple(float(b) for b in betas), float(grad_clip)
        self.warmup_steps, self.decay_fraction, self.end_lr_factor = int(warmup_steps), float(decay_fraction), float(end_lr_factor)

        self.ae = dict_class(activation_dim, dict_size).to(self.device)
        self.optimizer = make_adam(self.ae.parameters(), self.lr, self.betas)
        schedule = warmup_stable_decay_schedule(self.steps, self.warmup_steps, self.decay_fraction, self.end_lr_factor)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=schedule)

        # Per-latent statistics; all are permuted with the latents.
        self.contribution_ema = torch.zeros(dict_size, device=self.device)
        self.num_tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=self.device)
        self.latent_origin = torch.arange(dict_size, device=self.device)
        self._input_norm_initialised = False

        self.logging_parameters = ["effective_l0", "sparsity_coefficient", "dead_features", "input_norm"]
        self.effective_l0 = -1.0
        self.sparsity_coefficient = self.controller.applied(0)
        self.dead_features = -1
        self.input_norm = -1.0

    # -- the loss ---------------------------------------------------------------------------

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.ae.input_scale() if self.normalize_input else x

    def _forward(self, x_scaled: torch.Tensor, training: bool):
        """Activations, their magnitudes, the prefix reconstruction and the sparsity term."""
        a = self.ae.raw_encode(x_scaled)
        weights = self.prefixes.sample(self.generator) if training else self.prefixes.expected()
        recon = prefix_mse(
            x_scaled, sparse_from_dense(a), self.ae.W_dec, self.ae.b_dec, weights,
            backend=self.backend, consume_grads=training,
        )
        magnitudes = a * self.ae.W_dec.norm(dim=1)
        penalty = sparsity_penalty(magnitudes, weights.tail().to(a.device), self.sparsity, self.log_eps)
        return a, magnitudes, recon, penalty

    def _total(self, recon, penalty, coefficient: float, step: int | None):
        loss = recon.loss + coefficient * penalty
        parts = {"mse_loss": recon.loss.item(), "sparsity_loss": penalty.item()}
        self._check_loss(loss, step, parts)
        return loss, parts

    @threads_by_work
    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        """The training loss on ``x`` without changing any state (controller, EMAs, RNG).

        ``"pareto"`` mode uses the exact expectation of its random prefixes here.
        """
        x = self._prepare(x, step)
        coefficient = self.controller.applied(step if step is not None else self.steps)
        _, _, recon, penalty = self._forward(self._scaled(x), training=False)
        loss, parts = self._total(recon, penalty, coefficient, step)
        if not logging:
            return loss
        with torch.no_grad():
            f = self.ae.encode(x)
            x_hat = self.ae.decode(f)
        return LossLog(x, x_hat, f, {**parts, "loss": loss.item(), "sparsity_coefficient": coefficient})

    # -- one optimisation step ----------------------------------------------------------------

    @torch.no_grad()
    def _update_input_norm(self, x: torch.Tensor) -> None:
        mean_norm = x.float().norm(dim=1).mean()
        if not self._input_norm_initialised:
            # The reference starts the running mean at 0, inflating early inputs; start from data.
            self.ae.input_norm.fill_(float(mean_norm))
            self._input_norm_initialised = True
        else:
            self.ae.input_norm.mul_(self.input_norm_decay).add_((1 - self.input_norm_decay) * mean_norm)

    @threads_by_work
    def update(self, step: int, x: torch.Tensor) -> float:
        x = self._prepare(x, step)
        saved = (self.ae.input_norm.clone(), self._input_norm_initialised, self.controller.coefficient)
        try:
            if self.normalize_input:
                self._update_input_norm(x)
            a, magnitudes, recon, penalty = self._forward(self._scaled(x), training=True)
            l0 = float((a > 0).sum()) / x.shape[0]
            coefficient = self.controller.update(step, l0)
            loss, _ = self._total(recon, penalty, coefficient, step)
        except Exception:
            # A failed step leaves no trace: restore what was updated before the check.
            self.ae.input_norm.copy_(saved[0])
            self._input_norm_initialised, self.controller.coefficient = saved[1], saved[2]
            raise

        with torch.no_grad():
            fired = (a > 0).any(0)
            self.num_tokens_since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
            self.dead_features = int((self.num_tokens_since_fired >= 10_000_000).sum())
            self.effective_l0, self.sparsity_coefficient = l0, coefficient
            self.input_norm = float(self.ae.input_norm)
            perm = None
            if self.reorder_latents:
                contribution = magnitudes.pow(2).mean(0)
                self.contribution_ema.mul_(self.reorder_decay).add_((1 - self.reorder_decay) * contribution)
                perm = torch.argsort(self.contribution_ema, descending=True, stable=True)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.ae.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if perm is not None:
            self.reorder(perm)
        return loss.item()

    @torch.no_grad()
    def reorder(self, perm: torch.Tensor) -> None:
        """Put latent ``perm[i]`` at position ``i``: weights, Adam moments and statistics."""
        ae = self.ae
        permute_latents_(
            perm,
            self.optimizer,
            [(ae.W_enc, 1), (ae.b_enc, 0), (ae.W_dec, 0)],
            [self.contribution_ema, self.num_tokens_since_fired, self.latent_origin],
        )

    @property
    def config(self) -> dict:
        return {
            "trainer_class": "MatryoshkaLogSparsityTrainer",
            "dict_class": "MatryoshkaLogSparsitySAE",
            "steps": self.steps,
            "activation_dim": self.ae.activation_dim,
            "dict_size": self.ae.dict_size,
            "target_l0": self.target_l0,
            "prefix_mode": self.prefix_mode,
            "n_prefixes": self.n_prefixes,
            "pareto_power": self.pareto_power,
            "min_prefix_length": self.min_prefix_length,
            "group_fractions": self.group_fractions,
            "group_weights": self.group_weights,
            "group_sizes": self.group_sizes,
            "balance_beta": self.balance_beta,
            "sparsity": self.sparsity,
            "log_eps": self.log_eps,
            "sparsity_coeff": self.sparsity_coeff,
            "controller_rate": self.controller_rate,
            "controller_warmup_fraction": self.controller_warmup_fraction,
            "reorder_latents": self.reorder_latents,
            "reorder_decay": self.reorder_decay,
            "normalize_input": self.normalize_input,
            "input_norm_decay": self.input_norm_decay,
            "lr": self.lr,
            "betas": list(self.betas),
            "warmup_steps": self.warmup_steps,
            "decay_fraction": self.decay_fraction,
            "end_lr_factor": self.end_lr_factor,
            "grad_clip": self.grad_clip,
            "backend": self.backend,
            "loss_convention": "weighted mean of prefix MSEs on input scaled to norm sqrt(d)",
            **self._metadata(),
        }
