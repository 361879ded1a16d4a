"""Minimisation and least squares as root problems: the optimality condition.

``minimize(fun)`` is the root problem ``g(z) = ∇_z fun(z, θ) = 0`` and
``least_squares(residual)`` that of ``fun = ½‖residual‖²``. The gradient is taken with
``torch.func.grad``, so that it composes with autograd and every ``torch.func``
transform: the Jacobian of ``g`` that the backward solves with is the exact Hessian of
the objective (for least squares ``JᵀJ + Σ rᵢ∇²rᵢ``, not its Gauss–Newton part), by
products. With bounds ``l ≤ z ≤ u`` the condition is the projected-gradient fixed point
``g(z) = z − clip(z − ∇fun(z), l, u) = 0``: a coordinate held at a bound has the
residual ``z − l`` (or ``z − u``), hence derivative 0 with respect to everything but
that bound and 1 with respect to it, and the free coordinates have the gradient's rows.
The bounds are explicit inputs of the problem, so they receive gradients in every mode.

The forward solvers of these problems also need the objective itself: they see an
an ``Objective`` (``implicit/solvers/_objective.py``), a
[`Residual`][implicit.solvers.Residual] that also evaluates the
objective, its gradient, its Hessian and (least squares) the residual vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from implicit._complex import as_real, is_supported
from implicit._problem import Problem, State
from implicit.solvers._objective import Objective


class OptimizationProblem(Problem):
    """The optimality condition of ``min fun(z, *args)`` as a root problem.

    Args:
        fun: the objective (``least_squares=False``: a scalar, or ``(B,)`` per-problem
            values when batched) or the residual vector (``least_squares=True``: any
            shape; with ``batched=True`` dim 0 indexes the problems).
        z0: the initial state (a tensor or a tree of tensors), inside the bounds.
        args: the extra arguments of ``fun``.
        batched: whether dim 0 of the state indexes independent problems.
        least_squares: whether ``fun`` is a residual vector whose ``½‖·‖²`` is minimised.
        bounds: ``(lower, upper)`` as flat ``(B, n)`` tensors, or ``None``.
        tol_mode: ``"relative"`` (default: the test is scaled by
            ``min(|fun(z0)|, |fun(z)|)``) or
            ``"absolute"``.
    """

    def __init__(
        self,
        fun: Callable[..., Any],
        z0: State,
        args: Sequence[Any],
        *,
        batched: bool,
        least_squares: bool,
        bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
        tol_mode: str = "relative",
    ):
        if not callable(fun):
            name = "residual" if least_squares else "fun"
            raise TypeError(f"{name} must be callable, got {type(fun).__name__}")
        self.fun = fun
        self.least_squares = least_squares
        self.bounded = bounds is not None
        full_args = (*args, *bounds) if bounds is not None else tuple(args)
        super().__init__(
            self._gradient, z0, full_args, batched=batched, form="root", tol_mode=tol_mode
        )
        self.name = "residual" if least_squares else "fun"
        # The Hessian; the projected gradient's Jacobian mixes its rows with the identity's.
        self.symmetric = not self.bounded

    # -- functions of the unpacked state ----------------------------------------------
    def _user_args(self, args: Sequence[Any]) -> Sequence[Any]:
        return args[:-2] if self.bounded else args

    def _values(self, state: State, *args: Any) -> torch.Tensor:
        """The per-problem objective values, shape ``(B,)``."""
        out = self.fun(state, *self._user_args(args))
        if self.least_squares:
            vector = _check_residual(out, self.batched, self.batch_size)
            return 0.5 * vector.pow(2).sum(dim=1)  # ½Σ|rᵢ|²: a complex r is in its real view
        return _check_objective(out, self.batched, self.batch_size).reshape(self.batch_size)

    def _residual_vector(self, state: State, *args: Any) -> torch.Tensor:
        out = self.fun(state, *self._user_args(args))
        return _check_residual(out, self.batched, self.batch_size)

    def _gradient(self, state: State, *args: Any) -> State:
        return torch.func.grad(lambda s: self._values(s, *args).sum())(state)

    def _value_and_gradient(self, state: State, *args: Any) -> tuple[State, torch.Tensor]:
        def total(s: State) -> tuple[torch.Tensor, torch.Tensor]:
            values = self._values(s, *args)
            return values.sum(), values

        grad, (_, values) = torch.func.grad_and_value(total, has_aux=True)(state)
        return grad, values

    # -- the flat view ---------------------------------------------------------------
    def _bound_inputs(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        n_explicit = len(self.tensor_positions)
        return inputs[n_explicit - 2], inputs[n_explicit - 1]

    def residual(self, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """``∇fun`` on the flat view, or the projected-gradient residual with bounds."""
        grad = super().residual(z, *inputs)
        if not self.bounded:
            return grad
        lower, upper = self._bound_inputs(inputs)
        return z - torch.clamp(z - grad, lower, upper)

    def per_row(self, name: str, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """A function of the flat view that the solvers evaluate, one row per problem:

        * ``"value_and_grad"``: ``(B, 1 + n)``, the objective then its gradient;
        * ``"residuals"``: ``(B, m)``, the residual vector (least squares);
        * ``"lower"``, ``"upper"``: ``(B, n)``, the bounds.
        """
        if name == "value_and_grad":
            grad, values = self.call(self._value_and_gradient, z, inputs)
            return torch.cat([values.unsqueeze(1), self.pack(grad)], dim=1)
        if name == "residuals":
            return self.call(self._residual_vector, z, inputs)
        if name in ("lower", "upper"):
            bound = self._bound_inputs(inputs)[name == "upper"]
            return bound + torch.zeros_like(z)  # batched like z under vmap
        raise ValueError(f"unknown per-row function {name!r}")

    def scale(self, z0: torch.Tensor, r0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """``|fun(z0)|``, the scale of the stopping test at the start (0 with
        ``tol_mode="absolute"``); a minimiser tests ``‖g(z)‖₂ ≤ tol · (1 + s)`` with ``s``
        the smaller of it and ``|fun(z)|``."""
        if not self.relative:
            return super().scale(z0, r0, *inputs)
        return self.per_row("value_and_grad", z0, *inputs)[:, 0].abs()

    def solver_view(self, inputs: Sequence[torch.Tensor], source: Any = None) -> Objective:
        return Objective(self if source is None else source, inputs, self)


def _check_objective(out: Any, batched: bool, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"fun must return a tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        hint = ": a complex objective has no minimum (minimise a real function of z, e.g. |·|²)"
        raise TypeError(
            f"fun must return a real floating-point tensor, got {out.dtype}"
            + (hint if out.is_complex() else "")
        )
    expected = (batch,) if batched else ()
    if tuple(out.shape) != expected:
        hint = (
            "one objective value per problem (dim 0 of z indexes the problems)"
            if batched
            else "a scalar: sum or average its terms, or pass batched=True for one value "
            "per problem"
        )
        raise ValueError(
            f"fun returned shape {tuple(out.shape)}, expected {expected}: fun must return {hint}"
        )
    return out


def _check_residual(out: Any, batched: bool, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"residual must return a tensor, got {type(out).__name__}")
    if not is_supported(out.dtype):
        raise TypeError(f"residual must return a floating-point or complex tensor, got {out.dtype}")
    if batched and (out.dim() == 0 or out.shape[0] != batch):
        raise ValueError(
            f"residual returned shape {tuple(out.shape)}: with batched=True dim 0 must index "
            f"the {batch} problems"
        )
    if out.numel() == 0:
        raise ValueError("residual returned an empty tensor: there is nothing to fit")
    # A complex residual as its real view: ½‖r‖² = ½Σ|rᵢ|², and the solvers' Jacobian is
    # that of the real and imaginary parts.
    return as_real(out).reshape(batch, -1)
