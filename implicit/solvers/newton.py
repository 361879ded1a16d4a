"""Newton's method: dense per-sample Jacobians, or matrix-free Newton–Krylov.

The iteration, its line search and the reuse of factorisations are here; the direction
each step solves for, dense or by GMRES, is in ``_newton_direction.py``.
"""

from __future__ import annotations

import dataclasses

import torch

from implicit._batch import Factorization, check_interval, known_all, norms
from implicit._results import check_number
from implicit.linear import GMRES, JacobianOperator, NearbyFactorization
from implicit.solvers._line_search import (
    Search,
    frozen_rows,
    records_rejected_trials,
    squared_norm,
)
from implicit.solvers._newton_direction import dense_direction, krylov_direction
from implicit.solvers.base import Solver

#: Step halvings the line search may try after the full Newton step (t ≥ 2⁻²⁰).
HALVINGS = 20


@dataclasses.dataclass
class _NewtonState:
    """What one Newton step leaves for the next.

    Attributes:
        linearization: ``∂g/∂z`` at the points the last step evaluated (every sample's
            trial: its new iterate where it passed); None before the first step.
        frozen: ``(B,)`` rows the driver has stopped.
        initial_norm: ``‖g(z₀)‖`` per sample, the scale of the Krylov forcing term.
        proposed: the iterate the last step proposed (to recognise frozen rows).
        pending: ``(B,)`` samples whose line search goes on from their iterate (their
            last trial failed), None if none; ``search`` holds their directions.
        search: the line search of the pending samples.
        factors: the dense factorisation the last direction came from (None: none, or
            a Krylov step).
        reused: whether the current directions came from reused factors.
        reusable: whether the next step may reuse ``factors`` (``jacobian_reuse``).
    """

    linearization: JacobianOperator | None
    frozen: torch.Tensor
    initial_norm: torch.Tensor
    proposed: torch.Tensor | None = None
    pending: torch.Tensor | None = None
    search: Search | None = None
    factors: Factorization | None = None
    reused: bool = False
    reusable: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Newton(Solver):
    """Newton's method with a backtracking line search: the default of
    [`root_solve`][implicit.root_solve].

    For problems that are not contractive fixed points, or when few iterations matter
    more than cheap ones: convergence is quadratic near a root with a non-singular
    Jacobian. Each iteration solves ``(∂g/∂z) d = −g(z)`` per sample, either

    * **dense**: the per-sample Jacobian ``(B, n, n)`` from ``n`` vector-Jacobian
      products (``torch.func``) and a batched LU solve; or
    * **krylov**: matrix-free Newton–Krylov, GMRES on Jacobian-vector products, to a
      relative tolerance ``η = min(0.1, ‖g(z)‖/‖g(z₀)‖)`` (at least ``√eps``; the
      ``krylov`` instance's own ``tol`` replaces it), so the inner solve tightens as
      the outer one converges.

    The line search is per sample and takes one trial per iteration: a sample whose
    trial does not decrease ``½‖g‖²`` enough (Armijo) stays where it is and tries half
    the step at the next iteration, while the samples that passed take their next
    Newton step. So every trial counts against ``max_iter``, a batch evaluates ``g``
    about as often as its slowest sample needs, and an iteration of a batch may be a
    trial for some of its samples. After 20 halvings, or when the step no longer
    changes ``z``, a sample starts the same search again: one whose every trial fails
    stays where it is until ``max_iter``.

    A singular Jacobian block (or one whose Newton step is not finite) gets the
    damped least-squares (Levenberg–Marquardt) step
    ``d = −(JᵀJ + μI)⁻¹ Jᵀ g`` with ``μ = √eps · ‖J‖²_F / n``, which is finite and
    still decreases ``‖g‖`` where any step can; at a point where ``Jᵀg = 0`` (a
    stationary point of ``‖g‖²`` that is not a root) it is zero, the sample stays
    there and ends with status ``"max_iter"``: never NaN.

    Cost per iteration: one evaluation of ``g`` at every sample's trial point (it
    also provides the next linearisation; one more at the start); plus, unless every
    sample is still searching, ``n`` vector-Jacobian products (dense, counted in
    ``SolveInfo.jac_evals``) or the GMRES products (krylov). Under
    ``backward="unroll"``, an iteration in which some sample does not take its trial
    evaluates ``g`` once more, at the points kept, so that rejected trials stay out of
    the recorded graph.

    With ``jacobian_reuse=θ`` (dense steps only) a step reuses the previous step's
    factorisation (modified Newton, the chord method with refreshes) while the previous
    step reduced every sample's ``‖g‖`` by at least the factor ``θ`` and none failed
    its line search; otherwise it builds and factorises a fresh Jacobian, and samples
    whose reused direction failed start again from it. Reused steps converge linearly
    but cost one evaluation of ``g`` and a triangular solve: worth it where the
    Jacobian dominates (many unknowns per sample; e.g. 64 problems of 100 unknowns,
    where it costs some 50 evaluations of ``g``). The decision to refresh is the
    batch's, so a sample's iterates depend on the others'.

    Args:
        linear: ``"dense"``, ``"krylov"``, or ``"auto"``: dense when the problem has
            at most ``max_dense`` unknowns per sample, and under
            ``backward="unroll"`` (the Krylov inner solve cannot be differentiated
            through; ``"krylov"`` raises there).
        krylov: the [`GMRES`][implicit.linear.GMRES] instance for the Krylov inner
            solve (its ``restart``, ``preconditioner``, ``tol``, ``max_iter``);
            default ``GMRES()`` with the adaptive tolerance above and at most 100
            iterations.
        line_search: backtrack on ``½‖g‖²``; ``False`` always takes the full step.
        max_dense: the ``"auto"`` threshold on unknowns per sample.
        jacobian_reuse: ``θ`` in ``(0, 1)``: reuse the factorisation while each step
            reduces every sample's residual norm at least ``θ``-fold (see above);
            ``None``: a fresh Jacobian at every step.
        check_every: see [`Solver`][implicit.solvers.Solver].
    """

    name = "newton"

    linear: str = "auto"
    krylov: GMRES | None = None
    line_search: bool = True
    max_dense: int = 64
    jacobian_reuse: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.linear not in ("auto", "dense", "krylov"):
            raise ValueError(f"linear must be 'auto', 'dense' or 'krylov', got {self.linear!r}")
        if self.krylov is not None and not isinstance(self.krylov, GMRES):
            raise TypeError(
                f"krylov must be an implicit.linear.GMRES instance or None, "
                f"got {type(self.krylov).__name__}"
            )
        check_number(self.max_dense, "max_dense", "an integer >= 0")
        reuse = self.jacobian_reuse
        if reuse is not None and not (
            isinstance(reuse, (int, float)) and not isinstance(reuse, bool) and 0 < reuse < 1
        ):
            raise ValueError(f"jacobian_reuse must be a number in (0, 1) or None, got {reuse!r}")
        object.__setattr__(self, "line_search", bool(self.line_search))

    def init(self, fn, z, r):
        return _NewtonState(
            linearization=None,
            frozen=torch.zeros(z.shape[0], dtype=torch.bool, device=z.device),
            initial_norm=norms(r),
        )

    def step(self, fn, z, r, state):
        frozen = frozen_rows(z, state.proposed, state.frozen)
        pending, search = state.pending, state.search
        if state.reused and pending is not None:
            # A reused direction failed: those samples start again from a fresh Jacobian
            # rather than halve a direction that may not descend.
            pending = search = None
        reused, factors = False, state.factors
        interval = check_interval(self.check_every, z)
        if pending is None or not known_all(pending, interval):
            # A new direction where the linearisation is at the iterate: every sample
            # but those still searching from theirs.
            jacobian = state.linearization
            if jacobian is None:
                _, jacobian = fn.linearize(z)
            waiting = frozen if pending is None else frozen | pending
            if state.reusable:
                reused, direction, slope = True, -factors.solve(r), None
            else:
                direction, slope, factors = self._direction(
                    fn, jacobian, z, r, state.initial_norm, waiting, interval
                )
            fresh = Search(direction, slope, base=squared_norm(r))
            search = fresh if pending is None else search.merged(pending, fresh)
        if self.line_search:
            z_trial = search.trial(z)
            r_trial, linearization = fn.linearize(z_trial)
            verdict = search.judge(
                z, r, z_trial, r_trial, skip=frozen, halvings=HALVINGS, check_every=interval
            )
            if records_rejected_trials(verdict):
                verdict.r, linearization = fn.linearize(verdict.z)
            z_new, r_new, pending, search = verdict.z, verdict.r, verdict.pending, verdict.search
        else:
            z_new = z + search.direction
            r_new, linearization = fn.linearize(z_new)
            pending, search = None, None
        state = dataclasses.replace(
            state,
            linearization=linearization,
            frozen=frozen,
            proposed=z_new,
            pending=pending,
            search=search,
            factors=factors,
            reused=reused,
            reusable=self._reusable(factors, pending, frozen, r, r_new),
        )
        return z_new, r_new, state

    def hint(self, state: _NewtonState) -> NearbyFactorization | None:
        """The factorisation of the last dense step (a point a step from the root), for
        a dense backward to refine."""
        return None if state.factors is None else NearbyFactorization(state.factors)

    def _reusable(self, factors, pending, frozen, r, r_new) -> bool:
        """Whether the next step may reuse ``factors``: every sample still running
        reduced its residual norm ``jacobian_reuse``-fold, and none is searching."""
        if self.jacobian_reuse is None or factors is None or pending is not None:
            return False
        contracted = squared_norm(r_new) <= self.jacobian_reuse**2 * squared_norm(r)
        return bool((contracted | frozen).all())

    def _direction(self, fn, jacobian, z, r, initial_norm, waiting, interval):
        """The Newton direction of every sample, its slope (None: ``−‖g‖²``) and the
        factorisation it came from (None for a Krylov or damped step), reading the
        host only where the loop does every ``interval == 1`` iteration."""
        if self._dense(z, r):
            fn.jac_evals += 1  # built from a linearisation that fn has already counted
            return dense_direction(jacobian.dense(), r, interval)
        direction, slope = krylov_direction(
            self.krylov, self.check_every, jacobian, r, initial_norm, waiting, interval
        )
        return direction, slope, None

    def _dense(self, z, r):
        if self.linear != "auto":
            return self.linear == "dense"
        # GMRES cannot be differentiated through (backward="unroll"): dense is.
        return z.shape[1] <= self.max_dense or (torch.is_grad_enabled() and r.requires_grad)
