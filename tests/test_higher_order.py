"""Higher order and forward mode through solutions, against independent references.

Second and third derivatives (double backward, ``torch.func.hessian``), forward mode
(``torch.func.jvp``, ``torch.autograd.forward_ad`` dual tensors), the ``torch.func``
transforms and ``vmap``, for every front door, explicit arguments and captured tensors.
References: closed forms (a linear system, the cubic ``z³ + a z = y``), plain autograd
through long unrolled float64 iterations, central finite differences, and the
reverse-mode Jacobian. The unsupported combinations must raise, never answer wrongly.

``IMPLICIT_WORST_ERRORS=path.json pytest tests/test_higher_order.py`` writes the worst
relative error of every check to ``path.json``.
"""

from __future__ import annotations

import json
import os
import pathlib
import runpy

import pytest
import scipy.linalg
import torch
import torch.autograd.forward_ad as forward_ad
from conftest import EXACT_MODES, TanhProblem, contractive_matrix, rel_err, unrolled_fixed_point

import implicit
from implicit import __main__ as tour

TIGHT = {"tol": 1e-13, "max_iter": 500}
F64 = torch.float64

WORST: dict[str, float] = {}


def assert_close(check: str, got: torch.Tensor, want: torch.Tensor, bound: float) -> None:
    """``rel_err(got, want) <= bound``, remembering the worst error of each check."""
    error = rel_err(got, want)
    WORST[check] = max(WORST.get(check, 0.0), error)
    assert error <= bound, f"{check}: relative error {error:.2e} > {bound:.0e}"


def teardown_module():
    path = os.environ.get("IMPLICIT_WORST_ERRORS")
    if path:
        pathlib.Path(path).write_text(json.dumps(WORST, indent=1, sort_keys=True))


def loss_of(z: torch.Tensor) -> torch.Tensor:
    return (z**3).sum() + z.sin().sum()


