"""Bisection and Chandrupatla: bracketed scalar roots, per problem."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import implicit
from implicit.solvers import Bisection, Chandrupatla

D = torch.float64
METHODS = ["bisection", "chandrupatla"]


def cubic(z, theta):
    return z**3 + z - theta


@pytest.mark.parametrize("solver", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cubic_and_its_derivative(solver, dtype):
    theta = torch.linspace(-10, 10, 9, dtype=dtype, requires_grad=True)
    z, info = implicit.root_solve(
        cubic,
        torch.zeros(9, dtype=dtype),
        theta,
        solver=solver,
        lower=-5.0,
        upper=torch.full((9,), 5.0, dtype=dtype),
        batched=True,
        return_info=True,
        tol=1e-4 if dtype == torch.float32 else 1e-12,
    )
    assert info.status == "converged" and info.converged.shape == (9,)
    assert cubic(z.detach(), theta.detach()).abs().max() <= info.residual.max() + 1e-12
    (grad,) = torch.autograd.grad(z.sum(), theta)
    want = 1 / (3 * z.detach() ** 2 + 1)  # dz/dθ = 1 / (3z² + 1)
    assert rel_err(grad, want) <= (1e-4 if dtype == torch.float32 else 1e-10)


def test_chandrupatla_takes_far_fewer_iterations_than_bisection():
    theta = torch.tensor(2.0, dtype=D)
    counts = {}
    for solver in METHODS:
        z, info = implicit.root_solve(
            cubic,
            torch.tensor(0.0, dtype=D),
            theta,
            solver=solver,
            lower=-5.0,
            upper=5.0,
            tol=1e-12,
            return_info=True,
        )
        assert abs(float(z) - 1.0) <= 1e-12
        counts[solver] = info.iterations
    assert counts["bisection"] >= 40 and counts["chandrupatla"] <= 10


@pytest.mark.parametrize("solver", METHODS)
def test_sparsemax_threshold_derivative_is_one_over_the_support_size(solver):
    """τ with Σ max(x − τ, 0) = 1 (sparsemax); dτ/dx_i = 1/|S| on the support S."""
    x = torch.tensor([1.5, 1.2, 0.1, -0.3, 1.0], dtype=D, requires_grad=True)
    top = float(x.detach().max())  # g(top − 1) ≥ 0 ≥ g(top) = −1
    tau = implicit.root_solve(
        lambda tau, x: torch.relu(x - tau).sum() - 1,
        torch.tensor(0.0, dtype=D),
        x,
        solver=solver,
        lower=top - 1,
        upper=top,
        tol=1e-13,
    )
    support = x.detach() > tau.detach()
    assert int(support.sum()) == 3
    assert abs(float(torch.relu(x - tau).sum().detach()) - 1) <= 1e-12
    (grad,) = torch.autograd.grad(tau, x)
    assert torch.allclose(grad, support.to(D) / 3, atol=1e-12, rtol=0)


@pytest.mark.parametrize("solver", METHODS)
def test_a_bracket_without_a_sign_change_fails_and_names_lower_and_upper(solver):
    theta = torch.tensor([2.0, 200.0], dtype=D)  # the second root lies above 5
    kwargs = {"solver": solver, "lower": -5.0, "upper": 5.0, "batched": True}
    _z, info = implicit.root_solve(
        cubic, torch.zeros(2, dtype=D), theta, return_info=True, on_failure="ignore", **kwargs
    )
    assert info.status == "failed" and info.converged.tolist() == [True, False]
    assert "g(lower) and g(upper) must have opposite signs" in info.message
    assert "problem 1: g(-5.0) = -330.0, g(5.0) = -70.0" in info.message
    with pytest.raises(implicit.ConvergenceError, match=r"g\(lower\) and g\(upper\)"):
        implicit.root_solve(cubic, torch.zeros(2, dtype=D), theta, on_failure="raise", **kwargs)


def test_bad_brackets_and_shapes_raise():
    with pytest.raises(TypeError, match="needs a bracket: pass lower= and upper="):
        implicit.root_solve(cubic, torch.tensor(0.0), torch.tensor(1.0), solver="bisection")
    with pytest.raises(ValueError, match=r"lower > upper"):
        implicit.root_solve(
            cubic, torch.tensor(0.0), torch.tensor(1.0), solver="bisection", lower=1.0, upper=0.0
        )
    with pytest.raises(ValueError, match="one unknown each"):
        implicit.root_solve(
            cubic, torch.zeros(2), torch.ones(2), solver="chandrupatla", lower=-5.0, upper=5.0
        )
    with pytest.raises(ValueError, match="lower has 3 entries but there are 2 problems"):
        implicit.root_solve(
            cubic,
            torch.zeros(2),
            torch.ones(2),
            solver="bisection",
            batched=True,
            lower=torch.zeros(3),
            upper=5.0,
        )
    with pytest.raises(TypeError, match="lower must be a number or a tensor"):
        Bisection(lower="0", upper=1.0)
    with pytest.raises(ValueError, match="backward='unroll'"):
        implicit.root_solve(
            cubic,
            torch.tensor(0.0),
            torch.tensor(1.0, requires_grad=True),
            solver=Chandrupatla(lower=-5.0, upper=5.0),
            backward="unroll",
        )


@pytest.mark.parametrize("solver", METHODS)
def test_iterations_are_bounded_and_a_jump_fails_honestly(solver):
    _, info = implicit.root_solve(
        cubic,
        torch.tensor(0.0, dtype=D),
        torch.tensor(2.0, dtype=D),
        solver=solver,
        lower=-5.0,
        upper=5.0,
        max_iter=3,
        return_info=True,
        on_failure="ignore",
    )
    # Capture discovery's evaluation at z0, both ends, one per iteration (cubic hands no
    # value to Python: no discovery at the end).
    assert info.iterations == 3 and info.status == "max_iter" and info.f_evals == 6
    # A sign change without a root: the bracket closes on the jump, |g| stays 1.
    z, info = implicit.root_solve(
        lambda z: torch.sign(z - 0.3),
        torch.tensor(0.0, dtype=D),
        solver=solver,
        lower=-1.0,
        upper=1.0,
        max_iter=500,
        return_info=True,
        on_failure="ignore",
    )
    assert info.status == "failed" and "discontinuity" in info.message
    assert abs(float(z) - 0.3) <= 1e-15 and info.iterations < 200


def test_under_vmap_each_slice_keeps_its_bracket():
    thetas = torch.tensor([[1.0, 2.0], [10.0, 30.0]], dtype=D)

    def solve(theta):
        return implicit.root_solve(
            cubic,
            torch.zeros(2, dtype=D),
            theta,
            solver="chandrupatla",
            batched=True,
            lower=torch.tensor([-1.0, -2.0], dtype=D),
            upper=torch.tensor([5.0, 6.0], dtype=D),
            tol=1e-12,
        )

    z = torch.func.vmap(solve)(thetas)
    assert cubic(z, thetas).abs().max() <= 1e-11
    assert (
        rel_err(
            torch.func.vmap(torch.func.jacrev(solve))(thetas).diagonal(dim1=1, dim2=2),
            1 / (3 * z**2 + 1),
        )
        <= 1e-10
    )
