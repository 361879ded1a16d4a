"""Complex states and parameters: every front door, every exact backward mode.

The solvers see the real and imaginary parts (``implicit/_complex.py``); derivatives
follow PyTorch's conventions for complex numbers, which ``torch.autograd.gradcheck``
checks against finite differences along the real and imaginary parts of each input.
The references are independent of the solve: closed forms (``z = A⁻¹b``, its gradient
``2A⁻ᴴz`` for ``L = ‖z‖²``), long unrolled autograd, ``torch.linalg.lstsq``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err, unrolled_fixed_point
from torch.autograd import gradcheck, gradgradcheck

import implicit

C = torch.complex128
N = 3
TIGHT = {"tol": 1e-12, "max_iter": 300}


def randn(*shape: int, seed: int, dtype=C) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


A = randn(N, N, seed=0) * 0.3 + 2 * torch.eye(N, dtype=C)  # well conditioned, complex
B = randn(N, seed=1)
W = randn(N, N, seed=2) * 0.25  # a contraction for z = tanh(Wz + x)
X = randn(N, seed=3)
H = (lambda m: m.conj().T @ m + torch.eye(N, dtype=C))(randn(N, N, seed=4))  # Hermitian PD


# Every forward solver with every exact backward (scipy runs in numpy: nothing to unroll).
SOLVER_BACKWARD = [
    (solver, backward)
    for solver in ("newton", "broyden", "anderson", "fixed_point", "scipy")
    for backward in ("auto", "dense", "gmres", "bicgstab", "unroll")
    if (solver, backward) != ("scipy", "unroll")
]


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_()


def forward_gradcheck(fn, inputs) -> bool:
    return gradcheck(
        fn,
        inputs,
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )


def linear_root(backward):
    return lambda a, b: implicit.root_solve(
        lambda z, a, b: a @ z - b, torch.zeros(N, dtype=C), a, b, backward=backward, **TIGHT
    )


def tanh_fixed_point(backward):
    return lambda w, x: implicit.fixed_point(
        lambda z, w, x: torch.tanh(w @ z + x),
        torch.zeros(N, dtype=C),
        w,
        x,
        backward=backward,
        **TIGHT,
    )


class TestRoots:
    @pytest.mark.parametrize("backward", ["auto", "dense", "gmres", "bicgstab", "unroll"])
    def test_linear_root_against_the_closed_form(self, backward):
        a, b = leaf(A), leaf(B)
        z = linear_root(backward)(a, b)
        assert z.dtype == C
        assert rel_err(z, torch.linalg.solve(A, B)) <= 1e-12
        # L = ‖z‖²: PyTorch's gradient (∂L/∂Re + i ∂L/∂Im) is 2A⁻ᴴz for b, −(that)zᴴ for A.
        grad_a, grad_b = torch.autograd.grad(z.abs().pow(2).sum(), (a, b))
        expected_b = 2 * torch.linalg.solve(A.conj().T, z.detach())
        assert rel_err(grad_b, expected_b) <= 1e-10
        assert rel_err(grad_a, -torch.outer(expected_b, z.detach().conj())) <= 1e-10
        assert gradcheck(linear_root(backward), (a, b))

    @pytest.mark.parametrize("backward", ["dense", "gmres", "auto"])
    def test_forward_mode_and_double_backward(self, backward):
        inputs = (leaf(A), leaf(B))
        assert forward_gradcheck(linear_root(backward), inputs)
        assert gradgradcheck(linear_root(backward), inputs)

    @pytest.mark.parametrize("solver", ["newton", "broyden", "scipy"])
    def test_forward_solvers_see_the_real_system(self, solver):
        z, info = implicit.root_solve(
            lambda z: A @ z - B, torch.zeros(N, dtype=C), solver=solver, return_info=True, tol=1e-11
        )
        assert info.status == "converged" and info.residual.dtype == torch.float64
        assert rel_err(z, torch.linalg.solve(A, B)) <= 1e-9

    @pytest.mark.parametrize(("solver", "backward"), SOLVER_BACKWARD)
    def test_every_solver_with_every_backward(self, solver, backward):
        def g(z, a, b):  # A z + 0.1 z³ = b, holomorphic: Newton's derivative is A + 0.3 diag(z²)
            return a @ z + 0.1 * z**3 - b

        def unrolled_newton(a, b):
            z = torch.zeros(N, dtype=C)
            for _ in range(40):
                z = z - torch.linalg.solve(a + 0.3 * torch.diag(z**2), g(z, a, b))
            return z

        a, b, a_ref, b_ref = leaf(A), leaf(B), leaf(A), leaf(B)
        if solver in ("anderson", "fixed_point"):
            f = lambda z, a, b: z - 0.3 * g(z, a, b)  # noqa: E731
            z = implicit.fixed_point(
                f,
                torch.zeros(N, dtype=C),
                a,
                b,
                solver=solver,
                backward=backward,
                tol=1e-12,
                max_iter=500,
            )
        else:
            z = implicit.root_solve(
                g, torch.zeros(N, dtype=C), a, b, solver=solver, backward=backward, **TIGHT
            )
        reference = unrolled_newton(a_ref, b_ref)
        assert rel_err(z, reference) <= 1e-10
        loss = lambda z: z.abs().pow(2).sum() + z.real.sum()  # noqa: E731
        grads = torch.autograd.grad(loss(z), (a, b))
        for got, want in zip(grads, torch.autograd.grad(loss(reference), (a_ref, b_ref))):
            assert rel_err(got, want) <= 1e-8

    def test_captured_complex_parameter(self):
        def solve(a):
            return implicit.root_solve(lambda z: a @ z - B, torch.zeros(N, dtype=C), **TIGHT)

        assert gradcheck(solve, (leaf(A),))
        assert gradgradcheck(solve, (leaf(A),))

    def test_real_parameter_complex_state(self):
        def solve(r):  # a real right-hand side; the state is complex
            return implicit.root_solve(lambda z, r: A @ z - r, torch.zeros(N, dtype=C), r, **TIGHT)

        r = leaf(B.real)
        assert gradcheck(solve, (r,)) and forward_gradcheck(solve, (r,))
        assert gradgradcheck(solve, (r,))

    def test_complex_parameter_real_state(self):
        def solve(c):  # z³ + z = |c|² + Im c, per entry: a real root of complex data
            g = lambda z, c: z**3 + z - c.abs() ** 2 - c.imag  # noqa: E731
            return implicit.root_solve(g, torch.zeros(N, dtype=torch.float64), c, **TIGHT)

        c = leaf(B)
        assert solve(c).dtype == torch.float64
        assert gradcheck(solve, (c,)) and forward_gradcheck(solve, (c,))
        assert gradgradcheck(solve, (c,))

    def test_batched_and_tree_states(self):
        def batched(b):
            return implicit.root_solve(
                lambda z, b: z @ A.T - b, torch.zeros(4, N, dtype=C), b, batched=True, **TIGHT
            )

        b = leaf(randn(4, N, seed=5))
        assert rel_err(batched(b), torch.linalg.solve(A, b.detach().T).T) <= 1e-12
        assert gradcheck(batched, (b,))

        def tree(b):
            def g(z, b):
                return {"a": A @ z["a"] - b, "r": z["r"] ** 3 + z["r"] - z["a"]}

            start = {"a": torch.zeros(N, dtype=C), "r": torch.zeros(2, N, dtype=C)}
            return implicit.root_solve(g, start, b, **TIGHT)["r"]

        assert gradcheck(tree, (leaf(B),))


class TestFixedPoints:
    @pytest.mark.parametrize(
        "backward", ["auto", "dense", "gmres", "bicgstab", "neumann", "unroll"]
    )
    def test_against_unrolled_autograd(self, backward):
        w, x = leaf(W), leaf(X)
        z = tanh_fixed_point(backward)(w, x)
        w_ref, x_ref = leaf(W), leaf(X)
        f = lambda z, w, x: torch.tanh(w @ z + x)  # noqa: E731
        reference = unrolled_fixed_point(f, torch.zeros(N, dtype=C), w_ref, x_ref)
        assert rel_err(z, reference) <= 1e-11
        loss = lambda z: (z * randn(N, seed=6)).real.sum() + z.abs().pow(2).sum()  # noqa: E731
        grads = torch.autograd.grad(loss(z), (w, x))
        expected = torch.autograd.grad(loss(reference), (w_ref, x_ref))
        for got, want in zip(grads, expected):
            assert rel_err(got, want) <= 1e-9
        assert gradcheck(tanh_fixed_point(backward), (w, x))

    @pytest.mark.parametrize("backward", ["neumann", "auto"])
    def test_forward_mode_and_double_backward(self, backward):
        inputs = (leaf(W), leaf(X))
        assert forward_gradcheck(tanh_fixed_point(backward), inputs)
        assert gradgradcheck(tanh_fixed_point(backward), inputs)

    @pytest.mark.parametrize("solver", ["anderson", "fixed_point", "broyden", "newton"])
    def test_solvers(self, solver):
        f = lambda z: torch.tanh(W @ z + X)  # noqa: E731
        z = implicit.fixed_point(f, torch.zeros(N, dtype=C), solver=solver, tol=1e-11)
        assert rel_err(z, unrolled_fixed_point(f, torch.zeros(N, dtype=C))) <= 1e-9

    def test_deq_layer(self):
        torch.manual_seed(0)
        cell = torch.nn.Linear(N, N, dtype=C)
        with torch.no_grad():
            cell.weight.mul_(0.3)
            cell.bias.mul_(0.3)
        f = lambda z, x: torch.tanh(cell(z) + x)  # noqa: E731
        deq = implicit.DEQ(f, tol=1e-12, max_iter=200)
        x = 0.3 * randn(2, N, seed=7)
        z = deq(x)
        assert z.dtype == C and bool(deq.last_info.converged.all())
        (grad,) = torch.autograd.grad(z.abs().sum(), cell.weight)
        (expected,) = torch.autograd.grad(
            unrolled_fixed_point(f, torch.zeros_like(x), x).abs().sum(), cell.weight
        )
        assert rel_err(grad, expected) <= 1e-9


class TestInverses:
    def test_invert(self):
        def solve(y):
            return implicit.invert(lambda z: z + 0.1 * z**3, y, **TIGHT)

        y = leaf(B)
        z = solve(y)
        assert rel_err(z + 0.1 * z**3, B) <= 1e-12
        assert gradcheck(solve, (y,)) and forward_gradcheck(solve, (y,))
        assert gradgradcheck(solve, (y,))

    def test_black_boxes_may_answer_complex(self):
        @implicit.custom_root(lambda z, a, b: a @ z - b, tol=1e-12)
        def solve(a, b):
            return np.linalg.solve(a.numpy(), b.numpy())

        assert gradcheck(solve, (leaf(A), leaf(B)))
        y = leaf(B)
        z = implicit.implicit_inverse_layer(y, lambda y: y.numpy() / 2, lambda z: 2 * z)
        assert z.dtype == C
        (grad,) = torch.autograd.grad(z.abs().pow(2).sum(), y)
        assert rel_err(grad, B / 2) <= 1e-12  # ‖y/2‖² = ‖y‖²/4: gradient 2y/4


class TestTransforms:
    def test_grad_vmap_jvp(self):
        def solve(b):
            return implicit.root_solve(lambda z, b: A @ z - b, torch.zeros(N, dtype=C), b, **TIGHT)

        grad = torch.func.grad(lambda b: solve(b).abs().pow(2).sum())(B)
        assert rel_err(grad, 2 * torch.linalg.solve(A.conj().T, torch.linalg.solve(A, B))) <= 1e-10
        many = randn(5, N, seed=8)
        assert rel_err(torch.func.vmap(solve)(many), torch.linalg.solve(A, many.T).T) <= 1e-12
        tangent = 1j * randn(N, seed=9)
        _, dz = torch.func.jvp(solve, (B,), (tangent,))
        assert rel_err(dz, torch.linalg.solve(A, tangent)) <= 1e-12

    def test_vmap_of_grad_and_hessian_of_a_real_parameter(self):
        def solve(b):
            return implicit.root_solve(lambda z, b: A @ z - b, torch.zeros(N, dtype=C), b, **TIGHT)

        many = randn(4, N, seed=10)
        grads = torch.func.vmap(torch.func.grad(lambda b: solve(b).abs().pow(2).sum()))(many)
        reference = lambda b: torch.linalg.solve(A, b).abs().pow(2).sum()  # noqa: E731
        assert rel_err(grads, torch.func.vmap(torch.func.grad(reference))(many)) <= 1e-12

        def g(z, r):  # holomorphic in z: Newton's derivative is A + 0.3 diag(z²)
            return A @ z + 0.1 * z**3 - r * (1 + 1j)

        def loss(r):
            z = implicit.root_solve(g, torch.zeros(N, dtype=C), r, **TIGHT)
            return z.abs().pow(2).sum()

        def unrolled_newton(r):
            z = torch.zeros(N, dtype=C)
            for _ in range(60):
                z = z - torch.linalg.solve(A + 0.3 * torch.diag(z**2), g(z, r))
            return z.abs().pow(2).sum()

        r = randn(N, seed=11, dtype=torch.float64)
        hessian = torch.func.hessian(loss)(r)
        assert rel_err(hessian, torch.func.hessian(unrolled_newton)(r)) <= 1e-10
