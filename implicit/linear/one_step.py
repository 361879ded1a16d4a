"""Inexact backward modes by design: the Jacobian-free and the phantom gradient."""

from __future__ import annotations

import dataclasses
import math

import torch

from implicit._checks import check_max_iter
from implicit._results import check_number
from implicit.linear.base import CONVERGED, NONFINITE, LinearResult, LinearSolver
from implicit.linear.neumann import Neumann


@dataclasses.dataclass(frozen=True, kw_only=True)
class OneStep(LinearSolver):
    """Jacobian-free backward: assume ``∂g/∂z ≈ −I`` and take ``x = −rhs``.

    For a fixed point this is ``(I − ∂f/∂z)⁻¹ ≈ I``: the "phantom" / Jacobian-free
    gradient of Fung et al. (2022). Inexact by design and free: no products at all,
    so its residual and condition are not measured (NaN) and it never warns.
    """

    name = "one_step"
    exact = False

    def solve(self, state, rhs, *, tol, max_iter, x0=None, preconditioner=None):
        residual = torch.full_like(rhs[:, 0], math.nan)
        codes = torch.full_like(rhs[:, 0], CONVERGED, dtype=torch.long)
        return LinearResult(-rhs, residual, codes, 0, condition=residual)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phantom(LinearSolver):
    """Phantom gradient (Geng et al., 2021): ``steps`` damped steps unrolled from ``z*``.

    Differentiating ``k`` steps of ``z ← (1 − λ)·z + λ·f(z)`` unrolled from the fixed
    point ``z*`` gives ``w = −λ Σ_{j<k} (I + λ Aᵀ)^j v`` with ``A = ∂f/∂z − I``: the
    damped Neumann series truncated at ``k`` terms, which is exactly
    [`Neumann`][implicit.linear.Neumann] from zero stopped after ``k`` iterations (so no
    graph through the steps is kept). With ``steps=1, damping=1`` it is
    [`OneStep`][implicit.linear.OneStep]; more steps approach the exact gradient when
    ``f`` is contractive. Inexact by design: it takes no ``tol`` nor ``max_iter`` (the
    front door's do not apply) and never warns (its residual is reported).

    Args:
        steps: the number ``k`` of unrolled steps (default 5).
        damping: the step size ``λ`` in ``(0, 1]`` (default 0.5).
    """

    name = "phantom"
    exact = False

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self) -> None:
        if self.tol is not None or self.max_iter is not None:
            raise TypeError("Phantom takes steps (a fixed number of iterations), not tol/max_iter")
        check_max_iter(self.steps, "Phantom(steps=...)")
        check_number(self.damping, "damping", "in (0, 1]")

    def solve(self, state, rhs, *, tol, max_iter, x0=None, preconditioner=None):
        # tol=0: never stop early, so the result is always the k-term series.
        series = Neumann(damping=self.damping, divergence=None)
        result = series.solve(state, rhs, tol=0.0, max_iter=self.steps)
        codes = torch.where(result.codes == NONFINITE, NONFINITE, CONVERGED)
        # A truncated series is not A⁻¹ rhs: it says nothing of the condition.
        unmeasured = torch.full_like(result.residual, math.nan)
        return dataclasses.replace(result, codes=codes, condition=unmeasured)
