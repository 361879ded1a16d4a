"""The one ``torch.autograd.Function`` behind every solve, in every AD mode.

``forward`` solves its problem (:mod:`implicit.adjoint.problems`) where no graph is
recorded. Reverse and forward mode each take one path, built from ``g`` linearised at
the solution (:mod:`implicit.adjoint.linearize`):

* ``backward``: solve ``(∂g/∂z)ᵀ w = v`` (the adjoint system, a
  :class:`~implicit.adjoint.problems.LinearProblem` solved by this same Function, so that
  differentiating the backward applies the implicit function theorem again) and pull
  ``−w`` back to the inputs;
* ``jvp``: push the tangents ``dθ`` through ``∂g/∂θ`` and solve ``(∂g/∂z) dz = −b``;
* ``vmap``: the vmapped slices become more rows of one problem, or more right-hand
  sides of one system (:meth:`RootProblem.fold`, :meth:`LinearProblem.fold`), solved in
  one call.

Where nothing differentiates the backward (first order) and no ``torch.func`` transform
wraps its tensors, the linearisation is one recorded autograd graph, shared by the
adjoint solve and the pullback, and the adjoint solve needs no autograd node: the same
path with a cheaper linearisation. :class:`Settings` are what every solve of a problem
shares: tolerances, failure policy and the linear solver, whose solves it runs and
reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from implicit import _progress, _tolerance, _torch
from implicit._batch import attainable, is_half, upcast
from implicit._results import (
    CONVERGED,
    FAILED,
    STATUS_CODES,
    BackwardInfo,
    SolveInfo,
    report_failure,
    status_name,
)
from implicit.adjoint.vmap import rows
from implicit.linear import IterativeSolver, JacobianOperator, LinearSolver
from implicit.linear.base import Hint, WorkingOperator


class ImplicitFunction(torch.autograd.Function):
    """``z* = problem.solve(z0, inputs)`` with implicit derivatives in the inputs."""

    @staticmethod
    def forward(problem, z0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(problem, Solved):
            return problem.z
        # autograd.Function turns forward-mode AD off here; a user function that opens
        # its own dual level must see it on, as it does outside the solve.
        with _torch.forward_grad_as_outside():
            z = problem.solve(z0, inputs)
        return not_a_view_of(z0, z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, _z0, *tensors = inputs
        ctx.problem = problem.problem if isinstance(problem, Solved) else problem
        ctx.save_for_backward(output, *tensors)
        ctx.save_for_forward(output, *tensors)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, v):
        z, *inputs = ctx.saved_tensors
        needed = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        if v is None or not needed:
            return (None, None, *grads)
        problem = ctx.problem
        # Nothing differentiates a first-order backward (grad mode is off in here) and,
        # outside transforms, nothing wraps its tensors: then g's linearisation can be
        # one recorded graph, and the adjoint solve needs no node of its own.
        recorded = not torch.is_grad_enabled() and not _torch.transforms_active(v, z, *inputs)
        linearization = problem.linearize(z, inputs, needed, recorded)
        adjoint = problem.system(True, linearization.jacobian if recorded else None)
        if recorded:
            w = ImplicitFunction.forward(adjoint, torch.zeros_like(v), v, z, *inputs)
        else:
            w = implicit_solve(adjoint, torch.zeros_like(v), v, z, *inputs)
        for i, grad in zip(needed, linearization.pullback(-w)):
            grads[i] = grad
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx, _problem_tangent, _z0_tangent, *tangents):
        z, *inputs = ctx.saved_tensors
        if _torch.nested_forward_mode(z):
            raise RuntimeError(
                "forward-mode AD over forward-mode AD through an implicit solve (torch.func.jvp "
                "over jvp, jacfwd over jacfwd, hessian of a hessian) is not supported: torch "
                "cannot apply forward mode to a custom jvp rule and would silently drop the "
                "second-order term. Put reverse mode on one side instead: "
                "torch.func.hessian (jacfwd over jacrev), jacrev over jacfwd, or jacrev over "
                "jacrev."
            )
        moving = [i for i, tangent in enumerate(tangents) if tangent is not None]
        if not moving:
            return torch.zeros_like(z)
        problem = ctx.problem
        # dz = −(∂g/∂z)⁻¹ (∂g/∂θ) dθ: the tangent system, solved as a linear problem.
        linearization = problem.linearize(z, inputs, moving, False)
        pushed = linearization.push([tangents[i] for i in moving])
        tangent = problem.system(False)
        return implicit_solve(tangent, torch.zeros_like(pushed), -pushed, z, *inputs)

    @staticmethod
    def vmap(info, in_dims, problem, z0, *inputs):
        # The vmapped slices become more rows of one problem: one solve for all of them.
        size = info.batch_size
        z0_dim, *input_dims = in_dims[1:]
        z0 = z0 if z0_dim is None else z0.movedim(z0_dim, 0)
        inputs = [t if d is None else t.movedim(d, 0) for t, d in zip(inputs, input_dims)]
        dims = [None if d is None else 0 for d in input_dims]
        folded = problem.fold(size, dims, inputs)
        if folded is None:
            # No one problem covers the slices: one solve per slice.
            slices = [
                implicit_solve(
                    problem,
                    *(t if d is None else t[index] for t, d in zip((z0, *inputs), (z0_dim, *dims))),
                    vmapped=True,
                )
                for index in range(size)
            ]
            return torch.stack(slices), 0
        folded_problem, folded_inputs = folded
        z = implicit_solve(folded_problem, rows(z0, z0_dim, size), *folded_inputs, vmapped=True)
        return z.reshape(size, -1, z.shape[-1]), 0


class Solved:
    """A problem already solved before ``ImplicitFunction.apply`` (see
    :func:`implicit_solve`)."""

    def __init__(self, problem, z: torch.Tensor):
        self.problem = problem
        self.z = z


def implicit_solve(
    problem, z0: torch.Tensor, *inputs: torch.Tensor, vmapped: bool = False
) -> torch.Tensor:
    """``ImplicitFunction.apply(problem, z0, *inputs)``: ``problem``'s solution,
    differentiable in ``inputs``.

    ``vmapped``: called by the ``vmap`` rule for its slices (a continuation of the
    solve the rule serves, see :func:`implicit._torch.apply`). Where torch cannot
    switch forward-mode AD back on inside the Function's forward, the problem is solved
    first, here, outside ``torch.func`` transforms and dual levels (the same solve, with
    no graph recorded, as in the forward).
    """
    if not (
        _torch.FORWARD_GRAD_IN_FUNCTIONS
        or _torch.transforms_active(z0, *inputs)
        or _torch.dual_level_open()
    ):
        with torch.no_grad():
            problem = Solved(problem, not_a_view_of(z0, problem.solve(z0, inputs)))
    return _torch.apply(ImplicitFunction, problem, z0, *inputs, inherit=vmapped)


def not_a_view_of(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A solve that took no step returns its start: never hand the caller a view of z0."""
    return z.clone() if z is z0 else z


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
            converged=reported(result.codes == CONVERGED, report_shape),
            residual=reported(result.residual.detach(), report_shape),
            iterations=result.iterations,
            matvecs=operator.products,
            status=status_name(result.codes),
            method=result.method or linear.name,
            solution=result.x.detach(),
            condition=None
            if result.condition is None
            else reported(result.condition, report_shape),
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


def reported(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
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
