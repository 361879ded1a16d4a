"""Dense solves: materialise ``A`` per problem and LU-factorise it, or refine a nearby
factorisation that the forward solver left (Newton's last step); the condition estimate
from the LU factors."""

from __future__ import annotations

import dataclasses
import math

import torch

from implicit._batch import known_all, lu_factor, lu_solve
from implicit._results import check_number, condition_limit, flag_ill_conditioned
from implicit.linear.base import (
    BREAKDOWN,
    CONVERGED,
    NONFINITE,
    Hint,
    JacobianOperator,
    LinearResult,
    LinearSolver,
    NearbyFactorization,
)
from implicit.linear.iterative import norm, row_mask, safe_div

#: Products that iterative refinement may use before a dense solve builds the Jacobian.
REFINEMENTS = 5
#: ``B·n³`` (the order of the work of building and factorising ``B`` Jacobian blocks of
#: ``n`` unknowns) below which a dense solve does not refine: there the direct solve
#: costs no more than refinement's few sequential products (benchmarks/seed_newton.py).
REFINE_MIN_WORK = 2**16
#: A free condition estimate this far below the limit is not refined: on random
#: matrices (and triangular ones, the hardest), the free estimate was never below 1/2000
#: of κ₁, and below 1/200 in 1% of them.
_REFINE_BELOW_LIMIT = 100.0


@dataclasses.dataclass(frozen=True)
class _Factored:
    """``A``'s blocks (``matrix``) and the LU factors of the system solved: ``A``, or
    ``AᵀA + ridge·I``; ``adjoint``: solve with ``Aᵀ`` (the transpose of the state)."""

    matrix: torch.Tensor
    system: torch.Tensor
    lu: torch.Tensor
    pivots: torch.Tensor
    info: torch.Tensor
    adjoint: bool = False


@dataclasses.dataclass(frozen=True)
class _Refining:
    """A system to refine from ``nearby``; built and factorised only if that fails."""

    operator: JacobianOperator
    nearby: NearbyFactorization


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dense(LinearSolver):
    """Materialise ``A`` per problem (``n`` vector-Jacobian products) and LU-solve.

    Exact and the fastest choice for small ``n`` (up to a few hundred unknowns per
    problem). A direct solve cannot beat its conditioning, so a block counts as solved
    when its relative residual is at most ``max(tol, √eps)``. A block that LU cannot
    solve to that level (singular or numerically singular) gets the least-squares,
    minimum-norm answer of the pseudo-inverse instead and is reported as
    ``"breakdown"``. [`init`][implicit.linear.LinearSolver.init] factorises ``A``;
    [`transpose`][implicit.linear.LinearSolver.transpose] reuses the factors for ``Aᵀ``.

    ``ridge > 0`` damps an ill-conditioned Jacobian: it solves the Tikhonov system
    ``(AᵀA + ridge·I) x = Aᵀ rhs`` (the minimiser of ``‖A x − rhs‖² + ridge·‖x‖²``),
    whatever the signs of ``A``'s eigenvalues. The status then says whether that damped
    system was solved; the reported residual is still the one of ``A x = rhs``, so it
    shows how far the damped answer is from the exact one.

    **After Newton** (dense inner solve), the backward at the root does not build the
    Jacobian again: Newton's last step factorised it at a point a step away (a
    [`NearbyFactorization`][implicit.linear.NearbyFactorization] hint), and iterative
    refinement with that factorisation (one vector-Jacobian product with the exact
    Jacobian per correction, usually two to four) reaches the direct solve's rounding
    level. Where it would not (a step too long, an ill-conditioned Jacobian) the
    Jacobian is built and factorised after all; ``info.backward.method`` says
    ``"dense+refine"`` when refinement sufficed. Only without ``ridge``, in the
    first-order backward, and where ``n > 5`` and ``B·n³`` (batch times unknowns
    cubed) is at least ``2¹⁶``: elsewhere building the Jacobian costs no more than the
    products. The factorisation (``B·n²`` numbers) is then kept from the forward to the
    backward. The same holds where [`Auto`][implicit.linear.Auto] (the default) picks
    ``Dense``.

    Args:
        ridge: Tikhonov damping (default 0: exact).
        chunk_size: build the Jacobian this many rows at a time (memory bound).
        tol: a block counts as solved when its relative residual is at most
            ``max(tol, √eps)``; ``None`` takes the front door's ``tol``.
        max_iter: accepted for a uniform interface; a direct solve does not iterate.
    """

    name = "dense"

    ridge: float = 0.0
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.ridge, "ridge", "a finite number >= 0")
        if self.chunk_size is not None:
            check_number(self.chunk_size, "chunk_size", "an integer >= 1")
        object.__setattr__(self, "ridge", float(self.ridge))

    def uses(self, hint: Hint, shape: tuple[int, int]) -> bool:
        """Whether a system of ``shape = (B, n)`` is refined from a
        [`NearbyFactorization`][implicit.linear.NearbyFactorization] (see above)."""
        batch, n = shape
        # With n ≤ REFINEMENTS the direct solve's n products (batched) are never more.
        return (
            isinstance(hint, NearbyFactorization)
            and not self.ridge
            and n > REFINEMENTS
            and batch * n**3 >= REFINE_MIN_WORK
        )

    def init(self, operator: JacobianOperator, hint: Hint | None = None):
        if hint is not None and self.uses(hint, tuple(operator.shape)):
            return _Refining(operator, hint)
        return self.factor(operator.dense(self.chunk_size))

    def factor(self, matrix: torch.Tensor) -> _Factored:
        """The state for the ``(B, n, n)`` blocks ``matrix`` of ``A``, already at hand."""
        system = matrix
        if self.ridge:
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            system = matrix.mT @ matrix + self.ridge * eye
        return _Factored(matrix, system, *lu_factor(system))

    def transpose(self, state):
        if isinstance(state, _Refining):
            return _Refining(state.operator.transpose(), state.nearby)
        if self.ridge:  # (AAᵀ + ridge·I) is another system
            return self.factor(state.matrix.mT)
        return dataclasses.replace(state, adjoint=not state.adjoint)

    def solve(self, state, rhs, *, tol, max_iter=1, x0=None, preconditioner=None):
        if isinstance(state, JacobianOperator):
            state = self.init(state)
        if isinstance(state, _Refining):
            refined = _refine(state.operator, state.nearby, rhs, tol)
            if refined is not None:
                return refined
            state = self.factor(state.operator.dense(self.chunk_size))
        matrix = state.matrix.mT if state.adjoint else state.matrix
        right = rhs.unsqueeze(-1)
        if self.ridge:
            right = matrix.mT @ right
        x = lu_solve(state.lu, state.pivots, right, adjoint=state.adjoint)
        accept = max(tol, math.sqrt(torch.finfo(rhs.dtype).eps))
        # The residual of A x = rhs is the one reported; without damping it is also the
        # one that decides.
        residual = _relative_residual(matrix, x, rhs.unsqueeze(-1))
        system = state.system.mT if state.adjoint else state.system
        damped = _relative_residual(system, x, right) if self.ridge else residual
        solved = (state.info == 0) & (damped <= accept)
        condition = condition_from_factors(
            system, state.lu, state.pivots, x, right, adjoint=state.adjoint
        )
        if not known_all(solved):
            # A non-finite matrix has no least-squares answer (and would make the SVD fail).
            fallback = ~solved & torch.isfinite(system).flatten(1).all(dim=1)
            if bool(fallback.any()):
                x[fallback] = torch.linalg.pinv(system[fallback]) @ right[fallback]
                residual = _relative_residual(matrix, x, rhs.unsqueeze(-1))
        x = x.squeeze(-1)
        finite = torch.isfinite(residual) & torch.isfinite(x).all(dim=1)
        codes = torch.where(finite, torch.where(solved, CONVERGED, BREAKDOWN), NONFINITE)
        codes = flag_ill_conditioned(codes, condition)
        return LinearResult(x, residual, codes, 1, condition=condition)


