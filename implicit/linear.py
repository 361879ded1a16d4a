"""Linear solvers for the implicit backward (and the forward-mode tangent).

The backward of every front door solves the adjoint system ``(∂g/∂z)ᵀ w = v``; forward
mode solves ``(∂g/∂z) dz = −(∂g/∂θ) dθ``. Both are handed to one of these solvers as an
operator ``A`` with products ``A x`` (and, for [`Dense`][implicit.linear.Dense], its
per-sample matrix).
Systems are batched: row ``b`` of ``x`` and ``rhs`` is problem ``b``, solved to its own
tolerance and frozen once solved. Problem ``b`` has converged when its *true* residual
satisfies ``‖A x_b − rhs_b‖₂ ≤ tol · ‖rhs_b‖₂``; a zero right-hand side has the solution
``x_b = 0``.

Choose by name (``backward="gmres"``) or by instance (``backward=GMRES(restart=30)``).
An instance's ``tol`` / ``max_iter`` default to the front door's.

Options of every iterative method ([`GMRES`][implicit.linear.GMRES],
[`BiCGStab`][implicit.linear.BiCGStab], [`CG`][implicit.linear.CG],
[`Neumann`][implicit.linear.Neumann]), all keyword-only:

- ``tol``: relative tolerance, ``‖A x − rhs‖₂ ≤ tol · ‖rhs‖₂`` per problem; ``None``
  takes the front door's ``tol``.
- ``max_iter``: iteration cap; ``None`` takes the front door's ``max_iter``.
- ``x0``: warm start: a tensor with the right-hand side's number of elements (reshaped
  to its flat ``(B, n)`` view) or broadcastable to it; ``"previous"`` (this instance's
  last solution when its shape, dtype and device match, else zero; e.g. across
  training steps); ``None`` (zero).
- ``preconditioner`` (not Neumann): ``preconditioner(r)`` takes a ``(B, n)`` tensor
  and returns ``M r ≈ A⁻¹ r`` per row, where ``A`` is the operator the solver sees (in
  the backward, the transposed Jacobian ``(∂g/∂z)ᵀ``; a diagonal preconditioner serves
  both). GMRES and BiCGStab apply it on the right (they minimise or reduce the true
  residual); CG needs ``M`` symmetric positive definite.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch

from implicit._batch import all_running, combine, known_all, project, row_selector
from implicit._blocks import solve
from implicit._checks import check_max_iter, check_tol
from implicit._operators import Operator
from implicit._results import BREAKDOWN, CONVERGED, MAX_ITER, NONFINITE

__all__ = [
    "CG",
    "GMRES",
    "NAMES",
    "Auto",
    "BiCGStab",
    "Dense",
    "LinearResult",
    "LinearSolver",
    "Neumann",
    "OneStep",
    "Phantom",
    "Unroll",
    "resolve",
]

#: Products that iterative refinement may use before a dense solve builds the Jacobian.
REFINEMENTS = 5
#: ``B·n³`` (the order of the work of building and factorising ``B`` Jacobian blocks of
#: ``n`` unknowns) below which a dense solve does not refine: there the direct solve
#: costs no more than refinement's few sequential products (measured on a CPU: equal
#: times for one problem of 24 unknowns or 64 of 12, refinement 1.2× faster for 64
#: of 16, 2.6× for 1,024 of 16, 10× for 64 of 100).
REFINE_MIN_WORK = 2**16

Preconditioner = Callable[[torch.Tensor], torch.Tensor]
WarmStart = torch.Tensor | Literal["previous"] | None


@dataclasses.dataclass
class LinearResult:
    """The outcome of a batched linear solve.

    Attributes:
        x: the solution, shape ``(B, n)``.
        residual: the true relative residual ``‖A x − rhs‖ / ‖rhs‖`` per problem (0
            where ``rhs = 0``; NaN where the method does not measure it).
        codes: per-problem status codes (see ``implicit._results``).
        iterations: iterations taken (the maximum over problems).
        method: the method that ran, where a solver chooses among several
            (``"auto"``'s iterative choice); ``None`` means the solver's own name.
    """

    x: torch.Tensor
    residual: torch.Tensor
    codes: torch.Tensor
    iterations: int
    method: str | None = None


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (frozen or broken-down problems).

    The division by zero in the rows not taken is harmless: linear solves run where
    nothing records a graph (inside the implicit function's forward, or a first-order
    backward), so no gradient flows through it.
    """
    return torch.where(den != 0, num / den, 0)


def _rows(mask: torch.Tensor) -> torch.Tensor:
    """A per-problem mask ``(B,)`` as a mask over rows ``(B, 1)``."""
    return mask.unsqueeze(1)


def _codes(mask: torch.Tensor, if_true: int, if_false: int) -> torch.Tensor:
    return torch.where(mask, if_true, if_false)  # int64, as Python integers give


class LinearSolver(abc.ABC):
    """Solves ``A x = rhs`` for a batch of independent systems given as an operator.

    Args:
        tol: relative tolerance ``‖A x − rhs‖ ≤ tol · ‖rhs‖``; ``None`` takes the
            front door's ``tol``.
        max_iter: iteration cap; ``None`` takes the front door's ``max_iter``.
    """

    name: ClassVar[str]
    #: Whether the method solves the system (as opposed to approximating it by design).
    exact: ClassVar[bool] = True

    def __init__(self, *, tol: float | None = None, max_iter: int | None = None):
        if tol is not None:
            check_tol(tol, f"{type(self).__name__}(tol=...)")
        if max_iter is not None:
            check_max_iter(max_iter, f"{type(self).__name__}(max_iter=...)")
        self.tol = tol
        self.max_iter = max_iter

    @abc.abstractmethod
    def solve(self, op: Operator, rhs: torch.Tensor, *, tol: float, max_iter: int) -> LinearResult:
        """Solve ``op · x = rhs`` for ``rhs`` of shape ``(B, n)``."""

    def for_size(self, n: int) -> LinearSolver:
        """The solver to use for systems of ``n`` unknowns per problem.

        Itself, except for [`Auto`][implicit.linear.Auto], which picks by ``n``.
        """
        return self

    def refines(self, shape: tuple[int, int]) -> bool:
        """Whether this solver, for a system of ``shape = (B, n)``, would refine from the
        factorisation of a nearby operator (``Operator.nearby``) that the forward left:
        only [`Dense`][implicit.linear.Dense] does."""
        return False

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_")
        )
        return f"{type(self).__name__}({fields})"


