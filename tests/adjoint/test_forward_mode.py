"""Forward mode through solutions (``torch.func.jvp``, ``torch.autograd.forward_ad``
dual tensors, and each mixed with reverse mode), and what is refused: ``unroll`` under
``vmap``, forward mode over forward mode, a user function's own nested forward mode."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from conftest import EXACT_MODES, TIGHT, contractive_matrix, loss_of, unrolled_fixed_point
from higher_order import (
    CASES,
    assert_close,
    dual_jvp,
    generator,
    spd_energy,
    tanh_fixed_point,
    write_worst_errors,
)

import implicit

F64 = torch.float64


def teardown_module():
    write_worst_errors()


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
