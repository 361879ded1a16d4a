"""Gauss–Newton for least squares, with a backtracking line search."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from implicit.solvers.modified_newton import ModifiedNewton


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussNewton(ModifiedNewton):
    """Gauss–Newton for [`least_squares`][implicit.least_squares]: ``solver="gauss_newton"``.

    Each step solves the normal equations ``(JᵀJ + μI) d = −Jᵀr`` per problem, with the
    Jacobian ``J`` (``m × n``, from ``m`` vector-Jacobian products) at the iterate and a
    tiny ``μ = √eps · tr(JᵀJ) / n`` that keeps them solvable where ``J`` loses rank,
    then backtracks along ``d`` (projected Armijo on ``½‖r‖²``, one trial per
    iteration, the full step first), as [`ModifiedNewton`][implicit.solvers.ModifiedNewton]
    does with its Hessian. Fast on fits whose residual is small at the solution
    (quadratic convergence on a zero-residual fit); on fits that leave large residuals
    [`LevenbergMarquardt`][implicit.solvers.LevenbergMarquardt] is the safer choice.
    The dense ``(B, m, n)`` Jacobians make it a method for small and medium problems.

    Args:
        curvature_check: see [`Minimizer`][implicit.solvers.Minimizer].
        max_dense: see [`Minimizer`][implicit.solvers.Minimizer].
        check_every: see [`Minimizer`][implicit.solvers.Minimizer].
    """

    name = "gauss_newton"
    least_squares_only: ClassVar[bool] = True

    # Its steps solve the normal equations, not the Hessian's: no options for those.
    linear: str = dataclasses.field(default="auto", init=False, repr=False)
    cg_max_iter: int | None = dataclasses.field(default=None, init=False, repr=False)

    def _direction(self, fn, z, free, descent):
        jacobian = jacobian_at(fn, z)
        normal = jacobian.transpose(1, 2) @ jacobian
        trace = normal.diagonal(dim1=1, dim2=2).sum(dim=1)
        mu = math.sqrt(torch.finfo(z.dtype).eps) * trace / z.shape[1]
        return damped_step(normal, descent, torch.ones_like(z) * mu.unsqueeze(1), free)


def jacobian_at(fn, z: torch.Tensor) -> torch.Tensor:
    """The residual's Jacobian ``(B, m, n)`` at ``z``."""
    fn.jac_evals += 1
    return fn.residuals_linearization(z).dense()


def damped_step(
    normal: torch.Tensor, descent: torch.Tensor, damping: torch.Tensor, free: torch.Tensor
) -> torch.Tensor:
    """``(A + diag(damping))⁻¹ descent`` on the free coordinates (0 on the others), by
    Cholesky; a row whose system is not positive definite to working precision gets
    NaN, which the caller's descent test rejects."""
    fixed = torch.diag_embed(1 - free)
    system = (normal + torch.diag_embed(damping)) * free.unsqueeze(1) * free.unsqueeze(2) + fixed
    factor, info = torch.linalg.cholesky_ex(system)
    solution = torch.cholesky_solve((free * descent).unsqueeze(2), factor).squeeze(2)
    return torch.where((info == 0).unsqueeze(1), free * solution, math.nan)
