"""Every linear solver on random systems with known answers (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from systems import (
    F64,
    PROPERTY,
    check_solution,
    contraction,
    generator,
    nonsymmetric,
    operator,
    reports_true_residual,
    rhs_of,
    run,
    sizes,
    spd,
    true_residual,
)

from implicit import linear
from implicit.linear.base import BREAKDOWN, CONVERGED, MAX_ITER


class TestProperties:
    @PROPERTY
    @given(
        **sizes,
        condition=st.floats(1.0, 1e3),
        transpose=st.booleans(),
        sign=st.sampled_from([-1, 1]),
    )
    def test_cg_on_random_definite(self, batch, n, seed, condition, transpose, sign):
        # SPD, or negative definite (the adjoint of a symmetric contractive fixed point).
        matrix, rhs = sign * spd(batch, n, condition, seed), rhs_of(batch, n, seed)
        result = run(linear.CG(), operator(matrix, transpose), rhs, tol=1e-10, max_iter=200)
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
        result = run(solver, operator(matrix, transpose), rhs, tol=1e-10, max_iter=200)
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
        result = run(solver, operator(matrix, transpose), rhs, tol=1e-10, max_iter=3000)
        check_solution(result, matrix, rhs, 1e-10)

    @PROPERTY
    @given(**sizes, norm=st.floats(0.0, 0.9))
    def test_neumann_on_contractions(self, batch, n, seed, norm):
        # The adjoint of a fixed point: A = Fᵀ − I with ‖F‖ < 1.
        matrix = contraction(batch, n, norm, seed) - torch.eye(n, dtype=F64)
        rhs = rhs_of(batch, n, seed)
        result = run(linear.Neumann(), operator(matrix), rhs, tol=1e-10, max_iter=500)
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
        result = run(linear.resolve(method), operator(matrix), rhs, tol=1e-8, max_iter=3 * n)
        truth = true_residual(matrix, result.x, rhs)
        assert reports_true_residual(result, matrix, rhs)
        for code, residual in zip(result.codes.tolist(), truth.tolist()):
            if code == CONVERGED:
                assert residual <= 1e-8
            else:
                assert code in (MAX_ITER, BREAKDOWN) and residual > 1e-8
