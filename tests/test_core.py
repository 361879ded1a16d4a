"""The differentiable core: gradients against independent references, in every mode."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EXACT_MODES, TanhProblem, assert_fixed_point, rel_err, unrolled_fixed_point
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit
from implicit.solvers import Solver

TIGHT = {"tol": 1e-13, "max_iter": 500}


def loss_of(z):
    return (z**3).sum() + z.sin().sum()


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


def test_no_graph_without_grad():
    p = TanhProblem(n=3, batch=2)
    with torch.no_grad():
        z = implicit.fixed_point(p.f, p.z0, p.x, solver="fixed_point", batched=True)
    assert z.grad_fn is None and not z.requires_grad
    w = p.W.detach()
    z = implicit.fixed_point(
        lambda z, x: torch.tanh(z @ w.T + x), p.z0, p.x.detach(), solver="fixed_point", batched=True
    )
    assert z.grad_fn is None and not z.requires_grad


def test_z0_gets_no_gradient():
    p = TanhProblem(n=3, batch=2)
    z0 = torch.full_like(p.z0, 0.1, requires_grad=True)
    z = implicit.fixed_point(p.f, z0, p.x, solver="fixed_point", batched=True, **TIGHT)
    gz0, gx = torch.autograd.grad(z.sum(), [z0, p.x], allow_unused=True)
    assert gz0 is None and gx is not None


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


def test_inputs_are_not_modified():
    p = TanhProblem(n=4, batch=2)
    before = [t.detach().clone() for t in (p.z0, p.x, p.W)]
    z = implicit.fixed_point(p.f, p.z0, p.x, solver="fixed_point", batched=True, **TIGHT)
    z.sum().backward()
    for t, saved in zip((p.z0, p.x, p.W), before):
        assert torch.equal(t.detach(), saved)


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


def test_diverging_fixed_point_is_not_reported_converged():
    # f(z) = z + 0.1 has no fixed point: the iterate runs away while its residual stays 0.1.
    # A test relative to the current ‖z‖ would call it converged once ‖z‖ ≥ 0.1 / tol.
    _, info = implicit.fixed_point(
        lambda z: z + 0.1,
        torch.zeros(3, dtype=torch.float64),
        solver="fixed_point",
        tol=1e-2,
        max_iter=200,
        on_failure="ignore",
        return_info=True,
    )
    assert info.status == "max_iter" and not bool(info.converged)


# -- failures, per-sample status and the on_failure policy ------------------------------


def per_sample_map(z, a, c):
    """``f(z) = a_b · tanh(z) + c_b`` per sample: contractive for ``|a_b| < 1``."""
    return a.unsqueeze(1) * torch.tanh(z) + c


def one_sample_cannot_converge(**kwargs):
    # Sample 1 oscillates for ever: f(z) = −z + c has the fixed point c/2, but Picard
    # iteration jumps between z0 and c − z0.
    a = torch.tensor([0.5, 1.0, 0.3], dtype=torch.float64)
    c = torch.tensor([[0.3, -0.2], [1.0, 2.0], [-0.4, 0.1]], dtype=torch.float64)

    oscillates = (torch.arange(3) == 1).unsqueeze(1)

    def f(z, c):
        return torch.where(oscillates, c - z, per_sample_map(z, a, c))

    return implicit.fixed_point(
        f,
        torch.zeros(3, 2, dtype=torch.float64),
        c,
        solver="fixed_point",
        batched=True,
        return_info=True,
        tol=1e-10,
        max_iter=60,
        **kwargs,
    )


class TestFailures:
    def test_one_sample_that_cannot_converge(self):
        z, info = one_sample_cannot_converge(on_failure="ignore")
        assert info.converged.tolist() == [True, False, True]
        assert info.status == "max_iter"
        assert info.iterations == 60  # the maximum over samples
        assert info.residual.shape == (3,) and float(info.residual[1]) > 1
        assert len(info.history) == 61
        # The others converged, each to its own tolerance.
        for b in (0, 2):
            assert float(info.residual[b]) <= 1e-10 * (1 + float(z[b].norm()))

    def test_the_others_are_frozen_when_converged(self):
        # Sample 0 alone stops after k iterations; in the batch it must not move after k.
        z, _ = one_sample_cannot_converge(on_failure="ignore")
        a = torch.tensor([0.5], dtype=torch.float64)
        c = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
        alone = implicit.fixed_point(
            lambda z: per_sample_map(z, a, c),
            torch.zeros(1, 2, dtype=torch.float64),
            solver="fixed_point",
            batched=True,
            tol=1e-10,
            max_iter=60,
        )
        assert torch.equal(z[0], alone[0])

    def test_forward_warn(self):
        with pytest.warns(implicit.ConvergenceWarning, match=r"forward solve.*1 of 3") as record:
            z, info = one_sample_cannot_converge()
        assert record[0].filename == __file__  # points at the caller
        assert z.shape == (3, 2) and info.status == "max_iter"

    def test_forward_raise(self):
        with pytest.raises(implicit.ConvergenceError, match="max_iter") as caught:
            one_sample_cannot_converge(on_failure="raise")
        info = caught.value.info
        assert isinstance(info, implicit.SolveInfo)
        assert info.converged.tolist() == [True, False, True] and info.iterations == 60

    def test_forward_ignore(self):
        # pytest turns ConvergenceWarning into an error: silence is checked by running.
        _, info = one_sample_cannot_converge(on_failure="ignore")
        assert info.status == "max_iter"

    def backward_that_cannot_converge(self, on_failure):
        p = TanhProblem(n=6, batch=3, norm=0.9)
        z, info = implicit.fixed_point(
            p.f,
            p.z0,
            p.x,
            solver="fixed_point",
            backward=implicit.linear.Neumann(max_iter=2),
            batched=True,
            on_failure=on_failure,
            return_info=True,
            **TIGHT,
        )
        return p, z, info

    def test_backward_warn(self):
        p, z, info = self.backward_that_cannot_converge("warn")
        with pytest.warns(implicit.ConvergenceWarning, match="backward linear solve") as record:
            z.sum().backward()
        assert record[0].filename == __file__
        assert info.backward.status == "max_iter" and info.backward.iterations == 2
        assert not bool(info.backward.converged.any())
        assert bool(torch.isfinite(p.x.grad).all())  # the result is returned

    def test_backward_raise(self):
        _, z, _ = self.backward_that_cannot_converge("raise")
        with pytest.raises(implicit.ConvergenceError, match="backward linear solve") as caught:
            z.sum().backward()
        assert isinstance(caught.value.info, implicit.BackwardInfo)
        assert caught.value.info.status == "max_iter" and caught.value.info.method == "neumann"
        assert caught.value.info.converged.shape == (3,)

    def test_backward_ignore(self):
        _, z, info = self.backward_that_cannot_converge("ignore")
        z.sum().backward()
        assert info.backward.status == "max_iter"

    def test_unbatched_info_is_per_problem_scalar(self):
        x = torch.ones(3, dtype=torch.float64, requires_grad=True)
        z, info = implicit.fixed_point(
            lambda z, x: 0.5 * torch.tanh(z) + x,
            torch.zeros(3, dtype=torch.float64),
            x,
            solver="fixed_point",
            return_info=True,
        )
        z.sum().backward()
        assert info.converged.shape == () and info.residual.shape == ()
        assert info.backward.converged.shape == () and info.backward.residual.shape == ()


class TestNonFinite:
    @staticmethod
    def f(z):
        # Sample 0 converges; sample 1 squares its way to inf; sample 2 takes the square
        # root of a negative number (NaN) at its third iterate.
        rows = [
            0.5 * torch.tanh(z[0]) + 1,
            z[1] ** 2 + 2,
            torch.sqrt(z[2]) - 1,
        ]
        return torch.stack(rows)

    def run(self, **kwargs):
        z0 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 4.0]], dtype=torch.float64)
        return implicit.fixed_point(
            self.f,
            z0,
            solver="fixed_point",
            batched=True,
            tol=1e-12,
            max_iter=500,
            on_failure="ignore",
            return_info=True,
            **kwargs,
        )

    def test_nonfinite_samples_stop_at_once(self):
        _, info = self.run()
        assert info.status == "nonfinite"
        assert info.converged.tolist() == [True, False, False]
        # Sample 0 needs a few dozen iterations; nobody ran to max_iter.
        assert 10 < info.iterations < 100
        assert not math.isfinite(max(info.history))  # the blow-up is in the history
        assert bool(torch.isfinite(info.residual).all())  # the kept iterates' residuals

    @pytest.mark.parametrize("sample", [1, 2])
    def test_the_returned_iterate_is_the_last_finite_one(self, sample):
        z, _ = self.run()
        # Replay Picard: stop before the residual's norm turns non-finite.
        current = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 4.0]], dtype=torch.float64)
        while True:
            nxt = self.f(current)
            if not math.isfinite(torch.linalg.vector_norm(self.f(nxt)[sample] - nxt[sample])):
                break
            current = nxt
        assert torch.equal(z[sample], current[sample])

    def test_nonfinite_at_the_initial_guess(self):
        x = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
        _, info = implicit.root_solve(
            lambda z, x: torch.sqrt(x) - z,
            torch.zeros(2, dtype=torch.float64),
            x,
            solver="fixed_point",
            on_failure="ignore",
            return_info=True,
        )
        assert info.status == "nonfinite" and info.iterations == 0
        with pytest.raises(implicit.ConvergenceError, match="nonfinite"):
            implicit.root_solve(
                lambda z, x: torch.sqrt(x) - z,
                torch.zeros(2, dtype=torch.float64),
                x,
                solver="fixed_point",
                on_failure="raise",
            )


# -- inputs are never modified, nor aliased -----------------------------------------------

ALL_MODES = ["dense", "cg", "gmres", "bicgstab", "neumann", "one_step", "unroll", "auto"]


@pytest.mark.parametrize("backward", ALL_MODES)
def test_inputs_unchanged_after_forward_and_backward(backward):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    captured = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    z0 = torch.full((2, 4), 0.1, dtype=torch.float64)
    guess = torch.ones(2, 4, dtype=torch.float64)
    mode = implicit.linear.GMRES(x0=guess) if backward == "gmres" else backward
    inputs = [z0, x, captured, lin.weight, lin.bias, guess]
    saved = [t.detach().clone() for t in inputs]
    versions = [t._version for t in inputs]
    z = implicit.fixed_point(
        lambda z, x: torch.tanh(lin(z) + x + captured),
        z0,
        x,
        solver="fixed_point",
        backward=mode,
        batched=True,
        on_failure="ignore",  # cg meets a Jacobian that is not SPD here: only inputs matter
        **TIGHT,
    )
    loss_of(z).backward()
    for tensor, before, version in zip(inputs, saved, versions):
        assert torch.equal(tensor.detach(), before) and tensor._version == version
    assert x.grad is not None and captured.grad is not None and lin.weight.grad is not None


@pytest.mark.parametrize("backward", ["dense", "unroll"])
@pytest.mark.parametrize("grad", [False, True])
def test_output_does_not_alias_z0(backward, grad):
    # z0 already solves the problem: no iteration happens.
    x = torch.ones(3, dtype=torch.float64, requires_grad=grad)
    z0 = torch.ones(3, dtype=torch.float64)
    z = implicit.fixed_point(
        lambda z, x: 0.5 * z + 0.5 * x, z0, x, solver="fixed_point", backward=backward
    )
    with torch.no_grad():
        z.add_(1)
    assert torch.equal(z0, torch.ones(3, dtype=torch.float64))


def test_unroll_gives_z0_no_gradient():
    p = TanhProblem(n=3, batch=2)
    z0 = torch.full_like(p.z0, 0.1, requires_grad=True)
    z = implicit.fixed_point(
        p.f,
        z0,
        p.x,
        solver="fixed_point",
        backward="unroll",
        batched=True,
        max_iter=5,
        on_failure="ignore",
    )
    gz0, gx = torch.autograd.grad(z.sum(), [z0, p.x], allow_unused=True)
    assert gz0 is None and gx is not None


class Descent(Solver):
    """``z ← z − step · g(z)``: Picard on ``−g``, for roots of gradients of convex energies."""

    name = "descent"

    def __init__(self, step: float):
        super().__init__()
        self.step_size = step

    def step(self, fn, z, r, state):
        z = z - self.step_size * r
        return z, fn(z), state


# -- property: random contractive maps, every exact backward mode --------------------------


def contractive_problem(batch, n, contraction, seed):
    """``f(z, x) = tanh(W_b z + x_b)`` per sample, with ``‖W_b‖₂ = contraction``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    w = w * (contraction / torch.linalg.matrix_norm(w, ord=2).reshape(batch, 1, 1))
    w.requires_grad_()
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(batch, n, generator=gen, dtype=torch.float64)

    def f(z, x):
        return torch.tanh(torch.einsum("bij,bj->bi", w, z) + x)

    return f, w, x, weights


