"""Backtracking (Armijo) line search on ``½‖g‖²``, per sample: for Newton and Broyden.

A :class:`Search` takes one trial per solver iteration: the samples that pass go on
with their next step while the others halve theirs at the next iteration. So every
trial counts against ``max_iter`` (a search that never passes cannot hold the loop),
and a batch evaluates ``g`` about as often as its slowest sample needs, not once per
trial of any sample at every step.

The driver (:meth:`Solver.solve`) steps every row and keeps the old iterate of rows
that have finished. A line search must not wait for those rows, so the solvers
recognise them: a row whose iterate is not the one the solver proposed has been
frozen by the driver, and stays frozen (:func:`frozen_rows`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from implicit._batch import known_all, norms, traced, upcast

#: Sufficient decrease: accept ``t`` when ``½‖g(z + t d)‖² ≤ ½‖g(z)‖² + ARMIJO · t · slope``.
ARMIJO = 1e-4


def squared_norm(r: torch.Tensor) -> torch.Tensor:
    """``‖g‖²`` per sample: twice the merit ``½‖g‖²``, whose test is written doubled (in
    float32 for half precision, where it would overflow from ``‖g‖ = 256`` on)."""
    r = upcast(r)
    return torch.linalg.vecdot(r, r)


def frozen_rows(
    z: torch.Tensor, proposed: torch.Tensor | None, frozen: torch.Tensor
) -> torch.Tensor:
    """``(B,)`` rows the driver has stopped: ``frozen`` plus rows where ``z`` is not the
    iterate ``proposed`` by the previous step (finished rows keep their old iterate)."""
    if proposed is None:
        return frozen
    return frozen | (z != proposed).any(dim=1)


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
    return torch.finfo(z.dtype).eps * norms(z), norms(direction)


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
        if self.t is None:
            return z + self.direction
        # (t is in the merit's dtype: float32 for a half-precision z.)
        return z + self.t.to(z.dtype).unsqueeze(1) * self.direction

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
        check_every: int | None = None,
    ) -> Verdict:
        """The Armijo test of the trial ``z_trial`` (residuals ``r_trial``) per sample.

        A sample that passes moves there. One that fails stays at ``z`` and will try
        half the step at the next iteration; when the step no longer changes ``z`` in
        floating point, or after ``halvings`` halvings, it gives up (and would start
        the same search again, as a new step from the same point would), unless its
        trial was not finite: that trial is handed over, so that the driver stops the
        sample. Samples in ``skip`` (frozen by the driver) stay without a test. The
        host is asked whether every sample passed only where the solver reads it every
        iteration (``check_every``, see :func:`implicit._batch.known_all`).
        """
        squares = squared_norm(r_trial)
        t = 1.0 if self.t is None else self.t
        # NaN compares False: a non-finite trial never passes.
        take = ~skip & (squares <= _threshold(self.base, t, self.slope))
        if known_all(take, check_every):
            # Every sample passes (none skipped): the common case near a root.
            return Verdict(z_trial, r_trial, take)
        failed = ~(skip | take)
        halved = torch.full_like(self.base, 0.5) if self.t is None else self.t / 2
        rounding, length = _scales(z, self.direction)
        gave_up = failed & ((halved * length <= rounding) | (halved < 2.0**-halvings))
        blew_up = gave_up & ~(squares < math.inf)
        moved = (take | blew_up).unsqueeze(1)
        z_new, r_new = torch.where(moved, z_trial, z), torch.where(moved, r_trial, r)
        search = dataclasses.replace(self, t=torch.where(gave_up, 1, halved))
        return Verdict(z_new, r_new, take, failed & ~blew_up, search, gave_up & ~blew_up)


@dataclasses.dataclass
class Verdict:
    """What :meth:`Search.judge` decided for each sample.

    Attributes:
        z, r: the new iterates and their residuals: the trial where it passed (or
            was not finite at the shortest step), the old iterate elsewhere.
        passed: ``(B,)`` the samples whose trial passed the Armijo test.
        pending: ``(B,)`` the samples whose search goes on from their iterate (None
            if none); ``search`` holds their next step fractions.
        search: the search of the pending samples (None if none).
        gave_up: ``(B,)`` pending samples that tried every step fraction (their next
            trial is the full step again); None if none is pending.
    """

    z: torch.Tensor
    r: torch.Tensor
    passed: torch.Tensor
    pending: torch.Tensor | None = None
    search: Search | None = None
    gave_up: torch.Tensor | None = None


def records_rejected_trials(verdict: Verdict) -> bool:
    """Whether ``verdict.r`` must be evaluated again at ``verdict.z`` before the solver
    goes on: where autograd or a ``torch.func`` transform records the solver
    (``backward="unroll"``) and some sample did not take its trial. The rejected trial
    may lie where ``g``'s derivative is not finite (the square root of a negative
    number), and its evaluation, recorded for the whole batch, would turn the
    gradients NaN even with a zero cotangent there (0·∞). One more evaluation, at the
    points kept, leaves rejected trials out of the graph."""
    return traced(verdict.z, verdict.r) and not bool(verdict.passed.all())