def _refine(
    operator: JacobianOperator, nearby: NearbyFactorization, rhs: torch.Tensor, tol: float
) -> LinearResult | None:
    """``A x = rhs`` by iterative refinement with the factorisation of a nearby
    operator, or None if it leaves a problem above ``tol`` (relative residual; at least
    rounding level).

    ``x ← x + M (rhs − A x)``, ``M`` the nearby inverse, one product per correction.
    Each correction multiplies the residual by about ``‖I − A M‖``, the relative
    distance of the two operators (for Newton's last step at a tolerance of 1e-10,
    about 1e-5), so two to four products reach rounding level. As LAPACK's
    refinement (``?gerfs``) does, it goes on to rounding level whatever ``tol``, and
    stops there, when the residual no longer halves, or after ``REFINEMENTS`` products.
    """
    rhs_norm = norm(rhs)
    # What a direct solve leaves: a relative residual of one or two eps.
    rounding = 4 * torch.finfo(rhs.dtype).eps
    transposed = operator.transposed
    x = nearby.solve(rhs, transposed=transposed)
    x_best = best = None
    for products in range(1, REFINEMENTS + 1):
        correction = rhs - operator.mv(x)
        residual = safe_div(norm(correction), rhs_norm)
        if best is None:
            x_best, best, halved = x, residual, torch.ones_like(residual, dtype=torch.bool)
        else:
            # Per problem, the better of the last two (NaN is never better).
            better = residual <= best
            halved = (residual <= best / 2) | (residual <= rounding)
            x_best = torch.where(row_mask(better), x, x_best)
            best = torch.where(better, residual, best)
        if products == REFINEMENTS or bool((best <= rounding).all() | ~halved.all()):
            break
        x = x + nearby.solve(correction, transposed=transposed)
    if not bool((best <= max(tol, rounding)).all()):
        return None
    codes = torch.full_like(best, CONVERGED, dtype=torch.long)
    # The nearby matrix stands in for A: its factors are those of (∂g/∂z)ᵀ, A's own
    # (transposed) or its transpose.
    factors = nearby.factorization
    permutation, lower, upper = torch.lu_unpack(factors.lu, factors.pivots)
    matrix = permutation @ lower @ upper
    condition = condition_from_factors(
        matrix if transposed else matrix.mT,
        factors.lu,
        factors.pivots,
        x_best.unsqueeze(-1),
        rhs.unsqueeze(-1),
        adjoint=not transposed,
    )
    codes = flag_ill_conditioned(codes, condition)
    return LinearResult(x_best, best, codes, products, "dense+refine", condition)


