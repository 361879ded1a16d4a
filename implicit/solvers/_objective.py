"""What a minimisation solver receives: the objective beside the optimality residual.

The root problem of [`minimize`][implicit.minimize] and
[`least_squares`][implicit.least_squares] is the optimality condition
(``implicit/_optimization.py``); its solvers also evaluate the objective, its
gradient and Hessian, the bounds and, for least squares, the residual vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from implicit._batch import traced
from implicit.linear.operator import GraphJacobian, Jacobian, JacobianOperator
from implicit.solvers.base import Residual


class Objective(Residual):
    """What a minimisation solver sees: the optimality residual (as every solver's
    [`Residual`][implicit.solvers.Residual]), the objective, its gradient and Hessian,
    the bounds and, for least squares, the residual vector.

    Every evaluation of the user's function counts in ``f_evals``.

    Args:
        source: evaluates the problem's per-row functions (the problem, or its
            slices under ``vmap``).
        inputs: the problem's inputs (or their stand-ins).
        problem: the optimisation problem (``implicit/_optimization.py``).
    """

    def __init__(self, source: Any, inputs: Sequence[torch.Tensor], problem: Any):
        super().__init__(source.residual, source.scale, inputs)
        self._per_row = lambda name, z: source.per_row(name, z, *inputs)
        self.least_squares = problem.least_squares
        self.bounded = problem.bounded
        self.relative = problem.relative
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None

    def scale_of_value(self, f: torch.Tensor) -> torch.Tensor:
        """The stopping test's scale from the objective ``f`` ``(B,)`` at the initial
        guess (the problem's scale without evaluating it again): ``|f|``, or 0 with
        ``tol_mode="absolute"``."""
        return f.abs() if self.relative else torch.zeros_like(f)

    def value(self, z: torch.Tensor) -> torch.Tensor:
        """The objective ``(B,)`` at ``z``, for methods that use no derivative."""
        self.f_evals += 1
        return self._per_row("value", z)[:, 0]

    def value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective ``(B,)`` and its gradient ``(B, n)`` at ``z``."""
        self.f_evals += 1
        out = self._per_row("value_and_grad", z)
        return out[:, 0], out[:, 1:]

    def hessian(self, z: torch.Tensor) -> JacobianOperator:
        """The Hessian at ``z``, a symmetric operator: products (``.mv``) or blocks
        (``.dense()``)."""
        self.f_evals += 1
        gradient = _linearize(lambda point: self._per_row("value_and_grad", point)[:, 1:], z)
        return JacobianOperator(gradient, symmetric=True)

    def residuals(self, z: torch.Tensor) -> torch.Tensor:
        """The residual vector ``(B, m)`` at ``z`` (least squares only)."""
        if not self.least_squares:
            raise TypeError("this solver needs a least-squares problem (implicit.least_squares)")
        self.f_evals += 1
        return self._per_row("residuals", z)

    def residuals_linearization(self, z: torch.Tensor) -> Jacobian:
        """The residual vector ``r(z)`` (``.value``, ``(B, m)``) and its Jacobian
        (``.dense()``, ``(B, m, n)``) at ``z`` (least squares only)."""
        if not self.least_squares:
            raise TypeError("this solver needs a least-squares problem (implicit.least_squares)")
        self.f_evals += 1
        return _linearize(lambda point: self._per_row("residuals", point), z)

    def bounds(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(lower, upper)``, each ``(B, n)``, or ``None`` without bounds."""
        if not self.bounded:
            return None
        if self._bounds is None or self._bounds[0].shape != z.shape:
            self._bounds = (self._per_row("lower", z), self._per_row("upper", z))
        return self._bounds

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` clipped into the bounds."""
        bounds = self.bounds(z)
        return z if bounds is None else torch.clamp(z, *bounds)

    def optimality(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The residual of the stopping test from the gradient at ``z``: the gradient,
        or ``z − clip(z − ∇fun, l, u)`` with bounds."""
        bounds = self.bounds(z)
        return grad if bounds is None else z - torch.clamp(z - grad, *bounds)

    def free(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``(B, n)`` coordinates not held at a bound by a gradient pushing outwards."""
        bounds = self.bounds(z)
        if bounds is None:
            return torch.ones_like(z, dtype=torch.bool)
        lower, upper = bounds
        return ~(((z <= lower) & (grad > 0)) | ((z >= upper) & (grad < 0)))


def _linearize(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> Jacobian:
    """As [`Residual.linearize`][implicit.solvers.Residual.linearize]: one recorded graph
    unless the operations are traced."""
    if traced(z):
        return Jacobian(fn, z)
    return GraphJacobian.record(fn, z)
