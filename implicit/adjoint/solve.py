"""The entry of the differentiable solve: every front door calls :func:`solve`."""

from __future__ import annotations

import torch

from implicit import _progress, _tolerance, _torch
from implicit._problem import Problem
from implicit._results import SolveInfo
from implicit.adjoint.function import implicit_solve, not_a_view_of
from implicit.adjoint.problems import Given, RootProblem, Settings
from implicit.adjoint.unroll import unrolled
from implicit.linear import Auto, LinearSolver, Unroll
from implicit.solvers.base import Solver


def solve(
    problem: Problem,
    solver: Solver,
    backward: LinearSolver | Unroll,
    *,
    tol: _tolerance.Tol,
    max_iter: int,
    on_failure: str,
    backward_x0: torch.Tensor | None = None,
    callback: _progress.Callback | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``problem`` from its packed initial state; differentiable in its inputs.

    ``tol`` is a number or a ``(B,)`` tensor (:func:`implicit._tolerance.per_problem`);
    ``callback`` is the user's, called after each iteration of the forward solve.
    Returns the packed solution ``(B, n)`` and the forward :class:`SolveInfo`.
    ``backward_x0``: an initial guess for the backward's adjoint solve (a layer's warm
    start: an earlier ``BackwardInfo.solution``).

    The solve runs inside :class:`~implicit.adjoint.function.ImplicitFunction` only
    where a derivative may be asked for: grad mode on, a dual level open, or a
    ``torch.func`` transform active, and an input that carries a derivative.
    """
    z0 = problem.pack(problem.initial).detach()  # z0 gets no gradient, in every mode
    report_shape = (problem.batch_size,) if problem.batched else ()
    if isinstance(backward, Unroll):
        return unrolled(problem, solver, z0, tol, max_iter, on_failure, report_shape, callback)
    if isinstance(backward, Auto) and problem.n <= backward.max_dense:
        backward = backward.dense  # Auto's choice at this size, made once per call
    settings = Settings(
        tol, max_iter, on_failure, backward, problem.batch_size, backward_x0, callback
    )
    transforming = _torch.transforms_active(z0, *problem.explicit)
    derivatives_possible = torch.is_grad_enabled() or transforming or _torch.dual_level_open()
    r0 = None
    if derivatives_possible or not _torch.KNOWS_TRANSFORMS:
        r0 = problem.discover(z0)
        # Known from the tensors alone, a transform may wrap only what g captures; then
        # it wraps g's value at z0.
        if not _torch.KNOWS_TRANSFORMS and _torch.transforms_active(r0):
            derivatives_possible = transforming = True
    root = RootProblem(problem, solver, settings, None if transforming else r0, report_shape)
    # Under a torch.func transform the solve always runs inside the Function: its vmap
    # rule also serves a vmapped z0 when nothing else carries a derivative.
    differentiable = transforming or (derivatives_possible and problem.carries_derivatives())
    if differentiable:
        z = implicit_solve(root, z0, *problem.inputs)
    else:
        with torch.no_grad():
            z = not_a_view_of(z0, root.solve(z0, problem.inputs))
    if r0 is not None:
        root.info.f_evals += 1  # capture discovery's evaluation of g at z0
    # Another point may read other tensors only on another branch: where g read no value.
    if derivatives_possible and root.info.iterations > 0 and problem.reads_values:
        z = _recaptured(root, z)
    return z, root.info


def _recaptured(root: RootProblem, z: torch.Tensor) -> torch.Tensor:
    """``z``, wired also to the tensors that ``g`` reads at the solution but did not
    read at ``z0`` (a branch taken only near the solution), which would otherwise get
    no derivative. Only for a ``g`` that handed a tensor's values to Python at ``z0``
    (``Problem.reads_values``): without a branch on values every point reads the same
    tensors.

    Costs one evaluation of ``g`` at ``z``, counted in ``f_evals``. The solution does
    not change (``g`` read those tensors while it was solved): the solved problem is
    wired again, with every captured tensor as an input, by a solve that takes no step
    and keeps the forward's report (:class:`~implicit.adjoint.problems.Given`).
    """
    problem = root.problem
    added = problem.rediscover(z)
    root.info.f_evals += 1
    if not added:
        return z
    again = RootProblem(problem, Given(root.info), root.settings, None, root.report_shape)
    z = implicit_solve(again, z.detach(), *problem.inputs)
    # The same problem at the same solution: what its solve learned of ∂g/∂z holds.
    again.hint, again.positive_definite = root.hint, root.positive_definite
    return z
