"""The differentiable core's gradients against independent references (unrolled float64
autograd, closed forms, gradcheck): every solver and exact backward mode, captured
tensors, tuple states, the backward's report, second order and forward mode."""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT_MODES, TIGHT, TanhProblem, loss_of, rel_err, unrolled_fixed_point

import implicit


def reference_grads(p: TanhProblem):
    z = unrolled_fixed_point(p.f, p.z0, p.x)
    return torch.autograd.grad(loss_of(z), [p.x, p.W])


def solver_names():
    # Every registered forward solver that runs on a fixed-point problem by default.
    return sorted(implicit.solvers.NAMES)


@pytest.mark.parametrize("solver", solver_names())
@pytest.mark.parametrize("backward", EXACT_MODES)
def test_every_solver_and_exact_mode_matches_unrolled_reference(solver, backward):
    p = TanhProblem(n=6, batch=3)
    z = implicit.fixed_point(
        p.f, p.z0, p.x, solver=solver, backward=backward, batched=True, **TIGHT
    )
    grads = torch.autograd.grad(loss_of(z), [p.x, p.W])
    for got, want in zip(grads, reference_grads(p)):
        assert rel_err(got, want) <= 1e-7


@pytest.mark.parametrize("backward", EXACT_MODES)
def test_dzdx_matches_closed_form(backward):
    p = TanhProblem(n=5, batch=2)
    jac = torch.func.jacrev(
        lambda x: implicit.fixed_point(
            p.f, p.z0, x, solver="fixed_point", backward=backward, batched=True, **TIGHT
        )
    )(p.x.detach())
    # jac[b, i, c, j] = ∂z_bi/∂x_cj; samples are independent.
    per_sample = torch.stack([jac[b, :, b, :] for b in range(2)])
    z = implicit.fixed_point(p.f, p.z0, p.x.detach(), solver="fixed_point", batched=True, **TIGHT)
    assert rel_err(per_sample, p.closed_form_dzdx(z)) <= 1e-7
    assert jac[0, :, 1, :].abs().max() == 0


def test_cg_on_gradient_of_convex_energy():
    # g = ∇E for E(z) = ½ zᵀAz − bᵀz + Σ softplus(z): ∂g/∂z = A + diag(σ'(z)) is SPD.
    torch.manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64)
    a = (m @ m.T + 5 * torch.eye(5, dtype=torch.float64)).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def g(z, a, b):
        return a @ z - b + torch.sigmoid(z)

    z = implicit.root_solve(g, torch.zeros(5, dtype=torch.float64), a, b, backward="cg", **TIGHT)
    grads = torch.autograd.grad(loss_of(z), [a, b])
    z_ref = implicit.root_solve(
        g, torch.zeros(5, dtype=torch.float64), a, b, backward="dense", **TIGHT
    )
    refs = torch.autograd.grad(loss_of(z_ref), [a, b])
    for got, want in zip(grads, refs):
        assert rel_err(got, want) <= 1e-9
    # And the dense answer against the closed form dz/db = (A + diag σ')⁻¹.
    jac = torch.linalg.inv(
        a.detach() + torch.diag(torch.sigmoid(z_ref) * (1 - torch.sigmoid(z_ref))).detach()
    )
    v = 3 * z_ref.detach() ** 2 + z_ref.detach().cos()
    assert rel_err(refs[1], jac.T @ v) <= 1e-9


def test_unroll_mode_builds_graph_through_iterations():
    p = TanhProblem(n=4, batch=2)
    z = implicit.fixed_point(
        p.f, p.z0, p.x, solver="fixed_point", backward="unroll", batched=True, **TIGHT
    )
    grads = torch.autograd.grad(loss_of(z), [p.x, p.W])
    for got, want in zip(grads, reference_grads(p)):
        assert rel_err(got, want) <= 1e-9


