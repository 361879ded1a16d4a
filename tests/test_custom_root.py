"""custom_root (implicit/_custom.py): black-box solves, linear and nonlinear, batched and
with tuple answers, each gradient against an independent reference (torch.linalg.solve's
own, long unrolled autograd, a closed form, gradcheck)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import contractive_matrix, rel_err, unrolled_fixed_point
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit

F64 = torch.float64


def spd_system(n: int = 4, batch: tuple[int, ...] = (), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(*batch, n, n, generator=generator, dtype=F64)
    a = m + n * torch.eye(n, dtype=F64)
    b = torch.randn(*batch, n, generator=generator, dtype=F64)
    return a.requires_grad_(), b.requires_grad_()


def batched_linear_solve(backward: str):
    """``A z = b`` per problem of a batch by numpy, made differentiable by custom_root."""

    @implicit.custom_root(
        lambda z, a, b: (a @ z.unsqueeze(-1)).squeeze(-1) - b,
        batched=True,
        backward=backward,
        tol=1e-12,
    )
    def solve(a, b):
        return np.linalg.solve(a.numpy(), b.numpy()[..., None])[..., 0]

    return solve


class TestCustomRootLinear:
    """solve(A, b) by scipy.linalg against torch.linalg.solve's own gradients."""

    def test_gradients_wrt_args_and_a_captured_tensor(self):
        a, b = spd_system()
        c = torch.tensor(0.7, dtype=F64, requires_grad=True)  # captured by g only

        @implicit.custom_root(lambda z, a, b: a @ z - c * b)
        def solve(a, b):
            assert not a.requires_grad and not b.requires_grad  # handed over detached
            return scipy.linalg.solve(a.numpy(), float(c) * b.numpy())

        z = solve(a, b)
        assert solve.last_info.status == "converged" and solve.last_info.solver == "black_box"
        weights = torch.arange(1.0, 5.0, dtype=F64)
        grads = torch.autograd.grad((weights * z).sum() + (z**2).sum(), [a, b, c])
        z_ref = torch.linalg.solve(a, c * b)
        refs = torch.autograd.grad((weights * z_ref).sum() + (z_ref**2).sum(), [a, b, c])
        assert rel_err(z, z_ref) <= 1e-13
        for got, want in zip(grads, refs):
            assert rel_err(got, want) <= 1e-12
        assert solve.last_info.backward.status == "converged"

    @pytest.mark.parametrize("backward", ["dense", "gmres", "bicgstab"])
    def test_batched_systems(self, backward):
        a, b = spd_system(n=3, batch=(4,))
        solve = batched_linear_solve(backward)
        z = solve(a, b)
        assert solve.last_info.converged.shape == (4,)
        grads = torch.autograd.grad(z.sin().sum(), [a, b])
        z_ref = torch.linalg.solve(a, b)
        refs = torch.autograd.grad(z_ref.sin().sum(), [a, b])
        for got, want in zip(grads, refs):
            assert rel_err(got, want) <= 1e-10

    def test_gradcheck_and_gradgradcheck(self):
        a, b = spd_system(n=3)

        @implicit.custom_root(lambda z, a, b: a @ z - b, tol=1e-12)
        def solve(a, b):
            return scipy.linalg.solve(a.numpy(), b.numpy())

        assert torch.autograd.gradcheck(solve, (a, b))
        assert torch.autograd.gradgradcheck(solve, (a, b))

    def test_torch_func_transforms_over_explicit_args(self):
        a, b = (t.detach() for t in spd_system(n=3))

        @implicit.custom_root(lambda z, a, b: a @ z - b, tol=1e-12)
        def solve(a, b):
            return scipy.linalg.solve(a.numpy(), b.numpy())

        for transform in (torch.func.jacrev, torch.func.jacfwd):
            jac_a, jac_b = transform(solve, argnums=(0, 1))(a, b)
            ref_a, ref_b = transform(torch.linalg.solve, argnums=(0, 1))(a, b)
            assert rel_err(jac_a, ref_a) <= 1e-12 and rel_err(jac_b, ref_b) <= 1e-12
        bs = torch.randn(5, 3, dtype=F64)
        zs = torch.func.vmap(solve, in_dims=(None, 0))(a, bs)
        assert rel_err(zs, torch.linalg.solve(a, bs.T).T) <= 1e-13
        tangent = torch.randn(3, dtype=F64)
        _, jvp = torch.func.jvp(lambda b: solve(a, b), (b,), (tangent,))
        assert rel_err(jvp, torch.linalg.solve(a, tangent)) <= 1e-12
        hess = torch.func.hessian(lambda b: (solve(a, b) ** 3).sum())(b)
        hess_ref = torch.func.hessian(lambda b: (torch.linalg.solve(a, b) ** 3).sum())(b)
        assert rel_err(hess, hess_ref) <= 1e-10

    def test_no_graph_without_grad_and_float32_conversion(self):
        a, b = (t.detach().float() for t in spd_system(n=3))

        @implicit.custom_root(lambda z, a, b: a @ z - b, tol=1e-5)
        def solve(a, b):
            # float64 from numpy: converted to the arguments' float32 (documented).
            return np.linalg.solve(a.numpy().astype(np.float64), b.numpy().astype(np.float64))

        z = solve(a, b)
        assert z.dtype == torch.float32 and z.grad_fn is None and not z.requires_grad
        assert rel_err(z, torch.linalg.solve(a, b)) <= 1e-5


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 6),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    backward=st.sampled_from(["dense", "gmres"]),
)
def test_custom_root_random_linear_systems(n, batch, seed, backward):
    a, b = spd_system(n=n, batch=(batch,), seed=seed)
    z = batched_linear_solve(backward)(a, b)
    grads = torch.autograd.grad((z**2).sum(), [a, b])
    z_ref = torch.linalg.solve(a, b)
    refs = torch.autograd.grad((z_ref**2).sum(), [a, b])
    for got, want in zip(grads, refs):
        assert rel_err(got, want) <= 1e-9


