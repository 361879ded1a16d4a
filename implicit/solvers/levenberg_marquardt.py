"""Levenberg–Marquardt for least squares, with adaptive damping."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from implicit._batch import known_all
from implicit._results import check_number
from implicit.solvers._minimizer import Minimizer, residual_norms
from implicit.solvers._search import FLAT_ULPS
from implicit.solvers.gauss_newton import damped_step

#: Consecutive rejected trials after which a problem is declared stuck.
MAX_REJECTIONS = 40


@dataclasses.dataclass
class _LMState:
    """Per problem: the residual's Jacobian at the iterate ``(B, m, n)``, the damping
    ``μ`` and its growth factor ``ν`` ``(B,)``, the scaling ``D`` ``(B, n)`` and the
    number of consecutive rejected trials."""

    jacobian: torch.Tensor
    mu: torch.Tensor
    nu: torch.Tensor
    scaling: torch.Tensor
    rejections: torch.Tensor


@dataclasses.dataclass(frozen=True, kw_only=True)
class LevenbergMarquardt(Minimizer):
    """Levenberg–Marquardt for [`least_squares`][implicit.least_squares]: its default.

    Each trial solves ``(JᵀJ + μ D) d = −Jᵀr`` per problem, with Marquardt's scaling
    ``D = diag(JᵀJ)`` (the largest seen so far, as in Moré's MINPACK, so that the
    method does not depend on the units of ``z``), and judges the trial ``P(z + d)``
    (projected into the bounds) by the gain ratio ``ρ`` of the actual to the predicted
    decrease of ``½‖r‖²``. A trial with ``ρ > 10⁻⁴`` is taken and ``μ`` shrinks by
    ``max(1/3, 1 − (2ρ − 1)³)``; otherwise ``μ`` grows by ``ν`` and ``ν`` doubles
    (Nielsen's update, as in Madsen, Nielsen & Tingleff, *Methods for non-linear
    least squares problems*, 2004). ``μ`` starts at ``10⁻³``. Each trial is one
    iteration (one evaluation of the residual; ``m`` vector-Jacobian products more
    when it is taken). Where the decrease is below the rounding of ``½‖r‖²`` (close to
    the minimum), a trial is taken if it reduces the stopping test's residual
    tenfold. After 40 rejections in a row, or a step too short to change ``z``, the
    problem ends with status ``"failed"``.

    Args:
        damping: the initial ``μ`` (relative to the scaling ``D``).
        curvature_check: see [`Minimizer`][implicit.solvers.Minimizer].
        max_dense: see [`Minimizer`][implicit.solvers.Minimizer].
        check_every: see [`Minimizer`][implicit.solvers.Minimizer].
    """

    name = "levenberg_marquardt"
    least_squares_only: ClassVar[bool] = True

    damping: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.damping, "damping", "a number > 0")
        object.__setattr__(self, "damping", float(self.damping))

    def init(self, fn, z):
        jacobian, f, grad = _linearized(fn, z)
        state = _LMState(
            jacobian=jacobian,
            mu=torch.full_like(f, self.damping),
            nu=torch.full_like(f, 2.0),
            scaling=_scaling(jacobian, None),
            rejections=torch.zeros_like(f, dtype=torch.long),
        )
        return f, grad, state

    def restart(self, fn, state, rows, z, f, grad):
        jacobian, _, _ = _linearized(fn, z)
        return dataclasses.replace(
            state,
            jacobian=torch.where(rows.reshape(-1, 1, 1), jacobian, state.jacobian),
            mu=torch.where(rows, self.damping, state.mu),
            nu=torch.where(rows, 2.0, state.nu),
            rejections=torch.where(rows, 0, state.rejections),
        )

    def step(self, fn, z, f, grad, state, running):
        jacobian = state.jacobian
        normal = jacobian.transpose(1, 2) @ jacobian
        free = fn.free(z, grad).to(z.dtype)
        damping = state.mu.unsqueeze(1) * state.scaling
        direction = damped_step(normal, -grad, damping, free)
        direction = torch.where(torch.isfinite(direction), direction, 0)
        trial = torch.where(running.unsqueeze(1), fn.project(z + direction), z)
        s = trial - z
        predicted = -((grad * s).sum(dim=1) + 0.5 * (jacobian @ s.unsqueeze(2)).pow(2).sum((1, 2)))
        linearization = fn.residuals_linearization(trial)
        r_trial = linearization.value
        f_trial = 0.5 * r_trial.pow(2).sum(dim=1)
        ratio = (f - f_trial) / predicted
        accept = running & torch.isfinite(f_trial) & (predicted > 0) & (ratio > 1e-4)
        # Where the decrease is below the rounding of ½‖r‖², the gradient judges (as in
        # the line searches, implicit.solvers._search).
        flat = running & ~accept & (f_trial <= f + FLAT_ULPS * torch.finfo(f.dtype).eps * f)
        if not known_all(~(accept | flat), self.check_every):
            fn.jac_evals += 1
            j_trial = linearization.dense()
            g_trial = (j_trial.transpose(1, 2) @ r_trial.unsqueeze(2)).squeeze(2)
            smaller = residual_norms(fn, trial, g_trial) <= 0.5 * residual_norms(fn, z, grad)
            accept = accept | (flat & smaller & torch.isfinite(g_trial).all(dim=1))
            jacobian = torch.where(accept.reshape(-1, 1, 1), j_trial, jacobian)
            z = torch.where(accept.unsqueeze(1), trial, z)
            f = torch.where(accept, f_trial, f)
            grad = torch.where(accept.unsqueeze(1), g_trial, grad)
        shrink = torch.clamp(1 - (2 * ratio - 1) ** 3, min=1 / 3).nan_to_num(1 / 3)
        rejections = torch.where(accept, 0, state.rejections + running.long())
        state = _LMState(
            jacobian=jacobian,
            mu=torch.where(accept, state.mu * shrink, state.mu * state.nu),
            nu=torch.where(accept, 2.0, state.nu * 2),
            scaling=_scaling(jacobian, state.scaling),
            rejections=rejections,
        )
        stuck = ~accept & ((s == 0).all(dim=1) | (rejections >= MAX_REJECTIONS))
        return z, f, grad, state, running & stuck


def _linearized(fn, z: torch.Tensor):
    """``(J, ½‖r‖², Jᵀr)`` at ``z``."""
    linearization = fn.residuals_linearization(z)
    fn.jac_evals += 1
    r, jacobian = linearization.value, linearization.dense()
    grad = (jacobian.transpose(1, 2) @ r.unsqueeze(2)).squeeze(2)
    return jacobian, 0.5 * r.pow(2).sum(dim=1), grad


def _scaling(jacobian: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Marquardt's ``diag(JᵀJ)``, the largest seen so far, floored by a relative ``eps``."""
    diagonal = jacobian.pow(2).sum(dim=1)
    if previous is not None:
        diagonal = torch.maximum(diagonal, previous)
    floor = torch.finfo(jacobian.dtype).eps * diagonal.amax(dim=1, keepdim=True).clamp(min=1)
    return torch.maximum(diagonal, floor)
