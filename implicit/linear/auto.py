"""The default backward mode: a method chosen from the operator's size and structure."""

from __future__ import annotations

import dataclasses
import functools

import torch

from implicit._batch import check_interval
from implicit._results import check_number
from implicit.linear.base import (
    BREAKDOWN,
    CONVERGED,
    DIVERGED,
    MAX_ITER,
    Hint,
    JacobianOperator,
    LinearSolver,
)
from implicit.linear.cg import CG
from implicit.linear.dense import Dense
from implicit.linear.gmres import GMRES
from implicit.linear.iterative import IterativeSolver, Progress, norm, row_mask
from implicit.linear.neumann import Neumann

#: Iterations over which Neumann must halve a problem's residual to keep it.
_NEUMANN_WINDOW = 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class NeumannThenGMRES(IterativeSolver):
    """Neumann while it contracts well, then GMRES from where it got: for a shifted
    operator (a fixed point's adjoint); GMRES alone for any other.

    On ``A = ∂f/∂z − I`` with products of ``∂f/∂z`` at hand (the first-order backward
    of a fixed point), Neumann costs one product and one pass over the data per
    iteration, where GMRES adds its orthogonalisation: when ``f`` contracts well (a
    trained DEQ), Neumann gets there first. A problem whose residual does not halve
    over four iterations (a weak contraction, or none) goes on with GMRES from its
    current iterate (from zero if its residual grew beyond ``‖rhs‖``), within the same
    iteration budget. A problem whose Neumann residual stagnates at rounding level
    stops there (status ``"stagnated"``): GMRES, working with the same products, could
    not do better, and would only add its basis to the memory. ``LinearResult.method``
    says which ran.
    """

    name = "neumann+gmres"

    def iterate(self, operator, rhs, x, *, target, max_iter, allowed, preconditioner):
        used, codes, r, ran = 0, None, None, []
        if operator.shifted:
            ran.append("neumann")
            neumann = Neumann(give_up_after=_NEUMANN_WINDOW, check_every=self.check_every)
            x, codes, used, r, _ = neumann.iterate(
                operator, rhs, x, target=target, max_iter=max_iter, allowed=allowed
            )
            # (Every code converged, the smallest, is read in one operation where the
            # loop reads the host each iteration.)
            if used >= max_iter or (
                check_interval(self.check_every, rhs) == 1 and int(codes.max()) == CONVERGED
            ):
                return Progress(x, codes, used, r, "+".join(ran))
            allowed = allowed & ((codes == MAX_ITER) | (codes == DIVERGED))
            if not bool(allowed.any()):
                return Progress(x, codes, used, r, "+".join(ran))
            grew = allowed & ~(norm(r) <= norm(rhs))
            x = torch.where(row_mask(grew), 0, x)
        ran.append("gmres")
        x, gmres_codes, more, r, _ = GMRES(check_every=self.check_every).iterate(
            operator,
            rhs,
            x,
            target=target,
            max_iter=max_iter - used,
            allowed=allowed,
            preconditioner=preconditioner,
        )
        codes = gmres_codes if codes is None else torch.where(allowed, gmres_codes, codes)
        return Progress(x, codes, used + more, r, "+".join(ran))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CGThenGMRES(IterativeSolver):
    """CG for an operator known symmetric positive definite; GMRES for the problems on
    which CG breaks down.

    A positive-definite claim may be wrong (a Lanczos estimate of the smallest
    eigenvalue, a Hessian that is not quite symmetric in floating point): CG then meets
    a curvature ``pᵀAp ≤ 0`` and stops that problem with status ``"breakdown"``, which
    goes on with GMRES from zero within the same iteration budget; the others keep
    CG's answer. ``LinearResult.method`` says which ran (``"cg"`` or ``"cg+gmres"``).
    """

    name = "cg"

    def iterate(self, operator, rhs, x, *, target, max_iter, allowed, preconditioner):
        x, codes, used, _, _ = CG(check_every=self.check_every).iterate(
            operator,
            rhs,
            x,
            target=target,
            max_iter=max_iter,
            allowed=allowed,
            preconditioner=preconditioner,
        )
        broken = allowed & (codes == BREAKDOWN)
        if used >= max_iter or not bool(broken.any()):
            return Progress(x, codes, used, None, "cg")
        # Along a direction of non-positive curvature CG's iterate may be far off.
        x = torch.where(row_mask(broken), 0, x)
        x, gmres_codes, more, r, _ = GMRES(check_every=self.check_every).iterate(
            operator,
            rhs,
            x,
            target=target,
            max_iter=max_iter - used,
            allowed=broken,
            preconditioner=preconditioner,
        )
        codes = torch.where(broken, gmres_codes, codes)
        return Progress(x, codes, used + more, r, "cg+gmres")


