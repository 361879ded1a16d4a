"""Saddles and maxima: what the minimisation solvers do after the second-order test.

A row that passes the gradient test may sit at a saddle or a maximum; the second-order
test (``_curvature.py``) finds its most negative curvature and the direction of it.
The loops of [`Minimizer`][implicit.solvers.Minimizer] and of the scipy wrappers share
what follows: the escape along that direction (:func:`escape`), the rows whose Hessian
was not finite where the test looked (:func:`unknown_curvature`), what the test hands
the backward (:func:`verified_minimum`) and the messages of the rows that end short of
a minimum.
"""

from __future__ import annotations

import torch

from implicit._results import CONVERGED
from implicit.linear.base import PositiveDefinite
from implicit.solvers._objective import Objective
from implicit.solvers._search import C1

#: Halvings an escape from a saddle tries before it gives up.
ESCAPE_TRIALS = 40


def escape(fn: Objective, z, f, grad, rows: torch.Tensor, leave, budget: int, report=None):
    """Leave the saddles of ``rows`` along their negative-curvature directions.

    Steps ``t = 1 + ‖z‖∞, t/2, …`` (downhill along the eigenvector, whose sign is
    free) until ``fun(P(z + t v)) ≤ fun(z) + c₁ (∇funᵀs + ½ λ ‖s‖²)`` with the step
    ``s`` actually taken and ``λ < 0`` the curvature: a decrease the saddle owes.
    ``report(trials, z, grad, escaped)`` (if given) is called after each trial.
    """
    direction, curvature = leave
    sign = torch.where((grad * direction).sum(dim=1) > 0, -1.0, 1.0).to(z.dtype)
    direction = sign.unsqueeze(1) * direction
    t = 1 + z.abs().amax(dim=1)
    done = ~rows
    escaped = torch.zeros_like(rows)
    used = 0
    for _ in range(min(budget, ESCAPE_TRIALS)):
        trial = torch.where(done.unsqueeze(1), z, fn.project(z + t.unsqueeze(1) * direction))
        f_trial, g_trial = fn.value_and_grad(trial)
        used += 1
        step = trial - z
        owed = (grad * step).sum(dim=1) + 0.5 * curvature * step.pow(2).sum(dim=1)
        ok = ~done & torch.isfinite(f_trial) & (f_trial <= f + C1 * owed) & (owed < 0)
        z = torch.where(ok.unsqueeze(1), trial, z)
        f = torch.where(ok, f_trial, f)
        grad = torch.where(ok.unsqueeze(1), g_trial, grad)
        escaped, done = escaped | ok, done | ok
        t = t / 2
        if report is not None:
            report(used, z, grad, escaped)
        if bool(done.all()):
            break
    return z, f, grad, escaped, used


def unknown_curvature(leave) -> torch.Tensor | bool:
    """The rows whose Hessian was not finite where the second-order test looked (no
    minimum can be claimed there), from :meth:`Minimizer._saddles`' ``leave``."""
    return False if leave is None else torch.isnan(leave[1])


def verified_minimum(codes: torch.Tensor, strict: torch.Tensor) -> PositiveDefinite | None:
    """What the second-order test established for the backward: the Hessian is
    positive definite at every solution, where every problem converged to a strict
    minimum."""
    return PositiveDefinite() if bool(((codes == CONVERGED) & strict).all()) else None


FAR_FROM_MINIMUM = (
    "The gradient test passed where a Newton step would still move z by more than a "
    "tenth of its size: the objective flattens out there (towards a minimum far away, or "
    "none at all, as a fit whose parameters can run off to infinity). Start nearer, or "
    "keep z in a box with bounds=."
)
UNKNOWN_CURVATURE = (
    "The gradient test passed where the Hessian is not finite (PyTorch's second derivative "
    "of the objective is NaN or infinite there): neither a minimum nor the implicit "
    "backward, which solves with the Hessian, can be trusted; write the objective so that "
    "its second derivative is finite there (e.g. logaddexp(z, -z) has a NaN one for |z| "
    "above a few hundred)."
)
