"""Backtracking (Armijo) line search on ``½‖g‖²``, per sample: for Newton and Broyden.

Two forms: :func:`backtrack` tries step after step within one solver iteration until
every sample has passed (Broyden, whose update needs the step taken); a
:class:`Search` takes one trial per solver iteration and lets the samples that passed
go on while the others halve their step (Newton: a batch then evaluates ``g`` as often
as its slowest sample needs, not once per trial of any sample at every step).

The driver (:meth:`Solver.solve`) steps every row and keeps the old iterate of rows
that have finished. A line search must not wait for those rows, so the solvers
recognise them: a row whose iterate is not the one the solver proposed has been
frozen by the driver, and stays frozen (:func:`frozen_rows`).
"""

from __future__ import annotations

import dataclasses
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
    *,
    halvings: int,
    skip: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step sizes ``t = 1, ½, ¼, …`` along quasi-Newton directions (predicted slope
    ``−‖g‖²``) until each sample decreases ``½‖g‖²`` enough.

    Every trial evaluates ``g`` once on the whole batch; a sample keeps the first step
    that passes the Armijo test. A sample for which no step passes stays at ``z``:
    its direction is not a descent direction, or it is converged to rounding (then the
    search stops as soon as the step is too short to change ``z``). A sample whose
    shortest trial is still not finite gets that trial, so that the driver stops it.

    Args:
        fn: the residual.
        z: the current iterates ``(B, n)``, with residuals ``r``.
        direction: the search directions ``d``, ``(B, n)``.
        halvings: how many times ``t`` may be halved after the full step.
        skip: ``(B,)`` rows to leave at ``z`` without a test (frozen rows).

    Returns:
        The new iterates, their residuals and ``(B,)`` whether each sample's step
        passed the test (True for skipped rows).
    """
    base = squared_norm(r)
    passed = skip
    z_new, r_new = z, r
    t = 1.0
    for trial in range(halvings + 1):
        z_trial = z + t * direction
        r_trial = fn(z_trial)
        # NaN compares False: a non-finite trial never passes.
        take = ~passed & (squared_norm(r_trial) <= _threshold(base, t, None))
        if trial == 0:
            if known_all(take):
                # Every row takes the full step (none skipped): the common case near a root.
                return z_trial, r_trial, take
            given_up = torch.zeros_like(skip)
            rounding, length = _scales(z, direction)
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
    return z_new, r_new, passed


def _threshold(
    base: torch.Tensor, t: float | torch.Tensor, slope: torch.Tensor | None
) -> torch.Tensor:
    """The Armijo bound on ``‖g(z + t d)‖²``: ``base + 2·ARMIJO·t·slope`` (the test on
    ``½‖g‖²``, doubled), ``base·(1 − 2·ARMIJO·t)`` for the slope ``−‖g‖²`` (None)."""
    if slope is None:
        return base * (1 - 2 * ARMIJO * t)
    return base + 2 * ARMIJO * t * slope


def _scales(z: torch.Tensor, direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` the rounding of ``z`` (``eps·‖z‖``) and the length of ``d``: a step ``t d``
    with ``t·‖d‖ ≤ eps·‖z‖`` no longer changes ``z`` in floating point."""
    rounding = torch.finfo(z.dtype).eps * torch.linalg.vector_norm(z, dim=1)
    return rounding, torch.linalg.vector_norm(direction, dim=1)


@dataclasses.dataclass
class Search:
    """Each sample's backtracking search along its direction, one trial per iteration.

    Attributes:
        direction: ``(B, n)`` the search directions ``d``.
        slope: ``(B,)`` the predicted derivative of ``½‖g(z + t d)‖²`` at ``t = 0``;
            None for Newton directions (``−‖g‖²``).
        base: ``(B,)`` ``‖g(z)‖²`` at each sample's iterate.
        t: ``(B,)`` the step fraction of each sample's next trial; None for the full
            step everywhere.
    """

    direction: torch.Tensor
    slope: torch.Tensor | None
    base: torch.Tensor
    t: torch.Tensor | None = None

    def trial(self, z: torch.Tensor) -> torch.Tensor:
        """The next trial point ``z + t d`` of every sample."""
        return z + self.direction if self.t is None else z + self.t.unsqueeze(1) * self.direction

    def merged(self, keep: torch.Tensor, fresh: Search) -> Search:
        """This search (as :meth:`judge` left it) for the samples in ``keep`` (``(B,)``),
        a ``fresh`` one (from the full step) for the others."""
        slope = fresh.slope
        if slope is not None or self.slope is not None:
            mine = -self.base if self.slope is None else self.slope
            slope = torch.where(keep, mine, -fresh.base if slope is None else slope)
        return Search(
            direction=torch.where(keep.unsqueeze(1), self.direction, fresh.direction),
            slope=slope,
            base=torch.where(keep, self.base, fresh.base),
            t=torch.where(keep, self.t, 1),
        )

    def judge(
        self,
        z: torch.Tensor,
        r: torch.Tensor,
        z_trial: torch.Tensor,
        r_trial: torch.Tensor,
        *,
        skip: torch.Tensor,
        halvings: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Search | None, bool]:
        """The Armijo test of the trial ``z_trial`` (residuals ``r_trial``) per sample.

        A sample that passes moves there. One that fails stays at ``z`` and will try
        half the step; when the step no longer changes ``z`` in floating point, or
        after ``halvings`` halvings, it gives up and starts the same search again at
        the next step (the same direction from the same point, as a new step would),
        unless its trial was not finite: that trial is handed over, so that the driver
        stops the sample. Samples in ``skip`` (frozen by the driver) stay without a test.

        Returns:
            The new iterates and residuals, ``(B,)`` the samples whose search goes on
            (None if none), this search for them (None if none), and whether to try
            again at once: when no sample moved, none can go on before the next
            trial, so waiting for the next step would gain nothing.
        """
        squares = squared_norm(r_trial)
        t = 1.0 if self.t is None else self.t
        # NaN compares False: a non-finite trial never passes.
        take = ~skip & (squares <= _threshold(self.base, t, self.slope))
        if known_all(take):
            # Every sample passes (none skipped): the common case near a root.
            return z_trial, r_trial, None, None, False
        failed = ~(skip | take)
        halved = torch.full_like(self.base, 0.5) if self.t is None else self.t / 2
        rounding, length = _scales(z, self.direction)
        gave_up = failed & ((halved * length <= rounding) | (halved < 2.0**-halvings))
        blew_up = gave_up & ~(squares < math.inf)
        moved = (take | blew_up).unsqueeze(1)
        z_new, r_new = torch.where(moved, z_trial, z), torch.where(moved, r_trial, r)
        pending = failed & ~blew_up
        search = dataclasses.replace(self, t=torch.where(gave_up, 1, halved))
        retry = not bool(moved.any()) and bool((failed & ~gave_up).any())
        return z_new, r_new, pending, search, retry
