"""``backward="unroll"``: autograd records every iteration of the forward solver.

The reference mode, and the one that builds a graph through the forward iterations
(memory grows with them). A problem that meets its tolerance at ``z0`` takes no
iteration, and the unrolled derivative of no iteration is zero, not the derivative of
the solution: those problems get the implicit one (:func:`implicit_at_start`).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence

import torch

from implicit import _progress, _tolerance, _torch
from implicit._batch import residual_norms, thresholds
from implicit._problem import Problem, carries_derivative
from implicit._results import SolveInfo, report_failure
from implicit.adjoint.function import implicit_solve
from implicit.adjoint.problems import RootProblem, shape_report
from implicit.adjoint.settings import Given, Settings
from implicit.linear import resolve as resolve_linear
from implicit.solvers.base import Residual, Solver

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_VMAP_REFUSALS = ("data-dependent control flow", "calling .item() on a Tensor")


def unrolled(
    problem: Problem,
    solver: Solver,
    z0: torch.Tensor,
    tol: _tolerance.Tol,
    max_iter: int,
    on_failure: str,
    report_shape: tuple[int, ...],
    callback: _progress.Callback | None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``problem`` from ``z0`` with autograd recording the solver's iterations (a
    callback receives the iterates detached)."""
    fn = problem.solver_view(problem.inputs)
    try:
        r0 = fn(z0)
        watch = _progress.watch(callback, problem, report_shape)
        z, info = solver.solve(fn, z0, r0, tol=tol, max_iter=max_iter, callback=watch)
    except RuntimeError as error:
        innermost = traceback.extract_tb(error.__traceback__)[-1].filename
        # (vmap's words for a branch on a value, and for a value read on the host.)
        refused = any(words in str(error) for words in _VMAP_REFUSALS)
        if not refused or not innermost.startswith(_PACKAGE):
            raise  # not the solver's own loop (e.g. the user's function branched on a value)
        raise RuntimeError(
            "backward='unroll' cannot run under torch.func.vmap with batched inputs: the "
            "solver's stopping test is data-dependent control flow, which vmap refuses. "
            "Use an implicit backward ('auto', 'dense', 'gmres', ...), which supports vmap."
        ) from error
    info.hint = None  # no linear solve to hand it to
    shape_report(info, report_shape)
    report_failure(info, on_failure, "forward solve")
    at_start = residual_norms(z0, r0) <= thresholds(tol, fn.scale(z0, r0))
    derivatives_possible = (
        torch.is_grad_enabled()
        or _torch.transforms_active(z, *problem.inputs)
        or _torch.dual_level_open()
    )
    if derivatives_possible and bool(at_start.any()):
        z = implicit_at_start(problem, z, at_start, tol, max_iter, on_failure)
        info.f_evals += 1  # capture discovery
    return (z.clone() if z is z0 else z), info  # never a view of z0


def implicit_at_start(problem, z, rows, tol, max_iter, on_failure):
    """``z`` with the implicit derivative (``backward="auto"``) in the ``rows`` that
    took no iteration; the same values.

    Those rows are solved again by the implicit function, which takes no step
    (:class:`~implicit.adjoint.problems.Given`); the other rows are pinned by the
    residual ``z − z*``, which has no inputs, so that their (unrolled) derivatives come
    from ``z`` alone.
    """
    anchor = z.detach()
    problem.discover(anchor)  # the captured tensors, as inputs of the function
    moving = any(carries_derivative(t) for t in problem.inputs)
    if not (_torch.transforms_active(z, *problem.inputs) or moving):
        return z
    settings = Settings(tol, max_iter, on_failure, resolve_linear("auto"), problem.batch_size)
    root = RootProblem(Pinned(problem), Given(), settings, None, (problem.batch_size,))
    rows = rows.unsqueeze(1)
    return torch.where(rows, implicit_solve(root, anchor, rows, anchor, *problem.inputs), z)


class Pinned:
    """``problem``'s residual in some rows, ``z − anchor`` in the others: the residual
    of inputs ``(rows, anchor, *problem's inputs)``, ``rows`` of shape ``(B, 1)``
    (inputs rather than attributes, so that ``torch.func`` transforms see them)."""

    #: Its Jacobian mixes rows of the problem's with rows of the identity.
    symmetric = False

    def __init__(self, problem: Problem):
        self.problem = problem

    def residual(self, z: torch.Tensor, rows, anchor, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.where(rows, self.problem.residual(z, *inputs), z - anchor)

    def scale(self, z0: torch.Tensor, r0: torch.Tensor, rows, anchor, *inputs) -> torch.Tensor:
        return self.problem.scale(z0, r0, *inputs)

    def solver_view(self, inputs: Sequence[torch.Tensor], source=None) -> Residual:
        source = self if source is None else source
        return Residual(source.residual, source.scale, inputs)
