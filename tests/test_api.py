"""Front doors for black boxes and inverses: custom_root, invert, the inverse layer,
batch_jacobian; each gradient against an independent reference."""

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

        @implicit.custom_root(
            lambda z, a, b: (a @ z.unsqueeze(-1)).squeeze(-1) - b,
            batched=True,
            backward=backward,
            tol=1e-12,
        )
        def solve(a, b):
            return np.linalg.solve(a.numpy(), b.numpy()[..., None])[..., 0]

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

    @implicit.custom_root(
        lambda z, a, b: (a @ z.unsqueeze(-1)).squeeze(-1) - b,
        batched=True,
        backward=backward,
        tol=1e-12,
    )
    def solve(a, b):
        return np.linalg.solve(a.numpy(), b.numpy()[..., None])[..., 0]

    z = solve(a, b)
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
        with pytest.raises(TypeError, match="y must be a floating-point tensor"):
            implicit.invert(torch.sin, torch.tensor([1, 2]), inverse=np.arcsin)


class TestBatchJacobian:
    def test_against_jacrev_blocks(self):
        generator = torch.Generator().manual_seed(0)
        m = torch.randn(4, 6, dtype=F64, generator=generator)
        x = torch.randn(3, 2, 3, dtype=F64, generator=generator)

        def func(x):  # (B, 2, 3) -> (B, 4), or (2, 3) -> (4,) for the vmap reference
            flat = x.flatten(-2)
            return torch.sin(flat @ m.T) * flat[..., :4].exp()

        jac = implicit.batch_jacobian(func, x)
        assert jac.shape == (3, 4, 6)
        full = torch.func.jacrev(func)(x).reshape(3, 4, 3, 6)
        blocks = torch.stack([full[b, :, b, :] for b in range(3)])
        assert rel_err(jac, blocks) <= 1e-14
        assert rel_err(jac, torch.func.vmap(torch.func.jacrev(func))(x).reshape(3, 4, 6)) <= 1e-14

    @settings(max_examples=25, deadline=None)
    @given(
        batch=st.integers(1, 4),
        shape_in=st.lists(st.integers(1, 3), min_size=0, max_size=2),
        n_out=st.integers(1, 5),
        seed=st.integers(0, 2**16),
    )
    def test_random_shapes_against_vmapped_jacrev(self, batch, shape_in, n_out, seed):
        generator = torch.Generator().manual_seed(seed)
        n_in = int(np.prod(shape_in))
        m = torch.randn(n_out, n_in, dtype=F64, generator=generator)
        x = torch.randn(batch, *shape_in, dtype=F64, generator=generator)

        def func(x):  # batch-first, or one sample under vmap
            flat = x.reshape(*x.shape[: x.dim() - len(shape_in)], n_in)
            return torch.tanh(flat @ m.T) * (1 + flat.pow(2).sum(-1, keepdim=True))

        jac = implicit.batch_jacobian(func, x)
        ref = torch.func.vmap(torch.func.jacrev(func))(x).reshape(batch, n_out, n_in)
        assert jac.shape == (batch, n_out, n_in) and rel_err(jac, ref) <= 1e-13

    def test_differentiable(self):
        theta = torch.tensor([0.3, -1.2], dtype=F64, requires_grad=True)
        x = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(1))

        def func(x):
            return torch.tanh(theta * x) * x.sum(-1, keepdim=True)

        x.requires_grad_()
        grads = torch.autograd.grad(implicit.batch_jacobian(func, x).pow(2).sum(), [theta, x])
        ref_jac = torch.func.vmap(torch.func.jacrev(func))(x)
        refs = torch.autograd.grad(ref_jac.pow(2).sum(), [theta, x])
        for got, want in zip(grads, refs):
            assert rel_err(got, want) <= 1e-13

    def test_errors(self):
        x = torch.zeros(3, 2)
        with pytest.raises(ValueError, match="batch size 3"):
            implicit.batch_jacobian(lambda x: x.sum(0), x)
        with pytest.raises(ValueError, match="batch size 3"):
            implicit.batch_jacobian(lambda x: x[:2], x)
        with pytest.raises(TypeError, match="must return a tensor"):
            implicit.batch_jacobian(lambda x: x.tolist(), x)
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            implicit.batch_jacobian(torch.sin, [1.0, 2.0])
        with pytest.raises(ValueError, match="batch dimension"):
            implicit.batch_jacobian(torch.sin, torch.tensor(1.0))
