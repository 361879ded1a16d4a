"""The interface of the linear solvers: what they return, the hints they may take, and
the solver itself; the operator they see is in ``implicit/linear/operator.py``.

A linear solver is configuration only: an immutable dataclass, safe to reuse across
calls, threads and ``torch.func`` transforms. A solve has two steps, as in lineax:

* [`init`][implicit.linear.LinearSolver.init] prepares what the method needs from the
  operator (the LU factors for [`Dense`][implicit.linear.Dense]; the operator itself for
  an iterative method), optionally using a [`Hint`][implicit.linear.Hint] from the
  forward solver;
* [`solve`][implicit.linear.LinearSolver.solve] solves for one right-hand side, with
  the per-call data (tolerance, cap, initial guess, preconditioner) passed per call.

A method reports per-problem status codes: ``CONVERGED``, ``ILL_CONDITIONED``,
``STAGNATED``, ``MAX_ITER``, ``BREAKDOWN``, ``DIVERGED`` and ``NONFINITE`` from this
module. An iterative method subclasses
[`IterativeSolver`][implicit.linear.IterativeSolver] (``implicit/linear/iterative.py``).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from implicit._batch import Factorization, upcast
from implicit._checks import check_max_iter, check_tol
from implicit._results import (
    BREAKDOWN,
    CONVERGED,
    DIVERGED,
    ILL_CONDITIONED,
    MAX_ITER,
    NONFINITE,
    STAGNATED,
)
from implicit.linear.operator import JacobianOperator

__all__ = [
    "BREAKDOWN",
    "CONVERGED",
    "DIVERGED",
    "ILL_CONDITIONED",
    "MAX_ITER",
    "NONFINITE",
    "STAGNATED",
    "ApproximateInverse",
    "Hint",
    "JacobianOperator",
    "LinearResult",
    "LinearSolver",
    "LowRankInverse",
    "NearbyFactorization",
    "PositiveDefinite",
    "Preconditioner",
]

#: ``M(r) ≈ A⁻¹ r`` for a ``(B, n)`` batch of rows.
Preconditioner = Callable[[torch.Tensor], torch.Tensor]


class WorkingOperator(JacobianOperator):
    """An operator whose products are evaluated in half precision, seen in float32.

    A linear solver then keeps its iterates, bases and small systems in float32
    (``implicit/_batch.py``); each product casts its argument down and its result
    up. Its structure is the operator's.

    Args:
        operator: the operator, whose products run in ``dtype``.
        dtype: float16 or bfloat16.
    """

    def __init__(self, operator: JacobianOperator, dtype: torch.dtype):
        super().__init__(
            operator.jacobian,
            transposed=operator.transposed,
            symmetric=operator.symmetric,
            positive_definite=operator.positive_definite,
        )
        self.dtype = self.evaluated_in = dtype

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return upcast(super().mv(x.to(self.dtype)))

    def shifted_mv(self, x: torch.Tensor) -> torch.Tensor:
        return upcast(super().shifted_mv(x.to(self.dtype)))

    def dense(self, chunk_size: int | None = None) -> torch.Tensor:
        return upcast(super().dense(chunk_size))

    def transpose(self) -> WorkingOperator:
        return WorkingOperator(super().transpose(), self.dtype)


@dataclasses.dataclass
class LinearResult:
    """The outcome of a batched linear solve.

    Attributes:
        x: the solution, shape ``(B, n)``.
        residual: the true relative residual ``‖A x − rhs‖ / ‖rhs‖`` per problem (0
            where ``rhs = 0``; NaN where the method does not measure it).
        codes: per-problem status codes (``CONVERGED``, ``MAX_ITER``, ...).
        iterations: iterations taken (the maximum over problems).
        method: how the solver ran, where it chooses among several ways (``"auto"``'s
            choice, ``"dense+refine"``); ``None`` means the solver's own name.
        condition: an estimate of the condition number of ``A`` per problem (NaN where
            the method makes none); a problem that converged with an estimate above
            ``1/√eps`` of the dtype has the code ``ILL_CONDITIONED``
            (``implicit._results.flag_ill_conditioned``).
    """

    x: torch.Tensor
    residual: torch.Tensor
    codes: torch.Tensor
    iterations: int
    method: str | None = None
    condition: torch.Tensor | None = None


class Hint:
    """What a forward solver learned about ``∂g/∂z`` near its solution, handed to the
    backward's linear solver, which decides whether to use it
    ([`uses`][implicit.linear.LinearSolver.uses]). A forward solver returns one in
    ``SolveInfo.hint``; subclasses say what it is (e.g.
    [`NearbyFactorization`][implicit.linear.NearbyFactorization])."""


class ApproximateInverse(Hint):
    """A hint that is an estimate ``M ≈ (∂g/∂z)⁻¹`` near the solution, one per problem:
    a preconditioner for an iterative method that takes any (see
    [`IterativeSolver`][implicit.linear.IterativeSolver]'s ``use_hints``), or the start
    of a refinement ([`NearbyFactorization`][implicit.linear.NearbyFactorization] for
    [`Dense`][implicit.linear.Dense]). A subclass implements
    [`solve`][implicit.linear.ApproximateInverse.solve]."""

    @property
    def rows(self) -> int:
        """The number of problems ``B`` the estimate is for."""
        raise NotImplementedError

    def solve(self, rhs: torch.Tensor, *, transposed: bool) -> torch.Tensor:
        """``M rhs`` per row of ``rhs`` ``(B, n)`` (``transposed``: ``Mᵀ rhs``, an
        estimate of the adjoint's inverse)."""
        raise NotImplementedError


class LowRankInverse(ApproximateInverse):
    """``M = s I + Σ_j u_j v_jᵀ ≈ (∂g/∂z)⁻¹`` per problem: the quasi-Newton methods'
    estimate of the inverse Jacobian, built from their secant steps.

    [`Broyden`][implicit.solvers.Broyden]'s inverse estimate is of this form, and so is
    [`Anderson`][implicit.solvers.Anderson]'s: its mixing step ``z − M g(z)`` with
    ``M = −β I + (ΔZ + βΔR)(ΔRᵀΔR + ridge)⁻¹ΔRᵀ`` satisfies the secant equations
    ``M Δr_j = Δz_j`` of its history (up to the ridge). Each is returned as the solver's
    hint; a GMRES or BiCGStab backward with ``use_hints=True`` preconditions the
    adjoint system with ``Mᵀ`` (an exact solve, in fewer products where the estimate is
    good).

    Args:
        scale: ``s``, shape ``(B,)``.
        left: the ``u_j``, shape ``(B, k, n)``.
        right: the ``v_j``, shape ``(B, k, n)``.
    """

    def __init__(self, scale: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
        self.scale = scale
        self.left = left
        self.right = right

    @property
    def rows(self) -> int:
        return self.scale.shape[0]

    def solve(self, rhs: torch.Tensor, *, transposed: bool) -> torch.Tensor:
        left, right = (self.right, self.left) if transposed else (self.left, self.right)
        if left.dtype != rhs.dtype:  # half-precision factors, float32 iterates
            left, right = left.to(rhs.dtype), right.to(rhs.dtype)
        coefficients = torch.bmm(rhs.unsqueeze(1), right.transpose(1, 2))
        correction = torch.bmm(coefficients, left).squeeze(1)
        return self.scale.to(rhs.dtype).unsqueeze(1) * rhs + correction


@dataclasses.dataclass(frozen=True)
class NearbyFactorization(ApproximateInverse):
    """The LU factorisation of ``∂g/∂z`` at a point near the solution (Newton's last
    step), which [`Dense`][implicit.linear.Dense] refines instead of building the
    Jacobian at the solution.

    Attributes:
        factorization: the ``(B, n, n)`` blocks' factors.
    """

    factorization: Factorization

    @property
    def rows(self) -> int:
        return self.factorization.lu.shape[0]

    def solve(self, rhs: torch.Tensor, *, transposed: bool) -> torch.Tensor:
        """``M rhs`` per row, ``M`` the inverse of the nearby ``∂g/∂z`` (transposed: of
        its transpose)."""
        return self.factorization.solve(rhs, adjoint=transposed)


@dataclasses.dataclass(frozen=True)
class PositiveDefinite(Hint):
    """The forward solver verified that ``∂g/∂z`` is positive definite at its solution:
    the second-order condition of a strict minimum, which the minimisation solvers test
    where the gradient vanishes.

    Not for a linear solver to use: it is structure. For a problem whose Jacobian is
    symmetric (the Hessian of [`minimize`][implicit.minimize] and
    [`least_squares`][implicit.least_squares] without bounds) the backward's operator
    is then known symmetric positive definite, and [`Auto`][implicit.linear.Auto]
    solves it with [`CG`][implicit.linear.CG] above its dense size. Above the dense
    size of the test the smallest eigenvalue is a Lanczos estimate: a claim CG finds
    wrong (a curvature that is not positive) is handed to GMRES.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearSolver(abc.ABC):
    """Solves ``A x = rhs`` for a batch of independent systems given as an operator.

    Args:
        tol: relative tolerance ``‖A x − rhs‖ ≤ tol · ‖rhs‖``; ``None`` takes the
            front door's ``tol``.
        max_iter: iteration cap; ``None`` takes the front door's ``max_iter``.
    """

    name: ClassVar[str]
    #: Whether the method solves the system (as opposed to approximating it by design).
    exact: ClassVar[bool] = True

    tol: float | None = None
    max_iter: int | None = None

    def __post_init__(self) -> None:
        if self.tol is not None:
            check_tol(self.tol, f"{type(self).__name__}(tol=...)")
        if self.max_iter is not None:
            check_max_iter(self.max_iter, f"{type(self).__name__}(max_iter=...)")

    def init(self, operator: JacobianOperator, hint: Hint | None = None) -> Any:
        """What the method needs from ``operator`` to solve with it (default: the
        operator itself); ``hint`` where [`uses`][implicit.linear.LinearSolver.uses]
        accepted it."""
        return operator

    @abc.abstractmethod
    def solve(
        self,
        state: Any,
        rhs: torch.Tensor,
        *,
        tol: float,
        max_iter: int,
        x0: torch.Tensor | None = None,
        preconditioner: Preconditioner | None = None,
    ) -> LinearResult:
        """Solve ``A x = rhs`` for ``rhs`` of shape ``(B, n)``, ``A`` the operator
        ``state`` was made from (by [`init`][implicit.linear.LinearSolver.init]).

        Args:
            state: from [`init`][implicit.linear.LinearSolver.init], or the operator
                itself (then every solver calls ``init`` on it first).
            rhs: the right-hand sides, one row per problem.
            tol: relative tolerance per problem.
            max_iter: iteration cap.
            x0: initial guess (``None``: zero, or the solver's own ``x0``); methods
                that do not iterate ignore it.
            preconditioner: ``M(r) ≈ A⁻¹ r`` (``None``: the solver's own, if any).

        The core passes ``x0`` and ``preconditioner`` only when it has one (a layer's
        warm start, an iterative solver's own), so a method that takes neither may
        leave them out of its signature.
        """

    def transpose(self, state: Any) -> Any:
        """The state for ``Aᵀ``, from the state for ``A`` (reusing its work where the
        method can: [`Dense`][implicit.linear.Dense] reuses its factors)."""
        return self.init(state.transpose())

    def uses(self, hint: Hint, shape: tuple[int, int]) -> bool:
        """Whether [`init`][implicit.linear.LinearSolver.init] would use ``hint`` for a
        system of ``shape = (B, n)`` (the core keeps a hint from the forward to the
        backward only then)."""
        return False
