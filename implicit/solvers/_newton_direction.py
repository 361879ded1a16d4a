"""The direction of a [`Newton`][implicit.solvers.Newton] step, dense or matrix-free.

Dense: a batched LU solve of the per-sample Jacobians, with the damped least-squares
(Levenberg–Marquardt) step where a block is singular or its solve not finite. Matrix-free:
GMRES on Jacobian-vector products to an adaptive relative tolerance.
"""

from __future__ import annotations

import math

import torch

from implicit._batch import Factorization, is_half, known_all, norms, solve, traced, upcast
from implicit.linear import GMRES
from implicit.linear.base import WorkingOperator

#: Inner GMRES iterations per Newton step when the ``krylov`` instance sets none.
KRYLOV_MAX_ITER = 100


def dense_direction(jacobian, r, interval):
    """The direction, its slope and the factorisation when every block is regular
    (a dense backward at the root may refine with it, see :meth:`Newton.hint`).

    Where the host is not read every iteration (``interval > 1``), the blocks are not
    known regular: every step takes the general path (the damped direction where a
    block is singular), with no factorisation to reuse or hand on."""
    factors = Factorization.of(jacobian)
    # Singular to working precision: a pivot ratio (a cheap estimate of the reciprocal
    # condition number) below n·eps, which an exact zero pivot and NaN also fail.
    n = r.shape[1]
    smallest, largest = torch.aminmax(factors.diagonal().abs(), dim=1)
    regular = smallest > n * torch.finfo(r.dtype).eps * largest
    direction = -factors.solve(r)
    # NaN also fails the comparison with ∞.
    solved = regular & (direction.abs().amax(dim=1) < math.inf)
    if known_all(solved, interval):
        # A Newton step: the line search knows its slope.
        return direction, None, factors
    singular, failed = ~regular, ~solved
    if traced(r) if interval > 1 else bool(singular.any()):
        # Factorise the identity in their place: the Newton branch stays finite
        # (and so does its derivative, under backward="unroll").
        eye = torch.eye(n, dtype=r.dtype, device=r.device)
        direction = -Factorization.of(torch.where(singular[:, None, None], eye, jacobian)).solve(r)
    damped = _damped_least_squares(jacobian, r)
    direction = torch.where(failed.unsqueeze(1), damped, direction)
    slope = (upcast(r) * (upcast(jacobian) @ upcast(direction).unsqueeze(2)).squeeze(2)).sum(1)
    return direction, slope, None


def krylov_direction(krylov, check_every, jacobian, r, initial_norm, waiting, interval):
    """The Newton–Krylov direction of every sample and a bound on its slope, by
    ``krylov`` (None: ``GMRES(check_every=check_every)``) to the adaptive tolerance
    ``η`` unless ``krylov`` sets its own."""
    if torch.is_grad_enabled() and r.requires_grad:
        raise NotImplementedError(
            "Newton's Krylov inner solve (implicit.linear.GMRES) cannot be "
            "differentiated through: with backward='unroll' use "
            "Newton(linear='dense') or another backward mode"
        )
    krylov = krylov or GMRES(check_every=check_every)
    norm = norms(r)
    if krylov.tol is not None:
        tol = krylov.tol
    else:
        # The least converged running sample sets the pace (frozen rows and rows
        # still searching from their iterate do not).
        ratio = torch.where(waiting, 0, norm / initial_norm).nan_to_num(0.0)
        # (A tensor where the host is not read every iteration.)
        ratio = ratio.max().detach().clamp(math.sqrt(torch.finfo(r.dtype).eps), 0.1)
        tol = float(ratio) if interval == 1 else ratio
    max_iter = krylov.max_iter if krylov.max_iter is not None else KRYLOV_MAX_ITER
    op = WorkingOperator(jacobian, r.dtype) if is_half(r.dtype) else jacobian
    result = krylov.solve(krylov.init(op), upcast(-r), tol=tol, max_iter=max_iter)
    finite = torch.isfinite(result.x).all(dim=1) & torch.isfinite(result.residual)
    direction = torch.where(finite.unsqueeze(1), result.x, 0).to(r.dtype)
    # ‖J d + g‖ = η‖g‖ bounds the slope gᵀJd ≤ −(1 − η)‖g‖² (no extra product).
    eta = torch.where(finite, result.residual, 1).clamp(0, 1)
    return direction, -(1 - eta) * norm**2


def _damped_least_squares(jacobian: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``−(JᵀJ + μI)⁻¹ Jᵀ r`` per sample with ``μ = √eps · ‖J‖²_F / n`` (μ = 1 if J = 0),
    in float32 for half precision (where ``JᵀJ`` would overflow), in ``r``'s dtype."""
    dtype, n = r.dtype, r.shape[1]
    jacobian, r = upcast(jacobian), upcast(r)
    normal = jacobian.transpose(1, 2) @ jacobian
    mu = math.sqrt(torch.finfo(dtype).eps) * normal.diagonal(dim1=1, dim2=2).sum(dim=1) / n
    mu = torch.where(mu > 0, mu, 1)
    eye = torch.eye(n, dtype=r.dtype, device=r.device)
    system = normal + mu[:, None, None] * eye
    gradient = (jacobian.transpose(1, 2) @ r.unsqueeze(2)).squeeze(2)
    return -solve(system, gradient)[0].to(dtype)
