"""minimize and least_squares against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from conftest import rel_err

import implicit

D = torch.float64


def ridge_data(n_samples=20, n_features=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_features, generator=generator, dtype=D)
    y = torch.randn(n_samples, generator=generator, dtype=D)
    return x, y


def ridge_objective(x, y):
    return lambda w, lam: 0.5 * ((x @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()


def ridge_closed_form(x, y, lam):
    """(XᵀX + λI)⁻¹Xᵀy, differentiable in λ by plain autograd."""
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=D), x.T @ y)


@pytest.mark.parametrize(
    ("solver", "options"),
    [("lbfgs", {}), ("newton", {}), ("scipy", {"method": "BFGS"}), ("scipy", {})],
)
def test_ridge_matches_closed_form_and_its_derivatives(solver, options):
    x, y = ridge_data()
    lam = torch.tensor(0.7, dtype=D, requires_grad=True)
    # L-BFGS-B (scipy's default) stops on its relative decrease near 1e-7 here.
    tol = 1e-6 if solver == "scipy" and not options else 1e-10
    w, info = implicit.minimize(
        ridge_objective(x, y),
        torch.zeros(4, dtype=D),
        lam,
        solver=solver,
        tol=tol,
        return_info=True,
        **options,
    )
    want = ridge_closed_form(x, y, lam)
    assert info.status == "converged"
    accuracy = 1e-6 if tol == 1e-6 else 1e-8
    assert rel_err(w, want) <= accuracy
    (grad,) = torch.autograd.grad(w.sum(), lam, create_graph=True)
    (grad_want,) = torch.autograd.grad(want.sum(), lam, create_graph=True)
    assert rel_err(grad, grad_want) <= 10 * accuracy
    # Double backward: the second derivative in λ.
    (second,) = torch.autograd.grad(grad, lam)
    (second_want,) = torch.autograd.grad(grad_want, lam)
    assert rel_err(second, second_want) <= 10 * accuracy


def test_ridge_forward_mode_jacrev_hessian_and_vmap():
    x, y = ridge_data()
    fun = ridge_objective(x, y)

    def solve(lam):
        return implicit.minimize(fun, torch.zeros(4, dtype=D), lam, tol=1e-12)

    def reference(lam):
        return ridge_closed_form(x, y, lam)

    lam = torch.tensor(0.7, dtype=D)
    one = torch.tensor(1.0, dtype=D)
    _, tangent = torch.func.jvp(solve, (lam,), (one,))
    _, tangent_want = torch.func.jvp(reference, (lam,), (one,))
    assert rel_err(tangent, tangent_want) <= 1e-9
    assert rel_err(torch.func.jacrev(solve)(lam), torch.func.jacrev(reference)(lam)) <= 1e-9
    hessian = torch.func.hessian(lambda lam: solve(lam).pow(2).sum())(lam)
    hessian_want = torch.func.hessian(lambda lam: reference(lam).pow(2).sum())(lam)
    assert rel_err(hessian, hessian_want) <= 1e-8
    lams = torch.tensor([0.1, 1.0, 3.0], dtype=D)
    got = torch.func.vmap(solve)(lams)
    assert rel_err(got, torch.stack([reference(lam) for lam in lams])) <= 1e-10


def test_hyperparameter_hessian_of_a_validation_loss():
    """A bilevel outer Hessian: d²/dλ² of a validation loss through the inner argmin."""
    x, y = ridge_data()
    xv, yv = ridge_data(seed=1)
    lam = torch.tensor(0.3, dtype=D, requires_grad=True)

    def validation(w):
        return ((xv @ w - yv) ** 2).mean()

    w = implicit.minimize(ridge_objective(x, y), torch.zeros(4, dtype=D), lam, tol=1e-12)
    (grad,) = torch.autograd.grad(validation(w), lam, create_graph=True)
    (second,) = torch.autograd.grad(grad, lam)
    want = validation(ridge_closed_form(x, y, lam))
    (grad_want,) = torch.autograd.grad(want, lam, create_graph=True)
    (second_want,) = torch.autograd.grad(grad_want, lam)
    assert rel_err(grad, grad_want) <= 1e-8
    assert rel_err(second, second_want) <= 1e-7


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_batched_ridge_each_problem_its_own_penalty(solver):
    x, y = ridge_data()
    lams = torch.tensor([0.1, 1.0, 10.0], dtype=D, requires_grad=True)

    def fun(w, lams):  # (B,) objectives
        return 0.5 * ((w @ x.T - y) ** 2).sum(1) + 0.5 * lams * (w**2).sum(1)

    w, info = implicit.minimize(
        fun,
        torch.zeros(3, 4, dtype=D),
        lams,
        batched=True,
        solver=solver,
        tol=1e-11,
        return_info=True,
    )
    assert info.converged.shape == (3,) and bool(info.converged.all())
    want = torch.stack([ridge_closed_form(x, y, lam) for lam in lams])
    assert rel_err(w, want) <= 1e-9
    (grad,) = torch.autograd.grad(w.sum(), lams)
    (grad_want,) = torch.autograd.grad(want.sum(), lams)
    assert rel_err(grad, grad_want) <= 1e-8


def logistic_data():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, generator=generator, dtype=D)
    labels = (torch.rand(30, generator=generator, dtype=D) < 0.5).to(D)
    return x, labels


def logistic_loss(w, x, labels, lam):
    logits = x @ w
    return (
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        + 0.5 * lam * (w**2).sum()
    )


def scipy_logistic(lam: float) -> np.ndarray:
    x, labels = (t.numpy() for t in logistic_data())

    def fun(w):
        logits = x @ w
        value = np.logaddexp(0, logits).sum() - labels @ logits + 0.5 * lam * w @ w
        grad = x.T @ (1 / (1 + np.exp(-logits)) - labels) + lam * w
        return value, grad

    result = scipy.optimize.minimize(
        fun, np.zeros(3), jac=True, method="BFGS", options={"gtol": 1e-13, "maxiter": 1000}
    )
    return result.x


@pytest.mark.parametrize(
    ("solver", "options"),
    [("lbfgs", {}), ("newton", {}), ("newton", {"linear": "cg"}), ("scipy", {"method": "BFGS"})],
)
def test_logistic_regression_matches_scipy_and_central_differences(solver, options):
    x, labels = logistic_data()
    lam = torch.tensor(0.5, dtype=D, requires_grad=True)
    w = implicit.minimize(
        logistic_loss,
        torch.zeros(3, dtype=D),
        x,
        labels,
        lam,
        solver=solver,
        tol=1e-11,
        **options,
    )
    assert np.abs(w.detach().numpy() - scipy_logistic(0.5)).max() <= 1e-8
    (grad,) = torch.autograd.grad(w.sum(), lam)
    h = 1e-5
    central = (scipy_logistic(0.5 + h).sum() - scipy_logistic(0.5 - h).sum()) / (2 * h)
    assert abs(float(grad) - central) <= 1e-7 * max(1.0, abs(central))


# -- least squares --------------------------------------------------------------------

SUBSTRATE = torch.tensor([0.038, 0.194, 0.425, 0.626, 1.253, 2.500, 3.740], dtype=D)
RATE = torch.tensor([0.050, 0.127, 0.094, 0.2122, 0.2729, 0.2665, 0.3317], dtype=D)


def enzyme_residual(c, rate):
    """Michaelis–Menten: rate = V s / (K + s) (jaxopt's Gauss–Newton test)."""
    return rate - c[0] * SUBSTRATE / (c[1] + SUBSTRATE)


def enzyme_fit(rate, solver="levenberg_marquardt", **options):
    start = torch.tensor([0.1, 0.1], dtype=D)
    return implicit.least_squares(enzyme_residual, start, rate, solver=solver, **options)


def scipy_enzyme(rate: np.ndarray) -> np.ndarray:
    """scipy's fit: MINPACK's Levenberg–Marquardt with the analytic Jacobian, polished
    by scipy's root finder on the normal equations ``Jᵀr = 0`` (LM alone stops near
    1e-9 here, too coarse for differences)."""
    s = SUBSTRATE.numpy()

    def residual(c):
        return rate - c[0] * s / (c[1] + s)

    def jacobian(c):
        return np.stack([-s / (c[1] + s), c[0] * s / (c[1] + s) ** 2], axis=1)

    fit = scipy.optimize.least_squares(residual, [0.1, 0.1], jac=jacobian, method="lm").x
    return scipy.optimize.root(lambda c: jacobian(c).T @ residual(c), fit, tol=1e-15).x


def enzyme_central_differences(h: float = 1e-4) -> torch.Tensor:
    """dV/d(rate) by central differences of scipy's fit."""
    rate = RATE.numpy()
    rows = [
        (scipy_enzyme(rate + h * e)[0] - scipy_enzyme(rate - h * e)[0]) / (2 * h) for e in np.eye(7)
    ]
    return torch.from_numpy(np.stack(rows))


@pytest.mark.parametrize(
    ("solver", "options"),
    [
        ("levenberg_marquardt", {}),
        ("gauss_newton", {}),
        ("lbfgs", {}),
        ("newton", {}),
        ("scipy", {"method": "trf"}),
        ("scipy", {"method": "dogbox"}),
        ("scipy", {"method": "lm"}),
    ],
)
def test_enzyme_fit_uses_the_exact_hessian_not_gauss_newton(solver, options):
    rate = RATE.clone().requires_grad_()
    # MINPACK's lm stops near a gradient of 1e-10 on this fit.
    tol = 1e-9 if solver == "scipy" else 1e-10
    c, info = enzyme_fit(rate, solver, tol=tol, return_info=True, **options)
    assert info.status == "converged"
    assert np.abs(c.detach().numpy() - scipy_enzyme(RATE.numpy())).max() <= 1e-7
    (grad,) = torch.autograd.grad(c[0], rate)
    central = enzyme_central_differences()
    assert rel_err(grad, central) <= 1e-6
    # The Gauss–Newton approximation H ≈ JᵀJ would be several percent wrong here.
    jacobian = torch.func.jacrev(enzyme_residual)(c.detach(), RATE)
    gauss_newton = -torch.linalg.solve(jacobian.T @ jacobian, jacobian.T)[0]
    assert rel_err(gauss_newton, central) >= 0.03


def test_least_squares_forward_mode_and_double_backward():
    rate = RATE.clone()

    def solve(r):
        return enzyme_fit(r, tol=1e-11)

    reverse, forward = torch.func.jacrev(solve)(rate), torch.func.jacfwd(solve)(rate)
    assert rel_err(forward, reverse) <= 1e-10
    # Second derivatives: d²c₀/dr² by reverse over reverse vs central differences of J.
    hessian = torch.func.jacrev(torch.func.jacrev(lambda r: solve(r)[0]))(rate)
    h = 1e-5
    central = torch.stack(
        [
            (
                torch.func.jacrev(lambda r: solve(r)[0])(rate + h * e)
                - torch.func.jacrev(lambda r: solve(r)[0])(rate - h * e)
            )
            / (2 * h)
            for e in torch.eye(7, dtype=D)
        ]
    )
    assert rel_err(hessian, central) <= 1e-5


def test_residual_may_have_more_entries_than_z_and_any_shape():
    t = torch.linspace(0, 1, 12, dtype=D).reshape(3, 4)
    y = 2.0 * torch.exp(-1.5 * t)
    fit = implicit.least_squares(
        lambda ab: ab[0] * torch.exp(ab[1] * t) - y, torch.tensor([1.0, 0.0], dtype=D)
    )
    assert torch.allclose(fit, torch.tensor([2.0, -1.5], dtype=D), atol=1e-8)


def test_batched_least_squares():
    t = torch.linspace(0, 1, 6, dtype=D)
    rates = torch.tensor([[0.5], [1.0], [2.0]], dtype=D, requires_grad=True)
    data = torch.exp(-rates.detach() * t)

    def residual(k, data):
        return torch.exp(-k * t) - data  # (B, 6) from k (B, 1)

    k, info = implicit.least_squares(
        residual, torch.ones(3, 1, dtype=D), data, batched=True, return_info=True, tol=1e-10
    )
    assert info.converged.shape == (3,) and bool(info.converged.all())
    assert rel_err(k, rates) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states_are_refused_naming_the_dtype(dtype):
    a = torch.ones(3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"minimize does not solve {dtype} states.*float32"):
        implicit.minimize(lambda z, a: ((z - a) ** 2).sum(), torch.zeros(3, dtype=dtype), a)
    with pytest.raises(TypeError, match=rf"least_squares does not solve {dtype} states"):
        implicit.least_squares(lambda z, a: z - a, torch.zeros(3, dtype=dtype), a)
