"""Sparsity penalties over nested prefixes, and the L0 controller (original Matryoshka post)."""

from __future__ import annotations

import math

import torch

__all__ = ["SPARSITY_KINDS", "sparsity_penalty", "L0Controller"]

SPARSITY_KINDS = ("log", "l1")


def sparsity_penalty(
    magnitudes: torch.Tensor, tail: torch.Tensor, kind: str = "log", eps: float = 0.1
) -> torch.Tensor:
    """``mean_b sum_i s(u_bi) * tail_i`` with ``s(u) = log(1 + u/eps)`` ("log") or ``u`` ("l1").

    ``magnitudes`` are ``a_i * ||w_i||`` (``[B, n]``); ``tail[i]`` is the share of the summed
    prefixes that contain latent ``i`` (``PrefixWeights.tail``), so the penalty is the same
    prefix-weighted sum as the reconstruction term.
    """
    if kind == "log":
        s = torch.log1p(magnitudes / eps)
    elif kind == "l1":
        s = magnitudes
    else:
        raise ValueError(f"unknown sparsity kind {kind!r}; choose one of {SPARSITY_KINDS}")
    return (s * tail.to(s.dtype)).sum(-1).mean()


class L0Controller:
    """Integral controller for the sparsity coefficient, working in log space.

    For ``warmup_steps`` the applied coefficient ramps linearly from 0 to ``init``; after
    that, each step multiplies it by ``exp(rate * e)`` with ``e = log(L0 / target)`` clipped to
    ``[-max_log_error, max_log_error]``: a batch L0 above the target strengthens the penalty,
    one below weakens it, in proportion to the relative error. Since ``log(coefficient)``
    integrates the error, the L0 settles on the target without a steady offset, and
    ``rate * steps`` bounds how far (in log units) the coefficient can travel in a run: give
    ``rate`` scaled to the run length (the trainer's default does). With ``target=None`` the
    coefficient stays fixed (after the ramp).
    """

    def __init__(
        self,
        init: float,
        target: float | None,
        rate: float,
        warmup_steps: int = 0,
        max_log_error: float = 1.0,
    ):
        if not (math.isfinite(init) and init >= 0):
            raise ValueError(f"sparsity coefficient must be finite and >= 0, got {init}")
        if target is not None and not (math.isfinite(target) and target > 0):
            raise ValueError(f"target_l0 must be positive, got {target}")
        if not (math.isfinite(rate) and 0 <= rate <= 1):
            raise ValueError(f"controller rate must lie in [0, 1], got {rate}")
        if not (math.isfinite(max_log_error) and max_log_error > 0):
            raise ValueError(f"max_log_error must be > 0, got {max_log_error}")
        self.coefficient = float(init)
        self.target = None if target is None else float(target)
        self.rate = float(rate)
        self.warmup_steps = int(warmup_steps)
        self.max_log_error = float(max_log_error)

    def ramp(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min((step + 1) / self.warmup_steps, 1.0)

    def applied(self, step: int) -> float:
        """The coefficient used in the loss at ``step`` (no state change)."""
        return self.coefficient * self.ramp(step)

    def log_error(self, l0: float) -> float:
        """``log(L0 / target)``, clipped (an L0 of 0 counts as the largest error below)."""
        if self.target is None:
            return 0.0
        if l0 <= 0:
            return -self.max_log_error
        return max(-self.max_log_error, min(self.max_log_error, math.log(l0 / self.target)))

    def update(self, step: int, l0: float) -> float:
        """Adapt to this batch's L0 (after the warm-up) and return the applied coefficient."""
        if self.target is not None and step + 1 > self.warmup_steps:
            self.coefficient *= math.exp(self.rate * self.log_error(l0))
        return self.applied(step)

    def state_dict(self) -> dict:
        return {"coefficient": self.coefficient}

    def load_state_dict(self, state: dict) -> None:
        self.coefficient = float(state["coefficient"])
