"""The diagonal first guess of elementwise maps (implicit/linear/diagonal.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err
from systems import F64, check_solution, nonsymmetric, operator, rhs_of, run

import implicit
from implicit import linear
from implicit.linear.base import CONVERGED, ILL_CONDITIONED
from implicit.linear.diagonal import DiagonalFirst


@pytest.mark.parametrize("transpose", [False, True])
def test_a_diagonal_system_takes_two_products(transpose):
    diagonal = torch.tensor([[0.5, -2.0, 3.0, 1e-3], [1.0, 1.0, 4.0, -7.0]], dtype=F64)
    matrix = torch.diag_embed(diagonal)
    op = operator(matrix, transpose)
    rhs = rhs_of(2, 4, 0)
    result = run(DiagonalFirst(), op, rhs, tol=1e-15, max_iter=10)
    assert result.method == "diagonal" and op.products == 2
    assert rel_err(result.x, rhs / diagonal) <= 1e-16
    assert result.codes.tolist() == [CONVERGED, CONVERGED]
    assert torch.allclose(result.condition, torch.tensor([3000.0, 7.0], dtype=F64))


@pytest.mark.parametrize("fallback", [linear.Auto(), linear.GMRES(), linear.Dense()])
def test_any_other_system_falls_back(fallback):
    matrix, rhs = nonsymmetric(3, 6, 0.5, 0), rhs_of(3, 6, 0)
    result = run(DiagonalFirst(fallback=fallback), operator(matrix), rhs, tol=1e-12, max_iter=50)
    assert result.method.startswith("diagonal+")
    check_solution(result, matrix, rhs, 1e-12)


def test_a_zero_on_the_diagonal_falls_back():
    # A 1 = [0, 1]: the division is not a solution; GMRES from zero in that row.
    matrix = torch.tensor([[[1.0, -1.0], [0.0, 1.0]]], dtype=F64)
    rhs = torch.tensor([[1.0, 2.0]], dtype=F64)
    result = run(
        DiagonalFirst(fallback=linear.GMRES()), operator(matrix), rhs, tol=1e-12, max_iter=10
    )
    check_solution(result, matrix, rhs, 1e-12)


def test_ill_conditioned_diagonal_is_reported():
    matrix = torch.diag_embed(torch.tensor([[1.0, 1e-9]], dtype=F64))
    result = run(DiagonalFirst(), operator(matrix), rhs_of(1, 2, 0), tol=1e-14, max_iter=10)
    assert result.codes.tolist() == [ILL_CONDITIONED]


def test_inverse_layer_under_jacrev_and_forward_mode():
    data = torch.linspace(-0.9, 0.9, 100, dtype=F64)

    def layer(y):
        return implicit.implicit_inverse_layer(y, lambda v: np.arcsin(v.numpy()), torch.sin)

    exact = 1 / torch.sqrt(1 - data**2)
    jacobian = torch.func.jacrev(layer)(data)
    assert rel_err(jacobian, torch.diag(exact)) <= 1e-15
    _, tangent = torch.func.jvp(layer, (data,), (torch.ones_like(data),))
    assert rel_err(tangent, exact) <= 1e-15
