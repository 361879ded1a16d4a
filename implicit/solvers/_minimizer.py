"""The base of the minimisation solvers, and the loop that drives them.

A [`Minimizer`][implicit.solvers.Minimizer] minimises the objective of
[`implicit.minimize`][implicit.minimize] or [`implicit.least_squares`][implicit.least_squares]
on a flat batch ``(B, n)``: each row its own problem, with its own line search or
damping, its own history and its own stop. A method implements ``init`` and ``step``;
[`Minimizer.solve`][implicit.solvers.Minimizer.solve] owns the rest:

* the stopping test ``‖g(z)_b‖₂ ≤ tol · (1 + min(|fun(z0)_b|, |fun(z)_b|))``, with
  ``g`` the gradient (the projected gradient ``z − clip(z − ∇fun, l, u)`` under
  bounds), recomputed at every iterate (the smaller scale, so that a start where the
  objective is huge does not loosen the test at every point after it);
* the second-order test where the first-order one passes: a row whose Hessian has a
  clearly negative eigenvalue there (a saddle or a maximum) is not converged; it
  leaves along that eigenvector with a backtracking search for a decrease of the
  objective and the method starts afresh from there. When the iterations run out
  first, or no step along it decreases the objective, the row ends with status
  ``"failed"``;
* every iteration evaluates the objective once (a line-search trial counts as one),
  and so do the trials of an escape: ``max_iter`` bounds them all;
* a row whose search cannot decrease the objective any more ends with status
  ``"failed"`` (usually ``tol`` below what the precision allows); a non-finite
  objective at the initial guess with ``"nonfinite"`` (so does a non-finite gradient
  at an iterate). A non-finite value at a trial point only shortens the step.

The escape from a saddle, the second-order test's verdicts and their messages are in
``_saddle.py`` (the scipy wrappers' loop shares them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from implicit._batch import check_interval, norms, thresholds
from implicit._batch import residual_norms as finite_norms
from implicit._results import (
    CONVERGED,
    FAILED,
    MAX_ITER,
    NONFINITE,
    SolveInfo,
    check_number,
    status_name,
)
from implicit.solvers._curvature import negative_curvature
from implicit.solvers._objective import Objective
from implicit.solvers._saddle import (
    FAR_FROM_MINIMUM,
    UNKNOWN_CURVATURE,
    escape,
    unknown_curvature,
    verified_minimum,
)
from implicit.solvers.base import Solver

#: A point that passed the gradient test is no minimum where the Newton step is longer
#: than this fraction of ``1 + ‖z‖`` (see ``Minimizer._saddles``).
FAR = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Minimizer(Solver):
    """A method that minimises an objective (for ``minimize`` and ``least_squares``).

    Args:
        curvature_check: test the second-order condition where the gradient test
            passes, and leave saddles and maxima (see the module); ``False`` accepts
            every stationary point.
        max_dense: up to this many unknowns per problem the test uses the dense
            Hessian; above, a few Lanczos steps.
        check_every: see [`Solver`][implicit.solvers.Solver]: how often the host
            tests for the end and the rows that have passed the gradient test (the
            second-order test runs there); between two tests a step does the work a
            row might need without asking whether one does.
    """

    #: Whether the method needs the residual vector of a least-squares problem.
    least_squares_only: ClassVar[bool] = False

    curvature_check: bool = True
    max_dense: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.max_dense, "max_dense", "an integer >= 0")
        object.__setattr__(self, "curvature_check", bool(self.curvature_check))

    def init(self, fn: Objective, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The objective ``(B,)``, its gradient ``(B, n)`` and the method's state at ``z``."""
        f, grad = fn.value_and_grad(z)
        return f, grad, None

    def step(self, fn: Objective, z, f, grad, state, running):
        """One iteration (one evaluation of the objective) of the ``running`` rows.

        Returns ``(z, f, grad, state, failed)``: the new iterates (unchanged where a row
        did not move), the state, and the ``(B,)`` rows that cannot make progress.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement step()")

    def restart(self, fn: Objective, state: Any, rows: torch.Tensor, z, f, grad) -> Any:
        """The state with ``rows`` started afresh at ``(z, f, grad)`` (after an escape)."""
        return state

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        """Minimise from ``z0`` (see the module for the stopping rules); the arguments
        are those of [`Solver.solve`][implicit.solvers.Solver.solve]. The callback is
        called after each evaluation of the objective, an escape's trials included."""
        check_objective(fn, self)
        z = fn.project(z0)
        f, grad, state = self.init(fn, z)
        if f.requires_grad:
            raise ValueError(
                f"backward='unroll' differentiates through a solver's iterations, but "
                f"{type(self).__name__}'s line search and curvature test are not "
                f"differentiable: use an implicit backward ('auto', 'dense', 'cg', ...)"
            )
        # The scale is the smaller of |fun| at the start and at the point tested: a start
        # where the objective is huge must not loosen the test everywhere after it.
        initial_scale = fn.scale_of_value(f)
        norms = residual_norms(fn, z, grad)
        codes = torch.full_like(f, MAX_ITER, dtype=torch.long)
        codes = torch.where(torch.isfinite(f) & torch.isfinite(norms), codes, NONFINITE)
        running = codes == MAX_ITER
        pending = torch.zeros_like(running)  # passed the gradient test, awaiting the Hessian's
        strict = torch.zeros_like(running)  # at a strict minimum when last tested
        stalled = torch.zeros_like(running)  # gave up: no step decreases the objective
        far_seen = torch.zeros_like(running)  # passed the gradient test far from a minimum
        far = torch.zeros_like(running)  # found far at the last check, not tested again yet
        iterations = torch.zeros_like(codes)
        history = [norms.max()]
        check_every = check_interval(self.check_every, z)
        notes: list[str] = []
        k = 0
        while True:
            threshold = thresholds(tol, torch.minimum(initial_scale, fn.scale_of_value(f)))
            passed = running & ~far & (norms <= threshold)
            running, pending = running & ~passed, pending | passed
            at_end = k >= max_iter
            checking = k % check_every == 0 or at_end
            if checking:  # one host read for both questions
                answers = int(2 * pending.any() + running.any())
                any_pending, any_running = answers >= 2, answers % 2 == 1
            if checking and any_pending:
                saddle, leave, positive, far = self._saddles(fn, z, grad, pending)
                # Far from a minimum, the row goes on (its gradient test is loose there).
                running, far_seen = running | far, far_seen | far
                codes = torch.where(pending & ~saddle & ~far, CONVERGED, codes)
                unknown = pending & unknown_curvature(leave)
                if bool(torch.as_tensor(unknown).any()):
                    codes = torch.where(unknown, NONFINITE, codes)
                    notes.append(UNKNOWN_CURVATURE)
                strict = torch.where(pending, positive, strict)
                if bool(saddle.any()):
                    report = _escape_report(callback, fn, k, norms)
                    trials = escape(fn, z, f, grad, saddle, leave, max_iter - k, report)
                    z, f, grad, escaped, used = trials
                    k += used
                    iterations = torch.where(saddle, k, iterations)
                    stuck = saddle & ~escaped
                    if bool(stuck.any()):
                        codes = torch.where(stuck, FAILED, codes)
                        notes.append(_SADDLE)
                    state = self.restart(fn, state, escaped, z, f, grad)
                    running = running | escaped
                    norms = torch.where(escaped, residual_norms(fn, z, grad), norms)
                    history.append(norms.max())
                pending = torch.zeros_like(pending)
                continue
            if checking and (at_end or not any_running):
                break
            z, f, grad, state, failed = self.step(fn, z, f, grad, state, running)
            far = torch.zeros_like(far)
            k += 1
            iterations = torch.where(running, k, iterations)
            norms = torch.where(running, residual_norms(fn, z, grad), norms)
            threshold = thresholds(tol, torch.minimum(initial_scale, fn.scale_of_value(f)))
            failed = running & failed & (norms > threshold)
            stalled = stalled | failed
            codes = torch.where(failed, FAILED, codes)
            running = running & ~failed
            # A finite objective with a non-finite gradient (the searches reject
            # non-finite values, so only a method's own derivatives can do this).
            broken = running & ~torch.isfinite(norms)
            codes = torch.where(broken, NONFINITE, codes)
            running = running & ~broken
            history.append(norms.max())
            if callback is not None:
                callback(k, norms, z)
        if bool(stalled.any()):
            notes.append(_STALLED)
        if bool((far_seen & (codes != CONVERGED)).any()):
            notes.append(FAR_FROM_MINIMUM)
        info = SolveInfo(
            converged=codes == CONVERGED,
            residual=norms.detach(),
            iterations=int(iterations.max()),
            f_evals=fn.f_evals,
            history=torch.stack(history).detach().tolist(),
            status=status_name(codes),
            solver=self.name,
            message=" ".join(dict.fromkeys(notes)),
            jac_evals=fn.jac_evals,
            iterations_per_problem=iterations,
            status_codes=codes,
            hint=verified_minimum(codes, strict),
        )
        return z, info

    def _saddles(self, fn: Objective, z, grad, rows: torch.Tensor):
        """The ``rows`` at a saddle or maximum, for each its negative-curvature direction
        and curvature, the ``rows`` at a strict minimum (positive curvature), and the
        ``rows`` far from any minimum: where the Newton step is longer than
        ``FAR · (1 + ‖z‖)`` although the gradient test passed (an objective that
        flattens out towards infinity: ``c + a/z`` has the step ``z/2``)."""
        if not self.curvature_check:
            none = torch.zeros_like(rows)
            return none, None, none, none
        negative, direction, curvature, positive, newton = negative_curvature(
            fn, z, grad, self.max_dense
        )
        far = rows & ~negative & (newton > FAR * (1 + norms(z)))
        return rows & negative, (direction, curvature), rows & positive, far


