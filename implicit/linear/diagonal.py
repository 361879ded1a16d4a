"""A diagonal first guess for elementwise maps, with another method behind it."""

from __future__ import annotations

import dataclasses

import torch

from implicit._results import flag_ill_conditioned
from implicit.linear.auto import Auto
from implicit.linear.base import CONVERGED, LinearResult, LinearSolver
from implicit.linear.iterative import norm, row_mask, safe_div


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiagonalFirst(LinearSolver):
    """Solve ``A x = rhs`` as if ``A`` were diagonal, and where the true residual says
    otherwise with ``fallback``.

    The Jacobian of an elementwise map (``torch.sin``, ``torch.tanh``, ...) is
    diagonal, and its diagonal is one product away: ``d = A 1``. Then ``x = rhs / d``
    is exact to rounding, where a Krylov method would need as many iterations as the
    diagonal has distinct entries. A second product measures the true residual
    ``‖A x − rhs‖``; a problem that does not meet ``tol`` (``A`` was not diagonal
    after all) is solved by ``fallback``, from that ``x`` where it is finite. So the
    answer is always checked; a non-diagonal ``A`` costs two products more.

    Args:
        fallback: the method for what the diagonal does not solve (default
            [`Auto`][implicit.linear.Auto]); it gets this solver's ``tol`` and
            ``max_iter`` unless it has its own.
        tol: as for every linear solver.
        max_iter: as for every linear solver.
    """

    name = "diagonal"

    fallback: LinearSolver = dataclasses.field(default_factory=Auto)

    def solve(self, state, rhs, *, tol, max_iter, x0=None, preconditioner=None):
        operator = state
        diagonal = operator.mv(torch.ones_like(rhs))
        x = safe_div(rhs, diagonal)
        residual = norm(operator.mv(x) - rhs)
        rhs_norm = norm(rhs)
        finite = torch.isfinite(x).all(dim=1) & torch.isfinite(residual)
        if bool((finite & (residual <= tol * rhs_norm)).all()):
            size = diagonal.abs()
            condition = size.amax(dim=1) / size.amin(dim=1)
            codes = flag_ill_conditioned(
                torch.full_like(rhs_norm, CONVERGED, dtype=torch.long), condition
            )
            relative = safe_div(residual, rhs_norm)
            return LinearResult(x, relative, codes, 2, "diagonal", condition)
        guess = torch.where(row_mask(finite), x, 0 if x0 is None else x0)
        fallback = dataclasses.replace(
            self.fallback,
            tol=tol if self.fallback.tol is None else self.fallback.tol,
            max_iter=max_iter if self.fallback.max_iter is None else self.fallback.max_iter,
        )
        options = {} if preconditioner is None else {"preconditioner": preconditioner}
        result = fallback.solve(
            fallback.init(operator), rhs, tol=fallback.tol, max_iter=fallback.max_iter,
            x0=guess, **options,
        )  # fmt: skip
        method = f"diagonal+{result.method or fallback.name}"
        return dataclasses.replace(result, iterations=result.iterations + 2, method=method)


def resolution(dtype: torch.dtype) -> float:
    """A relative tolerance at the resolution of ``dtype``: eight units of rounding
    (``1.8e-15`` in float64, ``9.5e-7`` in float32)."""
    return 8 * torch.finfo(dtype).eps