@dataclasses.dataclass(frozen=True)
class _Chosen:
    """Auto's state: the method it chose and that method's state."""

    solver: LinearSolver
    state: object


@dataclasses.dataclass(frozen=True, kw_only=True)
class Auto(LinearSolver):
    """The default backward mode: a method chosen from the operator's size and
    structure ([`choose`][implicit.linear.Auto.choose]).

    * [`Dense`][implicit.linear.Dense] up to ``max_dense`` unknowns per problem;
    * above, [`CG`][implicit.linear.CG] where the operator is known symmetric positive
      definite (the Hessian of [`minimize`][implicit.minimize] or
      [`least_squares`][implicit.least_squares] where the forward verified a strict
      minimum: see [`PositiveDefinite`][implicit.linear.PositiveDefinite]), with
      [`GMRES`][implicit.linear.GMRES] for the problems on which CG breaks down (the
      claim was wrong);
    * for the adjoint of a fixed point ``z = f(z)`` (a shifted operator, in the
      first-order backward), [`Neumann`][implicit.linear.Neumann] while it contracts
      well and [`GMRES`][implicit.linear.GMRES] from where it got for the problems
      whose residual does not halve over four iterations, except those whose residual
      has stagnated at the rounding level of the dtype (status ``"stagnated"``: no
      method can do better with these products), so that the memory stays that of
      Neumann for a tolerance below what the dtype resolves;
    * [`GMRES`][implicit.linear.GMRES] for every other system.

    ``info.backward.method`` says which ran (``"dense"``, ``"dense+refine"`` after
    Newton as for `Dense`, ``"cg"``, ``"cg+gmres"``, ``"neumann"``, ``"neumann+gmres"``
    or ``"gmres"``). A per-call initial guess and preconditioner go to the chosen method.

    Args:
        max_dense: largest number of unknowns per problem solved densely.
        tol: handed to the chosen solver (``None``: the front door's ``tol``).
        max_iter: handed to the chosen solver (``None``: the front door's
            ``max_iter``).
        check_every: handed to the chosen iterative method (see
            [`IterativeSolver`][implicit.linear.IterativeSolver]).
    """

    name = "auto"

    max_dense: int = 64
    check_every: int | None = None
    #: The method up to ``max_dense`` unknowns, with this solver's ``tol`` and
    #: ``max_iter``: the differentiable solve hands a problem of that size to it
    #: directly, its choice made once per call.
    dense: Dense = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.max_dense, "max_dense", "an integer >= 0")
        if self.check_every is not None:
            check_number(self.check_every, "check_every", "an integer >= 1")
        object.__setattr__(self, "dense", _configured(Dense, self.tol, self.max_iter))

    def choose(self, operator: JacobianOperator) -> LinearSolver:
        """The method for ``operator`` (see above)."""
        if operator.shape[1] <= self.max_dense:
            return self.dense
        if operator.positive_definite:
            method = CGThenGMRES
        elif operator.shifted:
            method = NeumannThenGMRES
        else:
            method = GMRES
        return _configured(method, self.tol, self.max_iter, self.check_every)

    def uses(self, hint: Hint, shape: tuple[int, int]) -> bool:
        return shape[1] <= self.max_dense and self.dense.uses(hint, shape)

    def init(self, operator: JacobianOperator, hint: Hint | None = None) -> _Chosen:
        chosen = self.choose(operator)
        accepted = hint if hint is not None and chosen.uses(hint, tuple(operator.shape)) else None
        return _Chosen(chosen, chosen.init(operator, accepted))

    def transpose(self, state: _Chosen) -> _Chosen:
        return _Chosen(state.solver, state.solver.transpose(state.state))

    def solve(self, state, rhs, *, tol, max_iter, x0=None, preconditioner=None):
        if isinstance(state, JacobianOperator):
            state = self.init(state)
        chosen: LinearSolver = state.solver
        result = chosen.solve(
            state.state, rhs, tol=tol, max_iter=max_iter, x0=x0, preconditioner=preconditioner
        )
        return dataclasses.replace(result, method=result.method or chosen.name)


@functools.cache
def _configured(
    method: type[LinearSolver],
    tol: float | None,
    max_iter: int | None,
    check_every: int | None = None,
):
    """``method(tol=tol, max_iter=max_iter)`` (and ``check_every`` where set), made once
    (instances are immutable)."""
    if check_every is None:
        return method(tol=tol, max_iter=max_iter)
    return method(tol=tol, max_iter=max_iter, check_every=check_every)
