"""Picard (fixed-point) iteration."""

from __future__ import annotations

import torch

from implicit._checks import check_number
from implicit.solvers.base import Solver


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

    def __init__(self, *, damping: float = 1.0, check_every: int | None = None):
        super().__init__(check_every=check_every)
        check_number(damping, "damping", "in (0, 1]")
        self.damping = float(damping)

    def step(self, fn, z, r, state):
        z = torch.add(z, r, alpha=self.damping)
        return z, fn(z), state
