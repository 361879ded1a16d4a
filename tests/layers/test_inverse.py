"""InverseLayer: iterative and black-box inverses against unrolling and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err, unrolled_fixed_point
from torch import nn

import implicit

TIGHT = {"tol": 1e-12, "max_iter": 200}


class Flow(nn.Module):
    """``f(z) = z + s · tanh(L z + c)`` with ``‖L‖₂ = 0.8``: invertible, since ``s·0.8 < 1``.

    ``s`` is 0.5 in training mode and 0.3 in eval mode, so that the inverse differs.
    """

    def __init__(self, n: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(4)
        w = torch.randn(n, n, generator=generator, dtype=torch.float64)
        self.linear = nn.Linear(n, n, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(0.8 * w / torch.linalg.matrix_norm(w, ord=2))

    @property
    def scale(self) -> float:
        return 0.5 if self.training else 0.3

    def forward(self, z):
        return z + self.scale * torch.tanh(self.linear(z))

    def inverse_step(self, z, y):
        """``f(z) = y`` as the contraction ``z = y − s · tanh(L z + c)``: the reference."""
        return y - self.scale * torch.tanh(self.linear(z))


def solver_names():
    # Picard iterates z ← z + (f(z) − y), which diverges here (∂f/∂z ≈ I, not −I);
    # scipy is tested with inverse problems in its own module.
    return sorted(set(implicit.solvers.NAMES) - {"fixed_point", "scipy"})


@pytest.mark.parametrize("solver", solver_names())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_match_unrolled_inverse(solver, mode):
    flow = Flow()
    layer = implicit.InverseLayer(flow, solver=solver, backward="gmres", **TIGHT)
    layer.train(mode == "train")
    y = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y.requires_grad_()
    z = layer(y)
    assert layer.last_info.status == "converged"
    assert rel_err(flow(z), y) <= 1e-11
    params = [y, *flow.parameters()]
    got = torch.autograd.grad((z**3).sum(), params)
    z_ref = unrolled_fixed_point(flow.inverse_step, torch.zeros_like(y), y)
    want = torch.autograd.grad((z_ref**3).sum(), params)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-8


def test_black_box_inverse_with_closed_form_gradient():
    layer = implicit.InverseLayer(torch.sin, inverse=lambda y: np.arcsin(y.numpy()))
    y = torch.tensor([[0.1, -0.5, 0.7]], dtype=torch.float64, requires_grad=True)
    z = layer(y)
    assert torch.allclose(z, torch.asin(y.detach()), rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad(z.sum(), [y])
    assert rel_err(grad, 1 / torch.sqrt(1 - y.detach() ** 2)) <= 1e-12
    assert layer.last_info.status == "converged"


def test_black_box_inverse_trains_module_parameters():
    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
            self.b = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, z):
            return self.a * z + self.b

    affine = Affine()

    def solve_in_numpy(y):
        a, b = affine.a.item(), affine.b.item()
        return (y.numpy() - b) / a

    layer = implicit.InverseLayer(affine, inverse=solve_in_numpy, backward="dense")
    y = torch.tensor([[1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    z = layer(y)
    grad_y, grad_a, grad_b = torch.autograd.grad(z.sum(), [y, affine.a, affine.b])
    a, b = 2.0, 0.5
    assert rel_err(grad_y, torch.full_like(y, 1 / a)) <= 1e-14
    assert grad_a.item() == pytest.approx(-((y.detach() - b).sum() / a**2).item(), rel=1e-13)
    assert grad_b.item() == pytest.approx(-2 / a, rel=1e-13)
    assert list(layer.parameters()) == [affine.a, affine.b]


def test_bad_options():
    with pytest.raises(TypeError, match="do not apply with inverse="):
        implicit.InverseLayer(torch.sin, inverse=np.arcsin, solver="broyden")
    with pytest.raises(ValueError, match="unroll"):
        implicit.InverseLayer(torch.sin, inverse=np.arcsin, backward="unroll")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['maxiter'\]"):
        implicit.InverseLayer(torch.sin, maxiter=3)
    with pytest.raises(TypeError, match="inverse must be callable"):
        implicit.InverseLayer(torch.sin, inverse="arcsin")
    with pytest.raises(TypeError, match="f must be callable"):
        implicit.InverseLayer(3)
    layer = implicit.InverseLayer(torch.sin, inverse=lambda y: np.arcsin(y.numpy()))
    assert "inverse=" in repr(layer) and "solver" not in repr(layer)
