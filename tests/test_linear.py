"""The backward linear solvers on explicit matrices, against torch.linalg.solve.

Every system is driven through the operator the core hands the solvers: the Jacobian of
a residual ``g(z) = z Aᵀ − b`` (so ``∂g/∂z = A``), seen transposed (vector-Jacobian
products, the backward's route) or not (Jacobian-vector products, forward mode's route).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit
from implicit import linear
from implicit._blocks import Factorization
from implicit._operators import GraphJacobian, Jacobian, Operator
from implicit._results import BREAKDOWN, CONVERGED, MAX_ITER, NONFINITE

F64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None)
ITERATIVE = {
    "cg": linear.CG,
    "gmres": linear.GMRES,
    "bicgstab": linear.BiCGStab,
    "neumann": linear.Neumann,
}


def operator(matrix: torch.Tensor, transpose: bool = True) -> Operator:
    """The operator ``x ↦ A x`` per sample, from the Jacobian of ``g(z) = z Aᵀ − b``.

    With ``transpose=True`` the residual is ``g(z) = z A − b`` (Jacobian ``Aᵀ``) and the
    operator is its transpose, applied by vector-Jacobian products as in the backward.
    """
    jacobian = matrix.mT if transpose else matrix
    offset = torch.ones(matrix.shape[:2], dtype=matrix.dtype)

    def g(z):
        return torch.einsum("bij,bj->bi", jacobian, z) - offset

    return Operator(Jacobian(g, torch.zeros_like(offset)), transpose=transpose)


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


class TestProperties:
    @PROPERTY
    @given(**sizes, condition=st.floats(1.0, 1e3), transpose=st.booleans())
    def test_cg_on_random_spd(self, batch, n, seed, condition, transpose):
        matrix, rhs = spd(batch, n, condition, seed), rhs_of(batch, n, seed)
        result = linear.CG().solve(operator(matrix, transpose), rhs, tol=1e-10, max_iter=200)
        check_solution(result, matrix, rhs, 1e-10)

    @PROPERTY
    @given(
        **sizes,
        spread=st.floats(0.0, 0.7),
        method=st.sampled_from(["gmres", "bicgstab", "dense"]),
        transpose=st.booleans(),
    )
    def test_nonsymmetric_methods(self, batch, n, seed, spread, method, transpose):
        matrix, rhs = nonsymmetric(batch, n, spread, seed), rhs_of(batch, n, seed)
        solver = linear.resolve(method)
        result = solver.solve(operator(matrix, transpose), rhs, tol=1e-10, max_iter=200)
        check_solution(result, matrix, rhs, 1e-10)

    @PROPERTY
    @given(**sizes, restart=st.integers(1, 12), transpose=st.booleans())
    def test_restarted_gmres_on_positive_real_systems(self, batch, n, seed, restart, transpose):
        # A = I + S + K, ‖S‖ ≤ ½ symmetric, ‖K‖ ≤ 1 skew: the symmetric part is ≥ ½ I,
        # so GMRES(m) converges for every m (Elman's bound: ≤ 0.98 per product).
        gen = generator(seed)
        s = torch.randn(batch, n, n, generator=gen, dtype=F64)
        k = torch.randn(batch, n, n, generator=gen, dtype=F64)
        s, k = s + s.mT, k - k.mT
        s = 0.5 * s / torch.linalg.matrix_norm(s, ord=2).clamp_min(1e-12).reshape(batch, 1, 1)
        k = k / torch.linalg.matrix_norm(k, ord=2).clamp_min(1e-12).reshape(batch, 1, 1)
        matrix = torch.eye(n, dtype=F64) + s + k
        rhs = rhs_of(batch, n, seed)
        solver = linear.GMRES(restart=restart)
        result = solver.solve(operator(matrix, transpose), rhs, tol=1e-10, max_iter=3000)
        check_solution(result, matrix, rhs, 1e-10)

    @PROPERTY
    @given(**sizes, norm=st.floats(0.0, 0.9))
    def test_neumann_on_contractions(self, batch, n, seed, norm):
        # The adjoint of a fixed point: A = Fᵀ − I with ‖F‖ < 1.
        matrix = contraction(batch, n, norm, seed) - torch.eye(n, dtype=F64)
        rhs = rhs_of(batch, n, seed)
        result = linear.Neumann().solve(operator(matrix), rhs, tol=1e-10, max_iter=500)
        check_solution(result, matrix, rhs, 1e-10)
        # The Neumann series converges like ‖F‖^k.
        if norm > 0:
            assert result.iterations <= math.ceil(math.log(1e-10) / math.log(norm)) + 2

    @PROPERTY
    @given(**sizes, method=st.sampled_from(["cg", "gmres", "bicgstab"]))
    def test_non_spd_systems_never_claim_a_wrong_answer(self, batch, n, seed, method):
        # Symmetric indefinite and non-symmetric matrices: a method may fail, but
        # "converged" must mean the true residual is within tol.
        gen = generator(seed)
        matrix = torch.randn(batch, n, n, generator=gen, dtype=F64)
        if seed % 2:
            matrix = matrix + matrix.mT
        rhs = rhs_of(batch, n, seed)
        result = linear.resolve(method).solve(operator(matrix), rhs, tol=1e-8, max_iter=3 * n)
        truth = true_residual(matrix, result.x, rhs)
        assert reports_true_residual(result, matrix, rhs)
        for code, residual in zip(result.codes.tolist(), truth.tolist()):
            if code == CONVERGED:
                assert residual <= 1e-8
            else:
                assert code in (MAX_ITER, BREAKDOWN) and residual > 1e-8


@pytest.mark.parametrize("method", ["cg", "bicgstab"])
def test_drifted_recurrence_is_restarted_from_the_true_residual(method, monkeypatch):
    # Near the attainable accuracy the recurrence's residual runs ahead of the true one.
    rounds = []
    cls = type(linear.resolve(method))
    iterate = cls._iterate

    def spy(self, op, rhs, x, target, max_iter, allowed):
        x, codes, used, true = iterate(self, op, rhs, x, target, max_iter, allowed)
        rounds.append((int(allowed.sum()), used))
        return x, codes, used, true

    monkeypatch.setattr(cls, "_iterate", spy)
    matrix, rhs = spd(4, 30, 1e4, 0), rhs_of(4, 30, 0)
    tol = 10**-12.5
    result = cls().solve(operator(matrix), rhs, tol=tol, max_iter=3000)
    assert len(rounds) >= 2 and rounds[0][0] == 4 and rounds[1][0] >= 1
    check_solution(result, matrix, rhs, tol)
    # No budget left for the restart: the drifted problems are reported unconverged.
    first_round = rounds[0][1]
    result = cls().solve(operator(matrix), rhs, tol=tol, max_iter=first_round)
    truth = true_residual(matrix, result.x, rhs)
    assert result.codes.tolist() == [CONVERGED if r <= tol else MAX_ITER for r in truth]
    assert MAX_ITER in result.codes.tolist()
    # Below the attainable accuracy: restarts until max_iter, and no false claim.
    rounds.clear()
    result = cls().solve(operator(matrix), rhs, tol=1e-16, max_iter=300)
    assert result.codes.tolist() == [MAX_ITER] * 4 and result.iterations == 300
    assert reports_true_residual(result, matrix, rhs)


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


@pytest.mark.parametrize("method", sorted(ITERATIVE))
def test_per_problem_stop_freezes_the_easy_problems(method):
    matrix, rhs = hard_and_easy(method)
    solver = ITERATIVE[method]()
    together = solver.solve(operator(matrix), rhs, tol=1e-10, max_iter=1000)
    check_solution(together, matrix, rhs, 1e-10)
    for b in (0, 2):
        alone = solver.solve(operator(matrix[b : b + 1]), rhs[b : b + 1], tol=1e-10, max_iter=1000)
        assert alone.iterations < together.iterations / 2
        # Frozen once converged: more iterations would move x by about its residual
        # (~1e-11 of ‖x‖), far more than the round-off of batched products.
        assert rel_err(together.x[b], alone.x[0]) <= 1e-14


class TestCG:
    def test_indefinite_system_reports_breakdown(self):
        # bᵀAb < 0: the very first curvature is negative. jaxopt returned zeros silently.
        matrix = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=F64)).unsqueeze(0)
        rhs = torch.tensor([[0.1, 1.0, 0.1]], dtype=F64)
        result = linear.CG().solve(operator(matrix), rhs, tol=1e-10, max_iter=50)
        assert result.codes.tolist() == [BREAKDOWN]
        assert torch.allclose(result.residual, true_residual(matrix, result.x, rhs))
        assert float(result.residual) > 1e-10

    def test_breakdown_reaches_the_user(self):
        # A root problem with an indefinite symmetric Jacobian, differentiated with cg.
        matrix = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=F64))
        b = torch.tensor([1.0, 1.0, 1.0], dtype=F64, requires_grad=True)
        z = implicit.root_solve(
            lambda z, b: z @ matrix.T - b,
            b.detach() / torch.diagonal(matrix),  # the solution: the forward stops at once
            b,
            solver="fixed_point",
            backward="cg",
            on_failure="raise",
        )
        weights = torch.tensor([0.1, 1.0, 0.1], dtype=F64)  # vᵀAv < 0
        with pytest.raises(implicit.ConvergenceError, match="backward linear solve") as caught:
            (z * weights).sum().backward()
        assert caught.value.info.status == "breakdown"
        assert caught.value.info.method == "cg"

    def test_non_spd_preconditioner_reports_breakdown(self):
        matrix = spd(2, 6, 10.0, 0)
        result = linear.CG(preconditioner=lambda r: -r).solve(
            operator(matrix), rhs_of(2, 6, 0), tol=1e-10, max_iter=50
        )
        assert result.codes.tolist() == [BREAKDOWN, BREAKDOWN]


class TestGMRES:
    def test_restart(self):
        matrix, rhs = nonsymmetric(2, 12, 0.6, 3), rhs_of(2, 12, 3)
        full = linear.GMRES(restart=12).solve(operator(matrix), rhs, tol=1e-10, max_iter=500)
        short = linear.GMRES(restart=3).solve(operator(matrix), rhs, tol=1e-10, max_iter=500)
        # Full GMRES is exact in n steps; GMRES(3) needs restarts and more products.
        assert full.iterations <= 12
        assert short.iterations > max(full.iterations, 3)
        check_solution(full, matrix, rhs, 1e-10)
        check_solution(short, matrix, rhs, 1e-10)

    def test_singular_system_reports_breakdown(self):
        # Inconsistent: rhs has a component outside the range of A.
        matrix = torch.diag(torch.tensor([1.0, 0.0], dtype=F64)).unsqueeze(0)
        rhs = torch.tensor([[1.0, 1.0]], dtype=F64)
        result = linear.GMRES().solve(operator(matrix), rhs, tol=1e-10, max_iter=50)
        assert result.codes.tolist() == [BREAKDOWN]
        assert bool(torch.isfinite(result.x).all())
        assert torch.allclose(result.residual, true_residual(matrix, result.x, rhs))

    def test_lucky_breakdown_is_an_exact_solve(self):
        matrix = 2 * torch.eye(5, dtype=F64).unsqueeze(0)
        rhs = rhs_of(1, 5, 0)
        result = linear.GMRES().solve(operator(matrix), rhs, tol=1e-12, max_iter=50)
        assert result.iterations == 1
        check_solution(result, matrix, rhs, 1e-12)


def test_bicgstab_breakdown():
    # The shadow residual e₁ is orthogonal to A e₁ = e₂: BiCGStab cannot take a step.
    matrix = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=F64)
    rhs = torch.tensor([[1.0, 0.0]], dtype=F64)
    result = linear.BiCGStab().solve(operator(matrix), rhs, tol=1e-10, max_iter=50)
    assert result.codes.tolist() == [BREAKDOWN]
    assert torch.equal(result.x, torch.zeros_like(rhs))
    assert float(result.residual) == 1.0
    # GMRES solves it.
    check_solution(
        linear.GMRES().solve(operator(matrix), rhs, tol=1e-10, max_iter=50), matrix, rhs, 1e-10
    )


@pytest.mark.parametrize("method", ["cg", "gmres", "bicgstab"])
def test_jacobi_preconditioner_reduces_iterations(method):
    # Badly scaled, diagonally dominant (and symmetric, so SPD for cg).
    n = 30
    gen = generator(0)
    diagonal = torch.logspace(0, 4, n, dtype=F64)
    coupling = torch.rand(n, n, generator=gen, dtype=F64)
    coupling = 0.3 * (coupling + coupling.T) / n
    matrix = (torch.diag(diagonal) + coupling * diagonal.sqrt().outer(diagonal.sqrt())).unsqueeze(0)
    rhs = rhs_of(1, n, 0)
    inverse_diagonal = 1 / torch.diagonal(matrix, dim1=1, dim2=2)
    plain = linear.resolve(method).solve(operator(matrix), rhs, tol=1e-10, max_iter=1000)
    jacobi = type(linear.resolve(method))(preconditioner=lambda r: r * inverse_diagonal)
    preconditioned = jacobi.solve(operator(matrix), rhs, tol=1e-10, max_iter=1000)
    check_solution(plain, matrix, rhs, 1e-10)
    check_solution(preconditioned, matrix, rhs, 1e-10)
    assert preconditioned.iterations * 3 <= plain.iterations


class TestWarmStart:
    @pytest.mark.parametrize("method", sorted(ITERATIVE))
    def test_from_the_exact_solution(self, method):
        matrix, rhs = hard_and_easy(method)
        exact = torch.linalg.solve(matrix, rhs)
        saved = exact.clone()
        result = ITERATIVE[method](x0=exact).solve(operator(matrix), rhs, tol=1e-10, max_iter=500)
        assert result.iterations <= 1
        check_solution(result, matrix, rhs, 1e-10)
        assert torch.equal(exact, saved)

    @pytest.mark.parametrize("method", sorted(ITERATIVE))
    def test_previous(self, method):
        matrix, rhs = hard_and_easy(method)
        solver = ITERATIVE[method](x0="previous")
        cold = solver.solve(operator(matrix), rhs, tol=1e-10, max_iter=1000)
        again = solver.solve(operator(matrix), rhs, tol=1e-10, max_iter=1000)
        nearby = solver.solve(operator(matrix), rhs * 1.001, tol=1e-10, max_iter=1000)
        assert cold.iterations > 5
        assert again.iterations == 0 and torch.equal(again.x, cold.x)
        assert nearby.iterations < cold.iterations
        check_solution(nearby, matrix, rhs * 1.001, 1e-10)
        # A system of another shape starts from zero.
        small = solver.solve(operator(matrix[:1, :5, :5]), rhs[:1, :5], tol=1e-10, max_iter=1000)
        check_solution(small, matrix[:1, :5, :5], rhs[:1, :5], 1e-10)

    def test_previous_through_the_backward(self):
        w = contraction(1, 6, 0.5, 0)[0].requires_grad_()
        x = torch.randn(6, dtype=F64, requires_grad=True)
        solver = linear.GMRES(x0="previous")
        iterations = []
        for _ in range(2):
            z, info = implicit.fixed_point(
                lambda z, x: torch.tanh(w @ z + x),
                torch.zeros(6, dtype=F64),
                x,
                solver="fixed_point",
                backward=solver,
                tol=1e-12,
                max_iter=200,
                return_info=True,
            )
            z.sum().backward()
            iterations.append(info.backward.iterations)
        assert iterations[0] >= 3 and iterations[1] == 0

    def test_broadcast_and_bad_shape(self):
        matrix, rhs = spd(3, 4, 5.0, 0), rhs_of(3, 4, 0)
        guess = torch.ones(4, dtype=torch.float32)  # broadcast over the batch, cast
        check_solution(
            linear.CG(x0=guess).solve(operator(matrix), rhs, tol=1e-10, max_iter=50),
            matrix,
            rhs,
            1e-10,
        )
        with pytest.raises(ValueError, match="x0"):
            linear.CG(x0=torch.ones(5)).solve(operator(matrix), rhs, tol=1e-10, max_iter=50)


class TestDense:
    def test_singular_block_falls_back_to_least_squares(self):
        gen = generator(0)
        factor = torch.randn(4, 3, generator=gen, dtype=F64)
        rank_deficient = factor @ factor.T  # rank 3 of 4: LU returns garbage
        zero_row = torch.eye(4, dtype=F64)
        zero_row[2, 2] = 0  # LU hits an exact zero pivot
        regular = nonsymmetric(1, 4, 0.5, 0)[0]
        matrix = torch.stack([rank_deficient, regular, zero_row])
        rhs = rhs_of(3, 4, 0)
        result = linear.Dense().solve(operator(matrix), rhs, tol=1e-10, max_iter=1)
        assert result.codes.tolist() == [BREAKDOWN, CONVERGED, BREAKDOWN]
        assert bool(torch.isfinite(result.x).all())
        least_squares = torch.linalg.pinv(matrix) @ rhs.unsqueeze(-1)
        assert rel_err(result.x, least_squares.squeeze(-1)) <= 1e-10
        assert torch.allclose(result.residual, true_residual(matrix, result.x, rhs))

    def test_ridge_solves_the_tikhonov_system(self):
        matrix = torch.cat([nonsymmetric(1, 5, 0.5, 0), -torch.eye(5, dtype=F64)[None]])
        rhs = rhs_of(2, 5, 0)
        ridge = 0.1
        result = linear.Dense(ridge=ridge).solve(operator(matrix), rhs, tol=1e-10, max_iter=1)
        normal = matrix.mT @ matrix + ridge * torch.eye(5, dtype=F64)
        expected = torch.linalg.solve(normal, (matrix.mT @ rhs.unsqueeze(-1)).squeeze(-1))
        assert rel_err(result.x, expected) <= 1e-12
        # For A = −I the damped answer is −rhs / (1 + ridge): damped, with the sign kept.
        assert rel_err(result.x[1], -rhs[1] / (1 + ridge)) <= 1e-12
        # The damped system was solved; the residual is the one of A x = rhs.
        assert result.codes.tolist() == [CONVERGED, CONVERGED]
        assert torch.allclose(result.residual, true_residual(matrix, result.x, rhs))
        assert float(result.residual[1]) == pytest.approx(ridge / (1 + ridge))

    def test_ridge_makes_a_singular_block_solvable(self):
        matrix = torch.diag(torch.tensor([1.0, 0.0], dtype=F64)).unsqueeze(0)
        rhs = torch.tensor([[1.0, 1.0]], dtype=F64)
        result = linear.Dense(ridge=1e-3).solve(operator(matrix), rhs, tol=1e-10, max_iter=1)
        assert result.codes.tolist() == [CONVERGED]
        assert torch.allclose(result.x, torch.tensor([[1 / 1.001, 0.0]], dtype=F64))

    def test_nonfinite_matrix(self):
        matrix = torch.eye(3, dtype=F64).repeat(2, 1, 1)
        matrix[1, 0, 1] = math.nan
        result = linear.Dense().solve(operator(matrix), rhs_of(2, 3, 0), tol=1e-10, max_iter=1)
        assert result.codes.tolist() == [CONVERGED, NONFINITE]


def with_nearby(op: Operator, nearby_matrix: torch.Tensor) -> Operator:
    """``op`` (built by :func:`operator` for some ``A``) with the factorisation of the
    Jacobian it comes from at ``nearby_matrix`` instead of ``A``, as Newton leaves it."""
    jacobian = nearby_matrix.mT if op.transpose else nearby_matrix
    return Operator(op.jacobian, op.transpose, nearby=Factorization.of(jacobian))


class TestRefinement:
    """Dense solves that refine with a nearby factorisation (Newton's last step)."""

    @pytest.mark.parametrize("transpose", [True, False])
    @pytest.mark.parametrize("tol", [1e-10, 1e-18])  # below rounding: rounding it is
    def test_refines_to_the_direct_answer_in_a_few_products(self, transpose, tol):
        matrix = nonsymmetric(64, 24, 0.5, 0)
        nearby = matrix + 1e-5 * torch.randn(matrix.shape, generator=generator(1), dtype=F64)
        rhs = rhs_of(64, 24, 0)
        op = with_nearby(operator(matrix, transpose), nearby)
        result = linear.Dense().solve(op, rhs, tol=tol, max_iter=1)
        assert result.method == "dense+refine"
        # Not the 24 products that build the Jacobian.
        assert op.products == result.iterations <= linear.REFINEMENTS
        assert result.codes.tolist() == [CONVERGED] * 64
        assert rel_err(result.x, torch.linalg.solve(matrix, rhs)) <= 1e-14
        assert reports_true_residual(result, matrix, rhs)
        assert float(result.residual.max()) <= 4 * torch.finfo(F64).eps

    def test_a_factorisation_too_far_away_builds_the_jacobian(self):
        matrix = nonsymmetric(64, 24, 0.5, 0)
        other = nonsymmetric(64, 24, 0.5, 7)  # as far from `matrix` as it is from I
        rhs = rhs_of(64, 24, 0)
        op = with_nearby(operator(matrix), other)
        result = linear.Dense().solve(op, rhs, tol=1e-10, max_iter=1)
        assert result.method is None  # the direct solve's answer
        # It counts the refinement's products and the 24 that built the Jacobian.
        assert 24 < op.products <= 24 + linear.REFINEMENTS
        assert rel_err(result.x, torch.linalg.solve(matrix, rhs)) <= 1e-13
        assert result.codes.tolist() == [CONVERGED] * 64

    @pytest.mark.parametrize(
        ("dense", "batch", "n"),
        [
            (linear.Dense(ridge=0.1), 64, 24),
            (linear.Dense(), 64, 10),
            (linear.Dense(), 1, 24),
            (linear.Dense(), 2**17, 1),
            (linear.Dense(), 2**12, 5),
        ],
    )
    def test_not_with_ridge_nor_where_the_direct_solve_is_as_cheap(self, dense, batch, n):
        # With a ridge the system is another one; 64·10³ and 24³ are below 2¹⁶; with
        # n ≤ 5 the direct solve's n products are never more than refinement's.
        matrix = nonsymmetric(batch, n, 0.5, 0)
        op = with_nearby(operator(matrix), matrix)
        result = dense.solve(op, rhs_of(batch, n, 0), tol=1e-10, max_iter=1)
        assert result.method is None and op.products == n

    @PROPERTY
    @given(
        batch=st.integers(1, 40),
        n=st.integers(41, 56),  # B·n³ ≥ 41³ > 2¹⁶: refinement is tried
        distance=st.floats(1e-9, 1e-1),
        spread=st.floats(0.1, 0.9),
        seed=st.integers(0, 2**16),
    )
    def test_property_equals_the_direct_solve(self, batch, n, distance, spread, seed):
        # Random well-conditioned systems and factorisations from near to far: refined or
        # not, the answer is the direct solve's up to what its residual (reported truly,
        # within tol) allows: per problem ‖x − x_direct‖ / ‖x_direct‖ ≤ cond · (residual
        # + the direct solve's own, a few eps). A factorisation far away can stop after
        # REFINEMENTS products between rounding level and tol.
        matrix = nonsymmetric(batch, n, spread, seed)
        noise = torch.randn(matrix.shape, generator=generator(seed + 2), dtype=F64)
        nearby = matrix + distance * matrix.abs().amax(dim=(1, 2), keepdim=True) * noise
        rhs = rhs_of(batch, n, seed)
        op = with_nearby(operator(matrix), nearby)
        result = linear.Dense().solve(op, rhs, tol=1e-10, max_iter=1)
        assert result.codes.tolist() == [CONVERGED] * batch
        assert reports_true_residual(result, matrix, rhs)
        direct = torch.linalg.solve(matrix, rhs)
        errors = torch.linalg.vector_norm(result.x - direct, dim=1) / torch.linalg.vector_norm(
            direct, dim=1
        )
        bound = torch.linalg.cond(matrix) * (result.residual + 4 * torch.finfo(F64).eps)
        assert bool((errors <= bound).all()) and float(result.residual.max()) <= 1e-10
        if result.method == "dense+refine":
            assert op.products <= linear.REFINEMENTS
        else:
            assert op.products > n


class TestAuto:
    def test_picks_dense_below_max_dense_and_an_iterative_method_above(self):
        auto = linear.Auto(max_dense=5, tol=1e-9, max_iter=7)
        small, large = auto.for_size(5), auto.for_size(6)
        assert isinstance(small, linear.Dense) and large.name == "neumann+gmres"
        assert (small.tol, small.max_iter, large.tol, large.max_iter) == (1e-9, 7, 1e-9, 7)

    @pytest.mark.parametrize(
        ("backward", "method"), [("auto", "dense"), (linear.Auto(max_dense=3), "neumann")]
    )
    def test_through_the_core(self, backward, method):
        x = torch.randn(4, dtype=F64, requires_grad=True)
        z, info = implicit.fixed_point(
            lambda z, x: 0.5 * torch.tanh(z) + x,
            torch.zeros(4, dtype=F64),
            x,
            solver="fixed_point",
            backward=backward,
            return_info=True,
        )
        z.sum().backward()
        assert info.backward.method == method

    @staticmethod
    def fixed_point_grad(diagonals: torch.Tensor, backward):
        """``∇x Σ z`` for ``z = S z + x`` with ``S = diag(diagonals[b])`` per problem,
        solved by Newton (which needs no contraction), and the backward's report."""
        x = torch.ones_like(diagonals, requires_grad=True)
        z, info = implicit.fixed_point(
            lambda z, x: diagonals * z + x,
            torch.zeros_like(x),
            x,
            solver="newton",
            backward=backward,
            batched=True,
            tol=1e-12,
            max_iter=200,
            return_info=True,
        )
        (grad,) = torch.autograd.grad(z.sum(), x)
        return grad, info.backward

    def test_weak_or_no_contraction_goes_on_with_gmres(self):
        # Row 0 contracts strongly (Neumann finishes it); row 1 contracts at 0.97 (its
        # residual does not halve in four iterations); row 2 does not contract at all
        # (S = −1.5 I: Neumann diverges). Every row gets (I − S)⁻¹ 1 exactly.
        n = 8
        diagonals = torch.stack(
            [
                torch.linspace(0.0, 0.3, n, dtype=F64),
                torch.linspace(0.0, 0.97, n, dtype=F64),
                torch.full((n,), -1.5, dtype=F64),
            ]
        )
        grad, report = self.fixed_point_grad(diagonals, linear.Auto(max_dense=3))
        assert report.method == "neumann+gmres"
        assert bool(report.converged.all())
        assert rel_err(grad, 1 / (1 - diagonals)) <= 1e-10
        # The strongly contracting row is Neumann's answer, untouched by GMRES.
        alone, _ = self.fixed_point_grad(diagonals[:1], "neumann")
        assert torch.equal(grad[0], alone[0])
        # With GMRES alone: the same answers, more products for the easy row's sake.
        gmres, _ = self.fixed_point_grad(diagonals, "gmres")
        assert rel_err(grad, gmres) <= 1e-10

    def test_a_strong_contraction_stays_with_neumann(self):
        diagonals = torch.linspace(-0.4, 0.4, 3 * 8, dtype=F64).reshape(3, 8)
        grad, report = self.fixed_point_grad(diagonals, linear.Auto(max_dense=3))
        neumann, neumann_report = self.fixed_point_grad(diagonals, "neumann")
        assert report.method == "neumann"
        assert torch.equal(grad, neumann)
        assert report.iterations == neumann_report.iterations

    def test_other_systems_use_gmres(self):
        # A root problem's adjoint has no ∂f/∂z to iterate on: GMRES from the start.
        x = torch.randn(6, dtype=F64, requires_grad=True)
        z, info = implicit.root_solve(
            lambda z, x: z + 0.3 * torch.tanh(z) - x,
            torch.zeros(6, dtype=F64),
            x,
            backward=linear.Auto(max_dense=3),
            tol=1e-12,
            return_info=True,
        )
        z.sum().backward()
        assert info.backward.method == "gmres"
        d = 1 + 0.3 / torch.cosh(z.detach()) ** 2
        assert rel_err(x.grad, 1 / d) <= 1e-10

    def test_solve_delegates(self):
        matrix, rhs = nonsymmetric(2, 6, 0.5, 0), rhs_of(2, 6, 0)
        for max_dense, iterations in ((6, 1), (5, 6)):
            result = linear.Auto(max_dense=max_dense).solve(
                operator(matrix), rhs, tol=1e-10, max_iter=50
            )
            check_solution(result, matrix, rhs, 1e-10)
            assert (result.iterations == 1) == (iterations == 1)


@pytest.mark.parametrize("method", ["dense", "cg", "gmres", "bicgstab", "neumann"])
def test_zero_right_hand_side(method):
    matrix = spd(3, 4, 5.0, 0) / (-6 if method == "neumann" else 1)  # Neumann: ‖I + A‖ < 1
    rhs = rhs_of(3, 4, 0)
    rhs[1] = 0
    kwargs = {} if method == "dense" else {"x0": torch.full((3, 4), 0.5, dtype=F64)}
    result = type(linear.resolve(method))(**kwargs).solve(
        operator(matrix), rhs, tol=1e-10, max_iter=200
    )
    assert torch.equal(result.x[1], torch.zeros(4, dtype=F64))
    assert result.codes.tolist() == [CONVERGED] * 3
    assert float(result.residual[1]) == 0
    everything_zero = linear.resolve(method).solve(
        operator(matrix), torch.zeros_like(rhs), tol=1e-10, max_iter=200
    )
    assert torch.equal(everything_zero.x, torch.zeros_like(rhs))
    assert everything_zero.codes.tolist() == [CONVERGED] * 3
    if method != "dense":
        assert everything_zero.iterations == 0


class TestNeumann:
    def test_damping_converges_where_the_plain_series_diverges(self):
        # F = −1.5 I: x ← F x − rhs diverges; with damping ½ the iteration matrix is
        # ½ I + ½ F = −¼ I.
        n = 4
        matrix = (-2.5 * torch.eye(n, dtype=F64)).unsqueeze(0)
        rhs = rhs_of(1, n, 0)
        plain = linear.Neumann().solve(operator(matrix), rhs, tol=1e-10, max_iter=60)
        damped = linear.Neumann(damping=0.5).solve(operator(matrix), rhs, tol=1e-10, max_iter=60)
        assert plain.codes.tolist() == [MAX_ITER]
        check_solution(damped, matrix, rhs, 1e-10)
        assert damped.iterations <= 20

    def test_overflow_stops_at_the_last_finite_iterate(self):
        matrix = (-5 * torch.eye(3, dtype=F64)).unsqueeze(0)
        result = linear.Neumann().solve(operator(matrix), rhs_of(1, 3, 0), tol=1e-10, max_iter=5000)
        assert result.codes.tolist() == [NONFINITE]
        assert result.iterations < 1000
        # The returned iterate is the last one whose residual was finite.
        assert bool(torch.isfinite(result.x).all() and torch.isfinite(result.residual).all())

    def test_is_the_classic_deq_backward(self):
        # x_k = −Σ_{i<k} (Fᵀ)^i rhs: the truncated Neumann series, k = iterations.
        f = contraction(1, 5, 0.5, 0)
        rhs = rhs_of(1, 5, 0)
        result = linear.Neumann(max_iter=8).solve(
            operator(f.mT - torch.eye(5, dtype=F64)), rhs, tol=1e-10, max_iter=8
        )
        series = torch.zeros_like(rhs)
        term = rhs
        for _ in range(result.iterations):
            series = series - term
            term = term @ f[0]
        assert result.codes.tolist() == [MAX_ITER] and result.iterations == 8
        assert rel_err(result.x, series) <= 1e-13

    @pytest.mark.parametrize("shifted", [True, False])
    def test_rows_stop_on_their_own(self, shifted):
        # Per row F = 0.1 I (done in a few steps), −5 I (overflows after that) and
        # 0.7 I (slow): each row ends as it would alone, the overflowing one at its last
        # finite iterate. shifted: the classic DEQ path, products of F from a recorded
        # graph of f; otherwise products of A = F − I.
        n = 3
        scales = torch.tensor([0.1, -5.0, 0.7], dtype=F64)
        rhs = rhs_of(3, n, 0)

        def solve(rows):
            f = scales[rows].reshape(-1, 1, 1) * torch.eye(n, dtype=F64)
            if shifted:
                graph = GraphJacobian.record(
                    lambda z: torch.einsum("bij,bj->bi", f.mT, z), torch.zeros_like(rhs[rows]), True
                )
                op = Operator(graph, transpose=True)
                assert op.shifted
            else:
                op = operator(f - torch.eye(n, dtype=F64))
            return linear.Neumann().solve(op, rhs[rows], tol=1e-12, max_iter=5000)

        together = solve(slice(None))
        assert together.codes.tolist() == [CONVERGED, NONFINITE, CONVERGED]
        assert bool(torch.isfinite(together.x).all())
        for b in range(3):
            alone = solve(slice(b, b + 1))
            assert torch.equal(together.x[b], alone.x[0])
            assert alone.codes.tolist() == together.codes[b : b + 1].tolist()


def test_one_step_is_minus_the_right_hand_side():
    rhs = rhs_of(2, 3, 0)
    result = linear.OneStep().solve(operator(spd(2, 3, 2.0, 0)), rhs, tol=1e-10, max_iter=5)
    assert torch.equal(result.x, -rhs)
    assert result.codes.tolist() == [CONVERGED, CONVERGED] and result.iterations == 0
    assert bool(result.residual.isnan().all())
    assert not linear.OneStep.exact and linear.GMRES.exact


@pytest.mark.parametrize("method", ["dense", "cg", "gmres", "bicgstab", "neumann", "one_step"])
def test_inputs_unchanged_and_float32(method):
    matrix = (spd(2, 5, 4.0, 0) / (-8 if method == "neumann" else 1)).float()
    rhs = rhs_of(2, 5, 0).float()
    saved = (matrix.clone(), rhs.clone())
    result = linear.resolve(method).solve(operator(matrix), rhs, tol=1e-5, max_iter=100)
    assert torch.equal(matrix, saved[0]) and torch.equal(rhs, saved[1])
    assert result.x.dtype == torch.float32 and result.residual.dtype == torch.float32
    assert result.codes.tolist() == [CONVERGED, CONVERGED]
    if method != "one_step":
        assert float(true_residual(matrix, result.x, rhs).max()) <= 1e-5


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: linear.GMRES(restart=0), "restart"),
        (lambda: linear.GMRES(restart=True), "restart"),
        (lambda: linear.Neumann(damping=0), "damping"),
        (lambda: linear.Neumann(damping=1.5), "damping"),
        (lambda: linear.Dense(ridge=-1.0), "ridge"),
        (lambda: linear.Dense(ridge=math.inf), "ridge"),
        (lambda: linear.Dense(chunk_size=0), "chunk_size"),
        (lambda: linear.CG(tol=0.0), r"CG\(tol"),
        (lambda: linear.BiCGStab(tol=math.nan), r"BiCGStab\(tol"),
        (lambda: linear.CG(max_iter=0), r"CG\(max_iter"),
        (lambda: linear.CG(max_iter=2.5), r"CG\(max_iter"),
        (lambda: linear.CG(x0="prev"), "x0"),
        (lambda: linear.Neumann(x0=[0.0]), "x0"),
        (lambda: linear.GMRES(x0=np.zeros(3)), "x0"),
        (lambda: linear.GMRES(preconditioner=3), "preconditioner"),
        (lambda: linear.Auto(max_dense=-1), "max_dense"),
        (lambda: linear.resolve("gmress"), "unknown backward 'gmress'"),
        (lambda: linear.GMRES(restrat=3), "restrat"),
    ],
)
def test_bad_options_name_the_argument(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize(
    "backward",
    [
        linear.GMRES(preconditioner=lambda r: -r, restart=3),
        linear.BiCGStab(preconditioner=lambda r: -r),
        linear.Neumann(damping=0.8, x0="previous"),
    ],
    ids=["gmres", "bicgstab", "neumann"],
)
def test_instances_through_the_backward(backward):
    # For a fixed point (∂g/∂z)ᵀ = Jᵀ − I ≈ −I: M = −I is the natural preconditioner.
    w = contraction(1, 6, 0.8, 0)[0].requires_grad_()
    x = torch.randn(2, 6, dtype=F64, requires_grad=True)

    def gradients(mode):
        z = implicit.fixed_point(
            lambda z, x: torch.tanh(z @ w.T + x),
            torch.zeros(2, 6, dtype=F64),
            x,
            solver="fixed_point",
            backward=mode,
            batched=True,
            tol=1e-12,
            max_iter=500,
        )
        return torch.autograd.grad((z**2).sum(), [x, w])

    for got, want in zip(gradients(backward), gradients("dense")):
        assert rel_err(got, want) <= 1e-9


class TestShiftedNeumann:
    """Neumann on a fixed point's adjoint, with products of ∂f/∂z (one pass per step)."""

    @staticmethod
    def operators(batch, n, norms, seed):
        """``A = Fᵀ − I`` per sample as a shifted graph (products of ``Fᵀ``) and as a
        plain one (products of ``A``); ``‖F_b‖₂ = norms[b]``."""
        gen = generator(seed)
        f = torch.randn(batch, n, n, generator=gen, dtype=F64)
        f = f * (torch.tensor(norms, dtype=F64) / torch.linalg.matrix_norm(f, ord=2))[:, None, None]

        def fixed_point_map(z):  # ∂/∂z = F (batched): its VJP is Fᵀ w
            return torch.einsum("bij,bj->bi", f, z)

        z = torch.zeros(batch, n, dtype=F64)
        shifted = Operator(GraphJacobian.record(fixed_point_map, z, shifted=True), True)
        plain = Operator(GraphJacobian.record(lambda z: fixed_point_map(z) - z, z), True)
        return shifted, plain, f.mT - torch.eye(n, dtype=F64)

    @pytest.mark.parametrize("x0", [None, "tensor"])
    def test_matches_the_plain_iteration(self, x0):
        # Contractions of different strengths: the samples converge at different steps.
        shifted, plain, matrix = self.operators(4, 6, [0.1, 0.5, 0.8, 0.95], seed=0)
        rhs = rhs_of(4, 6, 0)
        start = None if x0 is None else 0.3 * rhs_of(4, 6, 1)
        results = [
            linear.Neumann(x0=start).solve(op, rhs, tol=1e-12, max_iter=1000)
            for op in (shifted, plain)
        ]
        assert shifted.shifted and not plain.shifted
        fast, slow = results
        assert fast.iterations == slow.iterations
        assert torch.equal(fast.codes, slow.codes) and bool((fast.codes == CONVERGED).all())
        assert rel_err(fast.x, slow.x) <= 1e-13
        check_solution(fast, matrix, rhs, 1e-12)
        assert reports_true_residual(fast, matrix, rhs)
        # One product per iteration (and one for a warm start's initial residual).
        assert shifted.products == fast.iterations + (x0 is not None)

    def test_a_damped_iteration_uses_the_plain_products(self):
        shifted, _, matrix = self.operators(2, 4, [0.5, 0.5], seed=1)
        rhs = rhs_of(2, 4, 2)
        result = linear.Neumann(damping=0.7).solve(shifted, rhs, tol=1e-10, max_iter=500)
        check_solution(result, matrix, rhs, 1e-10)


def test_gmres_batch_equals_solving_each_problem_alone():
    # Problems that converge after different numbers of steps: the batched cycle's
    # fast path (every problem extending its space) and its per-problem path.
    matrix = nonsymmetric(4, 12, 0.2, 3) + torch.diag_embed(
        torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=F64)[:, None].expand(4, 12)
    )
    rhs = rhs_of(4, 12, 3)
    batched = linear.GMRES(restart=5).solve(operator(matrix), rhs, tol=1e-11, max_iter=200)
    for b in range(4):
        alone = linear.GMRES(restart=5).solve(
            operator(matrix[b : b + 1]), rhs[b : b + 1], tol=1e-11, max_iter=200
        )
        assert rel_err(batched.x[b], alone.x[0]) <= 1e-10
    check_solution(batched, matrix, rhs, 1e-11)
