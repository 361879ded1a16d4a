"""Second and third derivatives through solutions (double and triple backward,
``torch.func.hessian`` over ``grad``), for every front door, explicit arguments,
captured tensors and module parameters, against closed forms and unrolled autograd."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch
from conftest import EXACT_MODES, TIGHT, TanhProblem, loss_of, unrolled_fixed_point
from higher_order import CASES, Cubic, Linear, assert_close, spd_energy, write_worst_errors

import implicit

F64 = torch.float64


def teardown_module():
    write_worst_errors()


def second_order(loss, params):
    """A scalar built from the gradient (a gradient penalty), differentiated again."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum((g**2).sum() + g.sin().sum() for g in grads)
    return torch.autograd.grad(penalty, params)


class TestDoubleBackward:
    @pytest.mark.parametrize("door", sorted(CASES))
    def test_explicit_arguments(self, door):
        _, solve, reference, params = CASES[door]
        params = [t.clone().requires_grad_() for t in params]
        got = second_order(loss_of(solve(*params)), params)
        want = second_order(loss_of(reference(*params)), params)
        for g, r in zip(got, want):
            assert_close("double backward, explicit", g, r, 1e-8)

    @pytest.mark.parametrize("door", ["fixed_point", "root_solve", "invert"])
    def test_captured_leaf_tensors(self, door):
        _, _, reference, params = CASES[door]
        params = [t.clone().requires_grad_() for t in params]
        if door == "fixed_point":
            x, w = params
            z0 = torch.zeros(x.shape, dtype=F64)
            z = implicit.fixed_point(lambda z: torch.tanh(w @ z + x), z0, **TIGHT)
        elif door == "root_solve":
            A, b = params
            z = implicit.root_solve(lambda z: A @ z - b, torch.zeros_like(b.detach()), **TIGHT)
        else:
            y, a = params
            z = implicit.invert(lambda z: z**3 + a * z, y, **TIGHT)  # a captured, y explicit
        got = second_order(loss_of(z), params)
        want = second_order(loss_of(reference(*params)), params)
        for g, r in zip(got, want):
            assert_close("double backward, captured", g, r, 1e-8)

    def test_captured_by_custom_root(self):
        lin = Linear()
        A = lin.A.clone().requires_grad_()
        b = lin.b.clone().requires_grad_()
        solve = implicit.custom_root(lambda z, b: A @ z - b, tol=1e-12)(
            lambda b: scipy.linalg.solve(A.detach().numpy(), b.numpy())
        )
        got = second_order(loss_of(solve(b)), [A, b])
        want = second_order(loss_of(torch.linalg.solve(A, b)), [A, b])
        for g, r in zip(got, want):
            assert_close("double backward, captured", g, r, 1e-8)

    def test_module_parameters(self):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 4).double()
        with torch.no_grad():
            layer.weight.mul_(0.3)
        x = torch.randn(4, dtype=F64, requires_grad=True)
        params = [x, *layer.parameters()]

        def f(z):
            return torch.tanh(layer(z) + x)

        got = second_order(
            loss_of(implicit.fixed_point(f, torch.zeros(4, dtype=F64), **TIGHT)), params
        )
        want = second_order(loss_of(unrolled_fixed_point(f, torch.zeros(4, dtype=F64))), params)
        for g, r in zip(got, want):
            assert_close("double backward, module parameters", g, r, 1e-8)

    @pytest.mark.parametrize("backward", EXACT_MODES)
    def test_every_exact_backward_mode(self, backward):
        p = TanhProblem(n=4, batch=2)
        z = implicit.fixed_point(p.f, p.z0, p.x, backward=backward, batched=True, **TIGHT)
        got = second_order(loss_of(z), [p.x, p.W])
        want = second_order(loss_of(unrolled_fixed_point(p.f, p.z0, p.x)), [p.x, p.W])
        for g, r in zip(got, want):
            assert_close("double backward, every mode", g, r, 1e-8)

    @pytest.mark.parametrize("backward", ["cg", "dense", "gmres"])
    def test_hessian_of_energy_minimiser_closed_form(self, backward):
        # z*(b) minimises E: dz/db = H⁻¹, so d/db (1ᵀ dz/db 1) has a closed form too;
        # compare the Hessian of a loss with autograd through the implicit formula.
        g, b, lam, hessian = spd_energy()
        b = b.clone().requires_grad_()
        z = implicit.root_solve(g, torch.zeros_like(b.detach()), b, lam, backward=backward, **TIGHT)
        (grad,) = torch.autograd.grad(z.sum(), b, create_graph=True)
        # grad = H(z)⁻¹ 1, exactly; differentiate it by hand: d(H⁻¹1)/db = −H⁻¹ (dH/db) H⁻¹ 1.
        zd = z.detach()
        h_inv = torch.linalg.inv(hessian(zd, lam))
        assert_close("double backward, closed form", grad, h_inv.sum(1), 1e-10)
        (second,) = torch.autograd.grad(grad @ grad, b)
        s = torch.sigmoid(zd)
        third = lam * s * (1 - s) * (1 - 2 * s)  # d³E/dz³ (diagonal)
        u = h_inv.sum(1)  # H⁻¹ 1
        # d(uᵀu)/db = 2 uᵀ du/db, du/db = −H⁻¹ diag(third ⊙ u) H⁻¹.
        want = -2 * h_inv @ (third * u * (h_inv @ u))
        assert_close("double backward, closed form", second, want, 1e-9)

    def test_closed_form_cubic_second_derivatives(self):
        cubic = Cubic()
        y = cubic.y.clone().requires_grad_()
        a = cubic.a.clone().requires_grad_()
        z = implicit.invert(Cubic.f, y, a, **TIGHT)
        (dz_dy,) = torch.autograd.grad(z.sum(), y, create_graph=True)
        d2y, d2a = torch.autograd.grad(dz_dy.sum(), [y, a])
        zd, p, z2, _ = cubic.derivatives()
        assert_close("double backward, closed form", dz_dy, p, 1e-12)
        assert_close("double backward, closed form", d2y, z2, 1e-10)
        # d/da (dz/dy) = d/da (3z² + a)⁻¹ = −p² (6 z ∂z/∂a + 1) with ∂z/∂a = −z p.
        assert_close(
            "double backward, closed form", d2a, (-(p**2) * (1 - 6 * zd**2 * p)).sum(), 1e-10
        )

    def test_third_order(self):
        cubic = Cubic()
        _, _, _, z3 = cubic.derivatives()
        y = cubic.y.clone().requires_grad_()
        z = implicit.invert(Cubic.f, y, cubic.a, **TIGHT)
        (d1,) = torch.autograd.grad(z.sum(), y, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), y, create_graph=True)
        (d3,) = torch.autograd.grad(d2.sum(), y)
        assert_close("third order", d3, z3, 1e-9)

        def root(y):
            return implicit.invert(Cubic.f, y, cubic.a, **TIGHT).sum()

        y0 = cubic.y
        reverse3 = torch.func.jacrev(torch.func.jacrev(torch.func.grad(root)))(y0)
        mixed3 = torch.func.jacrev(torch.func.hessian(root))(y0)
        want = torch.diag_embed(torch.diag_embed(z3))
        assert_close("third order", reverse3, want, 1e-9)
        assert_close("third order", mixed3, want, 1e-9)

    def test_third_order_of_fixed_point_matches_unrolled(self):
        x = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
        a = torch.tensor(0.6, dtype=F64, requires_grad=True)

        def f(z, x):
            return a * torch.tanh(z) + x

        def third(z):
            (g1,) = torch.autograd.grad(z.sum() + (z**2).sum(), x, create_graph=True)
            (g2,) = torch.autograd.grad((g1**2).sum(), x, create_graph=True)
            return torch.autograd.grad(g2.sum(), [x, a])

        z0 = torch.zeros(2, dtype=F64)
        got = third(implicit.fixed_point(f, z0, x, backward="gmres", **TIGHT))
        want = third(unrolled_fixed_point(f, z0, x, iterations=200))
        for g, r in zip(got, want):
            assert_close("third order", g, r, 1e-10)

    def test_gradgradcheck_every_front_door(self):
        for door, solve, _, params in CASES.values():
            params = tuple(t.clone().requires_grad_() for t in params)
            assert torch.autograd.gradgradcheck(solve, params), door
