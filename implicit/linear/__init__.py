"""Linear solvers for the implicit backward (and the forward-mode tangent).

The backward of every front door solves the adjoint system ``(∂g/∂z)ᵀ w = v``; forward
mode solves ``(∂g/∂z) dz = −(∂g/∂θ) dθ``. Both are handed to one of these solvers as a
[`JacobianOperator`][implicit.linear.JacobianOperator] ``A`` with products ``A x`` (and,
for [`Dense`][implicit.linear.Dense], its per-problem matrix), which says what it is
known to be (shifted, symmetric, positive definite). Systems are batched: row ``b`` of
``x`` and ``rhs`` is problem ``b``, solved to its own tolerance and frozen once solved.
Problem ``b`` has converged when its *true* residual satisfies
``‖A x_b − rhs_b‖₂ ≤ tol · ‖rhs_b‖₂``; a zero right-hand side has the solution
``x_b = 0``.

Choose by name (``backward="gmres"``) or by instance (``backward=GMRES(restart=30)``).
Instances are immutable configuration, safe to reuse; an instance's ``tol`` /
``max_iter`` default to the front door's. The options of every iterative method
([`GMRES`][implicit.linear.GMRES], [`BiCGStab`][implicit.linear.BiCGStab],
[`CG`][implicit.linear.CG], [`Neumann`][implicit.linear.Neumann]) are those of
[`IterativeSolver`][implicit.linear.IterativeSolver]: ``tol``, ``max_iter``, ``x0`` and
``preconditioner`` (not Neumann). GMRES and BiCGStab apply the preconditioner on the
right (they minimise or reduce the true residual); CG needs it symmetric definite
(positive or negative). A warm start across calls belongs to whoever owns them:
``DEQ(..., warm_start_backward=True)`` starts each backward from the last one's
solution.

A new method is one file: subclass [`IterativeSolver`][implicit.linear.IterativeSolver]
(an iterative method) or [`LinearSolver`][implicit.linear.LinearSolver].
"""

from __future__ import annotations

from implicit.linear.auto import Auto
from implicit.linear.base import (
    ApproximateInverse,
    Hint,
    JacobianOperator,
    LinearResult,
    LinearSolver,
    LowRankInverse,
    NearbyFactorization,
    PositiveDefinite,
)
from implicit.linear.bicgstab import BiCGStab
from implicit.linear.cg import CG
from implicit.linear.dense import Dense
from implicit.linear.gmres import GMRES
from implicit.linear.iterative import IterativeSolver, Progress
from implicit.linear.neumann import Neumann
from implicit.linear.one_step import OneStep, Phantom
from implicit.linear.registry import NAMES, resolve
from implicit.linear.unroll import Unroll

__all__ = [
    "CG",
    "GMRES",
    "NAMES",
    "ApproximateInverse",
    "Auto",
    "BiCGStab",
    "Dense",
    "Hint",
    "IterativeSolver",
    "JacobianOperator",
    "LinearResult",
    "LinearSolver",
    "LowRankInverse",
    "NearbyFactorization",
    "Neumann",
    "OneStep",
    "Phantom",
    "PositiveDefinite",
    "Progress",
    "Unroll",
    "resolve",
]
