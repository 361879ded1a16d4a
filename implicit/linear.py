"""Linear solvers for the implicit backward (and the forward-mode tangent).

The backward of every front door solves the adjoint system ``(∂g/∂z)ᵀ w = v``; forward
mode solves ``(∂g/∂z) dz = −(∂g/∂θ) dθ``. Both are handed to one of these solvers as an
operator ``A`` with products ``A x`` (and, for :class:`Dense`, its per-sample matrix).
Systems are batched: row ``b`` of ``x`` and ``rhs`` is problem ``b``, solved to its own
tolerance. A solve stops when ``‖A x − rhs‖ ≤ tol · ‖rhs‖`` for every problem.

Choose by name (``backward="gmres"``) or by instance (``backward=GMRES(restart=30)``).
An instance's ``tol`` / ``max_iter`` default to the front door's.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch

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

Preconditioner = Callable[[torch.Tensor], torch.Tensor]
WarmStart = torch.Tensor | Literal["previous"] | None


@dataclasses.dataclass
class LinearResult:
    """The outcome of a batched linear solve.

    Attributes:
        x: the solution, shape ``(B, n)``.
        residual: ``‖A x − rhs‖ / ‖rhs‖`` per problem (0 where ``rhs = 0``; NaN
            where the method does not measure it).
        codes: per-problem status codes (see ``implicit._results``).
        iterations: iterations taken (the maximum over problems).
    """

    x: torch.Tensor
    residual: torch.Tensor
    codes: torch.Tensor
    iterations: int


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=1)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (frozen or broken-down problems)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)


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
        """The solver to use for systems of ``n`` unknowns per problem (see :class:`Auto`)."""
        return self

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_")
        )
        return f"{type(self).__name__}({fields})"


class _Krylov(LinearSolver):
    """Shared options of the iterative methods: warm start and preconditioner.

    Args:
        x0: initial guess, broadcastable to ``(B, n)``; ``"previous"`` reuses this
            instance's last solution when its shape matches (warm start across
            training steps); ``None`` starts from zero.
        preconditioner: ``M(r) ≈ A⁻¹ r`` on ``(B, n)`` tensors.
    """

    def __init__(
        self,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        x0: WarmStart = None,
        preconditioner: Preconditioner | None = None,
    ):
        super().__init__(tol=tol, max_iter=max_iter)
        if not (x0 is None or x0 == "previous" or isinstance(x0, torch.Tensor)):
            raise TypeError(f"x0 must be a tensor, 'previous' or None, got {type(x0).__name__}")
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError("preconditioner must be callable: M(r) -> approximately A⁻¹ r")
        self.x0 = x0
        self.preconditioner = preconditioner
        self._previous: torch.Tensor | None = None

    def _initial(self, rhs: torch.Tensor) -> torch.Tensor:
        if isinstance(self.x0, torch.Tensor):
            return self.x0.to(rhs).expand_as(rhs).clone()
        previous = self._previous
        if (
            self.x0 == "previous"
            and previous is not None
            and previous.shape == rhs.shape
            and previous.dtype == rhs.dtype
            and previous.device == rhs.device
        ):
            return previous.clone()
        return torch.zeros_like(rhs)

    def _precondition(self, r: torch.Tensor) -> torch.Tensor:
        return r if self.preconditioner is None else self.preconditioner(r)

    def solve(self, op: Operator, rhs: torch.Tensor, *, tol: float, max_iter: int) -> LinearResult:
        x, codes, iterations = self._iterate(op, rhs, self._initial(rhs), tol, max_iter)
        # The recurrences' residual estimates drift; report the true residual.
        rhs_norm = _norm(rhs)
        residual = _safe_div(_norm(op.mv(x) - rhs), rhs_norm)
        finite = torch.isfinite(residual) & torch.isfinite(x).all(dim=1)
        ok = finite & (residual <= tol)
        codes = torch.where(
            ~finite,
            NONFINITE,
            torch.where(ok, CONVERGED, torch.maximum(codes, torch.full_like(codes, MAX_ITER))),
        )
        if self.x0 == "previous":
            self._previous = x.detach()
        return LinearResult(x, residual, codes, iterations)

    @abc.abstractmethod
    def _iterate(
        self, op: Operator, rhs: torch.Tensor, x: torch.Tensor, tol: float, max_iter: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Run the method from ``x``; return ``x``, status codes and iterations."""


