"""scipy.optimize.minimize as the forward solver of minimize."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import implicit
from implicit.solvers import ScipyMinimize
from implicit.solvers.scipy_minimize import MINIMIZE_METHODS

D = torch.float64
A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=D)


def smooth(z, b):
    """A strictly convex objective: its minimiser solves A z + z³ = b."""
    return 0.5 * z @ A @ z + (z**4).sum() / 4 - b @ z


def reference(b):
    """Newton's method on the optimality condition, in float64 (an independent solver)."""
    z = torch.zeros(3, dtype=D)
    for _ in range(50):
        z = z - torch.linalg.solve(A + torch.diag(3 * z**2), A @ z + z**3 - b)
    return z


#: Derivative-free methods reach a looser tolerance, and the methods that stop on the
#: objective's relative decrease stop before 1e-9.
LOOSE = {"Nelder-Mead": 1e-5, "Powell": 1e-5, "COBYLA": 1e-3, "COBYQA": 1e-5}
LOOSE |= {"CG": 1e-7, "L-BFGS-B": 1e-7, "TNC": 1e-7, "SLSQP": 1e-7}


@pytest.mark.parametrize("method", MINIMIZE_METHODS)
def test_every_minimize_method_and_the_implicit_gradient(method):
    b = torch.tensor([1.0, -0.5, 0.25], dtype=D, requires_grad=True)
    tol = LOOSE.get(method, 1e-9)
    z, info = implicit.minimize(
        smooth,
        torch.zeros(3, dtype=D),
        b,
        solver="scipy",
        method=method,
        tol=tol,
        max_iter=5000,
        return_info=True,
        on_failure="ignore",
    )
    assert info.status == "converged", info.message
    assert info.message.startswith(f"scipy.optimize.minimize(method={method!r})")
    want = reference(b.detach())
    assert rel_err(z, want) <= 100 * tol
    # The gradient is the implicit function theorem's at z: exact for the z found.
    (grad,) = torch.autograd.grad(z.sum(), b)
    hessian = A + torch.diag(3 * z.detach() ** 2)
    assert rel_err(grad, torch.linalg.solve(hessian, torch.ones(3, dtype=D))) <= 1e-12


@pytest.mark.parametrize("strategy", ["block", "per_sample"])
def test_batched_strategies_agree(strategy):
    b = torch.tensor([[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]], dtype=D)

    def fun(z, b):
        return 0.5 * ((z @ A) * z).sum(1) + (z**4).sum(1) / 4 - (b * z).sum(1)

    z, info = implicit.minimize(
        fun,
        torch.zeros(2, 3, dtype=D),
        b,
        batched=True,
        solver=ScipyMinimize("BFGS", strategy=strategy),
        tol=1e-8,
        return_info=True,
    )
    assert info.converged.tolist() == [True, True]
    assert rel_err(z, torch.stack([reference(row) for row in b])) <= 1e-7


def test_a_saddle_scipy_stops_at_is_left_and_scipy_run_again():
    def saddle(z):
        return z[0] ** 2 - z[1] ** 2 + z[1] ** 4 / 4

    z, info = implicit.minimize(
        saddle, torch.zeros(2, dtype=D), solver="scipy", method="BFGS", return_info=True, tol=1e-7
    )
    assert info.status == "converged"
    assert torch.allclose(z.abs(), torch.tensor([0.0, 2**0.5], dtype=D), atol=1e-7)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown scipy method"):
        ScipyMinimize("Newton")
    with pytest.raises(TypeError, match=r"Unknown solver options: gtoll"):
        implicit.minimize(
            lambda z: (z**2).sum(),
            torch.ones(2),
            solver="scipy",
            method="BFGS",
            options={"gtoll": 1e-3},
        )
    with pytest.raises(ValueError, match="strategy must be"):
        ScipyMinimize(strategy="joint")


@pytest.mark.parametrize("method", ["dogleg", "trust-exact", "trust-ncg", "trust-krylov"])
def test_trust_region_methods_stop_at_a_non_finite_hessian(method):
    # PyTorch's second derivative of logaddexp(z, -z) is NaN at |z| = 400 (the value and
    # gradient are exact): scipy.linalg would raise numpy's ValueError on it.
    def fun(z):
        return (torch.logaddexp(z, -z) - 0.5 * z).sum(-1)

    z0 = torch.full((1, 3), 400.0, dtype=torch.float64)
    _, info = implicit.minimize(
        fun, z0, solver=ScipyMinimize(method), batched=True, return_info=True,
        on_failure="ignore",
    )  # fmt: skip
    assert info.status == "failed" and "not finite" in info.message


#: Evaluations and derivatives of _Counted.
CALLS = {"forward": 0, "backward": 0}


class _Counted(torch.autograd.Function):
    """The identity, counting its evaluations and its derivatives in CALLS."""

    @staticmethod
    def forward(x):
        CALLS["forward"] += 1
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        CALLS["backward"] += 1
        return grad


@pytest.mark.parametrize("method", ["Nelder-Mead", "Powell", "COBYLA", "COBYQA"])
def test_derivative_free_methods_evaluate_the_objective_alone(method):
    # scipy's iterations evaluate only the objective (its gradient costs about twice
    # as much again); the stopping test at the answer and the backward differentiate.
    c = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    CALLS.update(forward=0, backward=0)

    def fun(z, c):
        return ((_Counted.apply(z) - c) ** 2).sum()

    solver = implicit.solvers.ScipyMinimize(method=method)
    z = implicit.minimize(
        fun, torch.zeros(2, dtype=torch.float64), c, solver=solver, backward="dense",
        tol=1e-8, max_iter=400, on_failure="ignore",
    )  # fmt: skip
    assert CALLS["forward"] > 20 and CALLS["backward"] <= 5, CALLS
    (grad,) = torch.autograd.grad(z.sum(), c)
    assert torch.allclose(z, c.detach(), atol=1e-4)
    assert torch.allclose(grad, torch.ones(2, dtype=torch.float64), atol=1e-8)
