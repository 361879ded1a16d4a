"""Restarted GMRES (implicit/linear/gmres.py)."""

from __future__ import annotations

import torch
from conftest import rel_err
from systems import (
    F64,
    check_solution,
    nonsymmetric,
    operator,
    rhs_of,
    run,
    true_residual,
)

from implicit import linear
from implicit.linear.base import BREAKDOWN


class TestGMRES:
    def test_restart(self):
        matrix, rhs = nonsymmetric(2, 12, 0.6, 3), rhs_of(2, 12, 3)
        full = run(linear.GMRES(restart=12), operator(matrix), rhs, tol=1e-10, max_iter=500)
        short = run(linear.GMRES(restart=3), operator(matrix), rhs, tol=1e-10, max_iter=500)
        # Full GMRES is exact in n steps; GMRES(3) needs restarts and more products.
        assert full.iterations <= 12
        assert short.iterations > max(full.iterations, 3)
        check_solution(full, matrix, rhs, 1e-10)
        check_solution(short, matrix, rhs, 1e-10)

    def test_singular_system_reports_breakdown(self):
        # Inconsistent: rhs has a component outside the range of A.
        matrix = torch.diag(torch.tensor([1.0, 0.0], dtype=F64)).unsqueeze(0)
        rhs = torch.tensor([[1.0, 1.0]], dtype=F64)
        result = run(linear.GMRES(), operator(matrix), rhs, tol=1e-10, max_iter=50)
        assert result.codes.tolist() == [BREAKDOWN]
        assert bool(torch.isfinite(result.x).all())
        assert torch.allclose(result.residual, true_residual(matrix, result.x, rhs))

    def test_lucky_breakdown_is_an_exact_solve(self):
        matrix = 2 * torch.eye(5, dtype=F64).unsqueeze(0)
        rhs = rhs_of(1, 5, 0)
        result = run(linear.GMRES(), operator(matrix), rhs, tol=1e-12, max_iter=50)
        assert result.iterations == 1
        check_solution(result, matrix, rhs, 1e-12)

    # fast path (every problem extending its space) and its per-problem path.
    matrix = nonsymmetric(4, 12, 0.2, 3) + torch.diag_embed(
        torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=F64)[:, None].expand(4, 12)
    )
    rhs = rhs_of(4, 12, 3)
    batched = run(linear.GMRES(restart=5), operator(matrix), rhs, tol=1e-11, max_iter=200)
    for b in range(4):
        alone = run(
            linear.GMRES(restart=5),
            operator(matrix[b : b + 1]),
            rhs[b : b + 1],
            tol=1e-11,
            max_iter=200,
        )
        assert rel_err(batched.x[b], alone.x[0]) <= 1e-10
    check_solution(batched, matrix, rhs, 1e-11)