_SADDLE = (
    "A stationary point with negative curvature (a saddle or a maximum) could not be left "
    "within max_iter: raise max_iter or start elsewhere."
)
_STALLED = (
    "No step could decrease the objective further (the line search or the damping gave "
    "up): tol may be below what the precision of the objective allows (loosen tol, or use "
    "float64), or the objective is not smooth there."
)


def _escape_report(callback, fn: Objective, k: int, norms: torch.Tensor):
    """The callback of an escape from iteration ``k``: each trial is an iteration, with
    the stopping test's norms of the rows that have left their saddle."""
    if callback is None:
        return None

    def report(trials: int, z: torch.Tensor, grad: torch.Tensor, escaped: torch.Tensor) -> None:
        callback(k + trials, torch.where(escaped, residual_norms(fn, z, grad), norms), z)

    return report


def residual_norms(fn: Objective, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The stopping test's residual norm per row, from the gradient at ``z``; NaN where
    ``z`` is not finite (``tanh`` is flat, its gradient zero, at ``z = ∞``)."""
    return finite_norms(z, fn.optimality(z, grad))


def check_objective(fn: Any, solver: Minimizer) -> None:
    name = type(solver).__name__
    if not isinstance(fn, Objective):
        raise TypeError(
            f"{name} minimises an objective: use it with implicit.minimize or "
            f"implicit.least_squares (root_solve and fixed_point take root solvers)"
        )
    if solver.least_squares_only and not fn.least_squares:
        raise TypeError(
            f"{name} needs the residual vector of a least-squares problem: use it with "
            f"implicit.least_squares"
        )
