"""Systems with known answers for the linear solver tests.

Every system is driven through the operator the core hands the solvers: the Jacobian of
a residual ``g(z) = z Aᵀ − b`` (so ``∂g/∂z = A``), seen transposed (vector-Jacobian
products, the backward's route) or not (Jacobian-vector products, forward mode's route).
"""

from __future__ import annotations

import math

import torch
from conftest import rel_err
from hypothesis import settings
from hypothesis import strategies as st

from implicit import linear
from implicit.linear import JacobianOperator
from implicit.linear.base import CONVERGED

F64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None)
ITERATIVE = {
    "cg": linear.CG,
    "gmres": linear.GMRES,
    "bicgstab": linear.BiCGStab,
    "neumann": linear.Neumann,
}


def operator(matrix: torch.Tensor, transpose: bool = True) -> JacobianOperator:
    """The operator ``x ↦ A x`` per sample, from the Jacobian of ``g(z) = z Aᵀ − b``.

    With ``transpose=True`` the residual is ``g(z) = z A − b`` (Jacobian ``Aᵀ``) and the
    operator is its transpose, applied by vector-Jacobian products as in the backward.
    """
    jacobian = matrix.mT if transpose else matrix
    offset = torch.ones(matrix.shape[:2], dtype=matrix.dtype)

    def g(z):
        return torch.einsum("bij,bj->bi", jacobian, z) - offset

    return JacobianOperator.of(g, torch.zeros_like(offset), transposed=transpose)


def run(solver: linear.LinearSolver, op: JacobianOperator, rhs: torch.Tensor, **options):
    """``solver``'s two steps: ``init`` on the operator, then ``solve``."""
    return solver.solve(solver.init(op), rhs, **options)


def true_residual(matrix, x, rhs):
    """``‖A x − rhs‖ / ‖rhs‖`` per sample, computed directly."""
    diff = torch.einsum("bij,bj->bi", matrix, x) - rhs
    return torch.linalg.vector_norm(diff, dim=1) / torch.linalg.vector_norm(rhs, dim=1)


def reports_true_residual(result, matrix, rhs) -> bool:
    """The reported residual equals the true one up to the round-off of ``A x − rhs``."""
    truth = true_residual(matrix, result.x, rhs)
    size = torch.linalg.matrix_norm(matrix, ord=2) * torch.linalg.vector_norm(result.x, dim=1)
    roundoff = 64 * torch.finfo(rhs.dtype).eps * size / torch.linalg.vector_norm(rhs, dim=1)
    return bool(((result.residual - truth).abs() <= 1e-6 * truth + roundoff).all())


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(batch: int, n: int, condition: float, seed: int) -> torch.Tensor:
    """SPD matrices with eigenvalues spread log-uniformly over ``[1, condition]``."""
    gen = generator(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=F64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=F64)
    eigenvalues = eigenvalues[torch.randperm(n, generator=gen)]
    return q @ torch.diag_embed(eigenvalues.expand(batch, n)) @ q.mT


def nonsymmetric(batch: int, n: int, spread: float, seed: int) -> torch.Tensor:
    """``s (I + spread · G/√n)``: well conditioned for ``spread < 1``, random scale ``s``."""
    gen = generator(seed)
    noise = torch.randn(batch, n, n, generator=gen, dtype=F64) / math.sqrt(n)
    scale = torch.exp(torch.randn(batch, 1, 1, generator=gen, dtype=F64))
    return scale * (torch.eye(n, dtype=F64) + spread * noise)


def contraction(batch: int, n: int, norm: float, seed: int) -> torch.Tensor:
    """Random matrices with spectral norm ``norm``."""
    w = torch.randn(batch, n, n, generator=generator(seed), dtype=F64)
    return w * (norm / torch.linalg.matrix_norm(w, ord=2).reshape(batch, 1, 1))


def rhs_of(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, n, generator=generator(seed + 1), dtype=F64)


def check_solution(result, matrix, rhs, tol):
    """The answer against torch.linalg.solve, and the report against the truth."""
    truth = true_residual(matrix, result.x, rhs)
    assert result.codes.tolist() == [CONVERGED] * rhs.shape[0]
    assert reports_true_residual(result, matrix, rhs)
    assert bool((truth <= tol).all())
    # ‖x − x*‖/‖x*‖ ≤ cond(A) · ‖A x − b‖/‖b‖.
    reference = torch.linalg.solve(matrix, rhs)
    bound = torch.linalg.cond(matrix) * truth + 1e-14
    for b in range(rhs.shape[0]):
        assert rel_err(result.x[b], reference[b]) <= float(bound[b]) * (1 + 1e-6)
    return float(max(rel_err(result.x[b], reference[b]) for b in range(rhs.shape[0])))


sizes = {"batch": st.integers(1, 5), "n": st.integers(1, 12), "seed": st.integers(0, 2**31)}


def hard_and_easy(method: str, n: int = 40):
    """A batch ``[easy, hard, easy]`` suited to ``method`` (``n`` > GMRES's restart)."""
    if method == "cg":
        matrix = torch.cat([spd(1, n, 2.0, 1), spd(1, n, 1e4, 2), spd(1, n, 3.0, 3)])
    elif method == "neumann":
        norms = (0.1, 0.97, 0.2)
        matrix = torch.cat([contraction(1, n, c, i) for i, c in enumerate(norms)])
        matrix = matrix - torch.eye(n, dtype=F64)
    else:
        spreads = (0.1, 0.95, 0.2)
        matrix = torch.cat([nonsymmetric(1, n, s, i) for i, s in enumerate(spreads)])
    return matrix, rhs_of(3, n, 7)
