"""Picard (fixed-point) iteration."""

from __future__ import annotations

import dataclasses

import torch

from implicit._results import check_number
from implicit.solvers.base import Solver


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedPoint(Solver):
    """Picard iteration ``z ← z + damping · g(z)``.

    For a fixed point ``g = f(z) − z`` and ``damping = 1`` this is ``z ← f(z)``; a
    smaller damping gives the averaged (Krasnosel'skii–Mann) iteration
    ``z ← (1 − damping)·z + damping·f(z)``, which converges for non-expansive ``f``.
    One evaluation of ``g`` per iteration.

    Args:
        damping: step size in ``(0, 1]`` (default 1.0).
        check_every: see [`Solver`][implicit.solvers.Solver].
    """

    name = "fixed_point"

    damping: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.damping, "damping", "in (0, 1]")
        object.__setattr__(self, "damping", float(self.damping))

    def step(self, fn, z, r, state):
        z = torch.add(z, r, alpha=self.damping)
        return z, fn(z), state
