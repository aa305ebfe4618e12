"""Pieces both Matryoshka trainers share: input checks, schedules, optimizer-state surgery."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections import namedtuple
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterable

import torch

from ..distributed import LOCAL, LocalCollective, ProcessGroupCollective
from ..errors import CheckpointError, TrainingError, check_activations
from ..host_memory import reuse_if_requested
from ..import_hooks import import_leaf
from ..kernels import BACKENDS, fused_op
from ..kernels.reference import torch_normalise_rows_, torch_project_out_rows_
from ..prefixes import PrefixSampler
from ..registry import PACKAGE_MARK
from ..sparse_encoder import encoder_matmul_dtype

# Without dictionary_learning/__init__, which imports nnsight and transformers (import_hooks).
_upstream = import_leaf("dictionary_learning.trainers.trainer")
SAETrainer, get_lr_schedule = _upstream.SAETrainer, _upstream.get_lr_schedule

__all__ = [
    "LossLog",
    "MatryoshkaTrainerBase",
    "TrainerConfig",
    "constant_warmup_decay_schedule",
    "warmup_stable_decay_schedule",
    "geometric_median",
    "permute_latents_",
]

# Version of the dict ``state_dict()`` returns; bumped when its layout changes.
TRAINER_STATE_FORMAT = 1

# What dictionary_learning's trainSAE unpacks from loss(..., logging=True).
LossLog = namedtuple("LossLog", ["x", "x_hat", "f", "losses"])


def _package_version() -> str:
    try:
        return version("matryoshka_plugin")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


@dataclass(kw_only=True)
class TrainerConfig:
    """Settings every trainer of this package takes. ``trainSAE`` passes them as keywords
    (``trainer_configs=[dict(trainer=..., steps=..., ...)]``); each trainer extends this class
    with its own fields, and its ``config`` (saved as ``config.json``) is these fields plus
    metadata."""

    steps: int
    """Training steps; learning-rate schedules and warm-ups are measured against it."""
    activation_dim: int
    """Width ``d`` of the activations."""
    dict_size: int
    """Number of latents."""
    layer: int | None = None
    """Model layer the activations come from (metadata, as dictionary_learning records it)."""
    lm_name: str | None = None
    """Hugging Face id of the model (metadata; the SAELens export derives the model name from it)."""
    seed: int | None = None
    """Seeds torch and the trainer's private prefix generator."""
    device: str | None = None
    """Where the SAE trains; ``None`` picks CUDA when available."""
    wandb_name: str = "MatryoshkaSAE"
    """Run name for Weights & Biases (metadata)."""
    submodule_name: str | None = None
    """dictionary_learning submodule the activations come from (metadata; gives the SAELens hook)."""
    backend: str = "auto"
    """Prefix-loss implementation: ``"auto"`` (fused kernels where they exist) or ``"torch"``."""

    def __post_init__(self) -> None:
        for name in ("steps", "activation_dim", "dict_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        self.device = str(self.device) if self.device is not None else (
            "cuda" if torch.cuda.is_available() else "cpu")
        check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """The fields as ``config.json`` stores them (the SAE class by name)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in out.items():
            if isinstance(value, type) or callable(value):
                out[key] = getattr(value, "__name__", type(value).__name__)
            elif isinstance(value, tuple):
                out[key] = list(value)
        return out


Collective = LocalCollective | ProcessGroupCollective
"""What a trainer reduces its statistics over (see :mod:`..distributed`)."""


class MatryoshkaTrainerBase(SAETrainer):
    """Bookkeeping common to the trainers: typed settings, seed, metadata and input checks.

    A trainer takes its settings as keywords, validates them in its ``config_class`` (a
    :class:`TrainerConfig`) and keeps them as ``trainer.cfg`` (``trainer.cfg.k``). The few that
    dictionary_learning's trainers carry as attributes (``steps``, ``lr``, ``device``, ``layer``,
    ``lm_name``, ``submodule_name``, ``wandb_name``, ``seed``) read the same here.
    """

    config_class: type[TrainerConfig] = TrainerConfig
    trainer_class_name: str = ""
    loss_convention: str = ""
    # Attributes besides the SAE, optimizer, scheduler and generators that a checkpoint must hold
    # for training to continue exactly (counters, EMAs, flags, last logged values).
    state_attributes: tuple[str, ...] = ()
    # Per-latent statistics that move with the latents when they are reordered.
    permuted_statistics: tuple[str, ...] = ()
    # Whether ``update`` can train one SAE over several processes (``train(distributed="data")``).
    supports_data_parallel: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__ and "__init__" in cls.__dict__:
            # help() and IDEs show the config's keywords, not **kwargs.
            fields = list(inspect.signature(cls.config_class).parameters.values())
            self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
            cls.__init__.__signature__ = inspect.Signature([self_param, *fields])

    def __init__(self, cfg: TrainerConfig):
        super().__init__(cfg.seed)
        self.cfg = cfg
        seed = cfg.seed
        if seed is not None:
            torch.manual_seed(seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(seed)
        # A private generator keeps random prefixes reproducible and independent of other RNG use.
        self.generator = torch.Generator()
        # The encoder matmul's dtype, set from each batch by _prepare (None: decided from the input).
        self.matmul_dtype: torch.dtype | None = None
        if torch.device(cfg.device).type == "cpu":
            reuse_if_requested()  # malloc is changed only on the user's request (host_memory)
        self.generator.manual_seed(seed if seed is not None else torch.initial_seed() % (2**63))
        # Every batch statistic goes through this: one process by default, the ranks' collective
        # once bind_collective is called (train(distributed="data")).
        self.collective: Collective = LOCAL

    def bind_collective(self, collective: Collective) -> None:
        """Train data-parallel over ``collective``'s ranks: ``update`` then sees this rank's shard
        of each batch and reduces every statistic and the gradients over the ranks."""
        if not self.supports_data_parallel and collective.world_size > 1:
            raise ValueError(f"{type(self).__name__} cannot train one SAE over several processes")
        self.collective = collective

    # -- full training state (exact resume) ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: SAE weights and buffers, optimizer
        moments, learning-rate schedule, step counters and statistics, the prefix generator and the
        global RNG states (torch, CUDA, numpy, Python). Tensors are copied to the CPU."""
        from ..resume import rng_state, to_cpu

        stats = {}
        for name in self.state_attributes:
            value = getattr(self, name)
            stats[name] = value.state_dict() if hasattr(value, "state_dict") else to_cpu(value)
        return {
            "format": TRAINER_STATE_FORMAT,
            "trainer_class": self.trainer_class_name,
            "config": self.config,  # the settings too, as resolved at the first step
            "ae": to_cpu(self.ae.state_dict()),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "statistics": stats,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], restore_rng: bool = True) -> None:
        """Continue from :meth:`state_dict`. Raises :class:`~matryoshka_plugin.errors.CheckpointError`
        naming every setting that differs from this trainer's (class, dimensions, k, groups...)."""
        from ..resume import check_same_config, set_rng_state

        if not isinstance(state, dict) or state.get("format") != TRAINER_STATE_FORMAT:
            raise CheckpointError(
                f"not a {type(self).__name__} state (format {state.get('format') if isinstance(state, dict) else None!r}, "
                f"expected {TRAINER_STATE_FORMAT})"
            )
        if state.get("trainer_class") != self.trainer_class_name:
            raise CheckpointError(
                f"the checkpoint holds a {state.get('trainer_class')} state; this trainer is a {self.trainer_class_name}"
            )
        # Settings added to the trainer after the checkpoint was written count as their defaults.
        defaults = {f.name: f.default for f in dataclasses.fields(self.cfg) if f.default is not dataclasses.MISSING}
        check_same_config({**defaults, **state["config"]}, self.config)
        for key, value in state["config"].items():
            # Settings resolved at the first step (None until then) come back as resolved.
            if key in self.cfg.__dataclass_fields__ and getattr(self.cfg, key) is None and value is not None:
                setattr(self.cfg, key, value)
        self.ae.load_state_dict(state["ae"])
        self.optimizer.load_state_dict(state["optimizer"])
        for p, slots in self.optimizer.state.items():  # moments saved when W_enc was a transposed view
            for name, value in slots.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    slots[name] = value.contiguous() if p.is_contiguous() else value
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        for name in self.state_attributes:
            value, saved = getattr(self, name), state["statistics"][name]
            if hasattr(value, "load_state_dict"):
                value.load_state_dict(saved)
            elif isinstance(value, torch.Tensor):
                value.copy_(saved.to(device=value.device, dtype=value.dtype))
            else:
                setattr(self, name, saved)
        if restore_rng:
            set_rng_state(state["rng"])

    @torch.no_grad()
    def reorder(self, perm: torch.Tensor) -> None:
        """Put latent ``perm[i]`` at position ``i``: weights, Adam moments and per-latent statistics."""
        ae = self.ae
        permute_latents_(
            perm,
            self.optimizer,
            [(ae.W_enc, 1), (ae.b_enc, 0), (ae.W_dec, 0)],
            [getattr(self, name) for name in self.permuted_statistics],
        )

    # -- dictionary_learning's trainer attributes (read-only views of ``cfg``) -------------------
    # SAETrainer.__init__ sets ``seed`` itself.

    @property
    def steps(self) -> int:
        return self.cfg.steps

    @property
    def lr(self) -> float:
        return self.cfg.lr  # every trainer's config has one (its default differs)

    @property
    def device(self) -> str:
        return self.cfg.device

    @property
    def layer(self) -> int | None:
        return self.cfg.layer

    @property
    def lm_name(self) -> str | None:
        return self.cfg.lm_name

    @property
    def submodule_name(self) -> str | None:
        return self.cfg.submodule_name

    @property
    def wandb_name(self) -> str:
        return self.cfg.wandb_name

    @property
    def config(self) -> dict:
        """What ``trainSAE`` saves as ``config.json["trainer"]``."""
        return {
            "trainer_class": self.trainer_class_name,
            **self.cfg.to_dict(),
            # The class actually built: dict_class may be a factory (a function returning an SAE).
            "dict_class": type(self.ae).__name__,
            "loss_convention": self.loss_convention,
            "package": PACKAGE_MARK,
            "package_version": _package_version(),
        }

    def _prepare(self, x: torch.Tensor, step: int | None) -> torch.Tensor:
        check_activations(x, self.ae.activation_dim, step)
        self.matmul_dtype = encoder_matmul_dtype(x)  # bf16 input or autocast: a bf16 encoder matmul
        return x.to(device=self.cfg.device, dtype=self.ae.W_enc.dtype)

    @staticmethod
    def _check_loss(loss: torch.Tensor, step: int | None, parts: dict[str, float]) -> None:
        if not bool(torch.isfinite(loss)):
            where = f" at step {step}" if step is not None else ""
            detail = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
            raise TrainingError(
                f"non-finite loss {loss.item()}{where} ({detail}); the SAE was not updated. "
                "Lower the learning rate or check the activations' scale."
            )


