"""The front doors (implicit/api.py, implicit/_invert.py): every bad input API.md lists
gets an error naming the argument; black boxes and inverses (custom_root, invert, the inverse layer,
batch_jacobian) with each gradient against an independent reference."""

from __future__ import annotations

import math

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


def contraction(z, x):
    return 0.5 * torch.tanh(z) + x


def contraction_root(z, x):
    return contraction(z, x) - z


FRONT_DOORS = {
    # name: (call, the name the user's function goes by in messages, a solvable default)
    "fixed_point": (implicit.fixed_point, "f", contraction),
    "root_solve": (implicit.root_solve, "g", contraction_root),
}


@pytest.fixture(params=sorted(FRONT_DOORS))
def front_door(request):
    call, function_name, default = FRONT_DOORS[request.param]

    def run(fn=default, z0=None, *args, **kwargs):
        z0 = torch.zeros(3, dtype=F64) if z0 is None else z0
        args = args or (torch.ones(3, dtype=F64),)
        kwargs.setdefault("solver", "fixed_point")
        return call(fn, z0, *args, **kwargs)

    run.function_name = function_name
    return run


class TestBadInputs:
    def test_sparse_and_meta_states_are_refused(self, front_door):
        with pytest.raises(TypeError, match=r"z0 is a torch.sparse_coo tensor.*z0.to_dense\(\)"):
            front_door(z0=torch.zeros(3, dtype=F64).to_sparse())
        with pytest.raises(ValueError, match="z0 is on the meta device, which holds no values"):
            front_door(z0=torch.zeros(3, dtype=F64, device="meta"))
        with pytest.raises(TypeError, match=r"y is a torch.sparse_coo tensor"):
            implicit.invert(torch.sin, torch.ones(3, dtype=F64).to_sparse())
        with pytest.raises(ValueError, match="y is on the meta device"):
            implicit.invert(torch.sin, torch.ones(3, dtype=F64, device="meta"))

    def test_residual_shape_differs_from_z(self, front_door):
        name = front_door.function_name
        with pytest.raises(
            ValueError, match=rf"{name} returned shape \(2,\) but z has shape \(3,\)"
        ):
            front_door(lambda z, x: z[:2])

    def test_residual_structure_differs_from_z(self, front_door):
        name = front_door.function_name
        with pytest.raises(ValueError, match=rf"{name} must return the same structure as z"):
            front_door(lambda z, x: (z, z))
        with pytest.raises(TypeError, match=rf"{name} must return tensors, got float"):
            front_door(lambda z, x: (1.0,), (torch.zeros(3, dtype=F64),))

    def test_function_not_callable(self, front_door):
        with pytest.raises(TypeError, match=rf"{front_door.function_name} must be callable"):
            front_door("tanh")

    @pytest.mark.parametrize("z0", [[0.0, 0.0], 0.0, "z", object()])
    def test_non_tensor_z0(self, front_door, z0):
        with pytest.raises(TypeError, match=r"z0(\[0\])? must be a torch.Tensor"):
            front_door(contraction, z0)

    def test_z0_of_integers_or_empty(self, front_door):
        with pytest.raises(TypeError, match="z0 must be a floating-point or complex tensor"):
            front_door(contraction, torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="z0 is empty"):
            front_door(contraction, torch.zeros(0, dtype=F64))

    def test_mismatched_dtypes(self, front_door):
        with pytest.raises(TypeError, match=r"argument 0 \(after z0\) has dtype torch.float64"):
            front_door(contraction, torch.zeros(3), torch.ones(3, dtype=F64))
        # A captured tensor of another dtype makes the residual's dtype differ from z's.
        captured = torch.ones(3, dtype=F64)
        with pytest.raises(TypeError, match=r"returned dtype torch.float64 but z has dtype"):
            front_door(lambda z, x: z + captured, torch.zeros(3), torch.ones(3))

    def test_mismatched_devices(self, front_door):
        with pytest.raises(
            ValueError, match=r"argument 0 \(after z0\) is on meta but z0 is on cpu"
        ):
            front_door(
                contraction, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64, device="meta")
            )
        with pytest.raises(ValueError, match=r"z0 is on the meta device, which holds no values"):
            front_door(
                contraction, torch.zeros(3, dtype=F64, device="meta"), torch.ones(3, dtype=F64)
            )

    def test_tuple_state_parts_disagree(self, front_door):
        with pytest.raises(TypeError, match=r"z0\[1\] has dtype torch.float32"):
            front_door(lambda z, x: z, (torch.zeros(3, dtype=F64), torch.zeros(3)))
        with pytest.raises(ValueError, match=r"z0\[1\] is on the meta device"):
            front_door(
                lambda z, x: z,
                (torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64, device="meta")),
            )
        with pytest.raises(ValueError, match=r"z0\[1\] has batch size 2"):
            front_door(
                lambda z, x: z,
                (torch.zeros(3, 1, dtype=F64), torch.zeros(2, 1, dtype=F64)),
                batched=True,
            )

    def test_batched_scalar(self, front_door):
        with pytest.raises(ValueError, match="z0 is a scalar but batched=True"):
            front_door(
                contraction,
                torch.tensor(0.0, dtype=F64),
                torch.tensor(1.0, dtype=F64),
                batched=True,
            )

    def test_unknown_solver(self, front_door):
        with pytest.raises(ValueError, match="unknown solver 'fixed-point'"):
            front_door(solver="fixed-point")
        with pytest.raises(ValueError, match="unknown solver"):
            front_door(solver=3)

    def test_unknown_backward(self, front_door):
        with pytest.raises(ValueError, match="unknown backward 'gmress'"):
            front_door(backward="gmress")
        with pytest.raises(ValueError, match="unknown backward"):
            front_door(backward=implicit.solvers.FixedPoint())

    @pytest.mark.parametrize("tol", [0, 0.0, -1e-6, math.nan, math.inf, True, "1e-6", None])
    def test_bad_tol(self, front_door, tol):
        with pytest.raises(ValueError, match=r"^tol must be a positive finite number"):
            front_door(tol=tol)

    @pytest.mark.parametrize("max_iter", [0, -1, 2.0, True, "10", None])
    def test_bad_max_iter(self, front_door, max_iter):
        with pytest.raises(ValueError, match=r"^max_iter must be an integer >= 1"):
            front_door(max_iter=max_iter)

    @pytest.mark.parametrize("on_failure", ["warning", "Raise", None, True])
    def test_bad_on_failure(self, front_door, on_failure):
        with pytest.raises(ValueError, match=r"^on_failure must be one of"):
            front_door(on_failure=on_failure)

    def test_misspelt_solver_option(self, front_door):
        with pytest.raises(
            TypeError, match=r"solver 'fixed_point' got unknown option\(s\) \['dampig'\]"
        ):
            front_door(dampig=0.5)
        with pytest.raises(ValueError, match="damping must be in"):
            front_door(damping=2.0)

    def test_options_with_a_solver_instance(self, front_door):
        with pytest.raises(TypeError, match=r"solver options \['damping'\].*instance"):
            front_door(solver=implicit.solvers.FixedPoint(), damping=0.5)

    def test_errors_come_before_any_work(self, front_door):
        calls = []

        def counted(z, x):
            calls.append(1)
            return contraction(z, x)

        for bad in (
            {"tol": 0},
            {"max_iter": 0},
            {"on_failure": "x"},
            {"solver": "x"},
            {"backward": "x"},
        ):
            with pytest.raises(ValueError):
                front_door(counted, **bad)
        assert calls == []