def test_custom_root_nonlinear_against_long_unrolled_run():
    # z = tanh(W z + x + h), solved by a plain numpy Picard loop; h is captured by g.
    n = 5
    w = contractive_matrix(n, 0.6, seed=1).requires_grad_()
    x = torch.randn(2, n, dtype=F64, generator=torch.Generator().manual_seed(2))
    x.requires_grad_()
    h = torch.linspace(-0.5, 0.5, n, dtype=F64, requires_grad=True)

    def f(z, x, w):
        return torch.tanh(z @ w.T + x + h)

    @implicit.custom_root(lambda z, x, w: f(z, x, w) - z, batched=True, tol=1e-13)
    def picard(x, w):
        z = np.zeros(x.shape)
        for _ in range(200):
            z = np.tanh(z @ w.numpy().T + x.numpy() + h.detach().numpy())
        return z

    z = picard(x, w)
    grads = torch.autograd.grad((z**3).sum(), [x, w, h])
    z_ref = unrolled_fixed_point(lambda z, x: f(z, x, w), torch.zeros(2, n, dtype=F64), x)
    refs = torch.autograd.grad((z_ref**3).sum(), [x, w, h])
    for got, want in zip(grads, refs):
        assert rel_err(got, want) <= 1e-10


def test_custom_root_tuple_answer():
    a = torch.tensor([2.0, 3.0], dtype=F64, requires_grad=True)

    def g(state, a):
        u, v = state
        return u * v - a, u - 2 * v  # u = 2v, 2v² = a

    @implicit.custom_root(g)
    def solve(a):
        v = np.sqrt(a.numpy() / 2)
        return 2 * v, v

    u, v = solve(a)
    (grad,) = torch.autograd.grad(u.sum() + v.sum(), a)
    # u + v = 3 sqrt(a/2): derivative 3 / (2 sqrt(2a)).
    du = 1 / torch.sqrt(2 * a.detach())
    assert rel_err(grad, 1.5 * du) <= 1e-12
    # Forward mode and vmap with a tuple answer: one tangent, one slice per output.
    _, (tangent_u, tangent_v) = torch.func.jvp(solve, (a.detach(),), (torch.ones_like(a),))
    assert rel_err(tangent_u, du) <= 1e-12 and rel_err(tangent_v, du / 2) <= 1e-12
    us, vs = torch.func.vmap(solve)(torch.stack([a.detach(), 2 * a.detach()]))
    assert rel_err(us[1], 2 * torch.sqrt(a.detach())) <= 1e-12 and rel_err(us, 2 * vs) == 0