class Dense(LinearSolver):
    """Materialise ``A`` per problem (``n`` vector-Jacobian products) and LU-solve.

    Exact and the fastest choice for small ``n`` (up to a few hundred unknowns per
    problem). A singular block falls back to the least-squares (pseudo-inverse)
    solution and is reported as ``"breakdown"``; with ``ridge > 0`` the system solved
    is ``(A + ridge·I) x = rhs`` instead, a documented damping for ill-conditioned
    Jacobians. A solve counts as converged when its relative residual is at most
    ``max(tol, √eps)`` (a direct solve cannot do better than its conditioning).

    Args:
        ridge: Tikhonov damping added to the diagonal (default 0: exact).
        chunk_size: build the Jacobian this many rows at a time (memory bound).
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
        if not (isinstance(ridge, (int, float)) and ridge >= 0 and math.isfinite(ridge)):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        self.ridge = float(ridge)
        self.chunk_size = chunk_size

    def solve(self, op: Operator, rhs: torch.Tensor, *, tol: float, max_iter: int) -> LinearResult:
        matrix = op.dense(self.chunk_size)
        return self.solve_matrix(matrix, rhs, tol=tol)

    def solve_matrix(self, matrix: torch.Tensor, rhs: torch.Tensor, *, tol: float) -> LinearResult:
        """Solve with the ``(B, n, n)`` matrix already at hand."""
        system = matrix
        if self.ridge:
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            system = matrix + self.ridge * eye
        x, info = torch.linalg.solve_ex(system, rhs.unsqueeze(-1))
        x = x.squeeze(-1)
        singular = info != 0
        if bool(singular.any()):
            fallback = torch.linalg.pinv(system[singular]) @ rhs[singular].unsqueeze(-1)
            x = x.clone()
            x[singular] = fallback.squeeze(-1)
        residual = _safe_div(_norm((matrix @ x.unsqueeze(-1)).squeeze(-1) - rhs), _norm(rhs))
        finite = torch.isfinite(residual) & torch.isfinite(x).all(dim=1)
        accept = max(tol, math.sqrt(torch.finfo(rhs.dtype).eps))
        codes = torch.full_like(info, MAX_ITER)
        codes = torch.where(residual <= accept, CONVERGED, codes)
        codes = torch.where(singular, BREAKDOWN, codes)
        codes = torch.where(finite, codes, NONFINITE)
        return LinearResult(x, residual, codes, 1)


class CG(_Krylov):
    """Preconditioned conjugate gradients, for symmetric positive definite ``A``.

    Right for ``∂g/∂z`` that is the Hessian of a convex energy (``g = ∇E``). A
    problem whose curvature ``pᵀAp`` turns non-positive (``A`` is not SPD) stops with
    status ``"breakdown"`` instead of returning a silently wrong answer.
    """

    name = "cg"

    def _iterate(self, op, rhs, x, tol, max_iter):
        batch = rhs.shape[0]
        target = tol * _norm(rhs)
        r = rhs - op.mv(x) if bool(x.any()) else rhs.clone()
        z = self._precondition(r)
        p = z
        rz = _dot(r, z)
        codes = torch.full((batch,), MAX_ITER, dtype=torch.long, device=rhs.device)
        active = _norm(r) > target
        codes = torch.where(active, codes, CONVERGED)
        iterations = 0
        while iterations < max_iter and bool(active.any()):
            ap = op.mv(p)
            iterations += 1
            curvature = _dot(p, ap)
            broken = active & ~(curvature > 0)
            codes = torch.where(broken, BREAKDOWN, codes)
            active = active & ~broken
            alpha = torch.where(active, _safe_div(rz, curvature), 0).unsqueeze(1)
            x = x + alpha * p
            r = r - alpha * ap
            done = active & (_norm(r) <= target)
            codes = torch.where(done, CONVERGED, codes)
            active = active & ~done
            z = self._precondition(r)
            rz_new = _dot(r, z)
            beta = _safe_div(rz_new, rz).unsqueeze(1)
            p = torch.where(active.unsqueeze(1), z + beta * p, p)
            rz = torch.where(active, rz_new, rz)
        return x, codes, iterations


class GMRES(_Krylov):
    """Restarted GMRES with right preconditioning, for any non-singular ``A``.

    The default Krylov method: it needs only products with ``A`` and minimises the
    residual over the Krylov space, so it handles the non-symmetric Jacobians of
    fixed-point and root problems. Memory is ``restart + 1`` vectors per problem.

    Args:
        restart: Krylov space dimension before a restart.
    """

    name = "gmres"

    def __init__(self, *, restart: int = 20, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(restart, int) and restart >= 1):
            raise ValueError(f"restart must be an integer >= 1, got {restart!r}")
        self.restart = restart

    def _iterate(self, op, rhs, x, tol, max_iter):
        batch, n = rhs.shape
        target = tol * _norm(rhs)
        codes = torch.full((batch,), MAX_ITER, dtype=torch.long, device=rhs.device)
        iterations = 0
        while True:
            r = rhs - op.mv(x) if bool(x.any()) else rhs
            beta = _norm(r)
            active = beta > target
            codes = torch.where(active, codes, CONVERGED)
            if iterations >= max_iter or not bool(active.any()):
                return x, codes, iterations
            steps = min(self.restart, n, max_iter - iterations)
            x, used = self._cycle(op, r, beta, x, active, target, steps)
            iterations += used

    def _cycle(self, op, r, beta, x, active, target, steps):
        batch, n = r.shape
        basis = r.new_zeros(batch, steps + 1, n)
        hess = r.new_zeros(batch, steps + 1, steps)
        cos = r.new_zeros(batch, steps)
        sin = r.new_zeros(batch, steps)
        g = r.new_zeros(batch, steps + 1)
        g[:, 0] = beta
        basis[:, 0] = r / torch.where(beta > 0, beta, 1).unsqueeze(1)
        used = 0
        for j in range(steps):
            w = op.mv(self._precondition(basis[:, j]))
            used += 1
            # Classical Gram-Schmidt, twice (CGS2): as stable as modified GS, batched.
            for _ in range(2):
                h = torch.einsum("bkn,bn->bk", basis[:, : j + 1], w)
                w = w - torch.einsum("bkn,bk->bn", basis[:, : j + 1], h)
                hess[:, : j + 1, j] += h
            h_next = _norm(w)
            hess[:, j + 1, j] = h_next
            basis[:, j + 1] = w / torch.where(h_next > 0, h_next, 1).unsqueeze(1)
            # Apply the earlier Givens rotations to the new column, then make a new one.
            column = hess[:, :, j].clone()
            for i in range(j):
                upper = cos[:, i] * column[:, i] + sin[:, i] * column[:, i + 1]
                column[:, i + 1] = -sin[:, i] * column[:, i] + cos[:, i] * column[:, i + 1]
                column[:, i] = upper
            radius = torch.hypot(column[:, j], column[:, j + 1])
            safe = torch.where(radius > 0, radius, 1)
            cos[:, j] = torch.where(radius > 0, column[:, j] / safe, 1)
            sin[:, j] = torch.where(radius > 0, column[:, j + 1] / safe, 0)
            column[:, j] = radius
            column[:, j + 1] = 0
            hess[:, :, j] = column
            g[:, j + 1] = -sin[:, j] * g[:, j]
            g[:, j] = cos[:, j] * g[:, j]
            if not bool((active & (g[:, j + 1].abs() > target)).any()):
                break
        k = used
        upper = hess[:, :k, :k]
        # Guard exact zeros on the diagonal (lucky breakdown of an already solved problem).
        diag = torch.diagonal(upper, dim1=1, dim2=2)
        upper = upper + torch.diag_embed(
            torch.where(diag == 0, torch.ones_like(diag), torch.zeros_like(diag))
        )
        y = torch.linalg.solve_triangular(upper, g[:, :k].unsqueeze(-1), upper=True).squeeze(-1)
        step = self._precondition(torch.einsum("bkn,bk->bn", basis[:, :k], y))
        x = torch.where(active.unsqueeze(1), x + step, x)
        return x, used


class BiCGStab(_Krylov):
    """Preconditioned BiCGStab, for non-symmetric ``A`` with short recurrences.

    Two products per iteration and constant memory, against GMRES's growing basis;
    convergence is less smooth. A breakdown (``ρ`` or ``ω`` vanishing) stops that
    problem with status ``"breakdown"``.
    """

    name = "bicgstab"

    def _iterate(self, op, rhs, x, tol, max_iter):
        batch = rhs.shape[0]
        target = tol * _norm(rhs)
        r = rhs - op.mv(x) if bool(x.any()) else rhs.clone()
        shadow = r.clone()
        rho = alpha = omega = torch.ones(batch, dtype=rhs.dtype, device=rhs.device)
        v = torch.zeros_like(r)
        p = torch.zeros_like(r)
        codes = torch.full((batch,), MAX_ITER, dtype=torch.long, device=rhs.device)
        active = _norm(r) > target
        codes = torch.where(active, codes, CONVERGED)
        iterations = 0
        tiny = torch.finfo(rhs.dtype).tiny
        while iterations < max_iter and bool(active.any()):
            iterations += 1
            rho_new = _dot(shadow, r)
            broken = active & (rho_new.abs() <= tiny)
            beta = _safe_div(rho_new, rho) * _safe_div(alpha, omega)
            p = torch.where(
                active.unsqueeze(1), r + beta.unsqueeze(1) * (p - omega.unsqueeze(1) * v), p
            )
            p_hat = self._precondition(p)
            v = op.mv(p_hat)
            alpha = _safe_div(rho_new, _dot(shadow, v))
            s = r - alpha.unsqueeze(1) * v
            half_done = active & (_norm(s) <= target)
            x = torch.where(half_done.unsqueeze(1), x + alpha.unsqueeze(1) * p_hat, x)
            s_hat = self._precondition(s)
            t = op.mv(s_hat)
            omega = _safe_div(_dot(t, s), _dot(t, t))
            go = active & ~half_done & ~broken
            x = torch.where(
                go.unsqueeze(1), x + alpha.unsqueeze(1) * p_hat + omega.unsqueeze(1) * s_hat, x
            )
            r = torch.where(
                go.unsqueeze(1),
                s - omega.unsqueeze(1) * t,
                torch.where(half_done.unsqueeze(1), s, r),
            )
            broken = broken | (go & (omega.abs() <= tiny))
            done = half_done | (go & (_norm(r) <= target))
            codes = torch.where(done, CONVERGED, torch.where(broken, BREAKDOWN, codes))
            active = active & ~done & ~broken
            rho = rho_new
        return x, codes, iterations


class Neumann(LinearSolver):
    """The classic DEQ backward: fixed-point iteration on the adjoint equation.

    Iterates ``x ← x + damping · (A x − rhs)``. For a fixed-point problem
    ``g = f(z) − z`` the Jacobian is ``A = ∂f/∂z − I`` and, with ``damping = 1``,
    this is ``x ← (∂f/∂z)ᵀ x − rhs``: the truncated Neumann series of
    ``(I − ∂f/∂z)⁻ᵀ``. It converges when ``f`` is contractive; for general root
    problems use :class:`GMRES`. One product per iteration, no extra memory.

    Args:
        damping: step size in ``(0, 1]``; smaller values converge for a wider range of
            Jacobians, more slowly.
    """

    name = "neumann"

    def __init__(
        self, *, damping: float = 1.0, tol: float | None = None, max_iter: int | None = None
    ):
        super().__init__(tol=tol, max_iter=max_iter)
        if not (isinstance(damping, (int, float)) and 0 < damping <= 1):
            raise ValueError(f"damping must be in (0, 1], got {damping!r}")
        self.damping = float(damping)

    def solve(self, op, rhs, *, tol, max_iter):
        rhs_norm = _norm(rhs)
        x = torch.zeros_like(rhs)
        residual_vec = -rhs
        residual = _safe_div(_norm(residual_vec), rhs_norm)
        active = residual > tol
        codes = torch.where(active, MAX_ITER, CONVERGED).to(torch.long)
        iterations = 0
        while iterations < max_iter and bool(active.any()):
            x = torch.where(active.unsqueeze(1), x + self.damping * residual_vec, x)
            residual_vec = op.mv(x) - rhs
            iterations += 1
            residual = _safe_div(_norm(residual_vec), rhs_norm)
            nonfinite = active & ~torch.isfinite(residual)
            done = active & (residual <= tol)
            codes = torch.where(done, CONVERGED, torch.where(nonfinite, NONFINITE, codes))
            active = active & ~done & ~nonfinite
        return LinearResult(x, residual, codes, iterations)


class OneStep(LinearSolver):
    """Jacobian-free backward: assume ``∂g/∂z ≈ −I`` and take ``x = −rhs``.

    For a fixed point this is ``(I − ∂f/∂z)⁻¹ ≈ I``: the "phantom" / Jacobian-free
    gradient of Fung et al. (2022). Inexact by design and free: no products at all,
    so its residual is not measured (NaN) and it never warns.
    """

    name = "one_step"
    exact = False

    def solve(self, op, rhs, *, tol, max_iter):
        batch = rhs.shape[0]
        residual = torch.full((batch,), math.nan, dtype=rhs.dtype, device=rhs.device)
        codes = torch.full((batch,), CONVERGED, dtype=torch.long, device=rhs.device)
        return LinearResult(-rhs, residual, codes, 0)


class Phantom(Neumann):
    """Phantom gradient (Geng et al., 2021): ``steps`` damped steps unrolled from ``z*``.

    Differentiating ``k`` steps of ``z ← (1 − λ)·z + λ·f(z)`` unrolled from the fixed
    point ``z*`` gives ``w = −λ Σ_{j<k} (I + λ Aᵀ)^j v`` with ``A = ∂f/∂z − I``: the
    damped Neumann series truncated at ``k`` terms, which is exactly :class:`Neumann`
    stopped after ``k`` iterations (so no graph through the steps is kept). With
    ``steps=1, damping=1`` it is :class:`OneStep`; more steps approach the exact
    gradient when ``f`` is contractive. Inexact by design: the front door's ``tol``
    and ``max_iter`` do not apply and it never warns (its residual is reported).

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


class Auto(LinearSolver):
    """:class:`Dense` for small problems, :class:`GMRES` otherwise.

    Args:
        max_dense: largest number of unknowns per problem solved densely.
    """

    name = "auto"

    def __init__(
        self, *, max_dense: int = 64, tol: float | None = None, max_iter: int | None = None
    ):
        super().__init__(tol=tol, max_iter=max_iter)
        self.max_dense = max_dense

    def for_size(self, n: int) -> LinearSolver:
        chosen = Dense() if n <= self.max_dense else GMRES()
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
