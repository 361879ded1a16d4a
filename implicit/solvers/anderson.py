"""Anderson acceleration (type II) of the fixed-point map ``z ↦ z + g(z)``."""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from implicit._batch import (
    check_interval,
    combine,
    known_all,
    norms,
    project,
    solve,
    store,
    traced,
    upcast,
    working_dtype,
)
from implicit._results import check_number
from implicit._torch import transforms_active
from implicit.linear.base import LowRankInverse
from implicit.solvers.base import Solver


@dataclasses.dataclass
class _History:
    """The last ``m`` steps of every problem, in ``m`` slots used in turn.

    ``dr[:, j]`` is a difference of consecutive residuals and ``dz_mixed[:, j]`` the
    matching ``Δz + β Δr`` (the only form in which the step needs ``Δz``); ``gram`` is
    ``ΔRᵀΔR``, updated by one row and column per step; ``rhs`` is ``ΔRᵀ r``. A slot
    that is empty, was not usable or was cleared by a restart holds zeros everywhere,
    so that it adds nothing to a step (and no NaN); a used slot has ``‖Δr‖ > 0``. Slot
    ``slot`` is written next (the same for every problem).

    Before the solver starts extrapolating, the four tensors of the history are
    ``None`` (nothing is allocated) and ``worst`` is the largest residual norm over the
    batch at ``z`` (read on the host), against which the next step's contraction is
    measured; ``latest`` is that of the driver's current iterate, where the driver has
    read it (:meth:`Anderson.observe`).
    """

    z: torch.Tensor
    r: torch.Tensor
    dr: torch.Tensor | None = None
    dz_mixed: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    rhs: torch.Tensor | None = None
    slot: int = 0
    worst: float | None = None
    latest: float | None = None

    @property
    def valid(self) -> torch.Tensor:
        """``(B, m)``: the slots in use."""
        if self.gram is None:
            return self.z.new_zeros(self.z.shape[0], 1, dtype=torch.bool)
        return self.gram.diagonal(dim1=1, dim2=2) > 0


