"""The classic DEQ backward: fixed-point iteration on the adjoint equation."""

from __future__ import annotations

import dataclasses
import math

import torch

from implicit._batch import (
    all_running,
    cheap_host_reads,
    check_interval,
    known_all,
    select_rows,
)
from implicit._results import check_number
from implicit.linear.base import CONVERGED, DIVERGED, MAX_ITER, NONFINITE, STAGNATED
from implicit.linear.iterative import IterativeSolver, Progress, norm, start, where_codes

#: Iterations between two checks for divergence and stagnation.
_WINDOW = 4
#: The residual, in units of the products' machine epsilon times ``‖x‖ + ‖rhs‖``, at
#: or below which a residual that no longer halves has stagnated at rounding level.
_ROUNDING = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Neumann(IterativeSolver):
    """The classic DEQ backward: fixed-point iteration on the adjoint equation.

    Iterates ``x ← x + damping · (A x − rhs)``. For a fixed-point problem
    ``g = f(z) − z`` the Jacobian is ``A = ∂f/∂z − I`` and, with ``damping = 1``,
    this is ``x ← (∂f/∂z)ᵀ x − rhs``: the truncated Neumann series of
    ``−(I − ∂f/∂z)⁻ᵀ rhs``. It converges when ``f`` is contractive; ``damping < 1``
    converges whenever the eigenvalues of ``∂f/∂z`` have real part below 1 and are
    small enough, more slowly. For general root problems use
    [`GMRES`][implicit.linear.GMRES]. One product per iteration, no extra memory.

    A series that diverges (``f`` not contractive at the solution) is stopped early: a
    problem whose residual exceeds ``divergence`` times its initial residual (checked
    every 4 iterations) stops with status ``"diverged"``, and one whose iterate
    overflows stops at its last finite iterate with status ``"nonfinite"``. (A
    contractive but far from normal ``∂f/∂z`` can make the residual grow for a while
    before it decreases; by much less than a factor 1000 for the Jacobians of usual
    maps, and a hump that size costs as many digits anyway.) A problem whose residual
    stops decreasing (it does not halve over 4 iterations) at the level of the
    rounding errors of its evaluation (8 machine epsilons of the products' dtype times
    ``‖x‖ + ‖rhs‖``) stops with status ``"stagnated"``: a tolerance below what the
    dtype can resolve, which no more iterations, and no other method using these
    products, would meet.

    Takes the options of every [`IterativeSolver`][implicit.linear.IterativeSolver]
    but ``preconditioner`` (``tol``, ``max_iter``, ``x0``, ``check_every``).

    Args:
        damping: step size in ``(0, 1]``.
        give_up_after: stop a problem whose residual has not halved over this many
            iterations (status ``"max_iter"``), so that a caller can hand it to a
            method that does not need a contraction ([`Auto`][implicit.linear.Auto]
            does, after 4); ``None``: never.
        divergence: the growth of a problem's residual over its initial one at which it
            has diverged; ``None``: never stop for growth.
    """

    name = "neumann"
    preconditioned = False

    damping: float = 1.0
    give_up_after: int | None = None
    divergence: float | None = 1000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.damping, "damping", "in (0, 1]")
        if self.give_up_after is not None:
            check_number(self.give_up_after, "give_up_after", "an integer >= 1")
        if self.divergence is not None:
            check_number(self.divergence, "divergence", "a number > 1")
        object.__setattr__(self, "damping", float(self.damping))

    def iterate(self, operator, rhs, x, *, target, max_iter, allowed, preconditioner=None):
        # With damping 1 and A = S − I (a fixed point's ∂g/∂z, S = ∂f/∂z), iterate on
        # products of S: x ← S x − rhs, whose residual is S x_new − S x (one pass over
        # the data per iteration, where A's products and the update take three).
        shifted = self.damping == 1 and operator.shifted
        rhs_norm = norm(rhs)
        from_zero = x is None
        if not shifted:
            x, r = start(operator, rhs, x)
            r = -r  # A x − rhs, exact (a product) at every iterate
        elif from_zero:
            q, r = None, -rhs  # x = S x = 0, made where the loop needs them
        else:
            q = operator.shifted_mv(x)
            r = q - x - rhs
        # (From zero the residual is −rhs, whose norm is rhs's, exactly.)
        reference = recent = initial = rhs_norm if from_zero else norm(r)
        check_every = check_interval(self.check_every, rhs)
        # One problem tested on the host every iteration: its target as a number, read
        # once (see all_running), and the iteration that solves it ends the loop
        # without per-problem bookkeeping (what that would compute, the same numbers).
        one = check_every == 1 and target.shape[0] == 1 and cheap_host_reads(target)
        limit = target.item() if one else target
        # While every problem runs and the host checks each iteration (on the CPU), an
        # iteration in which none finishes or blows up needs no per-problem bookkeeping.
        every = one and bool(allowed) and initial.item() > limit
        active = codes = grow_limit = None
        if not every:
            active = allowed & (initial > target)
            every = not one and known_all(active, check_every)
            if not every:  # (else made where the loop leaves the fast path)
                codes = where_codes(active, MAX_ITER, CONVERGED)
        iterations = 0
        while iterations < max_iter:
            if not every and iterations % check_every == 0 and not bool(active.any()):
                break
            if shifted:
                x_new = r if q is None else q - rhs  # r = −rhs at the start from zero
                q_new = operator.shifted_mv(x_new)
                # S x_new − x_new − rhs, x_new = S x − rhs (to one rounding of x_new).
                r_new = q_new if q is None else q_new - q
            else:
                x_new = torch.add(x, r, alpha=self.damping)
                r_new = operator.mv(x_new) - rhs
            iterations += 1
            size = norm(r_new)
            if every and one:
                worst = size.item()
                if worst <= limit and worst < math.inf:
                    x, r = x_new, r_new
                    codes = torch.full_like(target, CONVERGED, dtype=torch.long)
                    break
            window = iterations % _WINDOW == 0
            give_up = bool(self.give_up_after) and iterations % self.give_up_after == 0
            if every:
                if not one:
                    worst = all_running(size, limit)
                running = limit < worst < math.inf if one else worst is not None
                if running and window and self.divergence and grow_limit is None:
                    grow_limit = (self.divergence * initial).min().item()
                if running and not (
                    (window or give_up)
                    and self._may_stop(size, worst, window, recent, give_up, reference, grow_limit)
                ):
                    if window:
                        recent = size
                    if give_up:
                        reference = size
                    x, r = x_new, r_new
                    if shifted:
                        q = q_new
                    continue
            # The problems stopped early at this iteration, with their status, by
            # priority: a stagnated or diverged one is not handed on as merely slow.
            stops = []
            if window:
                # Stagnation: the residual did not halve over the window and is at the
                # level of the rounding errors of its evaluation (the products run in the
                # operator's dtype), which no method working with these products can go
                # below.
                flat = ~(size <= 0.5 * recent)
                rounding = _ROUNDING * torch.finfo(operator.evaluated_in or rhs.dtype).eps
                stops.append((flat & (size <= rounding * (norm(x_new) + rhs_norm)), STAGNATED))
                recent = size
                if self.divergence:
                    grown = (size > self.divergence * initial) & (size < math.inf)
                    stops.append((grown, DIVERGED))
            if give_up:
                # The residual did not halve over the window (NaN included).
                stops.append((~(size <= 0.5 * reference), MAX_ITER))
                reference = size
            every = False
            if active is None:
                active, codes = _start(allowed, initial, target)
            elif codes is None:  # every problem ran until now
                codes = torch.full_like(target, MAX_ITER, dtype=torch.long)
            # A problem whose residual turned infinite or NaN keeps its last finite x.
            step = active & (size < math.inf)
            if shifted:
                if q is None:  # the first iteration from zero
                    x = q = torch.zeros_like(rhs)
                x, r, q = select_rows(step, check_every, (x_new, x), (r_new, r), (q_new, q))
            else:
                x, r = select_rows(step, check_every, (x_new, x), (r_new, r))
            done = step & (size <= target)
            # (step is a subset of active and done of step: ^ removes the subset, and
            # the two masks filled are disjoint.)
            codes = codes.masked_fill(active ^ step, NONFINITE).masked_fill(done, CONVERGED)
            active = step ^ done
            for mask, code in stops:
                stopped = active & mask
                codes = codes.masked_fill(stopped, code)
                active = active ^ stopped  # (a subset of active)
        if codes is None:  # out of iterations while every problem ran
            _, codes = _start(allowed, initial, target)
        return Progress(torch.zeros_like(rhs) if x is None else x, codes, iterations, r)

    def _may_stop(self, size, worst, window, recent, give_up, reference, grow_limit) -> bool:
        """Whether a stop for stagnation, divergence or slowness may select a problem
        at this iteration, while every problem runs (``worst``: the largest residual
        norm, finite; ``grow_limit``: the smallest of the problems' divergence
        thresholds, or ``None``): ``False`` only where none of their masks can.

        Every residual halved over the window rules out stagnation and slowness alike:
        one comparison and one read, where their masks take eight operations (the same
        comparison for both when their windows coincide); divergence is ruled out on
        the host, by ``worst`` against ``grow_limit``."""
        bases = [recent] if window else []
        if give_up and not (window and reference is recent):
            bases.append(reference)
        if any(not bool((size <= 0.5 * base).all()) for base in bases):
            return True
        return window and grow_limit is not None and worst > grow_limit


def _start(
    allowed: torch.Tensor, initial: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The problems to iterate (allowed, and not solved by their initial residual) and
    their status codes before the first iteration."""
    active = allowed & (initial > target)
    return active, where_codes(active, MAX_ITER, CONVERGED)
