"""Matryoshka SAEs as in the original post (Nabeshima, Dec 2024).

ReLU encoder ``a = relu(x_s W_enc + b_enc)`` on input scaled to norm ``sqrt(d)``; a log
sparsity penalty on ``a_i * ||w_i||``; each step the full SAE plus ``n - 1`` distinct
truncated-Pareto prefixes (or their exact expectation, every prefix, fixed groups); latents
reordered every step by an EMA of their squared contribution (optimizer moments and
per-latent statistics permuted too); an L0 controller steering the sparsity coefficient
toward ``target_l0``; Adam with warm-up and a final linear decay.

Two choices differ from the post's reference code, both because its L0 controller counts
activations ``a_i > 0`` while the penalty acts on ``a_i * ||w_i||``:

* decoder rows are kept at unit norm (``normalize_decoder=True``). With free norms Adam can
  shrink a decoder row and grow nothing in return, which lowers the penalty without
  switching the latent off; a controller pushing harder then collapses the SAE (decoder
  norms near 1e-3, FVU 1.0, L0 unchanged, measured on MiniLM). With unit rows the
  penalised magnitude is the activation the controller counts.
* the controller works on ``log(L0 / target)`` with a rate scaled to the run length, so the
  coefficient can travel the range a short run needs (``sparsity.L0Controller``).

Latents that have not fired for ``dead_feature_threshold`` tokens are resampled toward
badly reconstructed inputs (encoder and decoder along the residual, a bias that makes the
latent fire on about ``target_l0 / dict_size`` of the batch, Adam state reset), until the
learning-rate decay starts.

``prefix_mode="none"`` is the post's "vanilla" baseline: the same SAE and penalty, no prefixes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..distributed import LOCAL
from ..errors import ActivationError
from ..prefixes import group_sizes_from_fractions
from ..sae import LogSparsityForward, MatryoshkaLogSparsitySAE
from ..sparsity import SPARSITY_KINDS, L0Controller, sparsity_penalty
from ..threads import threads_by_work
from .common import (
    Collective,
    LossLog,
    MatryoshkaTrainerBase,
    TrainerConfig,
    check_positive,
    clip_grad_norm_,
    make_adam,
    prefix_sampler,
    normalise_rows_,
    project_out_radial_,
    warmup_stable_decay_schedule,
)

__all__ = ["MatryoshkaLogSparsityTrainer", "MatryoshkaLogSparsityConfig", "LM_LR"]

# Default learning rate, measured on MiniLM activations (docs/real_model.md); the post's toy used 3e-2.
LM_LR = 3e-3


@dataclass(kw_only=True)
class MatryoshkaLogSparsityConfig(TrainerConfig):
    """Settings of :class:`MatryoshkaLogSparsityTrainer` (the original post's method)."""

    target_l0: float | None = None
    """Mean active latents per token the controller steers toward; ``None``: a fixed coefficient."""
    prefix_mode: str = "pareto"
    """``"pareto"`` (the full SAE plus ``n_prefixes - 1`` random prefixes per step),
    ``"pareto_expected"``, ``"every"``, ``"groups"`` or ``"none"`` (the post's vanilla SAE)."""
    n_prefixes: int = 10
    """Prefixes per step in ``"pareto"`` mode."""
    pareto_power: float = 0.5
    """Shape of the truncated Pareto law of random prefix lengths."""
    min_prefix_length: int = 1
    """Shortest random prefix."""
    group_fractions: Sequence[float] | None = None
    """Nested group fractions (sum 1); only with ``prefix_mode="groups"``."""
    group_weights: Sequence[float] | None = None
    """Weight of each group's prefix loss (default equal)."""
    balance_beta: float | None = None
    """Weight inner levels by ``beta**depth`` (feature-hedging remedy); ``None``: standard."""
    sparsity: str = "log"
    """Penalty on ``a * ||w||``: ``"log"`` (``log(1 + m / log_eps)``) or ``"l1"``."""
    log_eps: float = 0.1
    """Scale of the log penalty."""
    sparsity_coeff: float = 1.2
    """Initial sparsity coefficient (the controller moves it toward ``target_l0``)."""
    controller_rate: float | None = None
    """Step size of ``log(coefficient)`` per unit of ``log(L0 / target)``; ``None``: scaled to the
    run so it can travel ``controller_log_range`` after the warm-up."""
    controller_warmup_fraction: float = 0.2
    """Fraction of the steps before the controller starts."""
    controller_log_range: float = 8.0
    """How far ``log(coefficient)`` can move over the run when ``controller_rate`` is ``None``."""
    reorder_latents: bool = True
    """Reorder latents every step by an EMA of their squared contribution."""
    reorder_decay: float = 0.95
    """Decay of that EMA."""
    normalize_input: bool = True
    """Scale inputs to norm ``sqrt(d)`` with a running mean of their norms."""
    input_norm_decay: float = 0.99
    """Decay of the running input norm."""
    lr: float = LM_LR
    """Adam learning rate (the post's toy used 3e-2)."""
    betas: Sequence[float] = (0.5, 0.9375)
    """Adam betas (the post's)."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up steps; ``None``: ``min(100, steps // 10)`` (the post's 100, a
    tenth of a shorter run)."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the learning rate decays linearly."""
    end_lr_factor: float = 0.1
    """Learning rate at the end, relative to ``lr``."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    dict_class: type = MatryoshkaLogSparsitySAE
    """SAE class, built as ``dict_class(activation_dim, dict_size)``."""
    wandb_name: str = "MatryoshkaLogSparsitySAE"
    """Run name for Weights & Biases (metadata)."""
    normalize_decoder: bool = True
    """Keep decoder rows at unit norm, so the penalised magnitude is the activation the
    controller counts (``False``: the post's free norms)."""
    dead_feature_threshold: int | None = None
    """Tokens without firing after which a latent is dead and resampled; ``None``: a tenth of
    the run's tokens (at most 10M), set at the first step."""
    resample_dead: bool = True
    """Resample dead latents until the learning-rate decay starts."""
    group_sizes: list[int] | None = field(init=False)
    """Latents per group, derived from ``group_fractions``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity not in SPARSITY_KINDS:
            raise ValueError(f"unknown sparsity {self.sparsity!r}; choose one of {SPARSITY_KINDS}")
        for name in ("log_eps", "lr", "grad_clip", "controller_log_range"):
            check_positive(name, getattr(self, name))
        for name in ("reorder_decay", "input_norm_decay"):
            if not (0.0 <= getattr(self, name) < 1.0):
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not (0.0 <= self.controller_warmup_fraction < 1.0):
            raise ValueError(f"controller_warmup_fraction must lie in [0, 1), got {self.controller_warmup_fraction}")
        if self.group_fractions is not None and self.prefix_mode != "groups":
            raise ValueError(f"group_fractions apply to prefix_mode='groups', not {self.prefix_mode!r}")
        d = self.dead_feature_threshold
        if d is not None and (isinstance(d, bool) or int(d) != d or d < 1):
            raise ValueError(f"dead_feature_threshold must be a positive number of tokens, got {d!r}")
        self.dead_feature_threshold = None if d is None else int(d)
        self.group_fractions = None if self.group_fractions is None else [float(f) for f in self.group_fractions]
        self.group_sizes = (None if self.group_fractions is None
                            else group_sizes_from_fractions(self.dict_size, self.group_fractions))
        self.group_weights = None if self.group_weights is None else [float(w) for w in self.group_weights]
        t = self.target_l0
        if t is not None and (isinstance(t, bool) or not (0 < float(t) <= self.dict_size)):
            raise ValueError(f"target_l0 must lie in (0, dict_size={self.dict_size}] active latents per token, got {t!r}")
        self.target_l0 = None if t is None else float(t)
        self.n_prefixes, self.pareto_power = int(self.n_prefixes), float(self.pareto_power)
        self.min_prefix_length = int(self.min_prefix_length)
        self.log_eps, self.sparsity_coeff = float(self.log_eps), float(self.sparsity_coeff)
        self.controller_warmup_fraction = float(self.controller_warmup_fraction)
        self.controller_log_range = float(self.controller_log_range)
        if self.controller_rate is None:
            self.controller_rate = min(1.0, self.controller_log_range / max(1, self.steps - self.controller_warmup))
        self.controller_rate = float(self.controller_rate)
        self.reorder_latents, self.reorder_decay = bool(self.reorder_latents), float(self.reorder_decay)
        self.normalize_input, self.input_norm_decay = bool(self.normalize_input), float(self.input_norm_decay)
        self.lr, self.grad_clip = float(self.lr), float(self.grad_clip)
        self.betas = tuple(float(b) for b in self.betas)
        w = self.warmup_steps
        if w is None:
            w = min(100, self.steps // 10)
        elif isinstance(w, bool) or int(w) != w or not (0 <= int(w) < self.steps):
            raise ValueError(f"warmup_steps must be an integer in [0, steps={self.steps}), got {w!r}")
        self.warmup_steps, self.decay_fraction = int(w), float(self.decay_fraction)
        self.end_lr_factor = float(self.end_lr_factor)
        self.normalize_decoder, self.resample_dead = bool(self.normalize_decoder), bool(self.resample_dead)

    @property
    def controller_warmup(self) -> int:
        """Steps before the controller starts."""
        return int(self.controller_warmup_fraction * self.steps)


class MatryoshkaLogSparsityTrainer(MatryoshkaTrainerBase):
    """Train a :class:`MatryoshkaLogSparsitySAE` with ``dictionary_learning.training.trainSAE``.

    Takes the keywords of :class:`MatryoshkaLogSparsityConfig`. Optimiser settings follow the
    post's reference code (Adam betas (0.5, 0.9375), 100 warm-up steps or a tenth of a shorter
    run, decay to 0.1x over the last 20%, coefficient 1.2 with a controller warm-up of 20% of steps); the default
    ``lr`` suits language-model activations, the post's toy used 3e-2.
    """

    config_class = MatryoshkaLogSparsityConfig
    trainer_class_name = "MatryoshkaLogSparsityTrainer"
    loss_convention = "weighted mean of prefix MSEs on input scaled to norm sqrt(d)"
    permuted_statistics = ("contribution_ema", "num_tokens_since_fired", "latent_origin")
    state_attributes = (
        "controller", "contribution_ema", "num_tokens_since_fired", "latent_origin", "_input_norm_initialised",
        "resampled", "effective_l0", "sparsity_coefficient", "dead_features", "input_norm",
    )
    supports_data_parallel = True

    def __init__(self, **settings: Any):
        cfg = MatryoshkaLogSparsityConfig(**settings)
        super().__init__(cfg)
        self.prefixes = prefix_sampler(cfg)
        self.controller = L0Controller(cfg.sparsity_coeff, cfg.target_l0, rate=cfg.controller_rate,
                                       warmup_steps=cfg.controller_warmup)
        self.ae = cfg.dict_class(cfg.activation_dim, cfg.dict_size).to(cfg.device)
        if self.cfg.normalize_decoder:
            # Unit decoder rows; the encoder keeps the post's scale: folding the decoder's 0.1
            # into the encoder would make its Adam steps larger relative to its weights, which
            # broke the toy's tree (docs/real_model.md, "Decoder-norm escape").
            with torch.no_grad():
                self.ae.W_dec.div_(self.ae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.optimizer = make_adam(self.ae.parameters(), cfg.lr, cfg.betas)
        schedule = warmup_stable_decay_schedule(cfg.steps, cfg.warmup_steps, cfg.decay_fraction, cfg.end_lr_factor)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=schedule)

        # Per-latent statistics; all are permuted with the latents.
        self.contribution_ema = torch.zeros(cfg.dict_size, device=cfg.device)
        self.num_tokens_since_fired = torch.zeros(cfg.dict_size, dtype=torch.long, device=cfg.device)
        self.latent_origin = torch.arange(cfg.dict_size, device=cfg.device)
        self._input_norm_initialised = False

        self.logging_parameters = ["effective_l0", "sparsity_coefficient", "dead_features", "input_norm", "resampled"]
        self.resampled = 0
        self.effective_l0 = -1.0
        self.sparsity_coefficient = self.controller.applied(0)
        self.dead_features = -1
        self.input_norm = -1.0

    # -- the loss ---------------------------------------------------------------------------

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.ae.input_scale() if self.cfg.normalize_input else x

    def _forward(self, x_scaled: torch.Tensor, training: bool) -> tuple[LogSparsityForward, torch.Tensor]:
        """The SAE's forward pass (activations, magnitudes, prefix loss) and the sparsity term."""
        weights = self.prefixes.sample(self.generator) if training else self.prefixes.expected()
        # bf16 input or autocast: a bf16 encoder matmul
        out = self.ae.training_forward(x_scaled, weights, self.cfg.backend, self.matmul_dtype, consume_grads=training)
        tail = weights.tail().to(out.activations.device)
        return out, sparsity_penalty(out.magnitudes, tail, self.cfg.sparsity, self.cfg.log_eps)

    def _total(self, recon, penalty, coefficient: float, step: int | None, collective: Collective = LOCAL):
        loss = recon.loss + coefficient * penalty
        # The global batch's values, the same on every rank, so all ranks raise together.
        terms = torch.stack([recon.loss.detach().float(), penalty.detach().float(), loss.detach().float()])
        terms = collective.sum_(terms) / collective.world_size
        parts = {"mse_loss": terms[0].item(), "sparsity_loss": terms[1].item()}
        self._check_loss(terms[2], step, parts)
        return loss, parts, terms[2].item()

    @threads_by_work
    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        """The training loss on ``x`` without changing any state (controller, EMAs, RNG).

        ``"pareto"`` mode uses the exact expectation of its random prefixes here.
        """
        x = self._prepare(x, step)
        coefficient = self.controller.applied(step if step is not None else self.cfg.steps)
        out, penalty = self._forward(self._scaled(x), training=False)
        loss, parts, _ = self._total(out.recon, penalty, coefficient, step)  # this process's x only
        if not logging:
            return loss
        with torch.no_grad():
            f = self.ae.encode(x)
            x_hat = self.ae.decode(f)
        return LossLog(x, x_hat, f, {**parts, "loss": loss.item(), "sparsity_coefficient": coefficient})

    # -- one optimisation step ----------------------------------------------------------------

    def _prepare(self, x: torch.Tensor, step: int | None) -> torch.Tensor:
        x = super()._prepare(x, step)
        if not self.cfg.normalize_input:
            return x  # an overflowing loss is caught by the loss check
        # Squared norms must be representable: the input scale, the loss and every FVU use them.
        sq = x.pow(2).sum(1)
        if not bool(torch.isfinite(sq).all()):
            row = int((~torch.isfinite(sq)).nonzero()[0])
            where = f" at step {step}" if step is not None else ""
            raise ActivationError(
                f"activations too large{where}: the squared norm of batch row {row} overflows {x.dtype} "
                f"(largest entry {float(x.abs().max()):.3g}); rescale the activations"
            )
        return x

    @torch.no_grad()
    def _update_input_norm(self, x: torch.Tensor, collective: Collective = LOCAL) -> None:
        norms = x.double().norm(dim=1)
        # The mean non-zero norm of the global batch: nan only where it has no non-zero row (the
        # norms are finite, _prepare checked).
        mean_norm = float(collective.batch_mean(norms[norms > 0]))
        if math.isnan(mean_norm):
            return  # an all-zero batch says nothing about the input's scale
        if not self._input_norm_initialised:
            # The reference starts the running mean at 0, inflating early inputs; start from data.
            self.ae.input_norm.fill_(mean_norm)
            self._input_norm_initialised = True
        else:
            self.ae.input_norm.mul_(self.cfg.input_norm_decay).add_((1 - self.cfg.input_norm_decay) * mean_norm)

    @threads_by_work
    def update(self, step: int, x: torch.Tensor) -> float:
        """One optimisation step on ``x`` (data-parallel, after bind_collective: this rank's shard)."""
        x = self._prepare(x, step)
        dp = self.collective
        batch = x.shape[0] * dp.world_size
        if self.cfg.dead_feature_threshold is None:
            self.cfg.dead_feature_threshold = min(10_000_000, max(batch, self.cfg.steps * batch // 10))
        saved = (self.ae.input_norm.clone(), self._input_norm_initialised, self.controller.coefficient)
        try:
            if self.cfg.normalize_input:
                self._update_input_norm(x, dp)
            x_scaled = self._scaled(x)
            (a, magnitudes, recon), penalty = self._forward(x_scaled, training=True)
            active = (a > 0).sum()
            l0 = float(dp.sum_(active.reshape(1))) / batch
            coefficient = self.controller.update(step, l0)
            loss, _, total = self._total(recon, penalty, coefficient, step, dp)
        except Exception:
            # A failed step leaves no trace: restore what was updated before the check.
            self.ae.input_norm.copy_(saved[0])
            self._input_norm_initialised, self.controller.coefficient = saved[1], saved[2]
            raise

        with torch.no_grad():
            fired = dp.max_((a > 0).any(0).to(torch.int32)).bool()  # anywhere in the global batch
            self.num_tokens_since_fired.add_(batch).masked_fill_(fired, 0)
            dead = self.num_tokens_since_fired >= self.cfg.dead_feature_threshold
            self.dead_features = int(dead.sum())
            self.effective_l0, self.sparsity_coefficient = l0, coefficient
            self.input_norm = float(self.ae.input_norm)
            perm = None
            if self.cfg.reorder_latents:
                contribution = dp.sum_(magnitudes.pow(2).mean(0)) / dp.world_size
                self.contribution_ema.mul_(self.cfg.reorder_decay).add_((1 - self.cfg.reorder_decay) * contribution)
                perm = torch.argsort(self.contribution_ema, descending=True, stable=True)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dp.average_gradients_(list(self.ae.parameters()))
        W = self.ae.W_dec
        if self.cfg.normalize_decoder:
            project_out_radial_(W.grad, W, self.cfg.backend)
        clip_grad_norm_(self.ae.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.cfg.normalize_decoder:
            normalise_rows_(W, self.cfg.backend)
        self.resampled = 0
        if self.cfg.resample_dead and self.dead_features and step < self.cfg.steps * (1 - self.cfg.decay_fraction):
            # Every rank resamples from the whole batch, with the same generator.
            self.resampled = self.resample(dead, dp.gather_rows(x_scaled), dp.gather_rows(recon.residual))
        if perm is not None:
            self.reorder(perm)
        return total  # the mean of the ranks' losses, the same on every rank

    @torch.no_grad()
    def resample(self, dead: torch.Tensor, x_scaled: torch.Tensor, residual: torch.Tensor) -> int:
        """Re-initialise dead latents toward badly reconstructed inputs of this batch.

        Each picked token (drawn with probability proportional to its squared residual, at
        most half the batch) gives one latent its direction: the residual's, for the decoder
        row and the encoder column. The encoder bias makes the latent fire on the
        ``target_l0 / dict_size`` share of the batch most aligned with it, so resampling many
        latents does not flood the L0. The latents' Adam moments, firing counters and
        contribution EMA start afresh.
        """
        ae = self.ae
        idx = dead.nonzero().flatten()
        weights = residual.float().pow(2).sum(1)
        if not bool(weights.sum() > 0):
            return 0
        idx = idx[: max(1, x_scaled.shape[0] // 2)]
        if self.collective.world_size > 1 and weights.device.type != "cpu":
            # every rank must draw the same tokens: the trainer's (synchronised) CPU generator
            tokens = torch.multinomial(weights.cpu(), idx.numel(), replacement=False,
                                       generator=self.generator).to(weights.device)
        else:
            tokens = torch.multinomial(weights, idx.numel(), replacement=False,
                                       generator=self._cpu_generator_for(weights))
        directions = residual[tokens].float()
        directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        proj = x_scaled.float() @ directions.T  # [B, m]
        rate = (self.cfg.target_l0 if self.cfg.target_l0 is not None else max(self.effective_l0, 1.0)) / ae.dict_size
        rank = min(proj.shape[0], max(1, math.ceil((1.0 - rate) * proj.shape[0])))
        q = proj.kthvalue(rank, dim=0).values  # the (1 - rate) quantile of each column
        # Scale so that the latent reconstructs its source token's residual: a latent born with
        # a tiny activation sits where the log penalty's pull (coefficient / eps) wins.
        source = proj[tokens, torch.arange(idx.numel(), device=proj.device)]
        # (at most 4x a unit encoder column; 1x when the source token is below the threshold)
        gap = source - q
        scale = torch.where(gap > 0, residual[tokens].float().norm(dim=1) / gap.clamp_min(1e-6), 1.0).clamp(1.0, 4.0)
        dt = ae.W_enc.dtype
        ae.W_enc[:, idx] = (directions.T * scale).to(dt)
        ae.b_enc[idx] = (-q * scale).to(dt)
        norms = ae.W_dec[idx].norm(dim=1, keepdim=True) if not self.cfg.normalize_decoder else 1.0
        ae.W_dec[idx] = directions.to(dt) * norms
        for p, dim in ((ae.W_enc, 1), (ae.b_enc, 0), (ae.W_dec, 0)):
            for value in self.optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.index_fill_(dim, idx, 0.0)
        self.num_tokens_since_fired[idx] = 0
        self.contribution_ema[idx] = 0.0
        return int(idx.numel())

    def _cpu_generator_for(self, t: torch.Tensor) -> torch.Generator | None:
        return self.generator if t.device.type == "cpu" else None
