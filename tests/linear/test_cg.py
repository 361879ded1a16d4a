"""Conjugate gradients (implicit/linear/cg.py)."""

from __future__ import annotations

import pytest
import torch
from systems import (
    F64,
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

    def test_non_spd_preconditioner_reports_breakdown(self):
        matrix = spd(2, 6, 10.0, 0)
        result = run(
            linear.CG(preconditioner=lambda r: -r),
            operator(matrix),
            rhs_of(2, 6, 0),
            tol=1e-10,
            max_iter=50,
        )
        assert result.codes.tolist() == [BREAKDOWN, BREAKDOWN]