def second_order(loss, params):
    """A scalar built from the gradient (a gradient penalty), differentiated again."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum((g**2).sum() + g.sin().sum() for g in grads)
    return torch.autograd.grad(penalty, params)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- problems with closed forms ---------------------------------------------------------


class Cubic:
    """``z³ + a z = y`` elementwise, ``a > 0``: one real root with closed-form derivatives.

    With ``p = 1 / (3z² + a)``: ``z' = p``, ``z'' = −6 z p³``, ``z''' = −6 p⁴ + 108 z² p⁵``
    (derivatives in ``y``), and ``∂z/∂a = −z p``.
    """

    def __init__(self, n: int = 3):
        self.y = torch.linspace(-0.8, 1.3, n, dtype=F64)
        self.a = torch.tensor(1.5, dtype=F64)

    @staticmethod
    def f(z, a):
        return z**3 + a * z

    def root(self, y=None, a=None):
        y = self.y if y is None else y
        a = self.a if a is None else a
        return implicit.invert(self.f, y.detach(), a.detach(), **TIGHT)

    def derivatives(self):
        z = self.root()
        p = 1 / (3 * z**2 + self.a)
        return z, p, -6 * z * p**3, -6 * p**4 + 108 * z**2 * p**5


class Linear:
    """``A z = b`` with a well-conditioned ``A``; the reference is ``torch.linalg.solve``."""

    def __init__(self, n: int = 4, seed: int = 0):
        m = torch.randn(n, n, generator=generator(seed), dtype=F64)
        self.A = m + n * torch.eye(n, dtype=F64)
        self.b = torch.randn(n, generator=generator(seed + 1), dtype=F64)

    @staticmethod
    def g(z, A, b):
        return A @ z - b


def spd_energy(n: int = 4, seed: int = 0):
    """``g = ∇E`` for the convex ``E(z) = ½ zᵀQz − bᵀz + λ Σ softplus(z)``: ∂g/∂z is SPD."""
    m = torch.randn(n, n, generator=generator(seed), dtype=F64)
    q = m @ m.T + n * torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=generator(seed + 1), dtype=F64)
    lam = torch.tensor(0.7, dtype=F64)

    def energy(z, b, lam):
        return 0.5 * z @ q @ z - b @ z + lam * torch.nn.functional.softplus(z).sum()

    def hessian(z, lam):
        s = torch.sigmoid(z)
        return q + lam * torch.diag(s * (1 - s))

    return torch.func.grad(energy), b, lam, hessian


# -- the four front doors, each with its reference ---------------------------------------


def front_door_cases():
    """``(name, solve(*params), reference(*params), params)``: ``solve`` goes through the
    front door, ``reference`` is plain autograd on a closed form or unrolled iterations."""
    p = TanhProblem(n=4, batch=1)
    w, x = p.W.detach(), p.x.detach()[0]
    lin = Linear()
    cubic = Cubic()

    def fixed_point(x, w):
        z0 = torch.zeros(x.shape, dtype=F64)
        return implicit.fixed_point(lambda z, x, w: torch.tanh(w @ z + x), z0, x, w, **TIGHT)

    def fixed_point_ref(x, w):
        return unrolled_fixed_point(
            lambda z: torch.tanh(w @ z + x), torch.zeros(x.shape, dtype=F64)
        )

    def root_solve(A, b):
        return implicit.root_solve(Linear.g, torch.zeros_like(b), A, b, **TIGHT)

    def invert(y, a):
        return implicit.invert(Cubic.f, y, a, **TIGHT)

    def invert_ref(y, a):
        # Newton on the cubic, unrolled (converged to machine precision well before 60).
        z = y.detach().clone()
        for _ in range(60):
            z = z - (z**3 + a * z - y) / (3 * z**2 + a)
        return z

    solve_scipy = implicit.custom_root(Linear.g, tol=1e-12)(
        lambda A, b: scipy.linalg.solve(A.numpy(), b.numpy())
    )
    return [
        ("fixed_point", fixed_point, fixed_point_ref, (x, w)),
        ("root_solve", root_solve, torch.linalg.solve, (lin.A, lin.b)),
        ("invert", invert, invert_ref, (cubic.y, cubic.a)),
        ("custom_root", solve_scipy, torch.linalg.solve, (lin.A, lin.b)),
    ]


CASES = {case[0]: case for case in front_door_cases()}


def captured(solve, params):
    """``solve`` with every parameter read from the closure instead of passed."""
    return lambda: solve(*params)


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


# -- forward mode ------------------------------------------------------------------------


def tanh_fixed_point(backward="dense", captured=False, n=4, solver="fixed_point"):
    """``x ↦ z*`` for ``z = tanh(W z + x)`` and its unrolled reference."""
    w = contractive_matrix(n, 0.5)
    z0 = torch.zeros(n, dtype=F64)
    if captured:

        def solve(x):
            return implicit.fixed_point(
                lambda z: torch.tanh(w @ z + x), z0, solver=solver, backward=backward, **TIGHT
            )

    else:

        def solve(x):
            return implicit.fixed_point(
                lambda z, x: torch.tanh(w @ z + x), z0, x, solver=solver, backward=backward, **TIGHT
            )

    def reference(x):
        return unrolled_fixed_point(lambda z: torch.tanh(w @ z + x), z0)

    x = torch.randn(n, generator=generator(5), dtype=F64)
    return solve, reference, x, w


def dual_jvp(fn, x, tangent):
    with forward_ad.dual_level():
        out = fn(forward_ad.make_dual(x, tangent))
        return forward_ad.unpack_dual(out).tangent


class TestForwardMode:
    @pytest.mark.parametrize("backward", EXACT_MODES)
    @pytest.mark.parametrize("captured", [False, True], ids=["explicit", "captured"])
    def test_jvp_and_dual_tensors_every_exact_mode(self, backward, captured):
        solve, reference, x, _ = tanh_fixed_point(backward, captured)
        tangent = torch.randn(x.shape, generator=generator(7), dtype=F64)
        _, want = torch.func.jvp(reference, (x,), (tangent,))
        assert_close("jvp vs unrolled", torch.func.jvp(solve, (x,), (tangent,))[1], want, 1e-9)
        assert_close("dual vs unrolled", dual_jvp(solve, x, tangent), want, 1e-9)

    @pytest.mark.parametrize("backward", ["cg", "dense", "gmres", "bicgstab"])
    def test_cg_and_others_on_an_spd_problem(self, backward):
        g, b, lam, hessian = spd_energy()

        def solve(b):
            return implicit.root_solve(g, torch.zeros_like(b), b, lam, backward=backward, **TIGHT)

        tangent = torch.randn(b.shape, generator=generator(3), dtype=F64)
        z, got = torch.func.jvp(solve, (b,), (tangent,))
        want = torch.linalg.solve(hessian(z, lam), tangent)  # dz = H⁻¹ db
        assert_close("jvp, closed form", got, want, 1e-10)
        assert_close("dual, closed form", dual_jvp(solve, b, tangent), want, 1e-10)

    def test_one_step_is_its_documented_approximation(self):
        # one_step takes ∂g/∂z ≈ −I: for a fixed point dz ≈ (∂f/∂x) dx at z*, in both
        # modes, and forward and reverse stay each other's transposes.
        solve, _, x, w = tanh_fixed_point("one_step")
        tangent = torch.randn(x.shape, generator=generator(7), dtype=F64)
        z, got = torch.func.jvp(solve, (x,), (tangent,))
        _, want = torch.func.jvp(lambda x: torch.tanh(w @ z + x), (x,), (tangent,))
        assert_close("one_step, documented", got, want, 1e-12)
        cotangent = torch.randn(x.shape, generator=generator(8), dtype=F64)
        (reverse,) = torch.func.vjp(solve, x)[1](cotangent)
        assert abs(float(cotangent @ got - reverse @ tangent)) <= 1e-12

    @pytest.mark.parametrize("backward", ["dense", "gmres"])
    def test_jvp_against_finite_differences_and_jacrev(self, backward):
        solve, _, x, _ = tanh_fixed_point(backward, captured=True)
        tangent = torch.randn(x.shape, generator=generator(9), dtype=F64)
        _, got = torch.func.jvp(solve, (x,), (tangent,))
        eps = 1e-5
        central = (solve(x + eps * tangent) - solve(x - eps * tangent)) / (2 * eps)
        assert_close("jvp vs finite differences", got, central, 1e-8)
        assert_close("jvp vs jacrev", got, torch.func.jacrev(solve)(x) @ tangent, 1e-12)

    @pytest.mark.parametrize("door", sorted(CASES))
    def test_front_doors_in_forward_mode(self, door):
        _, solve, reference, params = CASES[door]
        tangents = tuple(torch.randn(p.shape, generator=generator(11), dtype=F64) for p in params)
        _, want = torch.func.jvp(reference, params, tangents)
        _, got = torch.func.jvp(solve, params, tangents)
        assert_close("jvp, front doors", got, want, 1e-9)
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip(params, tangents)]
            got = forward_ad.unpack_dual(solve(*duals)).tangent
        assert_close("dual, front doors", got, want, 1e-9)

    def test_dual_module_parameters(self):
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 3).double()
        with torch.no_grad():
            layer.weight.mul_(0.3)
        x = torch.randn(3, dtype=F64)
        params = {k: v.detach() for k, v in layer.named_parameters()}
        tangents = {k: torch.randn_like(v) for k, v in params.items()}

        def solve(params):
            def f(z):
                return torch.tanh(torch.func.functional_call(layer, params, (z,)) + x)

            return implicit.fixed_point(f, torch.zeros(3, dtype=F64), **TIGHT)

        def reference(params):
            def f(z):
                return torch.tanh(torch.func.functional_call(layer, params, (z,)) + x)

            return unrolled_fixed_point(f, torch.zeros(3, dtype=F64))

        _, want = torch.func.jvp(reference, (params,), (tangents,))
        assert_close(
            "jvp, module parameters", torch.func.jvp(solve, (params,), (tangents,))[1], want, 1e-9
        )
        with forward_ad.dual_level():
            duals = {k: forward_ad.make_dual(v, tangents[k]) for k, v in params.items()}
            got = forward_ad.unpack_dual(solve(duals)).tangent
        assert_close("dual, module parameters", got, want, 1e-9)

    def test_forward_over_reverse_and_reverse_over_forward_with_dual_tensors(self):
        solve, reference, x, _ = tanh_fixed_point("gmres")
        tangent = torch.randn(x.shape, generator=generator(12), dtype=F64)
        hvp_want = torch.func.hessian(lambda x: loss_of(reference(x)))(x) @ tangent
        with forward_ad.dual_level():
            leaf = x.clone().requires_grad_()
            (grad,) = torch.autograd.grad(
                loss_of(solve(forward_ad.make_dual(leaf, tangent))), leaf, create_graph=True
            )
            hvp = forward_ad.unpack_dual(grad).tangent
        assert_close("dual over double backward", hvp, hvp_want, 1e-9)

        leaf = x.clone().requires_grad_()
        cotangent = torch.randn(x.shape, generator=generator(13), dtype=F64)
        with forward_ad.dual_level():
            jvp = forward_ad.unpack_dual(solve(forward_ad.make_dual(leaf, tangent))).tangent
        (got,) = torch.autograd.grad(cotangent @ jvp, leaf)
        want = torch.func.grad(
            lambda x: cotangent @ torch.func.jvp(reference, (x,), (tangent,))[1]
        )(x)
        assert_close("backward over dual", got, want, 1e-9)

    def test_forward_mode_linear_solve_reports_failure(self):
        solve, _, x, _ = tanh_fixed_point(implicit.linear.Neumann(max_iter=2))
        with pytest.warns(implicit.ConvergenceWarning, match="forward-mode linear solve"):
            torch.func.jvp(solve, (x,), (torch.ones_like(x),))

        def raising(x):
            w = contractive_matrix(4, 0.5)
            return implicit.fixed_point(
                lambda z, x: torch.tanh(w @ z + x),
                torch.zeros(4, dtype=F64),
                x,
                backward=implicit.linear.GMRES(max_iter=1, restart=1),
                on_failure="raise",
                tol=1e-13,
            )

        with pytest.raises(implicit.ConvergenceError, match="forward-mode linear solve"):
            torch.func.jvp(raising, (x,), (torch.ones_like(x),))


# -- torch.func transforms ---------------------------------------------------------------


def batched_problem(batch=2, n=3):
    w = contractive_matrix(n, 0.6)
    x = torch.randn(batch, n, generator=generator(21), dtype=F64)
    return w, x


def tanh_map(z, x, w):
    return torch.tanh(z @ w.T + x)


def batched_solve(**options):
    """``(x, w) ↦ z*`` with ``z* = tanh_map(z*, x, w)``, by implicit (batched, tight)."""

    def solve(x, w):
        return implicit.fixed_point(
            tanh_map, torch.zeros_like(x), x, w, batched=True, **options, **TIGHT
        )

    return solve


def batched_reference(x, w):
    """The same fixed point by unrolled float64 autograd."""
    return unrolled_fixed_point(tanh_map, torch.zeros_like(x), x, w)


@pytest.mark.parametrize("solver", sorted(implicit.solvers.NAMES))
def test_jacrev_jacfwd_hessian_every_solver_batched(solver):
    w, x = batched_problem()
    solve, reference = batched_solve(solver=solver), batched_reference
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        for got, want in zip(
            transform(solve, argnums=(0, 1))(x, w),
            torch.func.jacrev(reference, argnums=(0, 1))(x, w),
        ):
            assert_close("jacrev/jacfwd, every solver", got, want, 1e-9)
    hessian = torch.func.hessian(lambda x, w: loss_of(solve(x, w)), argnums=(0, 1))(x, w)
    want = torch.func.hessian(lambda x, w: loss_of(reference(x, w)), argnums=(0, 1))(x, w)
    for got_row, want_row in zip(hessian, want):
        for got, ref in zip(got_row, want_row):
            assert_close("hessian vs unrolled, every solver", got, ref, 1e-8)


@pytest.mark.parametrize("backward", ["dense", "gmres", "bicgstab", "neumann"])
def test_hessian_tuple_state_every_mode(backward):
    w, x = batched_problem()

    def f(state, x, w):
        a, b = state
        return torch.tanh(b @ w.T + x), 0.5 * torch.tanh(a)

    def loss(state):
        return loss_of(state[0]) + loss_of(state[1])

    z0 = (torch.zeros_like(x), torch.zeros_like(x))

    def solve(x, w):
        return implicit.fixed_point(f, z0, x, w, backward=backward, batched=True, **TIGHT)

    got = torch.func.hessian(lambda x, w: loss(solve(x, w)), argnums=(0, 1))(x, w)
    want = torch.func.hessian(lambda x, w: loss(unrolled_fixed_point(f, z0, x, w)), argnums=(0, 1))(
        x, w
    )
    for got_row, want_row in zip(got, want):
        for g, r in zip(got_row, want_row):
            assert_close("hessian, tuple state", g, r, 1e-8)
    jac = torch.func.jacfwd(solve, argnums=1)(x, w)
    ref = torch.func.jacrev(lambda x, w: unrolled_fixed_point(f, z0, x, w), argnums=1)(x, w)
    for g, r in zip(jac, ref):
        assert_close("jacfwd, tuple state", g, r, 1e-9)


@pytest.mark.parametrize("door", sorted(CASES))
def test_transforms_over_front_doors(door):
    _, solve, reference, params = CASES[door]
    for got, want in zip(
        torch.func.jacfwd(solve, argnums=(0, 1))(*params),
        torch.func.jacrev(reference, argnums=(0, 1))(*params),
    ):
        assert_close("jacfwd, front doors", got, want, 1e-9)
    hess = torch.func.hessian(lambda *p: loss_of(solve(*p)), argnums=(0, 1))(*params)
    ref = torch.func.hessian(lambda *p: loss_of(reference(*p)), argnums=(0, 1))(*params)
    for got_row, want_row in zip(hess, ref):
        for got, want in zip(got_row, want_row):
            assert_close("hessian, front doors", got, want, 1e-8)


# -- vmap ---------------------------------------------------------------------------------


class CountingMap:
    """``z ↦ tanh(z Wᵀ + x)``, counting its calls (a batched call counts once)."""

    def __init__(self, w):
        self.w = w
        self.calls = 0

    def __call__(self, z, x):
        self.calls += 1
        return torch.tanh(z @ self.w.T + x)


class TestVmap:
    def test_batched_problem_is_one_solve(self):
        w, _ = batched_problem()
        xs = torch.randn(5, 2, 3, generator=generator(31), dtype=F64)
        f = CountingMap(w)
        infos = []

        def solve(x):
            z, info = implicit.fixed_point(
                f, torch.zeros_like(x), x, batched=True, return_info=True, **TIGHT
            )
            infos.append(info)
            return z

        got = torch.func.vmap(solve)(xs)
        vmapped_calls = f.calls
        (info,) = infos
        assert info.converged.shape == (5, 2) and bool(info.converged.all())
        singles, calls = [], []
        for x in xs:
            f.calls = 0
            singles.append(solve(x))
            calls.append(f.calls)
        # The slices are solved together (as long as the slowest), not one after another.
        assert vmapped_calls <= max(calls) + 1
        assert_close("vmap vs single solves", got, torch.stack(singles), 1e-12)
        assert_close(
            "vmap vs unrolled", got, unrolled_fixed_point(f, torch.zeros_like(xs), xs), 1e-12
        )

    def test_unbatched_problem_and_batched_initial_guess(self):
        solve_x, reference, x, w = tanh_fixed_point()
        xs = torch.stack([x, 2 * x, -x])
        assert_close(
            "vmap, unbatched", torch.func.vmap(solve_x)(xs), torch.func.vmap(reference)(xs), 1e-12
        )

        def from_guess(z0):
            return implicit.fixed_point(lambda z: torch.tanh(w @ z + x), z0, **TIGHT)

        guesses = torch.randn(4, 4, generator=generator(32), dtype=F64)
        assert_close(
            "vmap, initial guesses",
            torch.func.vmap(from_guess)(guesses),
            reference(x).expand(4, 4),
            1e-12,
        )

    def test_inverse_form(self):
        cubic = Cubic()
        ys = torch.stack([cubic.y, 2 * cubic.y, -cubic.y])
        got = torch.func.vmap(lambda y: implicit.invert(Cubic.f, y, cubic.a, **TIGHT))(ys)
        assert_close("vmap, inverse", Cubic.f(got, cubic.a), ys, 1e-12)
        batched = torch.func.vmap(
            lambda y: implicit.invert(Cubic.f, y, cubic.a, batched=True, **TIGHT)
        )(ys.unsqueeze(-1))
        assert_close("vmap, inverse", batched.squeeze(-1), got, 1e-12)

    @pytest.mark.parametrize("backward", ["dense", "gmres"])
    def test_compositions(self, backward):
        w, _ = batched_problem()
        xs = torch.randn(3, 2, 3, generator=generator(33), dtype=F64)
        solve, reference = batched_solve(backward=backward), batched_reference
        vmap, jacrev, grad = torch.func.vmap, torch.func.jacrev, torch.func.grad
        compositions = {
            "vmap(grad)": lambda s: vmap(
                grad(lambda x, w: loss_of(s(x, w)), argnums=1), in_dims=(0, None)
            ),
            "vmap(jacrev)": lambda s: vmap(jacrev(s, argnums=1), in_dims=(0, None)),
            "jacrev(vmap)": lambda s: jacrev(vmap(s, in_dims=(0, None)), argnums=1),
            "vmap(hessian)": lambda s: vmap(
                torch.func.hessian(lambda x, w: loss_of(s(x, w))), in_dims=(0, None)
            ),
            "vmap(vmap)": lambda s: vmap(vmap(s, in_dims=(0, None)), in_dims=(0, None)),
        }
        for name, compose in compositions.items():
            inputs = xs.expand(2, -1, -1, -1) if name == "vmap(vmap)" else xs
            assert_close(
                "vmap compositions", compose(solve)(inputs, w), compose(reference)(inputs, w), 1e-9
            )

    def test_captured_batched_tensor(self):
        # Per-sample gradients with respect to a tensor f captures.
        w, _ = batched_problem()
        xs = torch.randn(4, 2, 3, generator=generator(34), dtype=F64)

        def loss(x, w, solve):
            return loss_of(solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x)))

        def implicit_solve(f, z0):
            return implicit.fixed_point(f, z0, batched=True, **TIGHT)

        per_sample = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(0, None, None))
        assert_close(
            "vmap, captured",
            per_sample(xs, w, implicit_solve),
            per_sample(xs, w, unrolled_fixed_point),
            1e-9,
        )

    @pytest.mark.parametrize("method", [implicit.linear.GMRES, implicit.linear.BiCGStab])
    def test_preconditioner_and_warm_start_see_one_block(self, method):
        # Written for the user's (B, n) rows: under jacrev and vmap the systems stack
        # blocks of B rows, and each block is preconditioned and warm-started as one.
        w, x = batched_problem()
        seen = []

        def jacobi(r):
            seen.append(r.shape)
            return r * torch.full_like(x, 0.9)  # shaped like one block: (B, n)

        backward = method(preconditioner=jacobi, x0=torch.full_like(x, 0.1))

        def solve(x):
            return implicit.fixed_point(
                lambda z, x: torch.tanh(z @ w.T + x),
                torch.zeros_like(x),
                x,
                backward=backward,
                batched=True,
                **TIGHT,
            )

        def reference(x):
            return unrolled_fixed_point(
                lambda z, x: torch.tanh(z @ w.T + x), torch.zeros_like(x), x
            )

        assert_close(
            "blockwise options", torch.func.jacrev(solve)(x), torch.func.jacrev(reference)(x), 1e-9
        )
        xs = torch.stack([x, -x, 2 * x])
        grad = torch.func.vmap(torch.func.grad(lambda x: loss_of(solve(x))))
        want = torch.func.vmap(torch.func.grad(lambda x: loss_of(reference(x))))(xs)
        assert_close("blockwise options", grad(xs), want, 1e-9)
        assert seen and set(seen) == {x.shape}

    def test_info_backward_under_jacrev(self):
        w, x = batched_problem()
        infos = []

        def solve(x):
            z, info = implicit.fixed_point(
                lambda z, x: torch.tanh(z @ w.T + x),
                torch.zeros_like(x),
                x,
                batched=True,
                backward="gmres",
                return_info=True,
                **TIGHT,
            )
            infos.append(info)
            return z

        torch.func.jacrev(solve)(x)
        backward = infos[0].backward
        assert backward.method == "gmres" and backward.converged.shape == (6, 2)  # 6 rows of dz/dx
        assert bool(backward.converged.all())


# -- what is not supported raises; what is, works ---------------------------------------


def assert_jacfwd_and_hessian(label, solve, reference, x):
    """``jacfwd`` and the Hessian of ``loss_of`` through ``solve`` against the reference's
    (``jacrev`` and the Hessian through unrolled float64 autograd)."""
    assert_close(label, torch.func.jacfwd(solve)(x), torch.func.jacrev(reference)(x), 1e-9)
    assert_close(
        label,
        torch.func.hessian(lambda x: loss_of(solve(x)))(x),
        torch.func.hessian(lambda x: loss_of(reference(x)))(x),
        1e-8,
    )


class TestEdges:
    def test_unroll_under_vmap_raises(self):
        solve, _, x, _ = tanh_fixed_point("unroll")
        with pytest.raises(
            RuntimeError, match=r"backward='unroll' cannot run under torch\.func\.vmap"
        ):
            torch.func.vmap(solve)(torch.stack([x, 2 * x]))

    def test_unroll_under_other_transforms(self):
        solve, reference, x, _ = tanh_fixed_point("unroll")
        tangent = torch.ones_like(x)
        assert_close(
            "unroll, transforms",
            torch.func.jvp(solve, (x,), (tangent,))[1],
            torch.func.jvp(reference, (x,), (tangent,))[1],
            1e-9,
        )
        assert_jacfwd_and_hessian("unroll, transforms", solve, reference, x)
        assert_close(
            "unroll, transforms",
            dual_jvp(solve, x, tangent),
            torch.func.jvp(reference, (x,), (tangent,))[1],
            1e-9,
        )

    @pytest.mark.parametrize(
        "transform",
        [
            lambda s: torch.func.jacfwd(torch.func.jacfwd(s)),
            lambda s: (
                lambda x: torch.func.jvp(lambda x: torch.func.jvp(s, (x,), (x,))[1], (x,), (x,))[1]
            ),
            lambda s: torch.func.jacfwd(torch.func.hessian(lambda x: loss_of(s(x)))),
        ],
        ids=["jacfwd(jacfwd)", "jvp(jvp)", "jacfwd(hessian)"],
    )
    def test_forward_over_forward_raises(self, transform):
        solve, _, x, _ = tanh_fixed_point()
        with pytest.raises(RuntimeError, match="forward-mode AD over forward-mode AD"):
            transform(solve)(x)

    def test_user_function_with_its_own_forward_mode(self):
        # g computes a derivative with forward_ad itself: same values with and without
        # gradients, and correct gradients in reverse mode.
        w = contractive_matrix(3, 0.5)

        def f(z, x):
            with forward_ad.dual_level():
                slope = forward_ad.unpack_dual(
                    torch.tanh(forward_ad.make_dual(z, torch.ones_like(z)))
                ).tangent
            return 0.5 * torch.tanh(w @ z + x) + 0.1 * slope

        x = torch.randn(3, generator=generator(41), dtype=F64, requires_grad=True)
        z = implicit.fixed_point(f, torch.zeros(3, dtype=F64), x, **TIGHT)
        with torch.no_grad():
            plain = implicit.fixed_point(f, torch.zeros(3, dtype=F64), x, **TIGHT)
        assert_close("user forward mode", z, plain, 1e-14)
        (got,) = torch.autograd.grad(loss_of(z), x)
        (want,) = torch.autograd.grad(
            loss_of(unrolled_fixed_point(f, torch.zeros(3, dtype=F64), x)), x
        )
        assert_close("user forward mode", got, want, 1e-9)
        with pytest.raises(RuntimeError, match=r"[Nn]ested forward mode"), forward_ad.dual_level():
            implicit.fixed_point(
                f, torch.zeros(3, dtype=F64), forward_ad.make_dual(x.detach(), x.detach())
            )

    def test_user_function_with_torch_func_jvp_inside(self):
        # torch.func inside g composes with every mode but forward_ad dual tensors, which
        # torch refuses to nest with torch.func.jvp (an error, never a wrong tangent).
        w = contractive_matrix(3, 0.5)

        def f(z, x):
            _, slope = torch.func.jvp(torch.tanh, (z,), (torch.ones_like(z),))
            return 0.5 * torch.tanh(w @ z + x) + 0.1 * slope

        def solve(x):
            return implicit.fixed_point(f, torch.zeros(3, dtype=F64), x, **TIGHT)

        def reference(x):
            return unrolled_fixed_point(f, torch.zeros(3, dtype=F64), x)

        x = torch.randn(3, generator=generator(42), dtype=F64)
        assert_jacfwd_and_hessian("user torch.func", solve, reference, x)
        with pytest.raises(RuntimeError, match=r"[Nn]ested forward mode"):
            dual_jvp(solve, x, torch.ones_like(x))


# -- the example and the tour --------------------------------------------------------


def test_bilevel_example():
    script = pathlib.Path(__file__).parents[1] / "examples" / "bilevel.py"
    results = runpy.run_path(str(script), run_name="bilevel")["main"](verbose=False)
    assert results["hypergradient error"] <= 1e-9
    assert results["hvp error"] <= 1e-9
    assert results["forward-mode error"] <= 1e-9
    assert results["validation loss after"] < results["validation loss, best shared penalty"]
    assert results["validation loss, best shared penalty"] < results["validation loss before"]


def test_tour_section():
    errors = tour.tour_bilevel()
    assert errors["hypergradient"] <= 1e-10 and errors["hvp"] <= 1e-10
