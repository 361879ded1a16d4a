"""The scipy solver: every method's implicit gradient, dtypes, scipy's verdicts."""

from __future__ import annotations

import pytest
import torch
from conftest import TanhProblem, assert_fixed_point, rel_err

import implicit
from implicit.solvers import Scipy
from implicit.solvers.scipy import METHODS

TIGHT = {"tol": 1e-12, "max_iter": 1000}


def cubic(z, a):
    """``a − z − z³/3``, elementwise: ``dz/da = 1 / (1 + z²)`` in closed form.

    The sign makes ``∂g/∂z ≈ −I``, the Jacobian the mixing methods assume.
    """
    return a - z - z**3 / 3


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gradient_matches_closed_form(method):
    # The coupled tanh problem: dz*/dx = (I − D W)⁻¹ D per sample, D = diag(1 − z*²).
    p = TanhProblem(n=5, batch=3)
    z, info = implicit.fixed_point(
        p.f, p.z0, p.x, solver="scipy", method=method, batched=True, return_info=True, **TIGHT
    )
    assert info.status == "converged" and info.solver == "scipy"
    cotangent = torch.linspace(-1, 1, 15, dtype=torch.float64).reshape(3, 5)
    (grad_x,) = torch.autograd.grad(z, p.x, cotangent)
    want = torch.einsum("bi,bij->bj", cotangent, p.closed_form_dzdx(z))
    assert rel_err(grad_x, want) <= 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_every_method_per_sample_gradient_of_cubic(method):
    a = torch.tensor([[-2.0], [0.5], [3.0]], dtype=torch.float64, requires_grad=True)
    solver = Scipy(method, strategy="per_sample")
    z, info = implicit.root_solve(
        cubic,
        torch.zeros(3, 1, dtype=torch.float64),
        a,
        solver=solver,
        batched=True,
        return_info=True,
        **TIGHT,
    )
    assert bool(info.converged.all()) and float(info.residual.max()) <= 1e-12
    (grad,) = torch.autograd.grad(z.sum(), a)
    assert rel_err(grad, 1 / (1 + z.detach() ** 2)) <= 1e-10


@pytest.mark.parametrize("strategy", ["block", "per_sample"])
@pytest.mark.parametrize("jacobian", [True, False])
def test_strategies_and_jacobians_agree(strategy, jacobian):
    p = TanhProblem(n=4, batch=3)
    solver = Scipy("hybr", strategy=strategy, jacobian=jacobian)
    z, info = implicit.fixed_point(p.f, p.z0, p.x, solver=solver, batched=True, return_info=True)
    want = implicit.fixed_point(p.f, p.z0, p.x, solver="fixed_point", batched=True, **TIGHT)
    assert rel_err(z, want) <= 1e-5
    assert info.converged.shape == (3,) and bool(info.converged.all())
    assert (info.jac_evals > 0) == jacobian
    # The stopping contract, checked on scipy's answer.
    assert_fixed_point(p.f, z, p.x, z0=p.z0, tol=1e-6)


@pytest.mark.parametrize("method", ["hybr", "broyden1", "krylov", "df-sane"])
def test_float32_round_trip(method):
    p = TanhProblem(n=4, batch=2, dtype=torch.float32)
    z, info = implicit.fixed_point(
        p.f, p.z0, p.x, solver=Scipy(method), batched=True, tol=1e-5, return_info=True
    )
    assert z.dtype == torch.float32 and z.device == p.x.device
    assert info.status == "converged"
    (grad_x,) = torch.autograd.grad(z.sum(), p.x)
    assert grad_x.dtype == torch.float32
    want = p.closed_form_dzdx(z.double()).sum(1).float()
    assert rel_err(grad_x, want) <= 1e-4


def test_invert_with_scipy_solver():
    y = torch.tensor([0.2, -0.7, 0.9], dtype=torch.float64, requires_grad=True)
    z = implicit.invert(torch.sin, y, solver="scipy", method="lm", tol=1e-12)
    (grad,) = torch.autograd.grad(z.sum(), y)
    assert rel_err(z, torch.asin(y)) <= 1e-12
    assert rel_err(grad, 1 / torch.sqrt(1 - y.detach() ** 2)) <= 1e-10


