"""Matryoshka BatchTopK (Bussmann, Nabeshima, Karvonen, Nanda; ICML 2025).

A drop-in replacement for dictionary_learning's ``MatryoshkaBatchTopKTrainer``: every keyword
of that trainer has the same meaning, so swapping the import is the only change.

Differences, all deliberate:

* the reconstruction term is the sparse prefix loss (``prefix_loss``), a *weighted mean* of
  the prefix MSEs (weights sum to 1; upstream's default is the mean times 1/G);
* ``prefix_mode``: ``"groups"`` (default), ``"every"`` prefix exactly, ``"pareto"`` random
  prefixes, their exact expectation ``"pareto_expected"``, or ``"none"`` (plain BatchTopK);
* ``balance_beta``: inner levels weighted ``beta**depth`` (feature-hedging remedy);
* options from the other Matryoshka implementations: per-level AuxK (``matryoshka_aux_loss``,
  SAELens), a stop-gradient between levels (``detach_inner_levels``, the ICML paper's
  ablation), latents reordered by an EMA statistic (``reorder_by``), a decreasing k
  (``k_anneal_steps``, dictionary_learning's head) and SAELens' zero decoder-bias start
  (``b_dec_init="zeros"``);
* upstream defects avoided: no dense encoding before a threshold exists (falls back to
  BatchTopK), bf16 input works, counters live on the trainer's device, ``loss(logging=True)``
  changes no state, and ``effective_l0`` is measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch

from ..distributed import LOCAL
from ..prefix_loss import PrefixLoss
from ..prefixes import group_sizes_from_fractions
from ..sae import BatchTopKForward, MatryoshkaBatchTopKSAE
from ..sparse_latents import SparseLatents
from ..threads import threads_by_work
from .common import (
    Collective,
    LossLog,
    MatryoshkaTrainerBase,
    TrainerConfig,
    check_positive,
    clip_grad_norm_,
    constant_warmup_decay_schedule,
    geometric_median,
    make_adam,
    prefix_sampler,
    normalise_rows_,
    project_out_radial_,
)

__all__ = ["MatryoshkaBatchTopKTrainer", "MatryoshkaBatchTopKConfig", "StepOutput", "annealed_k"]

REORDER_STATISTICS = (None, "frequency", "contribution")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


def annealed_k(step: int, k: int, activation_dim: int, k_anneal_steps: int | None) -> int:
    """The k used at ``step`` (see ``MatryoshkaBatchTopKConfig.k_anneal_steps``)."""
    if not k_anneal_steps:
        return k
    if step <= 0:
        return activation_dim
    r = min(step - 1, k_anneal_steps) / k_anneal_steps
    return int(activation_dim * (1 - r) + k * r)


@dataclass(kw_only=True)
class MatryoshkaBatchTopKConfig(TrainerConfig):
    """Settings of :class:`MatryoshkaBatchTopKTrainer`: every keyword of dictionary_learning's
    ``MatryoshkaBatchTopKTrainer`` with the same meaning, plus the prefix modes."""

    k: int
    """Mean active latents per token (BatchTopK over the batch)."""
    group_fractions: Sequence[float] | None = None
    """Fractions of ``dict_size`` in each nested group (sum 1); required with ``prefix_mode="groups"``."""
    group_weights: Sequence[float] | None = None
    """Weight of each group's prefix loss (default equal); normalised to sum 1."""
    dict_class: type = MatryoshkaBatchTopKSAE
    """SAE class, built as ``dict_class(activation_dim, dict_size, k, group_sizes)``."""
    lr: float | None = None
    """Adam learning rate; ``None``: 2e-4 / sqrt(dict_size / 2**14), as upstream."""
    auxk_alpha: float = 1 / 32
    """Weight of the auxiliary loss that lets dead latents reconstruct the residual."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up steps; ``None``: dictionary_learning's 1000 on runs of more than
    1000 steps (the runs it accepts), a tenth of a shorter run, and before ``decay_start``."""
    decay_start: int | None = None
    """Step where the learning rate starts its linear decay to 0 (``None``: no decay)."""
    threshold_beta: float = 0.999
    """EMA decay of the inference threshold (smallest selected activation per batch)."""
    threshold_start_step: int = 1000
    """First step that updates the inference threshold."""
    wandb_name: str = "MatryoshkaBatchTopKSAE"
    """Run name for Weights & Biases (metadata)."""
    prefix_mode: str = "groups"
    """``"groups"``, ``"every"`` prefix, random ``"pareto"`` prefixes, their exact expectation
    ``"pareto_expected"``, or ``"none"`` (plain BatchTopK)."""
    balance_beta: float | None = None
    """Weight inner levels by ``beta**depth`` (feature-hedging remedy); ``None``: standard."""
    n_prefixes: int = 10
    """Prefixes per step in ``"pareto"`` mode (the full SAE and ``n - 1`` random ones)."""
    pareto_power: float = 0.5
    """Shape of the truncated Pareto law of random prefix lengths."""
    dead_feature_threshold: int = 10_000_000
    """Tokens without firing after which a latent counts as dead (AuxK)."""
    top_k_aux: int | None = None
    """Dead latents used by AuxK per token; ``None``: ``activation_dim // 2``."""
    matryoshka_aux_loss: bool = False
    """Per-level AuxK (SAELens' ``use_matryoshka_aux_loss``): each group's dead latents (top
    ``min(top_k_aux, dead in the group)`` per token) reconstruct the residual of the prefix
    ending with that group, ``x - b - sum_{i < e_g} a_i w_i``; each group's term is normalised
    like this trainer's AuxK (by that residual's variance), scaled by
    ``min(dead in the group / top_k_aux, 1)`` as SAELens does, and the terms are summed.
    ``prefix_mode="groups"`` only."""
    detach_inner_levels: bool = False
    """Stop-gradient between levels (the ICML paper's ablation): group ``g``'s loss term sees the
    inner groups' reconstruction as a constant and trains only group ``g``'s latents; the
    decoder bias belongs to the first group (``prefix_loss.detached_level_mse``). The loss value
    is unchanged. ``prefix_mode="groups"`` only; uses the torch path, not the fused kernels."""
    reorder_by: str | None = None
    """Reorder latents after every step by an EMA of a per-latent statistic, most used first:
    ``"frequency"`` (share of the batch's tokens on which the latent fired) or
    ``"contribution"`` (batch mean of ``(a_i * ||w_i||)**2``, as the log-sparsity trainer).
    Weights, Adam moments, firing counters and the EMA move together. ``None``: fixed order.
    With ``train(distributed="data")`` the statistic is summed over the ranks, so every rank sorts alike."""
    reorder_decay: float = 0.99
    """EMA decay of the statistic ``reorder_by`` sorts by (``ema = decay * ema + (1 - decay) * stat``)."""
    k_anneal_steps: int | None = None
    """dictionary_learning's (head) k schedule: the k used at step ``s >= 1`` is
    ``int(activation_dim * (1 - r) + k * r)`` with ``r = min(s - 1, k_anneal_steps) / k_anneal_steps``
    (dictionary_learning sets it after step ``s - 1``), and ``activation_dim`` at step 0; so k
    falls linearly from ``activation_dim`` to the target. ``None`` or 0: constant k. Needs
    ``k < activation_dim`` and ``k_anneal_steps < steps``."""
    b_dec_init: str = "geometric_median"
    """How the decoder bias starts, set from the first training batch: ``"geometric_median"``
    (dictionary_learning's trainers), ``"mean"``, or ``"zeros"`` (SAELens' training SAEs, whose
    ``b_dec`` starts at zero). On SynthSAEBench's CPU protocol ``"zeros"`` scores +0.03 F1
    (docs/synth_sae_bench.md)."""
    group_sizes: list[int] = field(init=False)
    """Latents per group, derived from ``group_fractions``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.k
        if isinstance(k, bool) or int(k) != k or not (0 < int(k) <= self.dict_size):
            raise ValueError(f"k must be an integer in [1, dict_size={self.dict_size}], got {k!r}")
        self.k = int(k)
        if self.group_fractions is None:
            if self.prefix_mode == "groups":
                raise ValueError("group_fractions is required with prefix_mode='groups'")
            self.group_fractions = [1.0]
        self.group_fractions = [float(f) for f in self.group_fractions]
        self.group_sizes = group_sizes_from_fractions(self.dict_size, self.group_fractions)
        if self.group_weights is not None:
            if len(self.group_weights) != len(self.group_sizes):
                raise ValueError(
                    f"{len(self.group_weights)} group_weights for {len(self.group_sizes)} groups "
                    f"(group_fractions {self.group_fractions})"
                )
            self.group_weights = [float(w) for w in self.group_weights]
        self.n_prefixes, self.pareto_power = int(self.n_prefixes), float(self.pareto_power)
        check_positive("auxk_alpha", self.auxk_alpha, allow_zero=True)
        if not (0.0 <= self.threshold_beta < 1.0):
            raise ValueError(f"threshold_beta must lie in [0, 1), got {self.threshold_beta}")
        self.auxk_alpha, self.threshold_beta = float(self.auxk_alpha), float(self.threshold_beta)
        self.threshold_start_step = int(self.threshold_start_step)
        if self.warmup_steps is None:
            w = 1000 if self.steps > 1000 else self.steps // 10
            if self.decay_start is not None and int(self.decay_start) > 0:
                w = min(w, int(self.decay_start) - 1)
            self.warmup_steps = w
        w = self.warmup_steps
        if isinstance(w, bool) or int(w) != w:
            raise ValueError(f"warmup_steps must be an integer, got {w!r}")
        self.warmup_steps = int(w)
        # Auto-selected like upstream: 1/sqrt(dict size) scaling from 2e-4 at 2^14 latents.
        self.lr = float(self.lr) if self.lr is not None else 2e-4 / (self.dict_size / 2**14) ** 0.5
        check_positive("lr", self.lr)
        self.dead_feature_threshold = int(self.dead_feature_threshold)
        self.top_k_aux = int(self.top_k_aux) if self.top_k_aux is not None else self.activation_dim // 2
        self.matryoshka_aux_loss, self.detach_inner_levels = bool(self.matryoshka_aux_loss), bool(self.detach_inner_levels)
        for name in ("matryoshka_aux_loss", "detach_inner_levels"):
            if getattr(self, name) and self.prefix_mode != "groups":
                raise ValueError(f"{name} needs prefix_mode='groups' (levels are the groups), got {self.prefix_mode!r}")
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if self.reorder_by not in REORDER_STATISTICS:
            raise ValueError(f"reorder_by must be one of {REORDER_STATISTICS}, got {self.reorder_by!r}")
        self.reorder_decay = float(self.reorder_decay)
        if not (0.0 <= self.reorder_decay < 1.0):
            raise ValueError(f"reorder_decay must lie in [0, 1), got {self.reorder_decay}")
        if self.k_anneal_steps is not None:
            ka = self.k_anneal_steps
            if isinstance(ka, bool) or int(ka) != ka or not (0 <= int(ka) < self.steps):
                raise ValueError(f"k_anneal_steps must be an integer in [0, steps={self.steps}), got {ka!r}")
            self.k_anneal_steps = int(ka) or None
            if self.k_anneal_steps and not self.k < self.activation_dim:
                raise ValueError(
                    f"k_anneal_steps anneals k from activation_dim={self.activation_dim} down, so k={self.k} must be smaller"
                )


class StepOutput(NamedTuple):
    """One forward pass of the training loss."""

    loss: torch.Tensor
    """Prefix reconstruction loss plus ``auxk_alpha`` times the AuxK loss (scalar, with graph)."""
    latents: SparseLatents
    """The batch's selected activations."""
    recon: PrefixLoss
    """The prefix loss and the full SAE's residual."""
    post_relu: torch.Tensor
    """Dense pre-selection activations ``[B, n]`` (for the threshold estimate and AuxK)."""
    parts: dict[str, float]
    """Loss terms for logging (``l2_loss``, ``auxk_loss``)."""
    since_fired: torch.Tensor
    """Tokens since each latent last fired, counting this batch (not yet stored)."""
    dead: torch.Tensor
    """Latents that count as dead after this batch."""
    pre_norm_auxk: float
    """AuxK reconstruction error before normalisation (``-1`` when no latent is dead)."""


