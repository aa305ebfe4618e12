"""Errors raised for bad input, and the checks that raise them."""

from __future__ import annotations

import torch

__all__ = ["ActivationError", "TrainingError", "CheckpointError", "SAEBenchError", "check_activations"]


class ActivationError(ValueError):
    """Activations handed to a trainer or SAE have the wrong shape or non-finite values."""


class TrainingError(RuntimeError):
    """Training cannot continue (for example the loss became NaN or Inf)."""


class CheckpointError(ValueError):
    """A checkpoint or SAE folder is missing, incomplete, corrupt or of an unknown kind."""


class SAEBenchError(ValueError):
    """Bad input for an SAEBench run, reported before any expensive work."""


def _where(step: int | None) -> str:
    return f" at step {step}" if step is not None else ""


def check_activations(x: torch.Tensor, activation_dim: int, step: int | None = None) -> None:
    """Raise :class:`ActivationError` unless ``x`` is a finite ``[batch, activation_dim]`` tensor."""
    if not isinstance(x, torch.Tensor):
        raise ActivationError(f"activations{_where(step)} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ActivationError(
            f"activations{_where(step)} must have shape [batch, {activation_dim}], got {tuple(x.shape)}"
        )
    if x.shape[1] != activation_dim:
        raise ActivationError(
            f"activation dimension mismatch{_where(step)}: the SAE expects {activation_dim}, "
            f"got {x.shape[1]} (batch shape {tuple(x.shape)})"
        )
    if x.shape[0] == 0:
        raise ActivationError(f"empty batch of activations{_where(step)}")
    if not (x.is_floating_point()):
        raise ActivationError(f"activations{_where(step)} must be floating point, got {x.dtype}")
    # One reduction instead of isfinite's several passes: a NaN or an Inf makes the sum
    # non-finite; only then (or on overflow of finite values) is the batch inspected element-wise.
    if bool(torch.isfinite(x.sum(dtype=torch.float32 if x.element_size() < 4 else x.dtype))):
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        first = tuple(bad[0].tolist())
        raise ActivationError(
            f"non-finite activations{_where(step)}: {n_nan} NaN and {n_inf} Inf values "
            f"(first at batch row {first[0]}, dim {first[1]})"
        )
