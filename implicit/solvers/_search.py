"""A per-problem line search that takes one trial per solver iteration.

Each problem of a batch searches along its own direction with its own step; a trial
is one evaluation of the objective and its gradient on the whole batch, and counts as
one iteration of the solver (so ``max_iter`` bounds the trials too). Problems whose
trial passes move on; the others propose their next trial.

Two tests:

* **strong Wolfe** (``wolfe=True``, for quasi-Newton directions without bounds):
  sufficient decrease ``φ(t) ≤ φ(0) + c₁ t φ'(0)`` and curvature ``|φ'(t)| ≤ c₂ |φ'(0)|``,
  by bracketing and safeguarded quadratic interpolation (Nocedal & Wright,
  *Numerical Optimization*, algorithms 3.5 and 3.6), extrapolating fourfold until a
  bracket is found;
* **projected Armijo** (``wolfe=False``: Newton-type directions, and every search
  under bounds): the trial ``P(z + t d)`` is accepted when
  ``φ ≤ φ(0) + c₁ ∇φ(0)ᵀ(P(z + t d) − z)`` (Bertsekas), backtracking by safeguarded
  quadratic interpolation in ``[t/10, t/2]``.

Both ask for a strict decrease of the objective. Near a minimum the decrease a step
can make falls below the rounding of the objective, where values cannot rank points
but gradients still can: there a trial whose value is within ``FLAT · |φ(0)|`` of the
start's is judged by its gradient instead (Hager and Zhang's approximate Wolfe
conditions ``(2δ − 1) φ'(0) ≥ φ'(t) ≥ c₂ φ'(0)`` with a smaller stopping-test
residual for Wolfe searches; a tenfold reduction of that residual for Armijo
searches). A non-finite trial
counts as too long a step. A search fails after ``MAX_TRIALS`` trials or when the step
no longer changes ``z``; a Wolfe search that has found a point of sufficient decrease
takes it instead of failing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

C1 = 1e-4
C2 = 0.9
#: Hager and Zhang's δ of the approximate Wolfe conditions.
DELTA = 0.1
#: Trials one search may take before it gives up.
MAX_TRIALS = 30
#: Trials in a row whose value is flat (see FLAT_ULPS) and still not acceptable, after
#: which a search gives up: shorter steps cannot do better where values are rounding.
FLAT_TRIALS = 5
EXTRAPOLATION = 4.0
#: A trial's value within this many units in the last place of the start's is "flat".
FLAT_ULPS = 100


@dataclasses.dataclass
class Search:
    """The line searches of a batch, one per row (``(B,)`` fields, ``(B, n)`` vectors).

    Attributes:
        active: rows searching.
        direction: each row's direction.
        t: the step of each row's next trial.
        f0, slope0: the objective and its slope ``∇φ(0)ᵀ d`` where the search started.
        norm0: the stopping test's residual there, or the row's best so far if smaller.
        lo_t, lo_f, lo_slope, lo_grad: the best trial with sufficient decrease so far
            (``t = 0``: the start).
        hi_t, hi_f: the other end of the bracket (``∞``: none yet).
        trials: trials taken.
        flat_trials: trials in a row rejected with a value within rounding of ``f0``.
        best_norm: the smallest stopping-test residual of the row's iterates so far:
            a trial judged by its gradient must beat it (so that rounding cannot make
            a problem cycle).
    """

    active: torch.Tensor
    direction: torch.Tensor
    t: torch.Tensor
    f0: torch.Tensor
    slope0: torch.Tensor
    norm0: torch.Tensor
    lo_t: torch.Tensor
    lo_f: torch.Tensor
    lo_slope: torch.Tensor
    lo_grad: torch.Tensor
    hi_t: torch.Tensor
    hi_f: torch.Tensor
    trials: torch.Tensor
    flat_trials: torch.Tensor
    best_norm: torch.Tensor

    @classmethod
    def idle(cls, z: torch.Tensor) -> Search:
        """No row searching."""
        zeros = z.new_zeros(z.shape[0])
        return cls(
            active=torch.zeros_like(zeros, dtype=torch.bool),
            direction=torch.zeros_like(z),
            t=zeros,
            f0=zeros,
            slope0=zeros,
            norm0=zeros,
            lo_t=zeros,
            lo_f=zeros,
            lo_slope=zeros,
            lo_grad=torch.zeros_like(z),
            hi_t=zeros,
            hi_f=zeros,
            trials=torch.zeros_like(zeros, dtype=torch.long),
            flat_trials=torch.zeros_like(zeros, dtype=torch.long),
            best_norm=torch.full_like(zeros, float("inf")),
        )

    def reset(self, rows: torch.Tensor) -> Search:
        """``rows`` stop searching and forget their best point (a fresh start, after an
        escape from a saddle)."""
        return dataclasses.replace(
            self,
            active=self.active & ~rows,
            best_norm=torch.where(rows, float("inf"), self.best_norm),
        )

    def start(
        self,
        rows: torch.Tensor,
        direction: torch.Tensor,
        f: torch.Tensor,
        grad: torch.Tensor,
        norm: torch.Tensor,
        t0: torch.Tensor,
    ) -> Search:
        """Searches in ``rows`` from ``(f, grad)`` (stopping-test residual ``norm``)
        along ``direction``, with first step ``t0``."""
        slope = (grad * direction).sum(dim=1)
        infinity = torch.full_like(f, float("inf"))
        return Search(
            active=self.active | rows,
            direction=_pick(rows, direction, self.direction),
            t=_pick(rows, t0, self.t),
            f0=_pick(rows, f, self.f0),
            slope0=_pick(rows, slope, self.slope0),
            norm0=_pick(rows, torch.minimum(norm, self.best_norm), self.norm0),
            lo_t=_pick(rows, torch.zeros_like(f), self.lo_t),
            lo_f=_pick(rows, f, self.lo_f),
            lo_slope=_pick(rows, slope, self.lo_slope),
            lo_grad=_pick(rows, grad, self.lo_grad),
            hi_t=_pick(rows, infinity, self.hi_t),
            hi_f=_pick(rows, infinity, self.hi_f),
            trials=torch.where(rows, 0, self.trials),
            flat_trials=torch.where(rows, 0, self.flat_trials),
            best_norm=_pick(rows, torch.minimum(norm, self.best_norm), self.best_norm),
        )

    def trial(self, z: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]):
        """The trial points: ``P(z + t d)`` in the searching rows, ``z`` elsewhere."""
        step = torch.where(self.active, self.t, 0).unsqueeze(1) * self.direction
        return torch.where(self.active.unsqueeze(1), project(z + step), z)

    def judge(
        self,
        z: torch.Tensor,
        f: torch.Tensor,
        grad: torch.Tensor,
        trial: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        *,
        wolfe: bool,
    ) -> tuple[Step, Search]:
        """Judge the trials ``(z, f, grad, stopping-test norm)`` made from the iterates
        ``(z, f, grad)``.

        Rows that pass move to their trial; a Wolfe search that gives up moves to its
        best point of sufficient decrease; a search that gives up without one fails
        (the row stays at ``z``).
        """
        z_trial, f_trial, g_trial, norm_trial = trial
        active = self.active
        finite = torch.isfinite(f_trial) & torch.isfinite(g_trial).all(dim=1)
        trials = self.trials + active.long()
        flat = f_trial <= self.f0 + FLAT_ULPS * torch.finfo(f.dtype).eps * self.f0.abs()
        slope = (g_trial * self.direction).sum(dim=1)
        if wolfe:
            armijo = (f_trial <= self.f0 + C1 * self.t * self.slope0) & (f_trial < self.f0)
            worse = (f_trial >= self.lo_f) & (self.lo_t > 0)
            bad = ~finite | ~armijo | worse
            approximate = flat & (slope <= (2 * DELTA - 1) * self.slope0)
            approximate = approximate & (slope >= C2 * self.slope0) & (norm_trial < self.norm0)
            accepted = active & finite & ((~bad & (slope.abs() <= -C2 * self.slope0)) | approximate)
            # A good point: the new low end; the old one becomes the high end when the
            # slope says the minimum lies between them.
            good = active & ~bad & ~accepted
            flip = good & (slope * (self.hi_t - self.lo_t) >= 0)
            hi_t = torch.where(bad & active, self.t, torch.where(flip, self.lo_t, self.hi_t))
            hi_f = torch.where(bad & active, f_trial, torch.where(flip, self.lo_f, self.hi_f))
            lo_t = torch.where(good, self.t, self.lo_t)
            lo_f = torch.where(good, f_trial, self.lo_f)
            lo_slope = torch.where(good, slope, self.lo_slope)
            lo_grad = _pick(good, g_trial, self.lo_grad)
            bracketed = torch.isfinite(hi_t)
            t_next = torch.where(
                bracketed, _interpolate(lo_t, lo_f, lo_slope, hi_t, hi_f), EXTRAPOLATION * lo_t
            )
        else:
            decrease = (self.lo_grad * (z_trial - z)).sum(dim=1)
            sufficient = (f_trial <= self.f0 + C1 * decrease) & (f_trial < self.f0)
            approximate = flat & (norm_trial <= 0.5 * self.norm0)
            accepted = active & finite & (sufficient | approximate)
            lo_t, lo_f, lo_slope, lo_grad = self.lo_t, self.lo_f, self.lo_slope, self.lo_grad
            hi_t = torch.where(active, self.t, self.hi_t)
            hi_f = torch.where(active, f_trial, self.hi_f)
            t_next = _interpolate(torch.zeros_like(self.t), self.f0, self.slope0, self.t, f_trial)
            t_next = torch.minimum(torch.maximum(t_next, 0.1 * self.t), 0.5 * self.t)
        # A step too short to change z (in the working precision) ends the search, and
        # so do flat trials that keep failing.
        rounding = f_trial >= self.f0 - FLAT_ULPS * torch.finfo(f.dtype).eps * self.f0.abs()
        flat_trials = torch.where(active & ~accepted & flat & rounding, self.flat_trials + 1, 0)
        stalled = (z_trial == z).all(dim=1) | (flat_trials >= FLAT_TRIALS)
        exhausted = active & ~accepted & ((trials >= MAX_TRIALS) | stalled)
        # Only a strict decrease is worth a fallback: equal values are rounding.
        fallback = exhausted & (lo_t > 0) & (lo_f < self.f0) if wolfe else exhausted & False
        z_low = z + lo_t.unsqueeze(1) * self.direction
        step = Step(
            moved=accepted | fallback,
            failed=exhausted & ~fallback,
            z=_pick(accepted, z_trial, _pick(fallback, z_low, z)),
            f=_pick(accepted, f_trial, _pick(fallback, lo_f, f)),
            grad=_pick(accepted, g_trial, _pick(fallback, lo_grad, grad)),
        )
        search = Search(
            active=active & ~step.moved & ~step.failed,
            direction=self.direction,
            t=torch.where(active, t_next, self.t),
            f0=self.f0,
            slope0=self.slope0,
            norm0=self.norm0,
            lo_t=lo_t,
            lo_f=lo_f,
            lo_slope=lo_slope,
            lo_grad=lo_grad,
            hi_t=hi_t,
            hi_f=hi_f,
            trials=trials,
            flat_trials=flat_trials,
            best_norm=torch.where(
                accepted, torch.minimum(norm_trial, self.best_norm), self.best_norm
            ),
        )
        return step, search


@dataclasses.dataclass
class Step:
    """Where the searches of one iteration took the rows.

    Attributes:
        moved: ``(B,)`` rows that moved (their search ended with a point).
        failed: ``(B,)`` rows whose search ended without one.
        z, f, grad: the new iterates, objective values and gradients (the old ones
            where a row did not move).
    """

    moved: torch.Tensor
    failed: torch.Tensor
    z: torch.Tensor
    f: torch.Tensor
    grad: torch.Tensor


def _pick(rows: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(rows if new.dim() == 1 else rows.unsqueeze(1), new, old)


def _interpolate(
    lo_t: torch.Tensor,
    lo_f: torch.Tensor,
    lo_slope: torch.Tensor,
    hi_t: torch.Tensor,
    hi_f: torch.Tensor,
) -> torch.Tensor:
    """The minimiser of the quadratic through ``(lo_t, lo_f)`` with slope ``lo_slope`` and
    ``(hi_t, hi_f)``, kept within the middle 80 % of the bracket (its midpoint where the
    quadratic has no minimum or ``hi_f`` is not finite)."""
    width = hi_t - lo_t
    curvature = hi_f - lo_f - lo_slope * width
    step = -lo_slope * width * width / (2 * curvature)
    midpoint = lo_t + 0.5 * width
    usable = torch.isfinite(step) & (curvature > 0)
    guess = torch.where(usable, lo_t + step, midpoint)
    low = torch.minimum(lo_t + 0.1 * width, lo_t + 0.9 * width)
    high = torch.maximum(lo_t + 0.1 * width, lo_t + 0.9 * width)
    return torch.minimum(torch.maximum(guess, low), high)