class _Iterative(LinearSolver):
    """What every iterative method shares: warm start, per-problem stop, true residual.

    A method implements ``_iterate``, which runs its recurrences on the problems
    it is allowed to touch. ``solve`` then measures the true residual ``A x − rhs``
    (recurrences drift in floating point; a method that has just computed it, as a
    product, hands it back instead of having it computed twice): a problem the
    recurrence called converged but whose true residual is above the tolerance is
    restarted from its current ``x`` while the iteration budget lasts.

    Its options ``tol``, ``max_iter`` and ``x0`` are described in the module docstring.
    """

    def __init__(
        self, *, tol: float | None = None, max_iter: int | None = None, x0: WarmStart = None
    ):
        super().__init__(tol=tol, max_iter=max_iter)
        if not (
            x0 is None or isinstance(x0, torch.Tensor) or (isinstance(x0, str) and x0 == "previous")
        ):
            raise TypeError(f"x0 must be a tensor, 'previous' or None, got {x0!r}")
        self.x0 = x0
        self._previous: torch.Tensor | None = None

    def _initial(self, rhs: torch.Tensor) -> torch.Tensor | None:
        """The warm start, or ``None`` for zero (which needs no product to start from)."""
        if isinstance(self.x0, torch.Tensor):
            x0 = self.x0.detach().to(dtype=rhs.dtype, device=rhs.device)
            if x0.numel() == rhs.numel():
                return x0.reshape(rhs.shape)
            try:
                return x0.expand_as(rhs)
            except RuntimeError:
                raise ValueError(
                    f"x0 of shape {tuple(self.x0.shape)} does not fit the right-hand side "
                    f"of shape {tuple(rhs.shape)} (flat (batch, n) view)"
                ) from None
        previous = self._previous
        if (
            previous is not None
            and previous.shape == rhs.shape
            and previous.dtype == rhs.dtype
            and previous.device == rhs.device
        ):
            return previous
        return None

    def solve(self, op: Operator, rhs: torch.Tensor, *, tol: float, max_iter: int) -> LinearResult:
        rhs_norm = _norm(rhs)
        target = tol * rhs_norm
        # The solution of A x = 0 is x = 0, whatever the guess.
        x = self._initial(rhs)
        if x is not None:
            x = torch.where(_rows(rhs_norm == 0), 0, x)
        allowed = torch.ones_like(rhs_norm, dtype=torch.bool)
        codes = torch.full_like(rhs_norm, MAX_ITER, dtype=torch.long)
        iterations = 0
        while True:
            x, new_codes, used, true = self._iterate(
                op, rhs, x, target, max_iter - iterations, allowed
            )
            iterations += used
            residual = _norm(op.mv(x) - rhs if true is None else true)
            # The common end, every problem solved (a true residual at most the target is
            # finite, and so is the x it was computed from), needs no more bookkeeping.
            if bool((residual <= target).all()):
                codes = torch.full_like(codes, CONVERGED)
                break
            codes = torch.where(allowed, new_codes, codes)
            finite = torch.isfinite(residual) & torch.isfinite(x).all(dim=1)
            solved = finite & (residual <= target)
            allowed = (codes == CONVERGED) & ~solved & finite  # drifted: restart these
            if used == 0 or iterations >= max_iter or not bool(allowed.any()):
                codes = torch.where(
                    solved, CONVERGED, torch.where(codes == CONVERGED, MAX_ITER, codes)
                )
                codes = torch.where(finite, codes, NONFINITE)
                break
        if isinstance(self.x0, str):  # "previous"
            self._previous = x.detach().clone()
        # Relative, and 0 for a zero right-hand side (whose x is 0).
        return LinearResult(x, _safe_div(residual, rhs_norm), codes, iterations)

    @abc.abstractmethod
    def _iterate(
        self,
        op: Operator,
        rhs: torch.Tensor,
        x: torch.Tensor,
        target: torch.Tensor,
        max_iter: int,
        allowed: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """Iterate from ``x`` (``None``: zero) on the ``allowed`` problems until
        ``‖A x − rhs‖ ≤ target``.

        Returns ``x`` (rows of the other problems unchanged), the status codes of the
        allowed problems, the number of iterations taken, and ``±(A x − rhs)`` for the
        returned ``x`` when the method computed it as a product (not by a recurrence
        that may drift), else None.
        """


def _start(
    op: Operator, rhs: torch.Tensor, x: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The iterate to start from and its residual ``rhs − A x``: zero and ``rhs``, without
    a product, for ``x = None``."""
    return (torch.zeros_like(rhs), rhs) if x is None else (x, rhs - op.mv(x))


class _Krylov(_Iterative):
    """An iterative method with a warm start and a preconditioner (module docstring)."""

    def __init__(
        self,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        x0: WarmStart = None,
        preconditioner: Preconditioner | None = None,
    ):
        super().__init__(tol=tol, max_iter=max_iter, x0=x0)
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError("preconditioner must be callable: M(r) -> approximately A⁻¹ r")
        self.preconditioner = preconditioner

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        return r if self.preconditioner is None else self.preconditioner(r)


class Dense(LinearSolver):
    """Materialise ``A`` per problem (``n`` vector-Jacobian products) and LU-solve.

    Exact and the fastest choice for small ``n`` (up to a few hundred unknowns per
    problem). A direct solve cannot beat its conditioning, so a block counts as solved
    when its relative residual is at most ``max(tol, √eps)``. A block that LU cannot
    solve to that level (singular or numerically singular) gets the least-squares,
    minimum-norm answer of the pseudo-inverse instead and is reported as
    ``"breakdown"``.

    ``ridge > 0`` damps an ill-conditioned Jacobian: it solves the Tikhonov system
    ``(AᵀA + ridge·I) x = Aᵀ rhs`` (the minimiser of ``‖A x − rhs‖² + ridge·‖x‖²``),
    whatever the signs of ``A``'s eigenvalues. The status then says whether that damped
    system was solved; the reported residual is still the one of ``A x = rhs``, so it
    shows how far the damped answer is from the exact one.

    **After Newton** (dense inner solve), the backward at the root does not build the
    Jacobian again: Newton's last step factorised it at a point a step away, and
    iterative refinement with that factorisation (one vector-Jacobian product with the
    exact Jacobian per correction, usually two to four) reaches the direct solve's
    rounding level. Where it would not (a step too long, an ill-conditioned Jacobian)
    the Jacobian is built and factorised after all; ``info.backward.method`` says
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

    def __init__(
        self,
        *,
        ridge: float = 0.0,
        chunk_size: int | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
    ):
        super().__init__(tol=tol, max_iter=max_iter)
        if not (
            isinstance(ridge, (int, float))
            and not isinstance(ridge, bool)
            and ridge >= 0
            and math.isfinite(ridge)
        ):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
        self.ridge = float(ridge)
        self.chunk_size = chunk_size

    def solve(self, op: Operator, rhs: torch.Tensor, *, tol: float, max_iter: int) -> LinearResult:
        if op.nearby is not None and self.refines(rhs.shape):
            refined = _refine(op, rhs, tol)
            if refined is not None:
                return refined
        return self.solve_matrix(op.dense(self.chunk_size), rhs, tol=tol)

    def refines(self, shape: tuple[int, int]) -> bool:
        """Whether a system of ``shape = (B, n)`` is refined from a nearby
        factorisation (see above) rather than solved directly."""
        batch, n = shape
        # With n ≤ REFINEMENTS the direct solve's n products (batched) are never more.
        return not self.ridge and n > REFINEMENTS and batch * n**3 >= REFINE_MIN_WORK

    def solve_matrix(self, matrix: torch.Tensor, rhs: torch.Tensor, *, tol: float) -> LinearResult:
        """Solve with the ``(B, n, n)`` matrix already at hand."""
        system, right = matrix, rhs.unsqueeze(-1)
        if self.ridge:
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            system = matrix.mT @ matrix + self.ridge * eye
            right = matrix.mT @ right
        x, info = solve(system, right)
        accept = max(tol, math.sqrt(torch.finfo(rhs.dtype).eps))
        # The residual of A x = rhs is the one reported; without damping it is also the
        # one that decides.
        residual = _relative_residual(matrix, x, rhs.unsqueeze(-1))
        damped = _relative_residual(system, x, right) if self.ridge else residual
        solved = (info == 0) & (damped <= accept)
        if not known_all(solved):
            # A non-finite matrix has no least-squares answer (and would make the SVD fail).
            fallback = ~solved & torch.isfinite(system).flatten(1).all(dim=1)
            if bool(fallback.any()):
                x[fallback] = torch.linalg.pinv(system[fallback]) @ right[fallback]
                residual = _relative_residual(matrix, x, rhs.unsqueeze(-1))
        x = x.squeeze(-1)
        finite = torch.isfinite(residual) & torch.isfinite(x).all(dim=1)
        codes = torch.where(finite, _codes(solved, CONVERGED, BREAKDOWN), NONFINITE)
        return LinearResult(x, residual, codes, 1)


def _refine(op: Operator, rhs: torch.Tensor, tol: float) -> LinearResult | None:
    """``op · x = rhs`` by iterative refinement with the factorisation of a nearby
    operator (``op.nearby``), or None if it leaves a problem above ``tol`` (relative
    residual; at least rounding level).

    ``x ← x + M (rhs − op · x)``, ``M`` the nearby inverse, one product per correction.
    Each correction multiplies the residual by about ``‖I − op · M‖``, the relative
    distance of the two operators (for Newton's last step at a tolerance of 1e-10,
    about 1e-5), so two to four products reach rounding level. As LAPACK's
    refinement (``?gerfs``) does, it goes on to rounding level whatever ``tol``, and
    stops there, when the residual no longer halves, or after ``REFINEMENTS`` products.
    """
    rhs_norm = _norm(rhs)
    # What a direct solve leaves: a relative residual of one or two eps (measured).
    rounding = 4 * torch.finfo(rhs.dtype).eps
    x = op.nearby_solve(rhs)
    x_best = best = None
    for products in range(1, REFINEMENTS + 1):
        correction = rhs - op.mv(x)
        residual = _safe_div(_norm(correction), rhs_norm)
        if best is None:
            x_best, best, halved = x, residual, torch.ones_like(residual, dtype=torch.bool)
        else:
            # Per problem, the better of the last two (NaN is never better).
            better = residual <= best
            halved = (residual <= best / 2) | (residual <= rounding)
            x_best = torch.where(_rows(better), x, x_best)
            best = torch.where(better, residual, best)
        if products == REFINEMENTS or bool((best <= rounding).all() | ~halved.all()):
            break
        x = x + op.nearby_solve(correction)
    if not bool((best <= max(tol, rounding)).all()):
        return None
    codes = torch.full_like(best, CONVERGED, dtype=torch.long)
    return LinearResult(x_best, best, codes, products, "dense+refine")


def _relative_residual(matrix: torch.Tensor, x: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``‖matrix · x − rhs‖ / ‖rhs‖`` per block, for ``x`` and ``rhs`` of shape ``(B, n, 1)``."""
    return _safe_div(_norm((matrix @ x - rhs).squeeze(-1)), _norm(rhs.squeeze(-1)))


class CG(_Krylov):
    """Preconditioned conjugate gradients, for symmetric positive definite ``A``.

    Right for ``∂g/∂z`` that is the Hessian of a convex energy (``g = ∇E``). A
    problem whose curvature ``pᵀAp`` (or ``rᵀMr``) is not positive, so that ``A`` (or
    ``M``) is not SPD, stops with status ``"breakdown"`` instead of returning a
    silently wrong answer; a non-symmetric ``A`` that escapes this test is caught by
    the true-residual check.

    Takes the [options of every iterative method][implicit.linear] (``tol``,
    ``max_iter``, ``x0``, ``preconditioner``).
    """

    name = "cg"

    def _iterate(self, op, rhs, x, target, max_iter, allowed):
        x, r = _start(op, rhs, x)
        active = allowed & (_norm(r) > target)
        codes = _codes(active, MAX_ITER, CONVERGED)
        z = self._precondition(r)
        p = z
        rz = _dot(r, z)
        iterations = 0
        while iterations < max_iter and bool(active.any()):
            ap = op.mv(p)
            iterations += 1
            curvature = _dot(p, ap)
            broken = active & ~((curvature > 0) & (rz > 0))
            codes = torch.where(broken, BREAKDOWN, codes)
            active = active & ~broken
            alpha = _rows(_safe_div(rz, curvature))
            x = torch.where(_rows(active), x + alpha * p, x)
            r = torch.where(_rows(active), r - alpha * ap, r)
            done = active & (_norm(r) <= target)
            codes = torch.where(done, CONVERGED, codes)
            active = active & ~done
            z = self._precondition(r)
            rz_new = _dot(r, z)
            p = torch.where(_rows(active), z + _rows(_safe_div(rz_new, rz)) * p, p)
            rz = torch.where(active, rz_new, rz)
        return x, codes, iterations, None


class GMRES(_Krylov):
    """Restarted GMRES with right preconditioning, for any non-singular ``A``.

    The default Krylov method: it needs only products with ``A`` and minimises the
    residual over the Krylov space, so it handles the non-symmetric Jacobians of
    fixed-point and root problems. Each problem stops extending its Krylov space as
    soon as it has converged. A problem whose (preconditioned) operator turns out
    singular on its Krylov space stops with status ``"breakdown"``. Memory is
    ``restart + 1`` vectors per problem.

    Takes the [options of every iterative method][implicit.linear] (``tol``,
    ``max_iter``, ``x0``, ``preconditioner``).

    Args:
        restart: Krylov space dimension before a restart (capped at ``n``).
    """

    name = "gmres"

    def __init__(
        self,
        *,
        restart: int = 20,
        tol: float | None = None,
        max_iter: int | None = None,
        x0: WarmStart = None,
        preconditioner: Preconditioner | None = None,
    ):
        super().__init__(tol=tol, max_iter=max_iter, x0=x0, preconditioner=preconditioner)
        if isinstance(restart, bool) or not isinstance(restart, int) or restart < 1:
            raise ValueError(f"restart must be an integer >= 1, got {restart!r}")
        self.restart = restart

    def _iterate(self, op, rhs, x, target, max_iter, allowed):
        codes = torch.full_like(target, MAX_ITER, dtype=torch.long)
        active = allowed
        iterations = 0
        while True:
            x, r = _start(op, rhs, x)  # a product: exact, and handed back at the end
            solved = _norm(r) <= target
            codes = torch.where(active & solved, CONVERGED, codes)
            active = active & ~solved
            if iterations >= max_iter or not bool(active.any()):
                return x, codes, iterations, r
            steps = min(self.restart, rhs.shape[1], max_iter - iterations)
            x, broken, used = self._cycle(op, r, x, active, target, steps)
            codes = torch.where(broken, BREAKDOWN, codes)
            active = active & ~broken
            iterations += used

    def _cycle(self, op, r, x, active, target, steps):
        """One Arnoldi cycle of at most ``steps`` products; returns ``x``, breakdowns, steps."""
        batch, n = r.shape
        eps = torch.finfo(r.dtype).eps
        beta = _norm(r)
        # Rows are basis vectors: products with a row vector on the left are the fast
        # layout of batched matrix products on the CPU (einsum / matrix-vector are not).
        basis = r.new_empty(batch, steps + 1, n)  # every slot read is written first
        basis[:, 0] = r / _rows(torch.where(beta > 0, beta, 1))
        # The QR factorisation of the Hessenberg matrix by Givens rotations: R in
        # ``upper`` (an identity diagonal in the columns of problems that have stopped
        # extending), the product Q of the rotations kept as a matrix, so that a new
        # column is rotated by one small product rather than a loop over the rotations.
        upper = r.new_zeros(batch, steps, steps)
        rotations = torch.eye(steps + 1, dtype=r.dtype, device=r.device).repeat(batch, 1, 1)
        sizes = torch.zeros_like(beta, dtype=torch.long)  # Krylov dimension per problem
        broken = torch.zeros_like(active)
        alive = active
        used = 0
        # On the CPU the host checks whether every problem still extends its space:
        # then a step needs no per-problem selection (the common case).
        every = known_all(alive)
        for j in range(steps):
            w = op.mv(self._precondition(basis[:, j]))
            used += 1
            known = basis[:, : j + 1]
            # Classical Gram-Schmidt, batched; repeated ("twice is enough") when it
            # cancelled more than 90% of w, the only case in which one pass loses
            # orthogonality (about eps·‖w‖/‖w − Vh‖) beyond a few rounding errors. (The
            # classic DGKS threshold 1/√2 would repeat every step of a fixed point's
            # adjoint, whose A ≈ −I cancels half of w by design.)
            before = _norm(w)
            h = project(known, w)
            w = w - combine(known, h)
            h_next = _norm(w)
            cancelled = h_next < _REORTHOGONALIZE * before
            if bool((cancelled if every else alive & cancelled).any()):
                again = project(known, w)
                w = w - combine(known, again)
                h = h + again
                h_next = _norm(w)
            scale = torch.sqrt(_norm(h) ** 2 + h_next**2)
            column = torch.bmm(rotations[:, : j + 1, : j + 1], h.unsqueeze(2)).squeeze(2)
            pivot = column[:, j]
            radius = torch.hypot(pivot, h_next)
            # A vanishing pivot: A M is singular on this Krylov space; keep the previous x.
            singular = ~(radius > eps * scale)
            unit = _rows(torch.where(h_next > 0, h_next, 1))
            if every and not bool(singular.any()):
                cos, sin = _rows(pivot / radius), _rows(h_next / radius)
                upper[:, :j, j] = column[:, :j]
                upper[:, j, j] = radius
                basis[:, j + 1] = w / unit
                sizes = sizes + 1
            else:
                every = False
                singular = alive & singular
                broken = broken | singular
                alive = alive & ~singular
                safe = torch.where(alive, radius, 1)
                cos = _rows(torch.where(alive, pivot / safe, 1))
                sin = _rows(torch.where(alive, h_next / safe, 0))
                upper[:, :j, j] = torch.where(_rows(alive), column[:, :j], 0)
                upper[:, j, j] = safe
                basis[:, j + 1] = torch.where(_rows(alive), w / unit, 0)
                sizes = sizes + alive.long()
            # The new rotation acts on rows j and j + 1 of Q (row j + 1 is still e_{j+1}):
            # one 2 × 2 product per problem (five slice updates cost twice the calls).
            givens = torch.cat((cos, sin, -sin, cos), dim=1).view(batch, 2, 2)
            pair = torch.bmm(givens, rotations[:, j : j + 2, : j + 2])
            rotations[:, j : j + 2, : j + 2] = pair
            # |(Q β e₁)[j + 1]|: the residual norm of the least-squares solution so far.
            alive = alive & (beta * pair[:, 1, 0].abs() > target)
            every = every and bool(alive.all())
            if not (every or bool(alive.any())):
                break
        k = used
        g = beta.unsqueeze(1) * rotations[:, :k, 0]  # Q β e₁
        # Coefficients beyond a problem's own Krylov dimension are zero.
        g = torch.where(torch.arange(k, device=r.device) < sizes.unsqueeze(1), g, 0)
        y = torch.linalg.solve_triangular(upper[:, :k, :k], g.unsqueeze(-1), upper=True)
        step = self._precondition(combine(basis[:, :k], y.squeeze(-1)))
        return torch.where(_rows(active), x + step, x), broken, used


#: Orthogonalise again when a Gram-Schmidt pass leaves less than this fraction of ‖w‖.
_REORTHOGONALIZE = 0.1


class BiCGStab(_Krylov):
    """Preconditioned BiCGStab, for non-symmetric ``A`` with short recurrences.

    Two products per iteration and constant memory, against GMRES's growing basis;
    convergence is less smooth. A breakdown (the shadow residual orthogonal to the
    residual or to ``A p``, or a vanishing stabilisation step ``ω``) stops that problem
    with status ``"breakdown"`` at its last valid iterate. An iteration costs two
    products.

    Takes the [options of every iterative method][implicit.linear] (``tol``,
    ``max_iter``, ``x0``, ``preconditioner``).
    """

    name = "bicgstab"

    def _iterate(self, op, rhs, x, target, max_iter, allowed):
        eps = torch.finfo(rhs.dtype).eps
        x, r = _start(op, rhs, x)
        active = allowed & (_norm(r) > target)
        codes = _codes(active, MAX_ITER, CONVERGED)
        shadow = r
        shadow_norm = _norm(shadow)
        rho = alpha = omega = torch.ones_like(shadow_norm)
        v = p = torch.zeros_like(r)
        iterations = 0
        while iterations < max_iter and bool(active.any()):
            iterations += 1
            rho_new = _dot(shadow, r)
            beta = _safe_div(rho_new, rho) * _safe_div(alpha, omega)
            p = torch.where(_rows(active), r + _rows(beta) * (p - _rows(omega) * v), p)
            p_hat = self._precondition(p)
            v = op.mv(p_hat)
            shadow_v = _dot(shadow, v)
            # Near-orthogonality, relative to the vectors' sizes: the method cannot go on.
            broken = active & ~(
                (rho_new.abs() > eps * shadow_norm * _norm(r))
                & (shadow_v.abs() > eps * shadow_norm * _norm(v))
            )
            go = active & ~broken
            alpha = _safe_div(rho_new, shadow_v)
            s = r - _rows(alpha) * v
            x = torch.where(_rows(go), x + _rows(alpha) * p_hat, x)
            r = torch.where(_rows(go), s, r)
            half_done = go & (_norm(s) <= target)
            go = go & ~half_done
            s_hat = self._precondition(s)
            t = op.mv(s_hat)
            omega = _safe_div(_dot(t, s), _dot(t, t))
            x = torch.where(_rows(go), x + _rows(omega) * s_hat, x)
            r = torch.where(_rows(go), s - _rows(omega) * t, r)
            broken = broken | (go & (omega == 0))
            done = half_done | (go & (_norm(r) <= target))
            codes = torch.where(done, CONVERGED, torch.where(broken, BREAKDOWN, codes))
            active = active & ~done & ~broken
            rho = rho_new
        return x, codes, iterations, None


class Neumann(_Iterative):
    """The classic DEQ backward: fixed-point iteration on the adjoint equation.

    Iterates ``x ← x + damping · (A x − rhs)``. For a fixed-point problem
    ``g = f(z) − z`` the Jacobian is ``A = ∂f/∂z − I`` and, with ``damping = 1``,
    this is ``x ← (∂f/∂z)ᵀ x − rhs``: the truncated Neumann series of
    ``−(I − ∂f/∂z)⁻ᵀ rhs``. It converges when ``f`` is contractive; ``damping < 1``
    converges whenever the eigenvalues of ``∂f/∂z`` have real part below 1 and are
    small enough, more slowly. For general root problems use [`GMRES`][implicit.linear.GMRES]. One
    product per iteration, no extra memory. A problem whose iterate overflows stops at
    its last finite iterate with status ``"nonfinite"``.

    Takes the [options of every iterative method][implicit.linear] (``tol``,
    ``max_iter``, ``x0``).

    Args:
        damping: step size in ``(0, 1]``.
    """

    name = "neumann"
    #: Stop a problem whose residual has not halved over this many iterations
    #: (``None``: never); set by [`Auto`][implicit.linear.Auto]'s fixed-point method.
    _give_up_after: int | None = None

    def __init__(
        self,
        *,
        damping: float = 1.0,
        tol: float | None = None,
        max_iter: int | None = None,
        x0: WarmStart = None,
    ):
        super().__init__(tol=tol, max_iter=max_iter, x0=x0)
        if isinstance(damping, bool) or not (
            isinstance(damping, (int, float)) and 0 < damping <= 1
        ):
            raise ValueError(f"damping must be in (0, 1], got {damping!r}")
        self.damping = float(damping)

    def _iterate(self, op, rhs, x, target, max_iter, allowed):
        # With damping 1 and A = S − I (a fixed point's ∂g/∂z, S = ∂f/∂z), iterate on
        # products of S: x ← S x − rhs, whose residual is S x_new − S x (one pass over
        # the data per iteration, where A's products and the update take three).
        shifted = self.damping == 1 and op.shifted
        if not shifted:
            x, r = _start(op, rhs, x)
            r = -r  # A x − rhs, exact (a product) at every iterate
        elif x is None:
            q, r = None, -rhs  # S x = 0
        else:
            q = op.shifted_mv(x)
            r = q - x - rhs
        x = torch.zeros_like(rhs) if x is None else x
        reference = _norm(r)
        active = allowed & (reference > target)
        codes = _codes(active, MAX_ITER, CONVERGED)
        iterations = 0
        # While every problem runs and the host checks each iteration (on the CPU), an
        # iteration in which none finishes or blows up needs no per-problem bookkeeping.
        every = known_all(active)
        while iterations < max_iter and (every or bool(active.any())):
            if shifted:
                x_new = r if q is None else q - rhs  # r = −rhs at the start from zero
                q_new = op.shifted_mv(x_new)
                # S x_new − x_new − rhs, x_new = S x − rhs (to one rounding of x_new).
                r_new = q_new if q is None else q_new - q
            else:
                x_new = torch.add(x, r, alpha=self.damping)
                r_new = op.mv(x_new) - rhs
            iterations += 1
            norm = _norm(r_new)
            slow = None
            if self._give_up_after and iterations % self._give_up_after == 0:
                # Stop the problems whose residual did not halve over the window (NaN
                # included): a caller hands them to a method that does not need a
                # contraction.
                slow = active & ~(norm <= 0.5 * reference)
                reference = norm
                slow = slow if bool(slow.any()) else None
            if slow is None and every and all_running(norm, target, norm.max()):
                x, r = x_new, r_new
                if shifted:
                    q = q_new
                continue
            every = False
            # A problem whose residual turned infinite or NaN keeps its last finite x.
            step = active & (norm < math.inf)
            take = row_selector(step, x.shape[1])
            x, r = take(x_new, x), take(r_new, r)
            if shifted:
                q = take(q_new, torch.zeros_like(q_new) if q is None else q)
            done = step & (norm <= target)
            # (step is a subset of active and done of step: ^ removes the subset.)
            codes = torch.where(done, CONVERGED, torch.where(active ^ step, NONFINITE, codes))
            active = step ^ done
            if slow is not None:
                active = active & ~slow  # status stays "max_iter"
        return x, codes, iterations, r


class OneStep(LinearSolver):
    """Jacobian-free backward: assume ``∂g/∂z ≈ −I`` and take ``x = −rhs``.

    For a fixed point this is ``(I − ∂f/∂z)⁻¹ ≈ I``: the "phantom" / Jacobian-free
    gradient of Fung et al. (2022). Inexact by design and free: no products at all,
    so its residual is not measured (NaN) and it never warns.
    """

    name = "one_step"
    exact = False

    def solve(self, op, rhs, *, tol, max_iter):
        residual = torch.full_like(rhs[:, 0], math.nan)
        codes = torch.full_like(rhs[:, 0], CONVERGED, dtype=torch.long)
        return LinearResult(-rhs, residual, codes, 0)


class Phantom(Neumann):
    """Phantom gradient (Geng et al., 2021): ``steps`` damped steps unrolled from ``z*``.

    Differentiating ``k`` steps of ``z ← (1 − λ)·z + λ·f(z)`` unrolled from the fixed
    point ``z*`` gives ``w = −λ Σ_{j<k} (I + λ Aᵀ)^j v`` with ``A = ∂f/∂z − I``: the
    damped Neumann series truncated at ``k`` terms, which is exactly
    [`Neumann`][implicit.linear.Neumann] stopped after ``k`` iterations (so no graph
    through the steps is kept). With ``steps=1, damping=1`` it is
    [`OneStep`][implicit.linear.OneStep]; more steps approach the exact gradient when
    ``f`` is contractive. Inexact by design: the front door's ``tol`` and ``max_iter``
    do not apply and it never warns (its residual is reported).

    Args:
        steps: the number ``k`` of unrolled steps (default 5).
        damping: the step size ``λ`` in ``(0, 1]`` (default 0.5).
    """

    name = "phantom"
    exact = False

    def __init__(self, *, steps: int = 5, damping: float = 0.5):
        super().__init__(damping=damping)
        check_max_iter(steps, "Phantom(steps=...)")
        self.steps = steps

    def solve(self, op, rhs, *, tol, max_iter):
        # tol=0: never stop early, so the result is always the k-term series.
        result = super().solve(op, rhs, tol=0.0, max_iter=self.steps)
        codes = torch.where(result.codes == NONFINITE, NONFINITE, CONVERGED)
        return dataclasses.replace(result, codes=codes)


class Unroll:
    """Differentiate through the forward solver's iterations with plain autograd.

    Not a linear solver: it marks the one mode that builds a graph through every
    forward iteration (memory grows with iterations). Useful as a reference.
    """

    name = "unroll"

    def __repr__(self) -> str:
        return "Unroll()"


class _NeumannThenGMRES(_Iterative):
    """Auto's iterative method: for a fixed point's adjoint, Neumann while it contracts
    well, then GMRES from where it got; GMRES for every other system.

    On ``A = ∂f/∂z − I`` with products of ``∂f/∂z`` at hand (the first-order backward
    of a fixed point), Neumann costs one product and one pass over the data per
    iteration, where GMRES adds its orthogonalisation: when ``f`` contracts well (a
    trained DEQ), Neumann gets there first. A problem whose residual does not halve
    over four iterations (a weak contraction, or none) goes on with GMRES from its
    current iterate (from zero if its residual grew beyond ``‖rhs‖``), within the
    same iteration budget.
    """

    name = "neumann+gmres"

    def __init__(self, *, tol: float | None = None, max_iter: int | None = None):
        super().__init__(tol=tol, max_iter=max_iter)
        self._neumann = Neumann()
        self._neumann._give_up_after = 4
        self._gmres = GMRES()
        self._ran: set[str] = set()

    def solve(self, op, rhs, *, tol, max_iter):
        self._ran = set()
        result = super().solve(op, rhs, tol=tol, max_iter=max_iter)
        result.method = "+".join(m for m in ("neumann", "gmres") if m in self._ran)
        return result

    def _iterate(self, op, rhs, x, target, max_iter, allowed):
        used, codes, r = 0, None, None
        if op.shifted:
            self._ran.add("neumann")
            x, codes, used, r = self._neumann._iterate(op, rhs, x, target, max_iter, allowed)
            allowed = allowed & (codes == MAX_ITER)
            if used >= max_iter or not bool(allowed.any()):
                return x, codes, used, r
            grew = allowed & ~(_norm(r) <= _norm(rhs))
            x = torch.where(_rows(grew), 0, x)
        self._ran.add("gmres")
        x, gmres_codes, more, r = self._gmres._iterate(op, rhs, x, target, max_iter - used, allowed)
        codes = gmres_codes if codes is None else torch.where(allowed, gmres_codes, codes)
        return x, codes, used + more, r


class Auto(LinearSolver):
    """[`Dense`][implicit.linear.Dense] for small problems, a Krylov method otherwise:
    the default backward mode.

    Above ``max_dense`` unknowns: for the adjoint of a fixed point ``z = f(z)`` (the
    first-order backward), [`Neumann`][implicit.linear.Neumann] while it contracts well
    and [`GMRES`][implicit.linear.GMRES] from where it got for the problems whose
    residual does not halve over four iterations; [`GMRES`][implicit.linear.GMRES] for
    every other system. ``info.backward.method`` says which ran (``"dense"``,
    ``"dense+refine"`` after Newton as for `Dense`, ``"neumann"``, ``"neumann+gmres"``
    or ``"gmres"``).

    Args:
        max_dense: largest number of unknowns per problem solved densely.
        tol: handed to the chosen solver (``None``: the front door's ``tol``).
        max_iter: handed to the chosen solver (``None``: the front door's
            ``max_iter``).
    """

    name = "auto"

    def __init__(
        self, *, max_dense: int = 64, tol: float | None = None, max_iter: int | None = None
    ):
        super().__init__(tol=tol, max_iter=max_iter)
        if isinstance(max_dense, bool) or not isinstance(max_dense, int) or max_dense < 0:
            raise ValueError(f"max_dense must be an integer >= 0, got {max_dense!r}")
        self.max_dense = max_dense

    def for_size(self, n: int) -> LinearSolver:
        chosen = Dense() if n <= self.max_dense else _NeumannThenGMRES()
        chosen.tol, chosen.max_iter = self.tol, self.max_iter
        return chosen

    def solve(self, op, rhs, *, tol, max_iter):
        return self.for_size(rhs.shape[1]).solve(op, rhs, tol=tol, max_iter=max_iter)


NAMES: dict[str, Callable[[], LinearSolver | Unroll]] = {
    "auto": Auto,
    "dense": Dense,
    "cg": CG,
    "gmres": GMRES,
    "bicgstab": BiCGStab,
    "neumann": Neumann,
    "one_step": OneStep,
    "phantom": Phantom,
    "unroll": Unroll,
}
"""The backward modes by the names ``backward=`` accepts (each with its default options)."""


def resolve(backward: str | LinearSolver | Unroll) -> LinearSolver | Unroll:
    """A backward mode given by name or instance, as an instance."""
    if isinstance(backward, (LinearSolver, Unroll)):
        return backward
    if isinstance(backward, str) and backward in NAMES:
        return NAMES[backward]()
    raise ValueError(
        f"unknown backward {backward!r}: use one of {sorted(NAMES)} or an instance "
        f"from implicit.linear"
    )
