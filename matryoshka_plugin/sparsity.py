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
    """Multiplicative controller for the sparsity coefficient (credited to Glen Taggart).

    For ``warmup_steps`` the applied coefficient ramps linearly from 0 to ``init``; after
    that, each step multiplies it by ``1 - rate`` if the batch L0 is below ``target`` and by
    ``1 + rate`` otherwise. With ``target=None`` the coefficient stays fixed (after the ramp).
    """

    def __init__(self, init: float, target: float | None, rate: float = 3e-4, warmup_steps: int = 0):
        if not (math.isfinite(init) and init >= 0):
            raise ValueError(f"sparsity coefficient must be finite and >= 0, got {init}")
        if target is not None and not target > 0:
            raise ValueError(f"target_l0 must be positive, got {target}")
        if not (0 <= rate < 1):
            raise ValueError(f"controller rate must lie in [0, 1), got {rate}")
        self.coefficient = float(init)
        self.target = None if target is None else float(target)
        self.rate = float(rate)
        self.warmup_steps = int(warmup_steps)

    def ramp(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min((step + 1) / self.warmup_steps, 1.0)

    def applied(self, step: int) -> float:
        """The coefficient used in the loss at ``step`` (no state change)."""
        return self.coefficient * self.ramp(step)

    def update(self, step: int, l0: float) -> float:
        """Adapt to this batch's L0 (after the warm-up) and return the applied coefficient."""
        if self.target is not None and step + 1 > self.warmup_steps:
            self.coefficient *= (1.0 - self.rate) if l0 < self.target else (1.0 + self.rate)
        return self.applied(step)

    def state_dict(self) -> dict:
        return {"coefficient": self.coefficient}

    def load_state_dict(self, state: dict) -> None:
        self.coefficient = float(state["coefficient"])
