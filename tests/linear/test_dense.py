"""Dense solves (implicit/linear/dense.py): LU, least squares, ridge, transposes, and
refinement of a nearby factorisation (Newton's hint)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err
from hypothesis import given
from hypothesis import strategies as st
from systems import (
    F64,
    PROPERTY,
    generator,
    nonsymmetric,
    operator,
    reports_true_residual,
    rhs_of,
    run,
    true_residual,
)

from implicit import linear
from implicit._batch import Factorization
from implicit.linear import JacobianOperator, NearbyFactorization
from implicit.linear.base import BREAKDOWN, CONVERGED, NONFINITE
from implicit.linear.dense import REFINEMENTS


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
        result = run(linear.Dense(), operator(matrix), rhs, tol=1e-10, max_iter=1)
        assert result.codes.tolist() == [BREAKDOWN, CONVERGED, BREAKDOWN]
        assert bool(torch.isfinite(result.x).all())
        least_squares = torch.linalg.pinv(matrix) @ rhs.unsqueeze(-1)
        assert rel_err(result.x, least_squares.squeeze(-1)) <= 1e-10
        assert torch.allclose(result.residual, true_residual(matrix, result.x, rhs))

    def test_ridge_solves_the_tikhonov_system(self):
        matrix = torch.cat([nonsymmetric(1, 5, 0.5, 0), -torch.eye(5, dtype=F64)[None]])
        rhs = rhs_of(2, 5, 0)
        ridge = 0.1
        result = run(linear.Dense(ridge=ridge), operator(matrix), rhs, tol=1e-10, max_iter=1)
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
        result = run(linear.Dense(ridge=1e-3), operator(matrix), rhs, tol=1e-10, max_iter=1)
        assert result.codes.tolist() == [CONVERGED]
        assert torch.allclose(result.x, torch.tensor([[1 / 1.001, 0.0]], dtype=F64))

    def test_nonfinite_matrix(self):
        matrix = torch.eye(3, dtype=F64).repeat(2, 1, 1)
        matrix[1, 0, 1] = math.nan
        result = run(linear.Dense(), operator(matrix), rhs_of(2, 3, 0), tol=1e-10, max_iter=1)
        assert result.codes.tolist() == [CONVERGED, NONFINITE]


def nearby_hint(op: JacobianOperator, nearby_matrix: torch.Tensor) -> NearbyFactorization:
    """The factorisation of the Jacobian ``op`` comes from (built by ``operator`` for
    some ``A``), at ``nearby_matrix`` instead of ``A``, as Newton leaves it."""
    jacobian = nearby_matrix.mT if op.transposed else nearby_matrix
    return NearbyFactorization(Factorization.of(jacobian))


def run_with(solver, op, hint, rhs, **options):
    """``run`` with a hint: the solver refines where it ``uses`` it."""
    return solver.solve(solver.init(op, hint), rhs, **options)


class TestRefinement:
    """Dense solves that refine with a nearby factorisation (Newton's last step)."""

    @pytest.mark.parametrize("transpose", [True, False])
    @pytest.mark.parametrize("tol", [1e-10, 1e-18])  # below rounding: rounding it is
    def test_refines_to_the_direct_answer_in_a_few_products(self, transpose, tol):
        matrix = nonsymmetric(64, 24, 0.5, 0)
        nearby = matrix + 1e-5 * torch.randn(matrix.shape, generator=generator(1), dtype=F64)
        rhs = rhs_of(64, 24, 0)
        op = operator(matrix, transpose)
        hint = nearby_hint(op, nearby)
        result = run_with(linear.Dense(), op, hint, rhs, tol=tol, max_iter=1)
        assert result.method == "dense+refine"
        # Not the 24 products that build the Jacobian.
        assert op.products == result.iterations <= REFINEMENTS
        assert result.codes.tolist() == [CONVERGED] * 64
        assert rel_err(result.x, torch.linalg.solve(matrix, rhs)) <= 1e-14
        assert reports_true_residual(result, matrix, rhs)
        assert float(result.residual.max()) <= 4 * torch.finfo(F64).eps

    def test_a_factorisation_too_far_away_builds_the_jacobian(self):
        matrix = nonsymmetric(64, 24, 0.5, 0)
        other = nonsymmetric(64, 24, 0.5, 7)  # as far from `matrix` as it is from I
        rhs = rhs_of(64, 24, 0)
        op = operator(matrix)
        hint = nearby_hint(op, other)
        result = run_with(linear.Dense(), op, hint, rhs, tol=1e-10, max_iter=1)
        assert result.method is None  # the direct solve's answer
        # It counts the refinement's products and the 24 that built the Jacobian.
        assert 24 < op.products <= 24 + REFINEMENTS
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
        op = operator(matrix)
        hint = nearby_hint(op, matrix)
        result = run_with(dense, op, hint, rhs_of(batch, n, 0), tol=1e-10, max_iter=1)
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
        op = operator(matrix)
        hint = nearby_hint(op, nearby)
        result = run_with(linear.Dense(), op, hint, rhs, tol=1e-10, max_iter=1)
        assert result.codes.tolist() == [CONVERGED] * batch
        assert reports_true_residual(result, matrix, rhs)
        direct = torch.linalg.solve(matrix, rhs)
        errors = torch.linalg.vector_norm(result.x - direct, dim=1) / torch.linalg.vector_norm(
            direct, dim=1
        )
        bound = torch.linalg.cond(matrix) * (result.residual + 4 * torch.finfo(F64).eps)
        assert bool((errors <= bound).all()) and float(result.residual.max()) <= 1e-10
        if result.method == "dense+refine":
            assert op.products <= REFINEMENTS
        else:
            assert op.products > n


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_transpose_reuses_the_factors(ridge):
    # Aᵀ from A's state: no product, the transposed answer (with a ridge: the Tikhonov
    # system of Aᵀ).
    matrix, rhs = nonsymmetric(3, 6, 0.5, 0), rhs_of(3, 6, 0)
    dense = linear.Dense(ridge=ridge)
    op = operator(matrix, transpose=False)
    state = dense.init(op)
    assert op.products == 6
    result = dense.solve(dense.transpose(state), rhs, tol=1e-12, max_iter=1)
    assert op.products == 6
    expected = run(dense, operator(matrix.mT, transpose=False), rhs, tol=1e-12, max_iter=1)
    assert rel_err(result.x, expected.x) <= 1e-13
    assert torch.allclose(result.residual, true_residual(matrix.mT, result.x, rhs))
    assert result.codes.tolist() == [CONVERGED] * 3
    # Twice is the original.
    back = dense.solve(dense.transpose(dense.transpose(state)), rhs, tol=1e-12, max_iter=1)
    assert torch.equal(back.x, dense.solve(state, rhs, tol=1e-12, max_iter=1).x)


def test_direct_solve_is_torch_linalg_solve_bit_for_bit():
    matrix, rhs = nonsymmetric(5, 9, 0.5, 1), rhs_of(5, 9, 1)
    result = run(linear.Dense(), operator(matrix, transpose=False), rhs, tol=1e-12, max_iter=1)
    assert torch.equal(result.x, torch.linalg.solve(matrix, rhs))
