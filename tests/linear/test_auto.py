"""The default backward mode (implicit/linear/auto.py): its choice and its switch."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from systems import (
    F64,
    check_solution,
    generator,
    nonsymmetric,
    operator,
    rhs_of,
    run,
    spd,
)

import implicit
from implicit import linear
from implicit.linear import JacobianOperator
from implicit.linear.auto import CGThenGMRES, NeumannThenGMRES
from implicit.linear.base import BREAKDOWN, CONVERGED


class TestAuto:
    def test_chooses_from_the_size_and_the_structure(self):
        auto = linear.Auto(max_dense=5, tol=1e-9, max_iter=7)
        z = torch.zeros(2, 6, dtype=F64)
        small = operator(nonsymmetric(2, 5, 0.5, 0))
        plain = operator(nonsymmetric(2, 6, 0.5, 0))
        shifted = JacobianOperator.of_fixed_point(lambda z: 0.5 * z, z)
        spd_operator = JacobianOperator.of(lambda z: 2 * z, z, positive_definite=True)
        chosen = [auto.choose(op) for op in (small, plain, shifted, spd_operator)]
        assert [type(c) for c in chosen] == [
            linear.Dense,
            linear.GMRES,
            NeumannThenGMRES,
            CGThenGMRES,
        ]
        assert all((c.tol, c.max_iter) == (1e-9, 7) for c in chosen)
        # Symmetric is not enough for CG: it needs positive definite.
        symmetric = JacobianOperator.of(lambda z: -z, z, symmetric=True)
        assert type(auto.choose(symmetric)) is linear.GMRES

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

    def test_a_positive_definite_operator_is_solved_by_cg(self):
        matrix, rhs = spd(3, 10, 50.0, 0), rhs_of(3, 10, 0)
        op = operator(matrix)
        spd_op = JacobianOperator(op.jacobian, transposed=True, positive_definite=True)
        result = run(linear.Auto(max_dense=3), spd_op, rhs, tol=1e-10, max_iter=50)
        assert result.method == "cg"
        check_solution(result, matrix, rhs, 1e-10)
        # The same iterates as CG alone.
        alone = run(linear.CG(), spd_op, rhs, tol=1e-10, max_iter=50)
        assert torch.equal(result.x, alone.x)

    def test_a_wrong_positive_definite_claim_goes_on_with_gmres(self):
        # Rows 0 and 2 are SPD; row 1 is symmetric indefinite (eigenvalues of both signs),
        # claimed positive definite all the same: CG breaks down on it (a curvature
        # pᵀAp ≤ 0) and GMRES solves it; the others keep CG's answer.
        n = 10
        matrix = spd(3, n, 20.0, 1)
        signs = torch.ones(n, dtype=F64)
        signs[::2] = -1
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator(5), dtype=F64))
        matrix[1] = q @ torch.diag(signs * torch.linspace(1, 5, n, dtype=F64)) @ q.T
        rhs = rhs_of(3, n, 1)
        op = operator(matrix)
        claimed = JacobianOperator(op.jacobian, transposed=True, positive_definite=True)
        result = run(linear.Auto(max_dense=3), claimed, rhs, tol=1e-10, max_iter=60)
        assert result.method == "cg+gmres"
        check_solution(result, matrix, rhs, 1e-10)
        cg = run(linear.CG(), claimed, rhs, tol=1e-10, max_iter=60)
        assert cg.codes.tolist() == [CONVERGED, BREAKDOWN, CONVERGED]
        assert torch.equal(result.x[0], cg.x[0]) and torch.equal(result.x[2], cg.x[2])

    def test_solve_delegates(self):
        matrix, rhs = nonsymmetric(2, 6, 0.5, 0), rhs_of(2, 6, 0)
        for max_dense, iterations in ((6, 1), (5, 6)):
            result = run(
                linear.Auto(max_dense=max_dense), operator(matrix), rhs, tol=1e-10, max_iter=50
            )
            check_solution(result, matrix, rhs, 1e-10)
            assert (result.iterations == 1) == (iterations == 1)