def _relative_residual(matrix: torch.Tensor, x: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``‖matrix · x − rhs‖ / ‖rhs‖`` per block (0 where ``rhs = 0``), for ``x`` and
    ``rhs`` of shape ``(B, n, 1)``."""
    residual = torch.linalg.vector_norm(matrix @ x - rhs, dim=(1, 2))
    size = torch.linalg.vector_norm(rhs, dim=(1, 2))
    return torch.where(size != 0, residual / size, 0)


def condition_from_factors(
    matrix: torch.Tensor,
    lu: torch.Tensor,
    pivots: torch.Tensor,
    x: torch.Tensor,
    rhs: torch.Tensor,
    *,
    adjoint: bool,
) -> torch.Tensor:
    """An estimate of ``κ₁(M)`` per block, ``M`` the ``(B, n, n)`` ``matrix`` solved,
    from the LU factors of ``M`` (``adjoint=False``) or of ``Mᵀ`` (``adjoint=True``) and
    a solve ``M x = rhs`` already made (``x``, ``rhs`` of shape ``(B, n, 1)``).

    Free: the larger of the pivot ratio ``max|uᵢᵢ| / min|uᵢᵢ|`` and
    ``‖M‖₁ ‖x‖₁/‖rhs‖₁``. Where that comes within a factor ``_REFINE_BELOW_LIMIT`` of
    the limit, Hager's estimator refines it, as LAPACK's ``?gecon`` does (Higham,
    *Accuracy and Stability of Numerical Algorithms*, §15.3): ``‖M⁻¹ c‖₁`` for the
    probes ``c = 1/n`` and Higham's alternating vector, then one step of the ascent
    ``c = e_j``, ``j = argmax |M⁻ᵀ sign(M⁻¹ 1)|``; three solves with the factors, for
    the blocks that need them only. On random matrices the result was within a factor
    2 of ``κ₁``. A singular block reads ``inf``.
    """
    norm_m = torch.linalg.matrix_norm(matrix, ord=1)
    diagonal = lu.diagonal(dim1=-2, dim2=-1).abs()
    smallest = diagonal.amin(dim=-1)
    ratio = diagonal.amax(dim=-1) / torch.where(smallest > 0, smallest, 0)
    rhs_size = rhs.abs().sum(dim=(1, 2))
    amplified = norm_m * x.abs().sum(dim=(1, 2)) / torch.where(rhs_size > 0, rhs_size, 1)
    # (fmax: a singular block's NaN solution leaves its infinite pivot ratio.)
    estimate = torch.fmax(ratio, amplified).to(matrix.dtype)
    limit = condition_limit(estimate.dtype)
    suspect = torch.isfinite(estimate) & (estimate > limit / _REFINE_BELOW_LIMIT)
    if not bool(suspect.any()):
        return estimate
    rows = suspect.nonzero().squeeze(1)
    inverse_norm = _hager(lu[rows], pivots[rows], adjoint)
    refined = torch.maximum(estimate[rows], norm_m[rows] * inverse_norm)
    return estimate.index_put((rows,), refined)


def _hager(lu: torch.Tensor, pivots: torch.Tensor, adjoint: bool) -> torch.Tensor:
    """A lower estimate of ``‖M⁻¹‖₁`` per block (see :func:`condition_from_factors`)."""
    batch, n = lu.shape[:2]

    def solve(c: torch.Tensor, transposed: bool) -> torch.Tensor:
        return lu_solve(lu, pivots, c, adjoint=adjoint != transposed)

    index = torch.arange(n, dtype=lu.dtype, device=lu.device)
    alternating = (1 - 2 * (index % 2)) * (1 + index / max(n - 1, 1))
    probes = torch.stack((torch.full_like(index, 1 / n), alternating), dim=1)
    solved = solve(probes.expand(batch, n, 2), False)
    sizes = solved.abs().sum(dim=1)  # (B, 2)
    estimate = torch.maximum(sizes[:, 0], 2 * sizes[:, 1] / (3 * n))
    signs = torch.where(solved[:, :, :1] >= 0, 1.0, -1.0).to(lu.dtype)
    ascent = solve(signs, True).abs().argmax(dim=1)  # (B, 1)
    unit = torch.zeros(batch, n, 1, dtype=lu.dtype, device=lu.device)
    unit.scatter_(1, ascent.unsqueeze(-1), 1.0)
    return torch.maximum(estimate, solve(unit, False).abs().sum(dim=(1, 2)))
