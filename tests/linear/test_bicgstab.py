"""BiCGStab (implicit/linear/bicgstab.py)."""

from __future__ import annotations

import torch
from systems import (
    F64,
    check_solution,
    operator,
    run,
)

from implicit import linear
from implicit.linear.base import BREAKDOWN


def test_bicgstab_breakdown():
    # The shadow residual e₁ is orthogonal to A e₁ = e₂: BiCGStab cannot take a step.
    matrix = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=F64)
    rhs = torch.tensor([[1.0, 0.0]], dtype=F64)
    result = run(linear.BiCGStab(), operator(matrix), rhs, tol=1e-10, max_iter=50)
    assert result.codes.tolist() == [BREAKDOWN]
    assert torch.equal(result.x, torch.zeros_like(rhs))
    assert float(result.residual) == 1.0
    # GMRES solves it.
    check_solution(
        run(linear.GMRES(), operator(matrix), rhs, tol=1e-10, max_iter=50), matrix, rhs, 1e-10
    )
