"""Conjugate gradients (implicit/linear/cg.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from systems import (
    F64,
    check_solution,
    operator,
    rhs_of,
    run,
    spd,
    true_residual,
)

import implicit
from implicit import linear
from implicit.linear.base import BREAKDOWN


class TestCG:
    def test_indefinite_system_reports_breakdown(self):
        # bᵀAb < 0: the very first curvature is negative. jaxopt returned zeros silently.
        matrix = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=F64)).unsqueeze(0)
        rhs = torch.tensor([[0.1, 1.0, 0.1]], dtype=F64)
        result = run(linear.CG(), operator(matrix), rhs, tol=1e-10, max_iter=50)
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

    def test_indefinite_preconditioner_reports_breakdown(self):
        signs = torch.tensor([1.0, -1.0] * 3, dtype=F64)
        result = run(
            linear.CG(preconditioner=lambda r: r * signs),
            operator(spd(2, 6, 10.0, 0)),
            rhs_of(2, 6, 0),
            tol=1e-10,
            max_iter=50,
        )
        assert result.codes.tolist() == [BREAKDOWN, BREAKDOWN]

    @pytest.mark.parametrize("flip_matrix", [False, True])
    @pytest.mark.parametrize("flip_preconditioner", [False, True])
    def test_negative_definite_matrix_or_preconditioner(self, flip_matrix, flip_preconditioner):
        # CG's iterates are the same for A and −A, M and −M: a definite system of either
        # sign is solved (the adjoint of a symmetric contractive fixed point is −SPD).
        matrix = spd(3, 12, 100.0, 4) * (-1 if flip_matrix else 1)
        diagonal = matrix.diagonal(dim1=1, dim2=2)
        sign = -1 if flip_preconditioner != flip_matrix else 1
        jacobi = linear.CG(preconditioner=lambda r: sign * r / diagonal)
        rhs = rhs_of(3, 12, 4)
        for solver in (linear.CG(), jacobi):
            result = run(solver, operator(matrix), rhs, tol=1e-10, max_iter=100)
            check_solution(result, matrix, rhs, 1e-10)

    def test_symmetric_contractive_fixed_point(self):
        # z = S z + b with S symmetric, ‖S‖ < 1: ∂g/∂z = S − I is negative definite. CG
        # broke down at its first iteration and the gradient was zero.
        gen = torch.Generator().manual_seed(0)
        s = torch.randn(8, 8, generator=gen, dtype=F64)
        s = 0.9 * (s + s.T) / torch.linalg.matrix_norm(s + s.T, ord=2)
        b = torch.randn(8, generator=gen, dtype=F64, requires_grad=True)
        weights = torch.randn(8, generator=gen, dtype=F64)
        z, info = implicit.fixed_point(
            lambda z, b: s @ z + b,
            torch.zeros(8, dtype=F64),
            b,
            backward="cg",
            tol=1e-12,
            on_failure="raise",
            return_info=True,
        )
        (z * weights).sum().backward()
        reference = torch.linalg.solve(torch.eye(8, dtype=F64) - s.T, weights)
        assert info.backward.status == "converged"
        assert rel_err(b.grad, reference) < 1e-10