class MatryoshkaBatchTopKTrainer(MatryoshkaTrainerBase):
    """Train a :class:`MatryoshkaBatchTopKSAE` with ``dictionary_learning.training.trainSAE``.

    Takes the keywords of :class:`MatryoshkaBatchTopKConfig`.
    """

    config_class = MatryoshkaBatchTopKConfig
    trainer_class_name = "MatryoshkaBatchTopKTrainer"
    loss_convention = "weighted mean of prefix MSEs (prefix weights sum to 1)"
    permuted_statistics = ("reorder_ema", "num_tokens_since_fired", "latent_origin")
    state_attributes = (
        "num_tokens_since_fired", "_b_dec_initialised",
        "effective_l0", "threshold_l0", "dead_features", "pre_norm_auxk_loss",
        "reorder_ema", "latent_origin",
    )
    supports_data_parallel = True

    def __init__(self, **settings: Any):
        cfg = MatryoshkaBatchTopKConfig(**settings)
        super().__init__(cfg)
        self.prefixes = prefix_sampler(cfg)
        self.ae = cfg.dict_class(cfg.activation_dim, cfg.dict_size, cfg.k, cfg.group_sizes).to(cfg.device)

        self.optimizer = make_adam(self.ae.parameters(), cfg.lr, (0.9, 0.999))
        schedule = constant_warmup_decay_schedule(cfg.steps, cfg.warmup_steps, cfg.decay_start)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=schedule)

        self.num_tokens_since_fired = torch.zeros(cfg.dict_size, dtype=torch.long, device=cfg.device)
        self._b_dec_initialised = False
        # Per-latent statistics; reorder_by permutes them with the latents.
        self.reorder_ema = torch.zeros(cfg.dict_size, dtype=torch.float32, device=cfg.device)
        self.latent_origin = torch.arange(cfg.dict_size, device=cfg.device)
        self.level_ends = [int(e) for e in torch.tensor(cfg.group_sizes).cumsum(0)]
        self.logging_parameters = ["effective_l0", "threshold_l0", "dead_features", "pre_norm_auxk_loss"]
        self.effective_l0 = -1.0
        self.threshold_l0 = -1.0
        self.dead_features = -1
        self.pre_norm_auxk_loss = -1.0

    # -- the loss ---------------------------------------------------------------------------

    def _dead_mask(self, latents: SparseLatents, collective: Collective = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
        """Counters after this (global) batch, without storing them, and the resulting dead mask."""
        fired = torch.zeros_like(self.num_tokens_since_fired, dtype=torch.bool)
        fired[latents.indices[latents.values > 0]] = True
        fired = collective.max_(fired.to(torch.int32)).bool()  # fired anywhere in the global batch
        tokens = latents.batch_size * collective.world_size
        since = torch.where(fired, 0, self.num_tokens_since_fired + tokens)
        return since, since >= self.cfg.dead_feature_threshold

    def _auxk_loss(self, x, out: BatchTopKForward, dead: torch.Tensor, collective: Collective = LOCAL):
        """AuxK: the dead latents reconstruct the residual (per level with ``matryoshka_aux_loss``)."""
        residual = out.recon.residual
        if not self.cfg.matryoshka_aux_loss:
            return self._dead_fit(x, residual, out.pre_activations, dead, collective)
        if not bool(dead.any()) or self.cfg.auxk_alpha == 0:
            return residual.new_zeros(()), -1.0
        residuals = self.ae.level_residuals(x, out.latents, self.level_ends)
        total, pre_norm, start = residual.new_zeros((), dtype=torch.float32), 0.0, 0
        for end, r in zip(self.level_ends, residuals):
            mine = torch.zeros_like(dead)
            mine[start:end] = dead[start:end]
            start = end
            n_dead = int(mine.sum())
            if n_dead == 0:
                continue
            loss, pre = self._dead_fit(x, r, out.pre_activations, mine, collective)
            scale = min(n_dead / self.cfg.top_k_aux, 1.0)
            total, pre_norm = total + scale * loss, pre_norm + scale * pre
        return total, pre_norm

    def _dead_fit(
        self, x, residual: torch.Tensor, pre_activations: torch.Tensor, dead: torch.Tensor,
        collective: Collective = LOCAL,
    ):
        """How well the ``dead`` latents reconstruct ``residual``, normalised by its variance;
        and the error before normalisation (``-1`` when no latent is dead)."""
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.auxk_alpha == 0:
            return residual.new_zeros(()), -1.0
        k_aux = min(self.cfg.top_k_aux, n_dead)
        recon = self.ae.dead_latent_decode(x, pre_activations, dead, k_aux, self.cfg.backend)
        l2 = (residual.float() - recon.float()).pow(2).sum(-1).mean()
        r = residual.float()
        denom = collective.batch_variance(r)  # over the global batch
        pre_norm = float(collective.sum_(l2.detach().clone())) / collective.world_size
        return (l2 / denom).nan_to_num(0.0), pre_norm

    def _forward(
        self, x: torch.Tensor, step: int | None, training: bool, collective: Collective = LOCAL
    ) -> StepOutput:
        """The SAE's forward pass (encoding and prefix loss), then AuxK on the residual it hands back."""
        weights = self.prefixes.sample(self.generator) if training else self.prefixes.expected()
        out = self.ae.training_forward(
            x, weights, self.cfg.backend, self.matmul_dtype, collective, consume_grads=training,
            detach_level_ends=self.level_ends if self.cfg.detach_inner_levels else None,
        )
        since, dead = self._dead_mask(out.latents, collective)
        auxk, pre_norm_auxk = self._auxk_loss(x, out, dead, collective)
        recon = out.recon
        loss = recon.loss + self.cfg.auxk_alpha * auxk
        # The global batch's values, the same on every rank, so all ranks raise together.
        terms = torch.stack([recon.loss.detach().float(), auxk.detach().float(), loss.detach().float()])
        terms = collective.sum_(terms) / collective.world_size
        parts = {"l2_loss": terms[0].item(), "auxk_loss": terms[1].item()}
        self._check_loss(terms[2], step, parts)
        return StepOutput(loss, out.latents, recon, out.pre_activations, parts, since, dead, pre_norm_auxk)

    @threads_by_work
    def loss(self, x: torch.Tensor, step: int | None = None, logging: bool = False):
        """The training loss on ``x`` without changing any state (threshold, counters, RNG).

        Random prefix modes use their exact expectation here.
        """
        x = self._prepare(x, step)
        out = self._forward(x, step, training=False)  # this process's x only, whatever the collective
        loss, latents, recon = out.loss, out.latents, out.recon
        if not logging:
            return loss
        f = latents._replace(values=latents.values.detach()).to_dense()
        x_hat = x - recon.residual
        return LossLog(x, x_hat, f, {**out.parts, "loss": loss.item()})

    # -- one optimisation step ----------------------------------------------------------------

    @torch.no_grad()
    def _update_threshold(self, latents: SparseLatents, collective: Collective = LOCAL) -> None:
        active = latents.values[latents.values > 0]
        low = active.min() if active.numel() else active.new_tensor(float("inf"))
        smallest = float(collective.min_(low.reshape(1).float()))  # over the global batch
        smallest = 0.0 if smallest == float("inf") else smallest
        thr = self.ae.threshold
        if float(thr) < 0:
            thr.fill_(smallest)
        else:
            thr.mul_(self.cfg.threshold_beta).add_((1 - self.cfg.threshold_beta) * smallest)

    @threads_by_work
    def update(self, step: int, x: torch.Tensor) -> float:
        """One optimisation step on ``x`` (data-parallel, after bind_collective: this rank's shard)."""
        x = self._prepare(x, step)
        dp = self.collective
        if self.cfg.k_anneal_steps:
            self.ae.k.fill_(annealed_k(step, self.cfg.k, self.cfg.activation_dim, self.cfg.k_anneal_steps))
        if not self._b_dec_initialised:
            if self.cfg.b_dec_init == "zeros":
                self.ae.b_dec.data.zero_()
            else:
                first = dp.gather_rows(x).float()
                start = geometric_median(first) if self.cfg.b_dec_init == "geometric_median" else first.mean(0)
                self.ae.b_dec.data.copy_(start.to(self.ae.b_dec.dtype))
            self._b_dec_initialised = True
        out = self._forward(x, step, training=True, collective=dp)
        loss, latents, post_relu = out.loss, out.latents, out.post_relu

        with torch.no_grad():
            if step > self.cfg.threshold_start_step:
                self._update_threshold(latents, dp)
            self.num_tokens_since_fired.copy_(out.since_fired)
            self.dead_features = int(out.dead.sum())
            self.pre_norm_auxk_loss = out.pre_norm_auxk
            # The active count and the loss of the global batch, in one reduction.
            active = (latents.values > 0).sum()
            counts = dp.sum_(torch.stack([active.double(), loss.detach().double()]))
            self.effective_l0 = float(counts[0]) / (x.shape[0] * dp.world_size)
            total = float(counts[1]) / dp.world_size
            thr = float(self.ae.threshold)
            # Estimated on up to 256 tokens: a full pass over [B, n] for a logged figure is not worth
            # its share of the step (docs/speed.md).
            sample = post_relu[:256]
            self.threshold_l0 = float((sample > thr).count_nonzero()) / sample.shape[0] if thr >= 0 else -1.0
            perm = self._reorder_permutation(latents) if self.cfg.reorder_by is not None else None
        del post_relu, out  # the dense [B, n] activations are not needed for backward

        loss.backward()
        dp.average_gradients_(list(self.ae.parameters()))
        W = self.ae.W_dec
        project_out_radial_(W.grad, W, self.cfg.backend)
        clip_grad_norm_(self.ae.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        normalise_rows_(W, self.cfg.backend)
        if perm is not None:
            self.reorder(perm)
        return total  # the mean of the ranks' losses, the same on every rank

    # -- dynamic prefixes ---------------------------------------------------------------------

    @torch.no_grad()
    def _reorder_permutation(self, latents: SparseLatents) -> torch.Tensor:
        """Update the EMA of ``reorder_by``'s statistic with this batch; the order it sorts to."""
        n, B = self.cfg.dict_size, latents.batch_size
        dp = self.collective
        on = latents.values > 0
        idx, vals = latents.indices[on], latents.values.detach()[on].float()
        if self.cfg.reorder_by == "frequency":
            stat = torch.zeros(n, device=idx.device).index_add_(0, idx, torch.ones_like(vals))
        else:  # squared contribution a_i * ||w_i||
            norms = self.ae.W_dec.detach().float().norm(dim=1)
            stat = torch.zeros(n, device=idx.device).index_add_(0, idx, (vals * norms[idx]).pow(2))
        # The statistic of the global batch, so every rank sorts alike.
        stat, B = dp.sum_(stat), B * dp.world_size
        ema = self.reorder_ema
        ema.mul_(self.cfg.reorder_decay).add_((1 - self.cfg.reorder_decay) * stat.to(ema.device) / B)
        return torch.argsort(ema, descending=True, stable=True)
