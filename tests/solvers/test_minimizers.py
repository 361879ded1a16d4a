"""The minimisation solvers: minima (never maxima or saddles), bounded loops, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import implicit
from implicit.solvers import LBFGS, GaussNewton, LevenbergMarquardt, ModifiedNewton

D = torch.float64
MINIMIZERS = [
    pytest.param("lbfgs", {}, id="lbfgs"),
    pytest.param("newton", {}, id="newton-dense"),
    pytest.param("newton", {"linear": "cg"}, id="newton-cg"),
    pytest.param("lbfgs", {"max_dense": 0}, id="lbfgs-lanczos"),  # the test by Lanczos
]


def double_well(z):
    """Σ (z⁴/4 − z²/2): a maximum at 0, minima at ±1 in every coordinate."""
    return (z**4 / 4 - z**2 / 2).sum()


def saddle(z):
    """z₀² − z₁² + z₁⁴/4: a saddle at 0, minima at (0, ±√2)."""
    return z[0] ** 2 - z[1] ** 2 + z[1] ** 4 / 4


def hessian_is_positive_definite(fun, z):
    return bool(torch.linalg.eigvalsh(torch.func.hessian(fun)(z.detach())).min() > 0)


@pytest.mark.parametrize(("solver", "options"), MINIMIZERS)
@pytest.mark.parametrize("start", [0.0, 1e-9, 1e-3], ids=["at", "1e-9", "1e-3"])
def test_started_at_or_near_a_maximum_finds_a_minimum(solver, options, start):
    z, info = implicit.minimize(
        double_well,
        torch.full((3,), start, dtype=D),
        solver=solver,
        return_info=True,
        tol=1e-10,
        **options,
    )
    assert info.status == "converged"
    assert torch.allclose(z.abs(), torch.ones(3, dtype=D), atol=1e-8)
    assert hessian_is_positive_definite(double_well, z)


@pytest.mark.parametrize(("solver", "options"), MINIMIZERS)
@pytest.mark.parametrize("start", [(0.0, 0.0), (0.5, 0.0), (0.5, 1e-12)], ids=str)
def test_started_at_or_drawn_to_a_saddle_finds_a_minimum(solver, options, start):
    z, info = implicit.minimize(
        saddle,
        torch.tensor(start, dtype=D),
        solver=solver,
        return_info=True,
        tol=1e-10,
        **options,
    )
    assert info.status == "converged"
    assert torch.allclose(z, torch.tensor([0.0, math.sqrt(2)], dtype=D) * z[1].sign(), atol=1e-8)
    assert hessian_is_positive_definite(saddle, z)


@pytest.mark.parametrize("solver", ["gauss_newton", "levenberg_marquardt"])
def test_least_squares_solvers_leave_a_saddle_of_the_fit(solver):
    # ½‖r‖² with r = (z₀, z₁² − 1): a saddle at the origin, minima at (0, ±1).
    def residual(z):
        return torch.stack([z[0], z[1] ** 2 - 1])

    z, info = implicit.least_squares(
        residual, torch.zeros(2, dtype=D), solver=solver, return_info=True, tol=1e-10
    )
    assert info.status == "converged"
    assert torch.allclose(z.abs(), torch.tensor([0.0, 1.0], dtype=D), atol=1e-8)


def test_without_the_curvature_check_a_saddle_is_accepted():
    z, info = implicit.minimize(
        saddle, torch.zeros(2, dtype=D), curvature_check=False, return_info=True
    )
    assert info.status == "converged" and torch.equal(z, torch.zeros(2, dtype=D))


def test_a_saddle_that_cannot_be_left_in_max_iter_fails_with_a_message():
    z, info = implicit.minimize(
        saddle, torch.zeros(2, dtype=D), max_iter=1, return_info=True, on_failure="ignore"
    )
    assert info.iterations <= 1
    # One trial of the escape was allowed, and it decreased the objective.
    assert float(saddle(z)) < 0 and info.status == "max_iter"
    with pytest.raises(implicit.ConvergenceError, match="negative curvature"):
        implicit.minimize(
            lambda z: -(z**2).sum(),
            torch.zeros(2, dtype=D),
            bounds=(-1e-300, 1e-300),
            max_iter=5,
            on_failure="raise",
        )


def rosenbrock(z):
    return (1 - z[0]) ** 2 + 100 * (z[1] - z[0] ** 2) ** 2


@pytest.mark.parametrize(
    ("solver", "options"), [*MINIMIZERS[:3], pytest.param("scipy", {}, id="scipy")]
)
def test_rosenbrock_and_bounded_loops(solver, options):
    z, info = implicit.minimize(
        rosenbrock,
        torch.tensor([-1.2, 1.0], dtype=D),
        solver=solver,
        max_iter=200,
        tol=1e-10,
        return_info=True,
        **options,
    )
    assert info.status == "converged"
    assert torch.allclose(z, torch.ones(2, dtype=D), atol=1e-8)
    _, info = implicit.minimize(
        rosenbrock,
        torch.tensor([-1.2, 1.0], dtype=D),
        solver=solver,
        max_iter=3,
        return_info=True,
        on_failure="ignore",
        **options,
    )
    assert info.status in ("max_iter", "failed") and info.iterations <= 3
    # Every evaluation outside the iterations is accounted for: the start, Hessians,
    # capture discovery at the end.
    assert info.f_evals <= 3 * 2 + 4


@pytest.mark.parametrize("solver", ["gauss_newton", "levenberg_marquardt"])
def test_least_squares_solvers_bounded_by_max_iter(solver):
    _, info = implicit.least_squares(
        lambda z: torch.stack([10 * (z[1] - z[0] ** 2), 1 - z[0]]),
        torch.tensor([-1.2, 1.0], dtype=D),
        solver=solver,
        max_iter=2,
        return_info=True,
        on_failure="ignore",
    )
    assert info.iterations <= 2 and info.status == "max_iter"


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_batched_problems_stop_on_their_own(solver):
    scales = torch.tensor([1.0, 100.0, 1e4], dtype=D)

    def fun(z):  # ill-conditioning grows with the row
        return 0.5 * (z[:, 0] ** 2 + scales * z[:, 1] ** 2) + z[:, 0] ** 4

    z, info = implicit.minimize(
        fun, torch.ones(3, 2, dtype=D), batched=True, solver=solver, return_info=True, tol=1e-10
    )
    assert info.converged.shape == (3,) and bool(info.converged.all())
    assert z.abs().max() <= 1e-7


def test_a_non_finite_trial_shortens_the_step_but_a_non_finite_start_stops():
    def fun(z):  # −∞ < fun only where z < 1: long steps land where log is NaN
        return -torch.log(1 - z).sum() + (z**2).sum()

    z, info = implicit.minimize(fun, torch.full((2,), 0.9, dtype=D), return_info=True, tol=1e-10)
    assert info.status == "converged" and bool((z < 1).all())
    _, info = implicit.minimize(
        fun, torch.full((2,), 2.0, dtype=D), return_info=True, on_failure="ignore"
    )
    assert info.status == "nonfinite" and info.iterations == 0


def test_float32_at_a_tolerance_below_its_precision_fails_with_advice():
    x = torch.linspace(-1, 1, 50)
    fun = lambda w: ((x * w[0] + w[1] - torch.sin(3 * x)) ** 2).sum()  # noqa: E731
    with pytest.warns(implicit.ConvergenceWarning, match="precision"):
        implicit.minimize(fun, torch.zeros(2), tol=1e-12)


def test_bad_input_names_the_argument():
    z0 = torch.zeros(3, dtype=D)
    with pytest.raises(ValueError, match=r"fun returned shape \(3,\), expected \(\): fun must"):
        implicit.minimize(lambda z: z**2, z0)
    with pytest.raises(ValueError, match=r"fun returned shape \(\), expected \(3,\)"):
        implicit.minimize(lambda z: (z**2).sum(), torch.zeros(3, 2, dtype=D), batched=True)
    with pytest.raises(ValueError, match="unknown solver 'levenberg_marquardt' for minimize"):
        implicit.minimize(lambda z: (z**2).sum(), z0, solver="levenberg_marquardt")
    with pytest.raises(TypeError, match="needs the residual vector of a least-squares problem"):
        implicit.minimize(lambda z: (z**2).sum(), z0, solver=LevenbergMarquardt())
    with pytest.raises(TypeError, match="minimize needs a minimisation solver"):
        implicit.minimize(lambda z: (z**2).sum(), z0, solver=implicit.solvers.Newton())
    with pytest.raises(TypeError, match=r"use it with implicit\.minimize"):
        implicit.root_solve(lambda z: z, z0, solver=LBFGS())
    with pytest.raises(ValueError, match="backward='unroll'"):
        implicit.minimize(
            lambda z, a: ((z - a) ** 2).sum(),
            z0,
            torch.ones(3, dtype=D, requires_grad=True),
            backward="unroll",
        )
    with pytest.raises(TypeError, match="residual must return a tensor"):
        implicit.least_squares(lambda z: [z], z0)
    with pytest.raises(ValueError, match="memory must be an integer"):
        LBFGS(memory=0)
    with pytest.raises(ValueError, match="linear must be"):
        ModifiedNewton(linear="lu")
    with pytest.raises(ValueError, match="damping must be a number > 0"):
        LevenbergMarquardt(damping=0)
    with pytest.raises(TypeError, match="unknown option"):
        implicit.minimize(lambda z: (z**2).sum(), z0, memroy=5)
    assert GaussNewton.least_squares_only


@pytest.mark.parametrize(
    ("front_door", "solver"),
    [
        *((implicit.minimize, name) for name in ("lbfgs", "newton", "scipy")),
        *(
            (implicit.least_squares, name)
            for name in ("levenberg_marquardt", "gauss_newton", "scipy")
        ),
    ],
)
def test_an_infinite_iterate_never_passes_the_test(front_door, solver):
    # At z = ∞, tanh(z) is flat: the gradient of Σ tanh(z) and the residual tanh(z) − 1
    # vanish there, a finite stationary point at an infinite iterate.
    function = (
        (lambda z: torch.tanh(z).sum())
        if front_door is implicit.minimize
        else (lambda z: torch.tanh(z) - 1)
    )
    z0 = torch.tensor([math.inf], dtype=torch.float64)
    with pytest.warns(implicit.ConvergenceWarning, match="'nonfinite'"):
        _, info = front_door(function, z0, solver=solver, return_info=True)
    assert info.status == "nonfinite" and not bool(info.converged)


def _nan_hessian_at_the_minimum(z):
    # logaddexp(z, -z) = log(2 cosh z): PyTorch's second derivative of it is NaN for
    # |z| above a few hundred, its gradient exact (tanh z + z − 500 vanishes at 499).
    return (torch.logaddexp(z, -z) + 0.5 * (z - 500) ** 2).sum(-1)


@pytest.mark.parametrize("solver", ["newton", ModifiedNewton(), "scipy"])
def test_a_nan_hessian_where_the_gradient_test_passes_is_reported_not_converged(solver):
    z0 = torch.tensor([[499.5, 499.7]], dtype=torch.float64)
    z, info = implicit.minimize(
        _nan_hessian_at_the_minimum, z0, solver=solver, batched=True, return_info=True,
        on_failure="ignore",
    )  # fmt: skip
    # The gradient test passed (z is the minimum), but neither the second-order test
    # nor the backward can use the Hessian: status nonfinite, with the reason.
    assert torch.allclose(z, torch.full_like(z, 499.0), atol=1e-6)
    assert info.status == "nonfinite" and not bool(info.converged.any())
    assert "Hessian is not finite" in info.message
    with pytest.raises(implicit.ConvergenceError, match="Hessian is not finite"):
        implicit.minimize(
            _nan_hessian_at_the_minimum, z0, solver=solver, batched=True, on_failure="raise"
        )


@pytest.mark.parametrize("solver", ["newton", "lbfgs", "scipy"])
def test_a_huge_objective_at_the_start_does_not_loosen_the_test_near_the_minimum(solver):
    # fun(z0) ~ 1.6e12: scaled by |fun(z0)| alone, tol 1e-6 accepted ‖∇fun‖ ~ 1e6 (z = 13).
    z, info = implicit.minimize(
        lambda z: (torch.exp(z) - 2 * z).sum(),
        torch.full((3,), 27.0, dtype=torch.float64),
        solver=solver,
        max_iter=200,
        on_failure="ignore",
        return_info=True,
    )
    gradient = torch.exp(z) - 2
    scale = min(3 * (math.exp(27.0) - 54), float((torch.exp(z) - 2 * z).sum()))
    assert info.status == "converged" and gradient.norm() <= 1e-6 * (1 + scale)
    torch.testing.assert_close(z, torch.full_like(z, math.log(2.0)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "solver", ["levenberg_marquardt", "gauss_newton", "lbfgs", "newton", "scipy"]
)
def test_a_fit_that_runs_off_to_infinity_is_not_called_a_minimum(solver):
    # A Michaelis–Menten curve fitted to a straight line: the best fit has Vmax and Km
    # infinite with Vmax / Km = 0.3, and the gradient vanishes on the way there. Where it
    # passes the gradient test, a Newton step would still move z by half of its size:
    # the forward does not claim a minimum, or, once the valley is flat to rounding
    # (no Newton step can be resolved), the backward reports the singular Hessian.
    x = torch.linspace(0.1, 2, 12, dtype=D)
    y = (0.3 * x).requires_grad_()

    def residual(z, y):
        return z[0] * x / (z[1] + x) - y

    z, info = implicit.least_squares(
        residual, torch.ones(2, dtype=D), y, solver=solver, tol=1e-6, max_iter=300,
        on_failure="ignore", return_info=True,
    )  # fmt: skip
    z.sum().backward()
    if info.status == "converged":
        assert info.backward.status in ("ill_conditioned", "breakdown"), info.backward
    else:
        assert "Newton step" in info.message, info.message
    assert info.status != "converged" or float(z.detach().abs().max()) > 1e5


@pytest.mark.parametrize(
    "solver", ["levenberg_marquardt", "gauss_newton", "lbfgs", "newton", "scipy"]
)
def test_the_same_fit_to_its_own_curve_converges(solver):
    x = torch.linspace(0.1, 2, 12, dtype=D)
    y = 2 * x / (0.5 + x) + 0.01 * torch.sin(7 * x)  # a non-zero residual at the fit
    z, info = implicit.least_squares(
        lambda z, y: z[0] * x / (z[1] + x) - y, torch.ones(2, dtype=D), y, solver=solver,
        return_info=True,
    )  # fmt: skip
    assert info.status == "converged"
    assert torch.allclose(z, torch.tensor([2.0, 0.5], dtype=D), atol=1e-2)
