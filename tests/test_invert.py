"""Inverses: invert, iterative or by a black-box inverse, and the seed's
implicit_inverse_layer, on functions whose inverse derivative is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err

import implicit

F64 = torch.float64


def real_root(coefficients) -> float:
    """The real root of a cubic with one (numpy, no autograd)."""
    roots = np.roots(coefficients)
    return float(roots[np.argmin(np.abs(roots.imag))].real)


class TestInverse:
    """The inverse layer on functions whose inverse derivative is known."""

    def test_seed_call_unchanged(self):
        data = torch.linspace(-0.9, 0.9, 50).requires_grad_()  # float32, as in the seed

        def g(y):  # arcsin outside autograd
            return torch.from_numpy(np.arcsin(y.numpy()))

        y = implicit.implicit_inverse_layer(data, g, forward_func=torch.sin)
        assert y.dtype == torch.float32 and rel_err(y, torch.asin(data)) <= 1e-6
        y.backward(torch.ones_like(y))
        assert rel_err(data.grad, 1 / torch.sqrt(1 - data.detach() ** 2)) <= 1e-5

    @pytest.mark.parametrize("dtype", [torch.float32, F64])
    @pytest.mark.parametrize("size", [10, 64, 65, 1000])
    def test_seed_call_is_accurate_to_the_dtype(self, size, dtype):
        # Above 64 elements the default backward was GMRES at tol 1e-6 (the seed's call
        # has no tol): float64 gradients 8e-7 off. An elementwise map has a diagonal
        # Jacobian, solved by one division.
        gen = torch.Generator().manual_seed(size)
        data = (1.9 * torch.rand(size, generator=gen, dtype=F64) - 0.95).to(dtype)
        data.requires_grad_()
        z = implicit.implicit_inverse_layer(
            data, lambda y: np.arcsin(y.numpy()), forward_func=torch.sin
        )
        (grad,) = torch.autograd.grad(z, data, torch.ones_like(z))
        exact = 1 / torch.sqrt(1 - data.detach().double() ** 2)
        worst = float(((grad.double() - exact).abs() / exact).max())
        assert worst <= 8 * torch.finfo(dtype).eps

    def test_seed_call_with_a_coupled_map(self):
        # Not elementwise (a diagonal guess fails its residual check): the fallback,
        # held to the same tolerance, without a warning.
        gen = torch.Generator().manual_seed(0)
        mix = torch.eye(80, dtype=F64) + 0.1 * torch.randn(80, 80, generator=gen, dtype=F64) / 9
        data = torch.randn(80, generator=gen, dtype=F64, requires_grad=True)

        def forward(z):
            return mix @ z + 0.1 * torch.tanh(z)

        def inverse(y):  # Newton's method outside autograd
            z = torch.linalg.solve(mix, y)
            for _ in range(30):
                jac = mix + 0.1 * torch.diag(1 - torch.tanh(z) ** 2)
                z = z - torch.linalg.solve(jac, forward(z) - y)
            return z

        z = implicit.implicit_inverse_layer(data, inverse, forward_func=forward)
        weights = torch.randn(80, generator=gen, dtype=F64)
        (grad,) = torch.autograd.grad(z, data, weights)
        jac = mix + 0.1 * torch.diag(1 - torch.tanh(z.detach()) ** 2)
        assert rel_err(grad, torch.linalg.solve(jac.T, weights)) <= 1e-13

    @pytest.mark.parametrize(
        ("forward", "inverse", "derivative", "y"),
        [
            (torch.sin, np.arcsin, lambda y: 1 / torch.sqrt(1 - y**2), [-0.95, -0.3, 0.2, 0.8]),
            (torch.exp, np.log, lambda y: 1 / y, [0.1, 1.0, 2.5, 40.0]),
            (
                lambda z: z**3 + z,
                lambda y: np.array([real_root([1, 0, 1, -v]) for v in y]),
                lambda z: 1 / (3 * z**2 + 1),  # in terms of z
                [-10.0, -1.0, 0.5, 2.0],
            ),
        ],
        ids=["asin", "log", "cubic"],
    )
    def test_known_inverse_derivatives(self, forward, inverse, derivative, y):
        y = torch.tensor(y, dtype=F64, requires_grad=True)
        z, info = implicit.invert(
            forward, y, inverse=lambda y: inverse(y.numpy()), tol=1e-12, return_info=True
        )
        assert info.status == "converged"
        (grad,) = torch.autograd.grad(z.sum(), y)
        point = z.detach() if forward not in (torch.sin, torch.exp) else y.detach()
        assert rel_err(grad, derivative(point)) <= 1e-10

    def test_batched_inverse_with_an_extra_argument(self):
        # f(z, a) = a z + z³ per sample: dz/dy = 1/(a + 3z²), dz/da = −z/(a + 3z²).
        y = torch.tensor([[1.0], [-2.0], [5.0]], dtype=F64, requires_grad=True)
        a = torch.tensor([[1.0], [2.0], [0.5]], dtype=F64, requires_grad=True)

        def h(y, a):
            return np.array([[real_root([1, 0, ai, -yi])] for yi, ai in zip(y[:, 0], a[:, 0])])

        z = implicit.invert(lambda z, a: a * z + z**3, y, a, inverse=h, batched=True, tol=1e-12)
        gy, ga = torch.autograd.grad(z.sum(), [y, a])
        zd = z.detach()
        assert rel_err(gy, 1 / (a.detach() + 3 * zd**2)) <= 1e-10
        assert rel_err(ga, -zd / (a.detach() + 3 * zd**2)) <= 1e-10

    def test_jacrev_over_the_inverse_layer(self):
        y = torch.tensor([0.1, -0.4, 0.7], dtype=F64)
        jac = torch.func.jacrev(
            lambda y: implicit.invert(torch.sin, y, inverse=lambda y: np.arcsin(y.numpy()))
        )(y)
        assert rel_err(jac, torch.diag(1 / torch.sqrt(1 - y**2))) <= 1e-10

    def test_iterative_invert_with_the_default_solver(self):
        # Newton from z0 = y; the same gradient as the black box's.
        y = torch.tensor([[0.3, -0.6], [0.9, 0.1]], dtype=F64, requires_grad=True)
        z, info = implicit.invert(torch.sin, y, batched=True, tol=1e-12, return_info=True)
        assert info.solver == "newton" and info.converged.shape == (2,)
        (grad,) = torch.autograd.grad(z.sum(), y)
        z_box = implicit.invert(
            torch.sin, y, inverse=lambda y: np.arcsin(y.numpy()), batched=True, tol=1e-12
        )
        (grad_box,) = torch.autograd.grad(z_box.sum(), y)
        assert rel_err(z, z_box) <= 1e-12 and rel_err(grad, grad_box) <= 1e-10
        assert rel_err(grad, 1 / torch.sqrt(1 - y.detach() ** 2)) <= 1e-10

    def test_iterative_invert_matches_black_box(self):
        y = torch.tensor([0.3, -0.6], dtype=F64, requires_grad=True)
        z = implicit.invert(torch.sin, y, solver="scipy", tol=1e-12)
        (grad,) = torch.autograd.grad(z.sum(), y)
        assert rel_err(z, torch.asin(y)) <= 1e-12
        assert rel_err(grad, 1 / torch.sqrt(1 - y.detach() ** 2)) <= 1e-10

    def test_z0_of_another_shape(self):
        # f maps a (2, 2) matrix to a vector of 4: z0 is needed, and named when missing.
        m = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 3.0, 1.0, 0.0]] * 2, dtype=F64)
        m[2:, :2] = 0
        m[2:, 2:] = torch.tensor([[2.0, 0.5], [0.0, 1.5]], dtype=F64)
        y = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64, requires_grad=True)

        def f(z):
            return m @ z.reshape(4) + 0.1 * torch.tanh(z.reshape(4))

        z = implicit.invert(f, y, z0=torch.zeros(2, 2, dtype=F64), solver="scipy", tol=1e-12)
        assert z.shape == (2, 2) and rel_err(f(z), y) <= 1e-12
        (grad,) = torch.autograd.grad(z.sum(), y)
        jac = torch.func.jacrev(f)(z.detach()).reshape(4, 4)
        assert rel_err(grad, torch.linalg.solve(jac.T, torch.ones(4, dtype=F64))) <= 1e-10
        y_long = torch.arange(6.0, dtype=F64)
        with pytest.raises(ValueError, match="z0"):
            implicit.invert(lambda z: z[:4], y_long, solver="scipy")

    def test_inverse_excludes_solver_and_unroll(self):
        y = torch.tensor([0.5], dtype=F64)
        with pytest.raises(ValueError, match="inverse="):
            implicit.invert(torch.sin, y, inverse=lambda y: np.arcsin(y.numpy()), solver="scipy")
        with pytest.raises(ValueError, match="unroll"):
            implicit.invert(torch.sin, y, inverse=lambda y: np.arcsin(y.numpy()), backward="unroll")
        with pytest.raises(TypeError, match=r"y must be a torch\.Tensor"):
            implicit.invert(torch.sin, [0.5], inverse=np.arcsin)
        with pytest.raises(TypeError, match="y must be a floating-point or complex tensor"):
            implicit.invert(torch.sin, torch.tensor([1, 2]), inverse=np.arcsin)
