"""What every iterative method shares: warm start, per-problem stop, the true-residual
check and the status codes; and (from ``implicit.linear._rows``) helpers for methods on
batches of rows.

A new iterative method is one file: a frozen dataclass subclassing
[`IterativeSolver`][implicit.linear.IterativeSolver] that implements
[`iterate`][implicit.linear.IterativeSolver.iterate].
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar, NamedTuple

import torch

from implicit._batch import cheap_host_reads
from implicit._results import check_number, flag_ill_conditioned
from implicit.linear import _condition
from implicit.linear._rows import dot, identity, norm, row_mask, safe_div, start, where_codes
from implicit.linear.base import (
    CONVERGED,
    MAX_ITER,
    NONFINITE,
    ApproximateInverse,
    Hint,
    JacobianOperator,
    LinearResult,
    LinearSolver,
    Preconditioner,
)

__all__ = [
    "IterativeSolver",
    "Progress",
    "dot",
    "identity",
    "norm",
    "row_mask",
    "safe_div",
    "start",
    "where_codes",
]


class Progress(NamedTuple):
    """What one call of [`iterate`][implicit.linear.IterativeSolver.iterate] returns.

    Attributes:
        x: the iterate (rows of the problems not allowed to move unchanged).
        codes: the status codes of the allowed problems (others: anything).
        iterations: iterations taken.
        residual: ``±(A x − rhs)`` for the returned ``x`` when computed as a product
            (not by a recurrence that may drift), else ``None``.
        method: what ran, for a method that chooses among several (else ``None``).
    """

    x: torch.Tensor
    codes: torch.Tensor
    iterations: int
    residual: torch.Tensor | None = None
    method: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterativeSolver(LinearSolver):
    """An iterative method: warm start, per-problem stop and a true-residual check.

    A method implements [`iterate`][implicit.linear.IterativeSolver.iterate], which runs
    its recurrences on the problems it is allowed to touch.
    [`solve`][implicit.linear.LinearSolver.solve] then measures the true residual ``A x − rhs``
    (recurrences drift in floating point; a method that has just computed it, as a
    product, hands it back instead of having it computed twice): a problem the
    recurrence called converged but whose true residual is above the tolerance is
    restarted from its current ``x`` while the iteration budget lasts.

    Args:
        tol: relative tolerance, ``‖A x − rhs‖₂ ≤ tol · ‖rhs‖₂`` per problem; ``None``
            takes the front door's ``tol``.
        max_iter: iteration cap; ``None`` takes the front door's ``max_iter``.
        x0: initial guess: a tensor with the right-hand side's number of elements
            (reshaped to its flat ``(B, n)`` view) or broadcastable to it; ``None``
            (zero). A per-call ``x0`` (a layer's warm start) takes precedence.
        preconditioner: ``preconditioner(r)`` takes a ``(B, n)`` tensor and returns
            ``M r ≈ A⁻¹ r`` per row, where ``A`` is the operator the solver sees (in
            the backward, the transposed Jacobian ``(∂g/∂z)ᵀ``; a diagonal
            preconditioner serves both).
        use_hints: where no preconditioner is given, precondition with the estimate
            of ``(∂g/∂z)⁻¹`` the forward solver left (an
            [`ApproximateInverse`][implicit.linear.ApproximateInverse]: Broyden's and
            Anderson's secant estimates, Newton's nearby factorisation), transposed for
            the adjoint; still an exact solve. Only for methods that take any
            preconditioner (GMRES, BiCGStab). Off by default, and not used by
            [`Auto`][implicit.linear.Auto]: on the benchmark's equilibrium models the
            estimates save no product (13 of 13), on harder systems 7-17 % of GMRES's
            (``benchmarks/results/hints.txt``); they are kept from the forward to the
            backward (two ``(B, k, n)`` tensors) only where used.
        check_every: read the host (test which problems have finished, a
            synchronisation on an accelerator) every this many iterations; ``None``:
            every iteration on the CPU, every 4 on accelerators. In between, finished
            problems stop changing all the same, and the methods take their general
            paths (GMRES orthogonalises twice rather than test whether it must), so
            that a loop of ``k`` iterations reads the host about ``k / check_every``
            times, plus a few reads per solve (its end, the true-residual check).
    """

    #: Whether the method takes a preconditioner.
    preconditioned: ClassVar[bool] = True
    #: Whether it takes any preconditioner (CG needs a symmetric positive definite one).
    any_preconditioner: ClassVar[bool] = False

    x0: torch.Tensor | None = dataclasses.field(default=None, compare=False)
    preconditioner: Preconditioner | None = None
    use_hints: bool = False
    check_every: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.check_every is not None:
            check_number(self.check_every, "check_every", "an integer >= 1")
        if self.x0 is not None and not isinstance(self.x0, torch.Tensor):
            message = f"{owner}(x0=...) must be a tensor or None, got {self.x0!r}"
            if isinstance(self.x0, str) and self.x0 == "previous":
                message += (
                    ": the warm start across calls belongs to their caller: use "
                    "DEQ(..., warm_start_backward=True), or pass the last solution as x0"
                )
            raise TypeError(message)
        if self.preconditioner is not None:
            if not self.preconditioned:
                raise TypeError(f"{owner} takes no preconditioner")
            if not callable(self.preconditioner):
                raise TypeError(
                    f"{owner}(preconditioner=...) must be callable: M(r) -> approximately A⁻¹ r"
                )
        if self.use_hints and not self.any_preconditioner:
            raise TypeError(
                f"{owner}(use_hints=True): the forward's estimates of the inverse are not "
                f"symmetric positive definite preconditioners; use GMRES or BiCGStab"
            )

    def uses(self, hint: Hint, shape: tuple[int, int]) -> bool:
        """Whether the method preconditions a system of ``shape`` with ``hint`` (see
        ``use_hints``)."""
        return self.use_hints and isinstance(hint, ApproximateInverse) and hint.rows == shape[0]

    def init(self, operator: JacobianOperator, hint: Hint | None = None):
        if hint is not None and self.uses(hint, tuple(operator.shape)):
            return _Hinted(operator, hint)
        return operator

    def transpose(self, state):
        if isinstance(state, _Hinted):
            return _Hinted(state.operator.transpose(), state.hint)
        return self.init(state.transpose())

    def solve(self, state, rhs, *, tol, max_iter, x0=None, preconditioner=None):
        hinted = isinstance(state, _Hinted)
        # Its first product samples ‖A‖ for the condition estimate.
        operator = _condition.FirstProduct(state.operator if hinted else state)
        preconditioner = self.preconditioner if preconditioner is None else preconditioner
        if hinted and preconditioner is None:
            preconditioner = state.preconditioner()
        if preconditioner is not None and not self.preconditioned:
            raise TypeError(f"{type(self).__name__} takes no preconditioner")
        rhs_norm = norm(rhs)
        target = tol * rhs_norm
        # The solution of A x = 0 is x = 0, whatever the guess.
        x = _initial(self.x0 if x0 is None else x0, rhs)
        if x is not None:
            x = torch.where(row_mask(rhs_norm == 0), 0, x)
        allowed = torch.ones_like(rhs_norm, dtype=torch.bool)
        codes = None  # (after the first round: every problem's, all being allowed)
        iterations, methods = 0, []
        # One problem on the CPU: its end is tested on the host, without passes, against
        # its target read once.
        cheap = cheap_host_reads(rhs)
        one = cheap and rhs.shape[0] == 1
        host_target = target.item() if one else None
        while True:
            x, new_codes, used, true, method = self.iterate(
                operator,
                rhs,
                x,
                target=target,
                max_iter=max_iter - iterations,
                allowed=allowed,
                preconditioner=preconditioner,
            )
            iterations += used
            methods += [part for part in (method or "").split("+") if part not in methods]
            residual = norm(operator.mv(x) - rhs if true is None else true)
            # The common end, every problem solved (a true residual at most the target is
            # finite, and so is the x it was computed from), needs no more bookkeeping:
            # its codes (None) are made from the condition estimates below.
            if residual.item() <= host_target if one else bool((residual <= target).all()):
                codes = None
                break
            codes = new_codes if codes is None else torch.where(allowed, new_codes, codes)
            finite = torch.isfinite(residual) & torch.isfinite(x).all(dim=1)
            solved = finite & (residual <= target)
            allowed = (codes == CONVERGED) & ~solved & finite  # drifted: restart these
            if used == 0 or iterations >= max_iter or not bool(allowed.any()):
                codes = torch.where(
                    solved, CONVERGED, torch.where(codes == CONVERGED, MAX_ITER, codes)
                )
                codes = torch.where(finite, codes, NONFINITE)
                break
        gain = operator.gain if operator.gain is not None else torch.full_like(rhs_norm, math.nan)
        # Relative, and 0 for a zero right-hand side (whose x is 0), whose condition
        # estimate is NaN: where the host reads cheaply that no right-hand side is zero
        # (the common case; one problem's is not where its target is above zero), plain
        # divisions, without the guards' passes (which give the same numbers elsewhere).
        if cheap and (host_target > 0 if one else bool((rhs_norm > 0).all())):
            relative = residual / rhs_norm
            condition = gain * (norm(x) / rhs_norm)
        else:
            relative = safe_div(residual, rhs_norm)
            condition = _condition.seen(gain, x, rhs_norm)
        # (codes None: every problem solved, converged or ill-conditioned.)
        codes = flag_ill_conditioned(codes, condition)
        method = "+".join(methods) or None
        return LinearResult(x, relative, codes, iterations, method, condition)

    @abc.abstractmethod
    def iterate(
        self,
        operator: JacobianOperator,
        rhs: torch.Tensor,
        x: torch.Tensor | None,
        *,
        target: torch.Tensor,
        max_iter: int,
        allowed: torch.Tensor,
        preconditioner: Preconditioner | None,
    ) -> Progress:
        """Iterate from ``x`` (``None``: zero) on the ``allowed`` problems (a ``(B,)``
        mask) until ``‖A x − rhs‖ ≤ target`` (per problem), for at most ``max_iter``
        iterations, preconditioned by ``preconditioner`` where the method takes one.

        ``operator`` has the methods and attributes of a
        [`JacobianOperator`][implicit.linear.JacobianOperator] (it is one seen through
        a wrapper that records its first product for the condition estimate)."""


@dataclasses.dataclass(frozen=True)
class _Hinted:
    """The state of a solve preconditioned by the forward's estimate of the inverse."""

    operator: JacobianOperator
    hint: ApproximateInverse

    def preconditioner(self) -> Preconditioner:
        """``M`` for the operator: the estimate, transposed for the adjoint system."""
        hint, transposed = self.hint, self.operator.transposed
        return lambda r: hint.solve(r, transposed=transposed)


def _initial(x0: torch.Tensor | None, rhs: torch.Tensor) -> torch.Tensor | None:
    """The warm start in the flat view of ``rhs``, or ``None`` for zero (which needs no
    product to start from)."""
    if x0 is None:
        return None
    guess = x0.detach().to(dtype=rhs.dtype, device=rhs.device)
    if guess.numel() == rhs.numel():
        return guess.reshape(rhs.shape)
    try:
        return guess.expand_as(rhs)
    except RuntimeError:
        raise ValueError(
            f"x0 of shape {tuple(x0.shape)} does not fit the right-hand side of shape "
            f"{tuple(rhs.shape)} (flat (batch, n) view)"
        ) from None
