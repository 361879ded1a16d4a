"""The problems the differentiable solve solves: a user's root problem, and the linear
systems of its derivatives.

Each has ``residual(z, *inputs)`` (the root problem it is), ``solve(z0, inputs)`` (its
forward), ``linearize(z, inputs, moving, recorded)`` (its
:class:`~implicit.adjoint.linearize.Linearization`) and ``fold(size, in_dims, inputs)``
(the same problem for the slices of ``vmap``, :mod:`implicit.adjoint.vmap`). They are
solved by one :class:`~implicit.adjoint.function.ImplicitFunction`, so the derivatives
of a linear system (second order), its batching under ``vmap`` and its forward mode
come from the same machinery as the user problem's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from implicit import _progress, _tolerance
from implicit._precision import attainable, is_half, upcast
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
from implicit.adjoint.linearize import Functional, Linearization, Recorded
from implicit.adjoint.vmap import Folded, Repeated, rows
from implicit.linear import (
    Hint,
    IterativeSolver,
    JacobianOperator,
    LinearSolver,
    PositiveDefinite,
)
from implicit.linear.base import WorkingOperator
from implicit.linear.operator import Jacobian
from implicit.solvers.base import Solver


@dataclasses.dataclass
class Settings:
    """Tolerances, failure policy and linear solver shared by a solve and its linear solves.

    Attributes:
        tol: a number, or a ``(B,)`` tensor of per-problem tolerances (see
            :mod:`implicit._tolerance`).
        rows: the number of rows ``B`` of the user's problem. The systems of ``vmap``,
            ``jacrev``, ... stack several blocks of ``B`` rows; an initial guess and a
            preconditioner are written for one block.
        backward_x0: the initial guess of the backward's adjoint solve (a layer's warm
            start), or ``None``.
        callback: the user's per-iteration callback of the forward solve, or ``None``.
    """

    tol: _tolerance.Tol
    max_iter: int
    on_failure: str
    linear: LinearSolver
    rows: int
    backward_x0: torch.Tensor | None = None
    callback: _progress.Callback | None = None

    def linear_solve(
        self,
        operator: JacobianOperator,
        rhs: torch.Tensor,
        what: str,
        report_shape: tuple[int, ...],
        *,
        hint: Hint | None = None,
        x0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BackwardInfo]:
        """Solve ``operator x = rhs`` with the linear solver, and report how it went."""
        linear = self.linear
        tol = linear.tol if linear.tol is not None else self.tol
        if isinstance(tol, torch.Tensor):  # one number, for every problem
            tol = _tolerance.for_backward(tol)
        max_iter = linear.max_iter if linear.max_iter is not None else self.max_iter
        x0, preconditioner = self._per_call(rhs.shape, x0)
        dtype = rhs.dtype
        if is_half(dtype):  # solved in float32 around products in half precision
            operator, rhs = WorkingOperator(operator, dtype), upcast(rhs)
            tol, x0 = attainable(tol, dtype), None if x0 is None else upcast(x0)
        # Passed only when set: a method that takes neither may leave them out.
        options = {"x0": x0} if x0 is not None else {}
        if preconditioner is not None:
            options["preconditioner"] = preconditioner
        state = linear.init(operator, hint)
        result = linear.solve(state, rhs, tol=tol, max_iter=max_iter, **options)
        info = BackwardInfo(
            converged=_reported(result.codes == CONVERGED, report_shape),
            residual=_reported(result.residual.detach(), report_shape),
            iterations=result.iterations,
            matvecs=operator.products,
            status=status_name(result.codes),
            method=result.method or linear.name,
            solution=result.x.detach(),
            condition=None
            if result.condition is None
            else _reported(result.condition, report_shape),
        )
        report_failure(info, self.on_failure, what)
        return (result.x.to(dtype) if is_half(dtype) else result.x), info

    def _per_call(
        self, shape: torch.Size, x0: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, Callable | None]:
        """The initial guess and preconditioner of one linear solve, fitted to its rows.

        The one place where they meet ``vmap``: the user wrote them for one block of
        ``B`` rows, a system of ``jacrev``, ``vmap``, ... stacks several blocks, so a
        one-block guess is repeated for each block and the preconditioner is applied
        block by block. ``x0`` (a layer's warm start, the solution of an earlier
        system) takes precedence over the solver's own and is dropped (a cold start)
        where it fits neither the system nor one block; the solver's own must fit.
        """
        linear = self.linear
        own = isinstance(linear, IterativeSolver)
        preconditioner = linear.preconditioner if own else None
        blocks = shape[0] // self.rows
        block = self.rows * shape[1]
        if x0 is not None and x0.numel() not in (block, blocks * block):
            x0 = None
        if x0 is None and own:
            x0 = linear.x0
        if blocks > 1 and x0 is not None and x0.numel() == block:
            x0 = x0.reshape(self.rows, shape[1]).repeat(blocks, 1)
        if blocks > 1 and preconditioner is not None:
            one_block = preconditioner

            def preconditioner(r: torch.Tensor) -> torch.Tensor:
                return torch.cat([one_block(part) for part in r.chunk(blocks)])

        return x0, preconditioner


def _reported(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A per-problem field in the shape of the reports (reshaped only where it differs)."""
    return tensor if tensor.shape == shape else tensor.reshape(shape)


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
        self._unfolded: RootProblem | None = None

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
            problem.info, problem = info, problem._unfolded
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
        problem can be recorded as itself (not the slices of ``vmap``)."""
        if recorded and isinstance(self.problem, Problem):
            return Recorded(self.problem, z, inputs, moving)
        return Functional(self.residual, z, inputs, moving)

    def record_backward(self, info: BackwardInfo) -> None:
        if self.info is not None:
            self.info.backward = info

    def fold(
        self, size: int, in_dims: Sequence[int | None], inputs: Sequence[torch.Tensor]
    ) -> tuple[RootProblem, Sequence[torch.Tensor]]:
        """This problem for ``size`` vmapped slices at once, as more rows."""
        folded = RootProblem(
            Folded(self.problem, size, in_dims),
            self.solver,
            self.settings,
            None,
            (size, *self.report_shape),
        )
        folded._unfolded = self
        return folded, inputs


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
        jacobian: the products of ``A`` already at hand at exactly the ``(z, θ)`` this
            system is solved at (a recorded graph, see :func:`solve`), or ``None``:
            they are linearised where the system is solved.
        hint: what the forward solver knew of ``A``, for the linear solver to use.
    """

    #: Linear solves of higher orders are not warm-started.
    backward_x0 = None

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
        rhs, z, *theta = inputs
        jacobian = self.jacobian or self._jacobian(z, theta)
        operator = JacobianOperator(
            jacobian,
            transposed=self.transpose,
            symmetric=self.symmetric,
            positive_definite=self.positive_definite,
        )
        what = "backward linear solve" if self.transpose else "forward-mode linear solve"
        guess = self.parent.backward_x0 if self.transpose else None
        x, info = self.settings.linear_solve(
            operator, rhs, what, self.report_shape, hint=self.hint, x0=guess
        )
        if self.transpose:
            self.parent.record_backward(info)
        return x

    def linearize(
        self,
        z: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        moving: Sequence[int],
        recorded: bool,
    ) -> Linearization:
        """The system's own linearisation (for second order): by ``torch.func``."""
        return Functional(self.residual, z, inputs, moving)

    def record_backward(self, info: BackwardInfo) -> None:
        """Linear solves of higher orders are not reported."""

    def fold(
        self, size: int, in_dims: Sequence[int | None], inputs: Sequence[torch.Tensor]
    ) -> tuple[LinearProblem, Sequence[torch.Tensor]] | None:
        """This system for ``size`` vmapped slices at once, or ``None`` when no single
        system covers them.

        Where only the right-hand sides differ between slices (``jacrev``, ``jacfwd``:
        one matrix, many vectors), the slices are more copies of the same system and
        ``g`` is not evaluated under ``vmap`` at all. Where the matrices differ, the
        slices are rows of the system of the folded parent.
        """
        rhs, z, *theta = inputs
        rhs_dim, z_dim, *theta_dims = in_dims
        stacked = rows(rhs, rhs_dim, size)
        if z_dim is None and all(dim is None for dim in theta_dims):
            repeated = LinearProblem(self.parent, self.transpose, size * self.copies)
            return repeated, (stacked, z, *theta)
        if self.copies > 1:
            return None
        folded = LinearProblem(Folded(self.parent, size, theta_dims), self.transpose)
        return folded, (stacked, rows(z, z_dim, size), *theta)


@dataclasses.dataclass(frozen=True)
class Given(Solver):
    """The forward of a solve whose answer is known: its start, without an evaluation.

    Args:
        info: the report of the solve that found it (already reported), or ``None``
            for a report of convergence.
    """

    name = "given"

    info: SolveInfo | None = None

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        if self.info is not None:
            return z0, self.info
        converged = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
        residual = torch.zeros(z0.shape[0], dtype=z0.dtype, device=z0.device)
        info = SolveInfo(converged, residual, 0, 0, [], "converged", self.name)
        return z0, info