class TestReturns:
    def test_return_info(self, front_door):
        z = front_door(tol=1e-10)
        z2, info = front_door(tol=1e-10, return_info=True)
        assert torch.equal(z, z2) and isinstance(info, implicit.SolveInfo)
        assert info.solver == "fixed_point" and info.status == "converged"
        assert info.converged.shape == () and bool(info.converged)

    def test_tuple_state_round_trip(self):
        def f(state, x):
            a, b = state
            return 0.5 * torch.tanh(b) + x, 0.5 * torch.tanh(a)

        x = torch.ones(2, 3, dtype=F64)
        z0 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64))
        a, b = implicit.fixed_point(f, z0, x, solver="fixed_point", tol=1e-12, batched=True)
        assert a.shape == b.shape == (2, 3)
        fa, fb = f((a, b), x)
        assert torch.allclose(fa, a, atol=1e-10) and torch.allclose(fb, b, atol=1e-10)

    def test_tolerance_scaling(self):
        # fixed_point: ‖f(z) − z‖ ≤ tol (1 + max(‖z0‖, ‖f(z0)‖)); root_solve: ‖g(z)‖ ≤ tol.
        # Picard on f(z) = 0.9 z + 100 shrinks the residual by 0.9 a step, so each
        # stops just below its own threshold.
        def f(z):
            return 0.9 * z + 100

        _, info = implicit.fixed_point(
            f,
            torch.zeros(4, dtype=F64),
            solver="fixed_point",
            tol=1e-6,
            max_iter=500,
            return_info=True,
        )
        threshold = 1e-6 * (1 + float(f(torch.zeros(4, dtype=F64)).norm()))
        assert 0.9 * threshold < float(info.residual) <= threshold
        _, info = implicit.root_solve(
            lambda z: f(z) - z,
            torch.zeros(4, dtype=F64),
            solver="fixed_point",
            tol=1e-6,
            max_iter=500,
            return_info=True,
        )
        assert 0.9e-6 < float(info.residual) <= 1e-6