@pytest.mark.parametrize("backward", EXACT_MODES)
@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 4),
    n=st.integers(1, 8),
    contraction=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**31),
)
def test_random_contractive_maps_match_unrolled(backward, batch, n, contraction, seed):
    f, w, x, weights = contractive_problem(batch, n, contraction, seed)
    z0 = torch.zeros(batch, n, dtype=torch.float64)
    tol = 1e-12
    z, info = implicit.fixed_point(
        f,
        z0,
        x,
        solver="fixed_point",
        backward=backward,
        batched=True,
        tol=tol,
        max_iter=1000,
        return_info=True,
    )
    # The equation, checked independently of the solver's report.
    assert_fixed_point(f, z, x, z0=z0, tol=tol)
    assert bool(info.converged.all())
    grads = torch.autograd.grad((weights * z.sin()).sum(), [x, w])
    z_ref = unrolled_fixed_point(f, z0, x, iterations=500)
    refs = torch.autograd.grad((weights * z_ref.sin()).sum(), [x, w])
    for got, want in zip(grads, refs):
        assert rel_err(got, want) <= 1e-7


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    n=st.integers(1, 8),
    condition=st.floats(1.0, 100.0),
    seed=st.integers(0, 2**31),
)
def test_random_convex_energies_with_cg_match_closed_form(batch, n, condition, seed):
    # g = ∇E with E(z) = ½ zᵀAz + Σ log cosh(z) − bᵀz: ∂g/∂z = A + diag(sech² z) is SPD.
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    a = (q * eigenvalues) @ q.mT
    b = torch.randn(batch, n, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(batch, n, generator=gen, dtype=torch.float64)

    def g(z, b):
        return torch.einsum("bij,bj->bi", a, z) + torch.tanh(z) - b

    # Gradient descent on E, a forward solver defined here: z ← z − g(z) / L.
    descent = Descent(step=1 / (condition + 1))
    z, info = implicit.root_solve(
        g,
        torch.zeros(batch, n, dtype=torch.float64),
        b,
        solver=descent,
        backward="cg",
        batched=True,
        tol=1e-12,
        max_iter=20000,
        return_info=True,
    )
    with torch.no_grad():
        assert bool((torch.linalg.vector_norm(g(z, b), dim=1) <= 1e-12).all())
    (grad,) = torch.autograd.grad((weights * z).sum(), [b])
    # dz/db = (A + diag sech² z)⁻¹, symmetric: the gradient is J⁻¹ weights.
    jac = a + torch.diag_embed(1 - torch.tanh(z.detach()) ** 2)
    reference = torch.linalg.solve(jac, weights)
    assert rel_err(grad, reference) <= 1e-7
    assert info.backward is None or bool(info.backward.converged.all())


class TestFirstOrderPath:
    """A first-order backward records g once and takes every product from that graph.

    ``torch.autograd.grad(..., create_graph=True)`` takes the general path
    (``torch.func`` partials, a fresh linearisation for the adjoint), so comparing the
    two checks the fast path against the one that double backward relies on.
    """

    @staticmethod
    def problem(form):
        """``solve(backward) -> z`` and the leaves: explicit ``x``, captured leaf ``W``,
        and ``a``, reached through a captured non-leaf (and ``y`` for the inverse)."""
        p = TanhProblem(n=5, batch=3, norm=0.6)
        a = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        a.requires_grad_()
        y = (0.05 * p.x).detach().requires_grad_()

        def solve(backward):
            h = 0.1 * a.sin()  # rebuilt per call: each backward frees its graph
            options = dict(backward=backward, batched=True, **TIGHT)

            def f(z, x):
                return p.f(z, x) + h

            if form == "fixed_point":
                return implicit.fixed_point(f, p.z0, p.x, solver="fixed_point", **options)
            if form == "root":
                return implicit.root_solve(lambda z, x: f(z, x) - z, p.z0, p.x, **options)
            return implicit.invert(lambda z, x: z - f(z, x), y, p.x, z0=p.z0, **options)

        return solve, [p.x, p.W, a] + ([y] if form == "inverse" else [])

    @pytest.mark.parametrize(
        ("form", "backward"),
        [
            (form, backward)
            for form in ("fixed_point", "root", "inverse")
            for backward in ("dense", "gmres", "bicgstab", "neumann")
            # Neumann needs ∂g/∂z ≈ −I; the inverse z − f(z) = y has ∂g/∂z ≈ +I.
            if (form, backward) != ("inverse", "neumann")
        ],
    )
    def test_equals_the_general_path(self, form, backward):
        solve, leaves = self.problem(form)
        plain = torch.autograd.grad(loss_of(solve(backward)), leaves)
        general = torch.autograd.grad(loss_of(solve(backward)), leaves, create_graph=True)
        for got, want in zip(plain, general):
            assert rel_err(got, want) <= 1e-12

    def test_records_g_once_and_counts_its_products(self):
        # Counting evaluations of f and VJPs through it (one per backward of tanh).
        counts = {"f": 0, "vjp": 0}

        class CountedTanh(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(x):
                return torch.tanh(x)

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.save_for_backward(output)

            @staticmethod
            def backward(ctx, grad):
                counts["vjp"] += 1
                (y,) = ctx.saved_tensors
                return grad * (1 - y * y)

        p = TanhProblem(n=6, batch=4, norm=0.6)

        def f(z, x):
            counts["f"] += 1
            return CountedTanh.apply(z @ p.W.T + x)

        for backward, extra in (("neumann", 0), ("gmres", 1)):
            counts.update(f=0, vjp=0)
            z, info = implicit.fixed_point(
                f, p.z0, p.x, backward=backward, batched=True, return_info=True, **TIGHT
            )
            # The forward: the solver's evaluations and the capture discovery's one, which
            # f_evals counts (its residual is the solver's first).
            assert counts["f"] == info.f_evals
            counts.update(f=0, vjp=0)
            torch.autograd.grad(loss_of(z), [p.x, p.W])
            assert counts["f"] == 1  # one recorded graph for the adjoint and the partials
            # The adjoint's products, with no true-residual product computed twice
            # (Neumann's residual is exact at every iterate; GMRES adds the check of its
            # last iterate), and one pass for the partials.
            assert info.backward.matvecs == info.backward.iterations + extra
            assert counts["vjp"] == info.backward.matvecs + 1
