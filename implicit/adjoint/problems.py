"""The problems the differentiable solve solves: a user's root problem, and the linear
systems of its derivatives (each a :class:`LinearProblem` of its parent).

Each has ``residual(z, *inputs)``, ``solve(z0, inputs)`` (its forward) and
``linearize(z, inputs, moving, recorded)``; :func:`implicit.adjoint.vmap.fold` makes one
of the slices of ``vmap``. One :class:`~implicit.adjoint.function.ImplicitFunction` solves
them all, so the derivatives of a linear system (second order), its batching under
``vmap`` and its forward mode come from the same machinery as the user problem's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from implicit import _progress, _tolerance
from implicit._batch import attainable, is_half, upcast
from implicit._problem import Problem
from implicit._results import (
    CONVERGED,
    FAILED,
    STATUS_CODES,
    BackwardInfo,
    SolveInfo,
    report_failure,
    status_name,
)
from implicit._torch import autograd_grad
from implicit.adjoint.linearize import Functional, Linearization
from implicit.adjoint.settings import Given, Settings
from implicit.adjoint.vmap import Folded, Repeated
from implicit.linear import (
    Hint,
    IterativeSolver,
    JacobianOperator,
    PositiveDefinite,
)
from implicit.linear.base import WorkingOperator
from implicit.linear.operator import GraphJacobian, Jacobian
from implicit.solvers.base import Solver


def shape_report(info: SolveInfo, report_shape: tuple[int, ...]) -> None:
    """Give the per-problem fields of ``info`` the shape of the reports, in place.

    A solver that does not report per-problem iterations or statuses (one written
    before they existed) gets ``info.iterations`` for every problem, and its batch
    status for every problem that did not converge (``"failed"`` where that status
    says ``"converged"`` or is unknown).
    """
    rows = info.converged.shape
    if info.iterations_per_problem is None:
        info.iterations_per_problem = torch.full(
            rows, info.iterations, dtype=torch.long, device=info.converged.device
        )
    if info.status_codes is None:
        worst = STATUS_CODES.get(info.status, FAILED)
        unconverged = FAILED if worst == CONVERGED else worst
        info.status_codes = torch.where(info.converged, CONVERGED, unconverged)
    for name in ("converged", "residual", "iterations_per_problem", "status_codes"):
        value = getattr(info, name)
        if value.shape != report_shape:
            setattr(info, name, value.reshape(report_shape))


class RootProblem:
    """A user problem solved by a nonlinear solver.

    Args:
        problem: the residual ``problem.residual(z, *inputs)`` on ``(B, n)`` rows and
            the scale of its stopping test, ``problem.scale(z0, r0, *inputs)``.
        solver: the forward solver.
        settings: tolerances, failure policy and linear solver.
        r0: the residual at the initial guess when already known (used once).
        report_shape: the shape of the per-problem fields of the reports: ``(B,)``
            when batched, ``()`` otherwise, ``(V, ...)`` when folded under ``vmap``.
    """

    def __init__(
        self,
        problem: Problem | Folded,
        solver: Solver,
        settings: Settings,
        r0: torch.Tensor | None,
        report_shape: tuple[int, ...],
    ):
        self.problem = problem
        self.solver = solver
        self.settings = settings
        self.r0 = r0
        self.report_shape = report_shape
        self.info: SolveInfo | None = None
        # The initial guess of this problem's adjoint solve (a layer's warm start).
        self.backward_x0 = settings.backward_x0
        # What the forward solver knew of ∂g/∂z, where the backward's solver uses it.
        self.hint: Hint | None = None
        # ∂g/∂z is symmetric (the problem's structure), and positive definite at the
        # solution (where the forward solver verified it).
        self.symmetric = problem.symmetric
        self.positive_definite = False
        # The problem this one folds (under vmap): it reports through the same info.
        self.unfolded: RootProblem | None = None

    def residual(self, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.problem.residual(z, *inputs)

    def solve(self, z0: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        settings = self.settings
        fn = self.problem.solver_view(inputs)
        r0, self.r0 = self.r0, None  # reusable once, and only where it was computed
        tol, callback = settings.tol, settings.callback
        if isinstance(tol, torch.Tensor):  # one per row, also of vmap's stacked blocks
            tol = _tolerance.for_rows(tol, z0.shape[0])
        if callback is not None:
            callback = _progress.watch(callback, self.problem, self.report_shape)
        z, info = self.solver.solve(
            fn, z0, r0, tol=tol, max_iter=settings.max_iter, callback=callback
        )
        # Kept (Newton's: B·n² numbers, until the backward) only where it will be used.
        hint, info.hint = info.hint, None
        self.positive_definite = self.symmetric and isinstance(hint, PositiveDefinite)
        self.hint = hint if hint is not None and settings.linear.uses(hint, z.shape) else None
        shape_report(info, self.report_shape)
        problem: RootProblem | None = self
        while problem is not None:
            problem.info, problem = info, problem.unfolded
        if not isinstance(self.solver, Given):  # (a given answer's report was made)
            report_failure(info, settings.on_failure, "forward solve")
        return z

    def linearize(
        self,
        z: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        moving: Sequence[int],
        recorded: bool,
    ) -> Linearization:
        """``g`` linearised at ``(z, inputs)``; from one recorded graph where
        ``recorded`` (nothing differentiates what it is used for) and the user's
        problem can be recorded as itself (not the slices of ``vmap``).

        Recorded, ``g`` is evaluated once at ``(z, θ)``: ``z`` as a fresh leaf, the
        explicit inputs as detached leaves, and the captured tensors as themselves where
        they are leaves (a leaf cannot depend on another input, so its partial
        derivative is the total one; a captured non-leaf is swapped for a detached
        leaf). For a fixed point ``g = f(z) − z`` the graph is ``f``'s: ``A = ∂f/∂z −
        I`` is then shifted, and the partials are ``f``'s, the same.
        """
        problem = self.problem
        if not (recorded and isinstance(problem, Problem)):
            return Functional(self.residual, z, inputs, moving)
        explicit = len(problem.tensor_positions)
        stand_ins = [
            t if i >= explicit and t.is_leaf else t.detach().requires_grad_(t.requires_grad)
            for i, t in enumerate(inputs)
        ]
        shifted = problem.form == "fixed_point"
        with torch.enable_grad():
            point = z.detach().requires_grad_()
            out = (problem.map if shifted else problem.residual)(point, *stand_ins)
        return Recorded(GraphJacobian(out, point, shifted), tuple(stand_ins[i] for i in moving))


class LinearProblem:
    """The linear system of a derivative of ``parent``, as a root problem of its own.

    With ``A = ∂g/∂z`` of the parent at ``(z, θ)``:

    * ``transpose=True``: the adjoint system ``h(w; v, z, θ) = Aᵀ w − v`` (backward);
    * ``transpose=False``: the tangent system ``h(u; b, z, θ) = A u − b`` (forward mode).

    Its forward is a linear solve.

    Args:
        parent: the problem whose Jacobian ``A`` is.
        transpose: which of the two systems.
        copies: the number of right-hand sides per row of the parent: ``x`` and ``v``
            (or ``b``) have ``copies·B`` rows, copy-major, all with the same ``A``.
        jacobian: the products of ``A`` at hand at the ``(z, θ)`` of the system (the
            recorded graph of a first-order backward), or ``None``: linearised there.
        hint: what the forward solver knew of ``A``, for the linear solver to use.
    """

    #: Linear solves of higher orders are not warm-started, nor reported.
    backward_x0 = None
    info = None

    def __init__(
        self,
        parent: RootProblem | LinearProblem | Folded,
        transpose: bool,
        copies: int = 1,
        jacobian: Jacobian | None = None,
        hint: Hint | None = None,
    ):
        self.parent = parent
        self.transpose = transpose
        self.copies = copies
        self.settings = parent.settings
        # Its Jacobian is A or Aᵀ: the parent's structure.
        self.symmetric = parent.symmetric
        self.positive_definite = parent.positive_definite
        self.report_shape = (copies, *parent.report_shape) if copies > 1 else parent.report_shape
        self.jacobian = jacobian
        self.hint = hint

    def _jacobian(self, z: torch.Tensor, theta: Sequence[torch.Tensor]) -> Jacobian | Repeated:
        jacobian = Functional(self.parent.residual, z, theta, ()).jacobian
        return Repeated(jacobian, self.copies) if self.copies > 1 else jacobian

    def residual(
        self, x: torch.Tensor, rhs: torch.Tensor, z: torch.Tensor, *theta: torch.Tensor
    ) -> torch.Tensor:
        jacobian = self._jacobian(z, theta)
        product = jacobian.rmatvec(x) if self.transpose else jacobian.matvec(x)
        return product - rhs

    def solve(self, x0: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Solve the system with the settings' linear solver, and report how it went."""
        rhs, z, *theta = inputs
        jacobian = self.jacobian or self._jacobian(z, theta)
        operator = JacobianOperator(
            jacobian,
            transposed=self.transpose,
            symmetric=self.symmetric,
            positive_definite=self.positive_definite,
        )
        settings, linear, shape = self.settings, self.settings.linear, self.report_shape
        tol = linear.tol if linear.tol is not None else settings.tol
        if isinstance(tol, torch.Tensor):  # one number, for every problem
            tol = _tolerance.for_backward(tol)
        max_iter = linear.max_iter if linear.max_iter is not None else settings.max_iter
        guess = self.parent.backward_x0 if self.transpose else None
        options = {}
        if guess is not None or isinstance(linear, IterativeSolver):
            options = settings.per_call(rhs.shape, guess)
        dtype = rhs.dtype
        if is_half(dtype):  # solved in float32 around products in half precision
            operator, rhs = WorkingOperator(operator, dtype), upcast(rhs)
            tol = attainable(tol, dtype)
            if "x0" in options:
                options["x0"] = upcast(options["x0"])
        state = linear.init(operator, self.hint)
        result = linear.solve(state, rhs, tol=tol, max_iter=max_iter, **options)
        converged, residual = result.codes == CONVERGED, result.residual.detach()
        condition = result.condition
        if converged.shape != shape:  # per problem, in the shape of the reports
            converged, residual = converged.reshape(shape), residual.reshape(shape)
            condition = None if condition is None else condition.reshape(shape)
        status = status_name(result.codes)
        method = result.method or linear.name
        info = BackwardInfo(
            converged,
            residual,
            result.iterations,
            jacobian.vjps,
            status,
            method,
            solution=result.x.detach(),
            condition=condition,
        )
        what = "backward linear solve" if self.transpose else "forward-mode linear solve"
        report_failure(info, settings.on_failure, what)
        if self.transpose and self.parent.info is not None:  # the parent's report
            self.parent.info.backward = info
        return result.x.to(dtype) if is_half(dtype) else result.x

    def linearize(
        self,
        z: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        moving: Sequence[int],
        recorded: bool,
    ) -> Linearization:
        """The system's own linearisation (for second order): by ``torch.func``."""
        return Functional(self.residual, z, inputs, moving)


@dataclasses.dataclass(frozen=True, eq=False)
class Recorded(Linearization):
    """``g``'s linearisation from one graph recorded with plain autograd (see
    :meth:`RootProblem.linearize`): the products of that graph and the pullback through
    it.

    Attributes:
        jacobian: the graph's products, ``A = ∂g/∂z``.
        moving: the leaves the graph was recorded from that stand for the inputs to
            differentiate with respect to.
    """

    jacobian: GraphJacobian
    moving: tuple[torch.Tensor, ...]

    def pullback(self, cotangent: torch.Tensor) -> Sequence[torch.Tensor]:
        # The graph's last use: it is freed.
        return autograd_grad(self.jacobian.out, cotangent, self.moving, retain_graph=False)