def test_gradcheck_fixed_point_and_root_solve():
    p = TanhProblem(n=3, batch=2)
    W = p.W.detach()

    def fp(x, w):
        return implicit.fixed_point(
            lambda z, x: torch.tanh(z @ w.T + x),
            p.z0,
            x,
            solver="fixed_point",
            batched=True,
            **TIGHT,
        )

    def rs(x, w):
        return implicit.root_solve(
            lambda z, x: torch.tanh(z @ w.T + x) - z,
            p.z0,
            x,
            solver="fixed_point",
            batched=True,
            **TIGHT,
        )

    x = p.x.detach().requires_grad_()
    w = W.clone().requires_grad_()
    assert torch.autograd.gradcheck(fp, (x, w))
    assert torch.autograd.gradcheck(rs, (x, w))
    assert torch.autograd.gradgradcheck(fp, (x, w))


class TestCapturedTensors:
    """Gradients reach tensors g reads from its closure, however they were made."""

    def solve(self, f, z0, *args, **kw):
        return implicit.fixed_point(
            f, z0, *args, solver="fixed_point", backward="dense", **TIGHT, **kw
        )

    def test_closure_leaf_and_module_parameters(self):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 4).double()
        with torch.no_grad():
            lin.weight.mul_(0.3)
        x = torch.randn(4, dtype=torch.float64)

        def f(z):
            return torch.tanh(lin(z) + x)

        z = self.solve(f, torch.zeros(4, dtype=torch.float64))
        grads = torch.autograd.grad(loss_of(z), [lin.weight, lin.bias])
        z_ref = unrolled_fixed_point(f, torch.zeros(4, dtype=torch.float64))
        refs = torch.autograd.grad(loss_of(z_ref), [lin.weight, lin.bias])
        for got, want in zip(grads, refs):
            assert rel_err(got, want) <= 1e-9

    @pytest.mark.parametrize(
        "case", ["non_leaf_capture", "capture_of_explicit", "explicit_of_capture"]
    )
    def test_captures_related_to_explicit_args(self, case):
        p = TanhProblem(n=4, batch=1)
        a = torch.randn(4, dtype=torch.float64, requires_grad=True)
        x_leaf = p.x

        def build():
            x = x_leaf
            h = torch.zeros(4, dtype=torch.float64)
            if case == "non_leaf_capture":
                h = a.sin() * 2
            elif case == "capture_of_explicit":
                h = torch.sin(x_leaf) * a
            elif case == "explicit_of_capture":
                x = x_leaf * p.W.sum(0)
            return x, h

        x, h = build()
        z = self.solve(lambda z, x: p.f(z, x) + 0.1 * h, p.z0, x)
        grads = torch.autograd.grad(
            loss_of(z), [x_leaf, p.W, a], allow_unused=True, materialize_grads=True
        )
        x, h = build()
        z_ref = unrolled_fixed_point(lambda z, x: p.f(z, x) + 0.1 * h, p.z0, x)
        refs = torch.autograd.grad(
            loss_of(z_ref), [x_leaf, p.W, a], allow_unused=True, materialize_grads=True
        )
        for got, want in zip(grads, refs):
            assert rel_err(got, want) <= 1e-9


def test_backward_info_is_recorded():
    p = TanhProblem(n=6, batch=3)
    z, info = implicit.fixed_point(
        p.f,
        p.z0,
        p.x,
        solver="fixed_point",
        backward="gmres",
        batched=True,
        return_info=True,
        **TIGHT,
    )
    assert info.backward is None
    z.sum().backward()
    assert info.backward.method == "gmres"
    assert info.backward.converged.shape == (3,) and bool(info.backward.converged.all())
    assert info.backward.iterations >= 1 and info.backward.matvecs >= info.backward.iterations
    assert float(info.backward.residual.max()) <= 1e-13