def prefix_sampler(cfg: Any) -> PrefixSampler:
    """The prefix weights a trainer's settings ask for (``prefix_mode``, groups, balance, Pareto law)."""
    return PrefixSampler(
        cfg.prefix_mode,
        cfg.dict_size,
        group_sizes=cfg.group_sizes,
        group_weights=cfg.group_weights,
        balance_beta=cfg.balance_beta,
        n_prefixes=cfg.n_prefixes,
        pareto_power=cfg.pareto_power,
        min_prefix_length=getattr(cfg, "min_prefix_length", 1),
    )


def make_adam(params, lr: float, betas) -> torch.optim.Adam:
    """Adam, fused where torch supports it (fewer passes over the parameters, no temporaries)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas))


@torch.no_grad()
def project_out_radial_(grad: torch.Tensor, W: torch.Tensor, backend: str = "auto") -> None:
    """Remove from each row of ``grad`` its component along the matching row of ``W``.

    Keeps unit-norm decoder rows on the sphere to first order; in place, with no temporary of
    the decoder's size (one pass on CPU with numba unless ``backend="torch"``, see
    ``kernels.fused_op``).
    """
    run = fused_op("project_out_rows_", backend, grad, W.detach()) or torch_project_out_rows_
    run(grad, W.detach())


@torch.no_grad()
def normalise_rows_(W: torch.Tensor, backend: str = "auto") -> None:
    """Each row of ``W`` divided by its norm (at least the dtype's eps), in place (one pass on
    CPU with numba unless ``backend="torch"``)."""
    run = fused_op("normalise_rows_", backend, W.detach()) or torch_normalise_rows_
    run(W.detach(), torch.finfo(W.dtype).eps)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (same norm, same factor), except that on CPU the
    gradients are not multiplied by 1 when the norm is within ``max_norm``: a pass over every
    gradient saved on most steps. Returns the total norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if total.device.type != "cpu" or float(coef) < 1.0:  # on GPU: no host sync, as torch
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total


def constant_warmup_decay_schedule(
    steps: int, warmup_steps: int, decay_start: int | None
) -> Callable[[int], float]:
    """dictionary_learning's schedule (linear warm-up, optional linear decay to 0), with errors."""
    if not (0 <= warmup_steps < steps):
        raise ValueError(f"warmup_steps must lie in [0, steps={steps}), got {warmup_steps}")
    if decay_start is not None and not (warmup_steps < decay_start < steps):
        raise ValueError(
            f"decay_start must lie in (warmup_steps={warmup_steps}, steps={steps}), got {decay_start}"
        )
    return get_lr_schedule(steps, warmup_steps, decay_start=decay_start)


