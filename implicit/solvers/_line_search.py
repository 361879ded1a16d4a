"""Backtracking (Armijo) line search on ``½‖g‖²``, per sample: for Newton and Broyden.

The driver (:meth:`Solver.solve`) steps every row and keeps the old iterate of rows
that have finished. A line search must not wait for those rows, so the solvers
recognise them: a row whose iterate is not the one the solver proposed has been
frozen by the driver, and stays frozen (:func:`frozen_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from implicit._batch import known_all

#: Sufficient decrease: accept ``t`` when ``½‖g(z + t d)‖² ≤ ½‖g(z)‖² + ARMIJO · t · slope``.
ARMIJO = 1e-4


def squared_norm(r: torch.Tensor) -> torch.Tensor:
    """``‖g‖²`` per sample: twice the merit ``½‖g‖²``, whose test is written doubled."""
    return torch.linalg.vecdot(r, r)


def frozen_rows(
    z: torch.Tensor, proposed: torch.Tensor | None, frozen: torch.Tensor
) -> torch.Tensor:
    """``(B,)`` rows the driver has stopped: ``frozen`` plus rows where ``z`` is not the
    iterate ``proposed`` by the previous step (finished rows keep their old iterate)."""
    if proposed is None:
        return frozen
    return frozen | (z != proposed).any(dim=1)


def backtrack(
    fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    r: torch.Tensor,
    direction: torch.Tensor,
    slope: torch.Tensor | None,
    *,
    halvings: int,
    skip: torch.Tensor,
    full_step: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Step sizes ``t = 1, ½, ¼, …`` until each sample decreases ``½‖g‖²`` enough.

    Every trial evaluates ``g`` once on the whole batch; a sample keeps the first step
    that passes the Armijo test. A sample for which no step passes stays at ``z``:
    its direction is not a descent direction, or it is converged to rounding (then the
    search stops as soon as the step is too short to change ``z``). A sample whose
    shortest trial is still not finite gets that trial, so that the driver stops it.

    Args:
        fn: the residual.
        z: the current iterates ``(B, n)``, with residuals ``r``.
        direction: the search directions ``d``, ``(B, n)``.
        slope: ``(B,)`` the (predicted) derivative of ``½‖g(z + t d)‖²`` at ``t = 0``;
            None for a Newton direction (``(∂g/∂z) d = −g``, predicted by Broyden's
            inverse too), whose slope is ``−‖g‖²``.
        halvings: how many times ``t`` may be halved after the full step.
        skip: ``(B,)`` rows to leave at ``z`` without a test (frozen rows).
        full_step: evaluates the full step instead of ``fn`` (Newton keeps the
            linearisation it makes there).

    Returns:
        The new iterates, their residuals, ``(B,)`` whether each sample's step passed
        the test (True for skipped rows), and the number of trials.
    """
    base = squared_norm(r)
    # The Armijo threshold is base + 2·ARMIJO·t·slope, for a Newton step base·(1 − 2·ARMIJO·t).
    newton = slope is None
    passed = skip
    z_new, r_new = z, r
    t = 1.0
    for trials in range(1, halvings + 2):
        z_trial = z + t * direction
        first = trials == 1 and full_step is not None
        r_trial = full_step(z_trial) if first else fn(z_trial)
        # NaN compares False: a non-finite trial never passes.
        threshold = base * (1 - 2 * ARMIJO * t) if newton else base + 2 * ARMIJO * t * slope
        take = ~passed & (squared_norm(r_trial) <= threshold)
        if trials == 1:
            if known_all(take):
                # Every row takes the full step (none skipped): the common case near a root.
                return z_trial, r_trial, take, 1
            # Below this length a step no longer changes z in floating point: stop
            # halving it.
            rounding = torch.finfo(z.dtype).eps * torch.linalg.vector_norm(z, dim=1)
            length = torch.linalg.vector_norm(direction, dim=1)
            given_up = torch.zeros_like(skip)
        z_new = torch.where(take.unsqueeze(1), z_trial, z_new)
        r_new = torch.where(take.unsqueeze(1), r_trial, r_new)
        passed = passed | take
        t /= 2
        given_up = given_up | (t * length <= rounding)
        if bool((passed | given_up).all()):
            break
    # A sample whose shortest trial is still not finite is handed over as such: the
    # driver then stops it with status "nonfinite" instead of letting it idle to max_iter.
    blew_up = ~passed & ~(squared_norm(r_trial) < math.inf)
    z_new = torch.where(blew_up.unsqueeze(1), z_trial, z_new)
    r_new = torch.where(blew_up.unsqueeze(1), r_trial, r_new)
    return z_new, r_new, passed, trials