def test_tuple_states():
    p = TanhProblem(n=4, batch=2)

    def f(state, x):
        a, b = state
        return torch.tanh(b @ p.W.T + x), 0.5 * torch.tanh(a)

    z0 = (p.z0, p.z0.clone())
    a, b = implicit.fixed_point(f, z0, p.x, solver="fixed_point", batched=True, **TIGHT)
    grads = torch.autograd.grad(loss_of(a) + loss_of(b), [p.x, p.W])
    ref_state = unrolled_fixed_point(f, z0, p.x)
    refs = torch.autograd.grad(loss_of(ref_state[0]) + loss_of(ref_state[1]), [p.x, p.W])
    for got, want in zip(grads, refs):
        assert rel_err(got, want) <= 1e-9


class TestHigherOrder:
    def test_double_backward_matches_unrolled(self):
        p = TanhProblem(n=4, batch=2)
        z = implicit.fixed_point(p.f, p.z0, p.x, solver="fixed_point", batched=True, **TIGHT)
        gx, gw = torch.autograd.grad(loss_of(z), [p.x, p.W], create_graph=True)
        second = torch.autograd.grad((gx.sin()).sum() + (gw**2).sum(), [p.x, p.W])
        z_ref = unrolled_fixed_point(p.f, p.z0, p.x)
        rx, rw = torch.autograd.grad(loss_of(z_ref), [p.x, p.W], create_graph=True)
        refs = torch.autograd.grad((rx.sin()).sum() + (rw**2).sum(), [p.x, p.W])
        for got, want in zip(second, refs):
            assert rel_err(got, want) <= 1e-8

    def test_forward_mode_and_transforms(self):
        p = TanhProblem(n=4, batch=2)
        x = p.x.detach()
        W = p.W.detach()

        def solve(x):
            return implicit.fixed_point(
                lambda z, x: torch.tanh(z @ W.T + x),
                p.z0,
                x,
                solver="fixed_point",
                batched=True,
                **TIGHT,
            )

        def ref(x):
            return unrolled_fixed_point(lambda z, x: torch.tanh(z @ W.T + x), p.z0, x)

        tangent = torch.randn_like(x)
        _, jvp = torch.func.jvp(solve, (x,), (tangent,))
        _, jvp_ref = torch.func.jvp(ref, (x,), (tangent,))
        assert rel_err(jvp, jvp_ref) <= 1e-9
        assert rel_err(torch.func.jacfwd(solve)(x), torch.func.jacrev(ref)(x)) <= 1e-9
        hess = torch.func.hessian(lambda x: loss_of(solve(x)))(x)
        hess_ref = torch.func.hessian(lambda x: loss_of(ref(x)))(x)
        assert rel_err(hess, hess_ref) <= 1e-8

    def test_tangents_on_captured_tensors(self):
        # Regression: a tensor captured by f (not an explicit argument) carries a tangent
        # under torch.func.jvp / jacfwd / vmap and forward_ad: it must be seen.
        import torch.autograd.forward_ad as forward_ad

        p = TanhProblem(n=4, batch=1)
        W = p.W.detach()
        z0 = torch.zeros(4, dtype=torch.float64)

        def solve(x):
            return implicit.fixed_point(
                lambda z: torch.tanh(W @ z + x), z0, solver="fixed_point", **TIGHT
            )

        def ref(x):
            return unrolled_fixed_point(lambda z: torch.tanh(W @ z + x), z0)

        x = p.x.detach()[0]
        tangent = torch.randn_like(x)
        _, want = torch.func.jvp(ref, (x,), (tangent,))
        assert rel_err(torch.func.jvp(solve, (x,), (tangent,))[1], want) <= 1e-9
        assert rel_err(torch.func.jacfwd(solve)(x) @ tangent, want) <= 1e-9
        assert rel_err(torch.func.jacrev(solve)(x) @ tangent, want) <= 1e-9
        with forward_ad.dual_level():
            out = solve(forward_ad.make_dual(x, tangent))
            got = forward_ad.unpack_dual(out).tangent
        assert rel_err(got, want) <= 1e-9
        xs = torch.stack([x, 2 * x, -x])
        assert rel_err(torch.func.vmap(solve)(xs), torch.stack([ref(a) for a in xs])) <= 1e-9