class TestVerdicts:
    """scipy's success, status and message reach SolveInfo; our test decides."""

    def test_no_root_fails_with_scipy_message(self):
        z0 = torch.ones(2, dtype=torch.float64)
        with pytest.warns(implicit.ConvergenceWarning, match="not making good progress"):
            _, info = implicit.root_solve(lambda z: z**2 + 1, z0, solver="scipy", return_info=True)
        assert info.status == "failed" and not bool(info.converged.any())
        assert "success=False, status=5" in info.message
        with pytest.raises(implicit.ConvergenceError) as caught:
            implicit.root_solve(lambda z: z**2 + 1, z0, solver="scipy", on_failure="raise")
        assert caught.value.info.status == "failed"
        implicit.root_solve(lambda z: z**2 + 1, z0, solver="scipy", on_failure="ignore")

    def test_scipy_success_above_tol_is_a_failure(self):
        _, info = implicit.root_solve(
            lambda z: z**3 - 2,
            torch.ones(2, dtype=torch.float64),
            solver=Scipy("hybr", {"xtol": 0.1}),
            tol=1e-12,
            on_failure="ignore",
            return_info=True,
        )
        assert info.status == "failed"
        assert "success=True" in info.message and "does not meet tol" in info.message

    def test_scipy_failure_at_a_root_is_converged(self):
        # A triple root: hybr's step test never passes, but ‖z³‖ is far below tol.
        _, info = implicit.root_solve(
            lambda z: z**3, torch.ones(1, dtype=torch.float64), solver="scipy", return_info=True
        )
        assert info.status == "converged"
        assert "success=False" in info.message and "meets tol" in info.message

    def test_nonfinite_stops_that_sample_only(self):
        a = torch.tensor([[1.0], [20.0]], dtype=torch.float64)

        def g(z, a):
            return z - a + torch.where(z > 10, torch.nan, 0.0)

        z, info = implicit.root_solve(
            g,
            torch.zeros(2, 1, dtype=torch.float64),
            a,
            solver=Scipy("hybr", strategy="per_sample"),
            batched=True,
            on_failure="ignore",
            return_info=True,
        )
        assert info.status == "nonfinite"
        assert info.converged.tolist() == [True, False]
        assert torch.isfinite(z).all() and float(z[0]) == pytest.approx(1.0)
        assert "non-finite" in info.message
        z, info = implicit.root_solve(
            g,
            torch.zeros(2, 1, dtype=torch.float64),
            a,
            solver=Scipy("hybr", strategy="block"),
            batched=True,
            on_failure="ignore",
            return_info=True,
        )
        assert info.status == "nonfinite" and torch.isfinite(z).all()

    def test_history_and_counts(self):
        p = TanhProblem(n=4, batch=2)
        _, info = implicit.fixed_point(
            p.f, p.z0, p.x, solver=Scipy("broyden2"), batched=True, return_info=True
        )
        assert len(info.history) == info.iterations + 1
        assert info.history[-1] == pytest.approx(float(info.residual.max()))
        assert info.status == "converged" and info.history[-1] < 1e-5 * info.history[0]
        assert info.f_evals >= info.iterations

    def test_scipy_exception_is_a_breakdown_and_errors_of_g_propagate(self):
        # A constant g: krylov's Jacobian-vector products vanish and scipy raises.
        with pytest.warns(implicit.ConvergenceWarning, match="scipy raised ValueError"):
            z, info = implicit.root_solve(
                lambda z: torch.ones_like(z) + 0 * z,
                torch.zeros(3, dtype=torch.float64),
                solver=Scipy("krylov"),
                return_info=True,
            )
        assert info.status == "breakdown" and torch.equal(z, torch.zeros(3, dtype=z.dtype))

        def broken(z):
            raise KeyError("inside g")

        with pytest.raises(KeyError, match="inside g"):
            implicit.root_solve(broken, torch.zeros(2), solver="scipy")


class TestBadInput:
    def test_unknown_method(self):
        with pytest.raises(ValueError, match="unknown scipy method 'newton'"):
            Scipy("newton")

    def test_misspelt_option_raises(self):
        with pytest.raises(TypeError, match=r"unknown option\(s\) \['xtoll'\]"):
            Scipy("hybr", {"xtoll": 1e-3})
        with pytest.raises(TypeError, match="unknown option"):
            implicit.root_solve(cubic, torch.zeros(1), torch.ones(1), solver="scipy", metod="lm")

    def test_jacobian_for_a_method_without_one(self):
        with pytest.raises(ValueError, match="takes no Jacobian"):
            Scipy("broyden1", jacobian=True)

    def test_strategy(self):
        with pytest.raises(ValueError, match="strategy"):
            Scipy(strategy="rows")

    def test_unroll_is_refused(self):
        a = torch.ones(1, dtype=torch.float64, requires_grad=True)
        with pytest.raises(ValueError, match="unroll"):
            implicit.root_solve(
                cubic, torch.zeros(1, dtype=torch.float64), a, solver="scipy", backward="unroll"
            )
