"""Limited-memory "good" Broyden on the inverse Jacobian."""

from __future__ import annotations

import dataclasses
import math

import torch

from implicit._batch import check_interval, combine, known_all, norms, project, store, upcast
from implicit._results import check_number
from implicit.linear.base import LowRankInverse
from implicit.solvers._line_search import (
    Search,
    frozen_rows,
    records_rejected_trials,
    squared_norm,
)
from implicit.solvers.base import Solver

#: Step halvings the line search may try after the full step (t ≥ 2⁻¹⁰); a sample
#: that fails them all restarts with a fresh, descent-guaranteeing initial guess.
HALVINGS = 10


@dataclasses.dataclass
class _BroydenState:
    """The inverse-Jacobian estimate ``H = h₀ I + Σ_j u_j v_jᵀ`` per sample.

    Attributes:
        u, v: ``(B, memory, n)`` low-rank factors, a ring: the next update replaces
            slot ``slot``, the oldest (the sum does not depend on the order of its
            terms). Only the first ``filled`` slots hold terms (zeros for a sample
            without one there); the others are never read, so the products with the
            history cost what the terms stored so far need, and a solve that ends
            before the memory is full never touches the rest.
        h0: ``(B,)`` the scale of the initial guess.
        restart: ``(B,)`` samples whose estimate is rebuilt at the next step.
        proposed: the iterate the last step proposed (to recognise frozen rows).
        frozen: ``(B,)`` rows the driver has stopped.
        slot: the slot of the next update.
        filled: the slots written so far (at most ``memory``).
        h_r: ``H g`` at the iterate the last step proposed (with this ``H``), or None.
        pending: ``(B,)`` samples whose line search goes on from their iterate (their
            last trial failed; their ``H`` is left as it is meanwhile), None if none.
        search: the line search of the pending samples.
        steps: the steps taken so far (where the host is read every few steps only,
            the samples flagged ``restart`` restart at the steps that read it).
    """

    u: torch.Tensor
    v: torch.Tensor
    h0: torch.Tensor
    restart: torch.Tensor
    frozen: torch.Tensor
    proposed: torch.Tensor | None = None
    slot: int = 0
    filled: int = 0
    h_r: torch.Tensor | None = None
    pending: torch.Tensor | None = None
    search: Search | None = None
    steps: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``H x`` per sample."""
        return self._product(x, self.u, self.v)

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """``Hᵀ x`` per sample."""
        return self._product(x, self.v, self.u)

    def _product(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``h₀ x + Σ_j left_j (right_jᵀ x)`` per sample, over the filled slots."""
        scaled = self.h0.unsqueeze(1) * x
        if not self.filled:
            return scaled
        filled = slice(None, self.filled)
        return scaled + combine(left[:, filled], project(right[:, filled], x))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Broyden(Solver):
    """Limited-memory Broyden's method ("good" update of the inverse Jacobian).

    A quasi-Newton method: superlinear convergence without ever forming or solving
    with a Jacobian. It keeps an estimate ``H ≈ (∂g/∂z)⁻¹`` per sample as a scaled
    identity plus ``memory`` rank-one terms (``(B, memory, n)`` tensors), steps
    ``d = −H g(z)`` and, after the step ``s`` with residual change ``y``, applies the
    Sherman–Morrison form of Broyden's good update,
    ``H ← H + (s − H y) sᵀH / (sᵀ H y)``, dropping the oldest term when the memory
    is full. The popular choice for deep equilibrium models (Bai et al., 2019).

    The initial guess is ``H₀ = I / α`` with ``α = gᵀ(∂g/∂z)g / ‖g‖²`` (one
    Jacobian-vector product), so ``d = −H₀ g`` is a descent direction of ``‖g‖²``
    whatever the sign of the Jacobian (``α = −1``, the fixed-point guess
    ``∂g/∂z ≈ −I``, where it is zero or not finite). A sample *restarts* from such a
    fresh guess, at its current iterate, when its update is degenerate
    (``|sᵀHy| ≤ √eps ‖s‖ ‖Hy‖``) or not finite, or when its line search fails.

    The line search halves the step (per sample, at most 10 times) until ``½‖g‖²``
    decreases by the Armijo rule with the slope a Newton step would have. It takes one
    trial per iteration, as Newton's does: a sample whose trial fails stays where it
    is (its ``H`` unchanged) and tries half the step at the next iteration, while the
    others go on; so every trial counts against ``max_iter``.

    Cost per iteration: one evaluation of ``g``, plus one evaluation and one
    Jacobian-vector product when a sample (re)starts (with ``check_every = k > 1``, or
    on an accelerator, every ``k``-th iteration, which restarts the samples flagged
    since without reading the host to ask whether there are any). Under ``backward="unroll"``, an
    iteration in which some sample does not take its trial evaluates ``g`` once more,
    at the points kept, so that rejected trials stay out of the recorded graph.

    Args:
        memory: rank-one terms kept (at least 1).
        line_search: backtrack on ``½‖g‖²``; ``False`` always takes the full step.
        check_every: see [`Solver`][implicit.solvers.Solver].
    """

    name = "broyden"

    memory: int = 20
    line_search: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.memory, "memory", "an integer >= 1")
        object.__setattr__(self, "line_search", bool(self.line_search))

    def init(self, fn, z, r):
        batch, n = z.shape
        return _BroydenState(
            u=z.new_empty(batch, self.memory, n),
            v=z.new_empty(batch, self.memory, n),
            h0=z.new_full((batch,), -1.0),
            restart=torch.ones(batch, dtype=torch.bool, device=z.device),
            frozen=torch.zeros(batch, dtype=torch.bool, device=z.device),
        )

    def step(self, fn, z, r, state):
        frozen = frozen_rows(z, state.proposed, state.frozen)
        pending, search = state.pending, state.search
        restart = state.restart & ~frozen
        interval = check_interval(self.check_every, z)
        # Where the host is read every few steps only, the flagged samples keep their H
        # (their update was skipped) until the next of every interval-th step, which
        # restarts them without asking whether there are any (one evaluation and one
        # Jacobian-vector product, as a read would stall the device).
        if state.steps % interval == 0 and (interval > 1 or bool(restart.any())):
            state = self._restart(fn, z, r, state, restart)
            restart = None
        if pending is None or not known_all(pending, interval):
            # H g(z) is at hand from the last step (where z is not the proposed iterate,
            # the driver has frozen the row, whose step it discards).
            direction = -(state.apply(r) if state.h_r is None else state.h_r)
            fresh = Search(direction, None, base=squared_norm(r))
            search = fresh if pending is None else search.merged(pending, fresh)
        # H g(z) = −d for every sample: a sample still searching has kept its H.
        direction = search.direction
        if self.line_search:
            z_trial = search.trial(z)
            verdict = search.judge(
                z, r, z_trial, fn(z_trial), skip=frozen, halvings=HALVINGS, check_every=interval
            )
            if records_rejected_trials(verdict):
                verdict.r = fn(verdict.z)
            z_new, r_new, passed = verdict.z, verdict.r, verdict.passed
            pending, search = verdict.pending, verdict.search
            if verdict.gave_up is not None:
                # Every step fraction failed: H does not give a descent direction there,
                # and these samples restart rather than search along it again.
                pending = pending & ~verdict.gave_up
                if interval == 1:
                    pending = pending if bool(pending.any()) else None
        else:
            z_new = z + direction
            r_new = fn(z_new)
            passed, pending, search = torch.ones_like(frozen), None, None
        s = z_new - z
        h_r_new = state.apply(r_new)
        hy = h_r_new + direction  # H (g(z_new) − g(z))
        denominator = _dot(s, hy)
        size = norms(s) * norms(hy)
        eps = torch.finfo(z.dtype).eps
        usable = passed & torch.isfinite(denominator) & (denominator.abs() > math.sqrt(eps) * size)
        safe = torch.where(usable, denominator, 1).unsqueeze(1)
        u = torch.where(usable.unsqueeze(1), (s - hy) / safe, 0).to(z.dtype)
        v = torch.where(usable.unsqueeze(1), state.apply_transpose(s), 0)
        # (H + u vᵀ) g(z_new), for the next direction, without another pass over the history.
        h_r_new = h_r_new + u * _dot(v, r_new).to(z.dtype).unsqueeze(1)
        if state.filled == self.memory and pending is not None:
            # The slot holds each sample's oldest term: a sample still searching keeps
            # it (and so its H); the others lose it to their update or restart anyway.
            keep = pending.unsqueeze(1)
            u = torch.where(keep, state.u[:, state.slot], u)
            v = torch.where(keep, state.v[:, state.slot], v)
        # Into the oldest slot, in place where no graph needs the old terms: copying
        # the whole (B, memory, n) history every step cost a fifth of a DEQ forward.
        waiting = torch.zeros_like(usable) if pending is None else pending
        restart_next = ~usable & ~waiting
        state = dataclasses.replace(
            state,
            u=store(state.u, state.slot, u),
            v=store(state.v, state.slot, v),
            restart=restart_next if restart is None else restart_next | restart,
            frozen=frozen,
            proposed=z_new,
            slot=(state.slot + 1) % self.memory,
            filled=min(state.filled + 1, self.memory),
            h_r=h_r_new,
            pending=pending,
            search=search,
            steps=state.steps + 1,
        )
        return z_new, r_new, state

    def hint(self, state: _BroydenState) -> LowRankInverse:
        """The estimate ``H = h₀ I + Σ_j u_j v_jᵀ ≈ (∂g/∂z)⁻¹`` the last step updated."""
        filled = slice(None, state.filled)
        return LowRankInverse(state.h0, state.u[:, filled], state.v[:, filled])

    @staticmethod
    def _restart(fn, z, r, state, restart):
        """Forget the updates of ``restart`` samples and rescale their ``H₀`` at ``z``."""
        jr = fn.linearize(z)[1].mv(r)
        # Guarded divisions: a NaN in the branch torch.where discards would still
        # poison the derivative under backward="unroll" (here at r = 0).
        squared = _dot(r, r)
        alpha = _dot(r, jr) / torch.where(squared > 0, squared, 1)
        usable = (squared > 0) & torch.isfinite(alpha) & (alpha != 0)
        h0 = torch.where(usable, 1 / torch.where(usable, alpha, 1), -1.0).to(z.dtype)
        u, v = state.u, state.v
        if state.filled:
            keep = ~restart.unsqueeze(1).unsqueeze(2)
            u, v = torch.where(keep, u, 0), torch.where(keep, v, 0)
        return dataclasses.replace(state, u=u, v=v, h0=torch.where(restart, h0, state.h0), h_r=None)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aᵀb`` per row (in float32 for half precision, where it would overflow)."""
    return (upcast(a) * upcast(b)).sum(dim=1)