class _Multisecant(LowRankInverse):
    """Anderson's estimate ``M = −β I + (ΔZ + βΔR) C ΔRᵀ ≈ (∂g/∂z)⁻¹``, with ``C`` the
    inverse of the regularised ``ΔRᵀΔR`` of its last step (whose step is ``z − M g(z)``):
    it maps each residual difference of the history to its step, ``M Δr_j ≈ Δz_j``.
    Computed from the history when first applied: a solve whose backward does not use
    it pays nothing for it."""

    def __init__(self, solver: Anderson, history: _History):
        self._solver = solver
        self._history = history
        self.left = history.dz_mixed

    @property
    def rows(self) -> int:
        return self._history.z.shape[0]

    @functools.cached_property
    def scale(self) -> torch.Tensor:
        return torch.full_like(self._history.z[:, 0], -self._solver.mixing)

    @functools.cached_property
    def right(self) -> torch.Tensor:
        history = self._history
        system, inverse_norms = self._solver._system(history.gram)
        coefficients = inverse_norms.unsqueeze(2) * torch.linalg.inv(system)
        coefficients = coefficients * inverse_norms.unsqueeze(1)
        return torch.bmm(coefficients.to(history.dr.dtype), history.dr)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Anderson(Solver):
    """Anderson acceleration: the default solver of [`fixed_point`][implicit.fixed_point].

    Type-II Anderson mixing on ``G(z) = z + g(z)`` (for a fixed point ``g = f(z) − z``,
    ``G = f``). Each iteration combines the last ``m`` steps: with the differences of
    iterates ``ΔZ`` and residuals ``ΔR``,

    ``γ = argmin ‖g(z) − ΔR γ‖``,  ``z ← z + β g(z) − (ΔZ + β ΔR) γ``.

    One evaluation of ``g`` per iteration. The small least-squares problems of all
    samples are solved at once, through their normal equations, with the columns of
    ``ΔR`` scaled to unit norm (so the method does not care about the scale of
    ``g``) and a ridge ``regularization · I`` added (at least the machine epsilon,
    below which it vanishes in rounding; in float32 for half-precision states). A
    sample falls back to the plain mixing step ``z + β g(z)`` and starts a new history
    when its solve is not finite or its coefficients exceed ``max_coefficient`` (the
    history is nearly degenerate and the extrapolation would amplify noise); steps
    whose residual difference is zero or not finite never enter the history.
    Differentiable (``backward="unroll"`` works through it).

    Where plain mixing already converges fast, extrapolation costs more than it saves
    (its small solves and passes over the history, each iteration, beside one
    evaluation of ``g``): so the solver takes plain mixing steps, and keeps no history,
    while the largest residual of the batch shrinks at least by ``start_ratio`` per
    step (``max_b ‖g(z_k)_b‖ ≤ start_ratio · max_b ‖g(z_{k−1})_b‖``), and extrapolates
    from the first step where it does not, to the end. The choice is made for the
    whole batch (one host read of one number per step, no pass over the batch beyond
    the norms): a problem's iterates, though not its tolerance, can depend on the
    batch it is solved in. Where the loop must not read the host each step
    (``check_every > 1``, the default on accelerators) or cannot (under a
    ``torch.func`` transform), the solver extrapolates from the start.

    On a root problem this accelerates ``z ← z + β g(z)``, which needs ``∂g/∂z``
    close to ``−I`` (as for ``g = f(z) − z`` with a contractive ``f``); for other root
    problems use [`Newton`][implicit.solvers.Newton] or
    [`Broyden`][implicit.solvers.Broyden].

    Args:
        m: history size, the number of past steps combined with the current one.
            ``m`` larger than the number of unknowns is allowed (the ridge handles
            the rank deficiency).
        mixing: ``β`` in ``(0, 1]``, the weight of the residual in each step.
        regularization: ridge added to the normalised Gram matrix ``ΔRᵀΔR``.
        max_coefficient: largest allowed ``‖γ‖₁`` (the weights of the combination
            of past iterates are bounded by ``1 + 2‖γ‖₁``); ``math.inf`` turns the
            check off.
        start_ratio: the contraction per plain mixing step below which the solver
            does not extrapolate (yet), in ``[0, 1]``; ``0`` extrapolates from the
            second step on (classic Anderson).
        check_every: see [`Solver`][implicit.solvers.Solver].
    """

    name = "anderson"

    m: int = 5
    mixing: float = 1.0
    regularization: float = 1e-8
    max_coefficient: float = 1e4
    start_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.m, "m", "an integer >= 1")
        check_number(self.mixing, "mixing", "in (0, 1]")
        check_number(self.regularization, "regularization", "a finite number >= 0")
        check_number(self.max_coefficient, "max_coefficient", "a number > 0")
        check_number(self.start_ratio, "start_ratio", "in [0, 1]")
        object.__setattr__(self, "mixing", float(self.mixing))
        object.__setattr__(self, "regularization", float(self.regularization))
        object.__setattr__(self, "max_coefficient", float(self.max_coefficient))
        object.__setattr__(self, "start_ratio", float(self.start_ratio))

    def init(self, fn, z, r):
        if (
            self.start_ratio == 0
            or check_interval(self.check_every, z) > 1
            or transforms_active(z, r)
        ):
            return self._started(_History(z=z, r=r))
        return _History(z=z, r=r)

    def observe(self, state, largest):
        if state.dr is not None:  # extrapolating: the contraction no longer matters
            return state
        return _History(z=state.z, r=state.r, worst=state.worst, latest=largest)

    def step(self, fn, z, r, state):
        # The very tensors the history ends with (the first step, from init's point; or a
        # step after every problem has stopped, which the driver discards): no step to
        # remember, so no slot taken, and the plain mixing step.
        first = z is state.z and r is state.r
        if state.dr is None:
            # The largest residual at z, read on the host: the driver's reading where it
            # made one. After a plain mixing step from state.z to z, the history starts
            # with that step where the largest residual shrank by less than start_ratio
            # (NaN: no sign of slow contraction) or where none was known at state.z (a
            # step from another point than init's), else the next step is a plain one too.
            now = state.latest if state.latest is not None else float(norms(r.detach()).max())
            if first or (state.worst is not None and not now > self.start_ratio * state.worst):
                z_next = torch.add(z, r, alpha=self.mixing)
                return z_next, fn(z_next), _History(z=z, r=r, worst=now)
            state = self._started(state)
        elif first:
            z_next = torch.add(z, r, alpha=self.mixing)
            return z_next, fn(z_next), state
        in_place = not traced(z, r)
        state = self._remember(z, r, state, in_place, self.check_every)
        rhs = state.rhs
        system, inverse_norms = self._system(state.gram)
        scaled, _ = solve(system, inverse_norms * rhs)
        gamma = inverse_norms * scaled  # in this order: a contiguous (B, m) result
        # NaN and ∞ fail the test too; an infinite bound still needs a finite size.
        size = torch.linalg.vector_norm(gamma, ord=1, dim=1)
        accept = (
            size <= self.max_coefficient if self.max_coefficient < math.inf else size < math.inf
        )
        if not known_all(accept, self.check_every):
            # Fall back to the mixing step and start a new history (of zeros).
            keep = accept.unsqueeze(1)
            if not in_place:
                # Under a recorded graph the rejected rows' solve is redone as the
                # identity's: where() passes them a zero gradient, and zero times the
                # non-finite values of a singular solve would still be NaN.
                system = torch.where(
                    keep.unsqueeze(2),
                    system,
                    torch.eye(self.m, dtype=system.dtype, device=system.device),
                )
                scaled, _ = solve(system, torch.where(keep, inverse_norms * rhs, 0))
                gamma = inverse_norms * scaled
            gamma = torch.where(keep, gamma, 0)
            keep = keep.unsqueeze(2)
            state = dataclasses.replace(
                state,
                gram=torch.where(keep, state.gram, 0),
                dr=torch.where(keep, state.dr, 0),
                dz_mixed=torch.where(keep, state.dz_mixed, 0),
                rhs=torch.where(keep.squeeze(2), rhs, 0),
            )
        if gamma.dtype != z.dtype:  # the least squares ran in float32 (half precision)
            gamma = gamma.to(z.dtype)
        z_next = torch.add(z, r, alpha=self.mixing)
        if in_place:  # the correction subtracted as it is computed: one pass less
            z_next.unsqueeze(1).baddbmm_(gamma.unsqueeze(1), state.dz_mixed, alpha=-1)
        else:
            z_next = z_next - combine(state.dz_mixed, gamma)
        return z_next, fn(z_next), state

    def hint(self, state: _History) -> LowRankInverse | None:
        """The multisecant estimate of ``(∂g/∂z)⁻¹`` the mixing step applies (computed
        where a linear solver uses it); ``None`` if the solver never extrapolated."""
        return None if state.dr is None else _Multisecant(self, state)

    def _started(self, state: _History) -> _History:
        """``state`` with an empty history: the solver extrapolates from its next step."""
        z = state.z
        batch, n = z.shape
        return dataclasses.replace(
            state,
            dr=z.new_zeros(batch, self.m, n),
            dz_mixed=z.new_zeros(batch, self.m, n),
            gram=z.new_zeros(batch, self.m, self.m, dtype=working_dtype(z.dtype)),
            rhs=z.new_zeros(batch, self.m, dtype=working_dtype(z.dtype)),
            worst=None,
        )

    def _system(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised least-squares system of the step and the inverse norms of the
        columns of ``ΔR`` that normalise it."""
        # The columns of ΔR scaled to unit norm (so that the method does not care about
        # the scale of g) and a ridge on the unit diagonal. Unused slots (zero rows, zero
        # right-hand side) are uncoupled: their coefficient solves to exactly zero,
        # whatever their (finite) scale. An unused slot's scale is 1, not rsqrt(0): any
        # finite value leaves it uncoupled, and clamping to a tiny square instead gave a
        # derivative of about tiny^-1.5, infinite, whose product with the zero tangent
        # there is NaN (forward mode, Hessians under backward="unroll").
        squares = gram.diagonal(dim1=1, dim2=2)
        inverse_norms = torch.rsqrt(torch.where(squares > 0, squares, 1))
        system = gram * (inverse_norms.unsqueeze(2) * inverse_norms.unsqueeze(1))
        ridge = max(self.regularization, torch.finfo(system.dtype).eps)
        system.diagonal(dim1=1, dim2=2).fill_(1 + ridge)
        return system, inverse_norms

    def _remember(self, z, r, state, in_place, check_every):
        """The history with the step that led to ``z`` in the next slot (the oldest goes)
        and its ``ΔRᵀ r``, the right-hand side of the least-squares problem."""
        slot = state.slot
        if in_place:
            # Straight into the slots, without temporaries: beside f, the passes over
            # memory are what a step costs on large batches.
            dr, dz_buffer = state.dr, state.dz_mixed
            dr_new = torch.sub(r, state.r, out=dr[:, slot])
            dz_mixed = torch.sub(z, state.z, out=dz_buffer[:, slot])
            dz_mixed.add_(dr_new, alpha=self.mixing)
        else:
            dr_new = r - state.r
            dr = store(state.dr, slot, dr_new)
            dz_mixed = torch.sub(z, state.z).add_(dr_new, alpha=self.mixing)
            dz_buffer = store(state.dz_mixed, slot, dz_mixed)
        # One pass over the history: ΔRᵀ r. The new row of the Gram matrix follows
        # without a second one: Δr_jᵀ Δr_new = Δr_jᵀ r − Δr_jᵀ r_prev for the columns
        # kept from the last step (whose ΔRᵀ r_prev is at hand), ‖Δr_new‖² for the new.
        rhs = project(upcast(dr), upcast(r))
        square = torch.linalg.vecdot(upcast(dr_new), upcast(dr_new))
        row = store(rhs - state.rhs, slot, square, dim=1)
        # A first step (no previous iterate) has Δr = 0 and is not usable. NaN fails the
        # test; an infinite Δr (a problem that blew up, which the driver has stopped)
        # gives non-finite coefficients and a restart.
        usable = square > 0
        if not known_all(usable, check_every):
            keep = usable.unsqueeze(1)
            dr = store(dr, slot, torch.where(keep, dr_new, 0))
            dz_buffer = store(dz_buffer, slot, torch.where(keep, dz_mixed, 0))
            row = torch.where(keep, row, 0)
            rhs = store(rhs, slot, torch.where(usable, rhs[:, slot], 0), dim=1)
        return _History(
            z=z,
            r=r,
            dr=dr,
            dz_mixed=dz_buffer,
            gram=store(store(state.gram, slot, row), slot, row, dim=2),
            rhs=rhs,
            slot=(slot + 1) % self.m,
        )
