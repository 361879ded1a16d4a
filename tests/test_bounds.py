"""bounds=(lower, upper): clipped quadratics and the derivative through the active set."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import implicit

D = torch.float64
WEIGHTS = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D)


def quadratic(z, theta):
    """A separable quadratic: its bounded minimiser is clip(θ, l, u)."""
    return 0.5 * (WEIGHTS * (z - theta) ** 2).sum()


def weighted_residual(z, theta):
    return WEIGHTS.sqrt() * (z - theta)


CASES = [
    ("minimize", "lbfgs", {}),
    ("minimize", "newton", {}),
    ("minimize", "scipy", {"method": "L-BFGS-B"}),
    ("least_squares", "levenberg_marquardt", {}),
    ("least_squares", "gauss_newton", {}),
    ("least_squares", "scipy", {"method": "trf"}),
    ("least_squares", "scipy", {"method": "dogbox"}),
]


@pytest.mark.parametrize(("front", "solver", "options"), CASES)
def test_clipped_quadratic_and_its_derivatives(front, solver, options):
    theta = torch.tensor([-2.0, 0.3, 0.9, 3.0], dtype=D, requires_grad=True)
    lower = torch.full((4,), -1.0, dtype=D, requires_grad=True)
    upper = torch.tensor(1.0, dtype=D, requires_grad=True)
    fun = quadratic if front == "minimize" else weighted_residual
    z, info = getattr(implicit, front)(
        fun,
        torch.zeros(4, dtype=D),
        theta,
        bounds=(lower, upper),
        solver=solver,
        tol=1e-10,
        return_info=True,
        **options,
    )
    assert info.status == "converged"
    assert torch.allclose(z, torch.clamp(theta, lower, upper), atol=1e-9, rtol=0)
    # Per coordinate: 1 wrt θ where free, 0 where held; 1 wrt the bound that holds it.
    v = torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=D)
    d_theta, d_lower, d_upper = torch.autograd.grad(z, [theta, lower, upper], v)
    exact = {"atol": 1e-12, "rtol": 0}
    assert torch.allclose(d_theta, torch.tensor([0.0, 10.0, 100.0, 0.0], dtype=D), **exact)
    assert torch.allclose(d_lower, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D), **exact)
    assert abs(float(d_upper) - 1000.0) <= 1e-12  # a scalar bound, broadcast


def test_coupled_problem_derivative_on_the_free_coordinates_by_the_reduced_hessian():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=generator, dtype=D)
    a = m @ m.T + 5 * torch.eye(5, dtype=D)
    b = torch.tensor([3.0, -4.0, 0.5, 1.0, -0.2], dtype=D, requires_grad=True)
    upper = torch.tensor([0.2, 9.0, 9.0, 9.0, 9.0], dtype=D)
    z = implicit.minimize(
        lambda z, b: 0.5 * z @ a @ z - b @ z,
        torch.zeros(5, dtype=D),
        b,
        bounds=(-torch.full((5,), 0.3, dtype=D), upper),
        tol=1e-12,
    )
    active = (z.detach() <= -0.3 + 1e-12) | (z.detach() >= upper - 1e-12)
    assert bool(active.any()) and not bool(active.all())
    free = ~active
    # KKT: the free block solves A_ff z_f = b_f − A_fa z_a; dz_f/db_f = A_ff⁻¹.
    want = torch.zeros(5, 5, dtype=D)
    want[free.nonzero(), free.nonzero().T] = torch.linalg.inv(a[free][:, free])
    jacobian = torch.stack([torch.autograd.grad(z[i], b, retain_graph=True)[0] for i in range(5)])
    assert rel_err(jacobian, want) <= 1e-9


def test_bounds_on_a_tree_state_and_bounds_given_per_leaf():
    theta = torch.tensor([-2.0, 0.3, 0.9, 3.0], dtype=D)

    def fun(z, theta):
        return ((z["a"] - theta[:2]) ** 2).sum() + ((z["b"][0] - theta[2:]) ** 2).sum()

    lower = {"a": -1.0, "b": [torch.tensor([0.0, 0.0], dtype=D)]}
    start = {"a": torch.zeros(2, dtype=D), "b": [torch.zeros(2, dtype=D)]}
    z = implicit.minimize(fun, start, theta, bounds=(lower, 2.0), tol=1e-10)
    assert torch.allclose(z["a"], torch.tensor([-1.0, 0.3], dtype=D), atol=1e-9)
    assert torch.allclose(z["b"][0], torch.tensor([0.9, 2.0], dtype=D), atol=1e-9)


def test_forward_mode_sees_the_bound():
    theta = torch.tensor([-2.0, 0.3, 0.9, 3.0], dtype=D)

    def solve(theta, lower):
        return implicit.minimize(quadratic, torch.zeros(4, dtype=D), theta, bounds=(lower, 1.0))

    _, tangent = torch.func.jvp(
        solve,
        (theta, torch.full((4,), -1.0, dtype=D)),
        (torch.ones(4, dtype=D), 10 * torch.ones(4, dtype=D)),
    )
    want = torch.tensor([10.0, 1.0, 1.0, 0.0], dtype=D)
    assert torch.allclose(tangent, want, atol=1e-12, rtol=0)


def test_bad_bounds_raise_and_name_bounds():
    z0 = torch.zeros(3, dtype=D)

    def fun(z):
        return (z**2).sum()

    with pytest.raises(ValueError, match=r"bounds: lower > upper for z0 at index \(1,\)"):
        implicit.minimize(fun, z0, bounds=(torch.tensor([0.0, 2.0, 0.0], dtype=D), 1.0))
    with pytest.raises(TypeError, match="bounds must be a pair"):
        implicit.minimize(fun, z0, bounds=1.0)
    with pytest.raises(ValueError, match="bounds: upper has shape \\(2,\\)"):
        implicit.minimize(fun, z0, bounds=(None, torch.ones(2, dtype=D)))
    with pytest.raises(TypeError, match=r"bounds: lower has dtype torch\.float32"):
        implicit.minimize(fun, z0, bounds=(torch.zeros(3), None))
    with pytest.raises(ValueError, match="bounds: lower is NaN"):
        implicit.minimize(fun, z0, bounds=(float("nan"), None))
    with pytest.raises(ValueError, match="bounds: method 'BFGS' takes no bounds"):
        implicit.minimize(fun, z0, bounds=(-1.0, 1.0), solver="scipy", method="BFGS")
    with pytest.raises(ValueError, match="bounds: method 'lm' takes no bounds"):
        implicit.least_squares(lambda z: z, z0, bounds=(-1.0, 1.0), solver="scipy", method="lm")


def test_z0_is_clipped_into_the_bounds_and_not_modified():
    z0 = torch.tensor([5.0, -5.0], dtype=D)
    seen = []

    def fun(z):
        seen.append(z.detach().clone())
        return ((z - 0.5) ** 2).sum()

    z = implicit.minimize(fun, z0, bounds=(-1.0, 1.0))
    assert torch.equal(z0, torch.tensor([5.0, -5.0], dtype=D))
    assert torch.equal(seen[0], torch.tensor([1.0, -1.0], dtype=D))
    assert torch.allclose(z, torch.full((2,), 0.5, dtype=D))


def test_vmap_over_data_and_bounds():
    thetas = torch.tensor([[-2.0, 0.3, 0.9, 3.0], [0.5, -0.7, 2.0, -3.0]], dtype=D)
    lowers = torch.tensor([[-1.0] * 4, [-0.5] * 4], dtype=D)

    def solve(theta, lower):
        return implicit.minimize(
            quadratic, torch.zeros(4, dtype=D), theta, bounds=(lower, 1.0), tol=1e-12
        )

    z = torch.func.vmap(solve)(thetas, lowers)
    assert torch.allclose(
        z, torch.clamp(thetas, min=lowers, max=torch.tensor(1.0, dtype=D)), atol=1e-10, rtol=0
    )
    d_theta, d_lower = torch.func.vmap(torch.func.jacrev(solve, argnums=(0, 1)))(thetas, lowers)
    free = (thetas > lowers) & (thetas < 1.0)
    assert torch.allclose(d_theta, torch.diag_embed(free.to(D)), atol=1e-12, rtol=0)
    assert torch.allclose(d_lower, torch.diag_embed((thetas <= lowers).to(D)), atol=1e-12, rtol=0)
