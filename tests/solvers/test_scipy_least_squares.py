"""scipy.optimize.least_squares as the forward solver of least_squares."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import implicit
from implicit.solvers import ScipyLeastSquares

D = torch.float64


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_least_squares_methods(method):
    t = torch.linspace(0, 2, 9, dtype=D)
    y = torch.tensor([2.1, 1.6, 1.1, 0.9, 0.6, 0.5, 0.4, 0.28, 0.22], dtype=D, requires_grad=True)

    def residual(c, y):
        return c[0] * torch.exp(-c[1] * t) - y

    c, info = implicit.least_squares(
        residual,
        torch.ones(2, dtype=D),
        y,
        solver="scipy",
        method=method,
        tol=1e-9,
        return_info=True,
    )
    want = implicit.least_squares(residual, torch.ones(2, dtype=D), y.detach(), tol=1e-12)
    assert info.status == "converged" and rel_err(c, want) <= 1e-8
    jacobian = torch.func.jacrev(
        lambda y: implicit.least_squares(residual, torch.ones(2, dtype=D), y, tol=1e-12)
    )(y.detach())
    (grad,) = torch.autograd.grad(c[1], y)
    assert rel_err(grad, jacobian[1]) <= 1e-7


def test_options_are_checked():
    with pytest.raises(TypeError, match=r"unknown or reserved option\(s\) \['bounds'\]"):
        ScipyLeastSquares(options={"bounds": (0, 1)})
    with pytest.raises(ValueError, match="unknown scipy method"):
        ScipyLeastSquares("levenberg")