def warmup_stable_decay_schedule(
    steps: int, warmup_steps: int, decay_fraction: float, end_factor: float
) -> Callable[[int], float]:
    """Linear warm-up, constant, then linear decay to ``end_factor`` over the last ``decay_fraction``."""
    if not (0 <= warmup_steps < steps):
        raise ValueError(f"warmup_steps must lie in [0, steps={steps}), got {warmup_steps}")
    if not (0 <= decay_fraction <= 1):
        raise ValueError(f"decay_fraction must lie in [0, 1], got {decay_fraction}")
    if not (0 <= end_factor <= 1):
        raise ValueError(f"end_lr_factor must lie in [0, 1], got {end_factor}")
    decay_start = steps * (1.0 - decay_fraction)
    decay_len = max(steps - decay_start, 1e-9)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - end_factor) * min((step - decay_start) / decay_len, 1.0)

    return schedule


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm (float32 or wider; guarded against a point equal to the guess)."""
    pts = points.float()
    guess = pts.mean(0)
    for _ in range(max_iter):
        dist = (pts - guess).norm(dim=1).clamp_min(1e-8)
        w = 1.0 / dist
        new = (w[:, None] * pts).sum(0) / w.sum()
        if (new - guess).norm() < tol:
            guess = new
            break
        guess = new
    return guess


@torch.no_grad()
def permute_latents_(
    perm: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: Iterable[tuple[torch.nn.Parameter, int]],
    statistics: Iterable[torch.Tensor] = (),
) -> None:
    """Reorder latents in place: parameters (along their latent dimension), every tensor of
    the optimizer state shaped like them (Adam's moments), and per-latent statistics.

    Permuting only the weights (as the reference code does) leaves Adam's moments attached
    to the wrong latents.
    """
    for p, dim in params:
        p.data.copy_(p.data.index_select(dim, perm))
        if p.grad is not None:
            p.grad.copy_(p.grad.index_select(dim, perm))
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value.copy_(value.index_select(dim, perm))
    for stat in statistics:
        stat.copy_(stat.index_select(0, perm.to(stat.device)))


def check_device(device: str) -> None:
    """Refuse a CUDA device this torch cannot use, naming it (torch itself fails later with a bare
    ``AssertionError: Torch not compiled with CUDA enabled``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e})") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        built = "built without CUDA" if torch.version.cuda is None else "built with CUDA but sees no GPU"
        raise ValueError(
            f"device={device!r}, but this torch ({torch.__version__}) has no CUDA ({built}); "
            "pass device='cpu', or device=None to pick CUDA only where it is available"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
