"""ImplicitLayer: a general root as an nn.Module, against closed forms and unrolling."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, unrolled_fixed_point
from torch import nn

import implicit

TIGHT = {"tol": 1e-12, "max_iter": 500}


def spd_system(n: int = 5, seed: int = 0):
    """``A`` symmetric with eigenvalues in [0.5, 1.3], so that ``z ← z + g(z)`` contracts."""
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=generator, dtype=torch.float64)
    sym = (m + m.T) / 2
    a = torch.eye(n, dtype=torch.float64) + 0.3 * sym / torch.linalg.matrix_norm(sym, ord=2)
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    return a.requires_grad_(), b.requires_grad_()


def energy_gradient(z, a, b):
    """``g = −∇E`` for ``E(z) = ½ zᵀAz − bᵀz + Σ softplus(z)``: its root minimises E."""
    return b - a @ z - torch.sigmoid(z)


@pytest.mark.parametrize("solver", sorted(implicit.solvers.NAMES))
@pytest.mark.parametrize("backward", ["dense", "gmres", "bicgstab", "neumann"])
def test_root_gradients_match_closed_form(solver, backward):
    a, b = spd_system()
    layer = implicit.ImplicitLayer(energy_gradient, solver=solver, backward=backward, **TIGHT)
    z = layer(a, b, z0=torch.zeros(5, dtype=torch.float64))
    assert layer.last_info.status == "converged"
    v = torch.linspace(-1, 1, 5, dtype=torch.float64)
    grad_a, grad_b = torch.autograd.grad(z @ v, [a, b])
    # dz/db = (A + diag σ'(z))⁻¹ (symmetric) and dz/dA = −(dz/db) ⊗ z.
    sig = torch.sigmoid(z.detach())
    hessian = a.detach() + torch.diag(sig * (1 - sig))
    want_b = torch.linalg.solve(hessian, v)
    assert rel_err(grad_b, want_b) <= 1e-9
    assert rel_err(grad_a, -torch.outer(want_b, z.detach())) <= 1e-9


class Residual(nn.Module):
    """``g(z, x) = tanh(W z + x) − z`` with trainable ``W`` (‖W‖₂ = 0.5) and a mode switch."""

    def __init__(self, n: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        w = torch.randn(n, n, generator=generator, dtype=torch.float64)
        self.weight = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, ord=2))

    def cell(self, z, x):
        scale = 1.0 if self.training else 0.7
        return torch.tanh(scale * z @ self.weight.T + x)

    def forward(self, z, x):
        return self.cell(z, x) - z


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_module_parameters_train_through_the_layer_in_both_modes(mode):
    g = Residual()
    layer = implicit.ImplicitLayer(g, batched=True, solver="fixed_point", backward="gmres", **TIGHT)
    layer.train(mode == "train")
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z = layer(x)  # z0 defaults to zeros shaped like x
    assert layer.last_info.converged.shape == (3,)
    got = torch.autograd.grad((z**2).sum(), [x, g.weight])
    z_ref = unrolled_fixed_point(g.cell, torch.zeros_like(x), x)
    want = torch.autograd.grad((z_ref**2).sum(), [x, g.weight])
    for have, ref in zip(got, want):
        assert rel_err(have, ref) <= 1e-9
    assert list(layer.parameters()) == [g.weight]


def test_tuple_state_and_several_arguments():
    a, b = spd_system(n=3)
    c = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def g(state, a, b, c):
        u, s = state
        return energy_gradient(u, a, b), c * u.sum() - s  # s = c · Σu

    layer = implicit.ImplicitLayer(g, solver="fixed_point", **TIGHT)
    u, s = layer(a, b, c, z0=(torch.zeros(3, dtype=torch.float64), torch.zeros((), dtype=a.dtype)))
    grad_b, grad_c = torch.autograd.grad(s, [b, c])
    sig = torch.sigmoid(u.detach())
    hessian = a.detach() + torch.diag(sig * (1 - sig))
    assert rel_err(grad_c, u.sum()) <= 1e-10
    assert (
        rel_err(grad_b, c.detach() * torch.linalg.solve(hessian, torch.ones(3, dtype=a.dtype)))
        <= 1e-9
    )


def test_bad_input_and_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tolerance'\]"):
        implicit.ImplicitLayer(energy_gradient, solver="fixed_point", tolerance=1e-3)
    with pytest.raises(TypeError, match="g must be callable"):
        implicit.ImplicitLayer(None)
    with pytest.raises(ValueError, match="unknown backward"):
        implicit.ImplicitLayer(energy_gradient, solver="fixed_point", backward="lu")
    layer = implicit.ImplicitLayer(lambda z, scale: scale * z, solver="fixed_point")
    with pytest.raises(TypeError, match="pass z0"):
        layer(2.0)


def test_defaults_newton_and_auto():
    a, b = spd_system()
    layer = implicit.ImplicitLayer(energy_gradient)
    z = layer(a, b, z0=torch.zeros(5, dtype=torch.float64))
    assert layer.last_info.solver == "newton" and layer.last_info.status == "converged"
    (grad_b,) = torch.autograd.grad(z.sum(), [b])
    sig = torch.sigmoid(z.detach())
    hessian = a.detach() + torch.diag(sig * (1 - sig))
    assert rel_err(grad_b, torch.linalg.solve(hessian, torch.ones(5, dtype=a.dtype))) <= 1e-6
