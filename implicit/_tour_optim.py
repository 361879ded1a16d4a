"""The tour's optimisation section: minimisers, least squares, bounds and brackets.

Each check compares a derivative through a solve with an independent reference and
returns the relative error, which :func:`tour_optimisation` prints.
"""

from __future__ import annotations

import torch

import implicit

D = torch.float64


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def ridge_hypergradient() -> float:
    """``dw*/dλ`` of ridge regression by ``minimize`` against ``(XᵀX + λI)⁻¹Xᵀy``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=generator, dtype=D)
    y = torch.randn(30, generator=generator, dtype=D)
    lam = torch.tensor(0.5, dtype=D)

    def objective(w, lam):
        return 0.5 * ((x @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()

    def solve(lam):
        return implicit.minimize(objective, torch.zeros(5, dtype=D), lam, tol=1e-12)

    def closed_form(lam):
        return torch.linalg.solve(x.T @ x + lam * torch.eye(5, dtype=D), x.T @ y)

    return _relative(torch.func.jacrev(solve)(lam), torch.func.jacrev(closed_form)(lam))


def maximum_left() -> tuple[str, float]:
    """``minimize`` started at the maximum of a double well: its status, and the
    distance of the answer to the nearest minimum (±1 per coordinate)."""
    z, info = implicit.minimize(
        lambda z: (z**4 / 4 - z**2 / 2).sum(), torch.zeros(3, dtype=D), return_info=True
    )
    return info.status, float((z.abs() - 1).abs().max())


SUBSTRATE = torch.tensor([0.038, 0.194, 0.425, 0.626, 1.253, 2.5, 3.74], dtype=D)
RATE = torch.tensor([0.05, 0.127, 0.094, 0.2122, 0.2729, 0.2665, 0.3317], dtype=D)


def enzyme_fit() -> dict[str, float]:
    """The Michaelis–Menten fit: ``dVmax/d(rate)`` by ``least_squares`` and by a
    Gauss–Newton-only backward, against central differences of tight solves."""

    def residual(c, rate):
        return rate - c[0] * SUBSTRATE / (c[1] + SUBSTRATE)

    def fit(rate, **options):
        start = torch.tensor([0.1, 0.1], dtype=D)
        return implicit.least_squares(residual, start, rate, **options)

    rate = RATE.clone().requires_grad_()
    c = fit(rate, tol=1e-10)
    (exact,) = torch.autograd.grad(c[0], rate)
    # The reference: differences of Newton's solves (quadratic convergence) at tol 1e-12.
    h, tight = 1e-4, {"solver": "newton", "tol": 1e-12}
    steps = h * torch.eye(7, dtype=D)
    central = torch.stack(
        [(fit(RATE + e, **tight)[0] - fit(RATE - e, **tight)[0]) / (2 * h) for e in steps]
    )
    jacobian = torch.func.jacrev(residual)(c.detach(), RATE)
    gauss_newton = -torch.linalg.solve(jacobian.T @ jacobian, jacobian.T)[0]
    return {"exact": _relative(exact, central), "gauss_newton": _relative(gauss_newton, central)}


def clipped_quadratic() -> float:
    """``bounds``: the minimiser of ``½‖z − θ‖²`` in ``[−1, 1]`` is ``clip(θ)``; the largest
    error of ``dz/dθ`` (1 where free, 0 where held) and ``dz/dl`` (1 where held at l)."""
    theta = torch.tensor([-2.0, 0.3, 0.9, 3.0], dtype=D, requires_grad=True)
    lower = torch.full((4,), -1.0, dtype=D, requires_grad=True)
    z = implicit.minimize(
        lambda z, t: 0.5 * ((z - t) ** 2).sum(),
        torch.zeros(4, dtype=D),
        theta,
        bounds=(lower, 1.0),
        tol=1e-12,
    )
    d_theta, d_lower = torch.autograd.grad(z.sum(), [theta, lower])
    free = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=D)
    held_low = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D)
    return float(torch.maximum((d_theta - free).abs().max(), (d_lower - held_low).abs().max()))


def cubic_by_bracketing() -> dict[str, tuple[int, float]]:
    """``z³ + z = θ`` in ``[−5, 5]``: iterations and the error of ``dz/dθ = 1/(3z² + 1)``."""
    out = {}
    for solver in ("bisection", "chandrupatla"):
        theta = torch.tensor(2.0, dtype=D, requires_grad=True)
        z, info = implicit.root_solve(
            lambda z, t: z**3 + z - t,
            torch.tensor(0.0, dtype=D),
            theta,
            solver=solver,
            lower=-5.0,
            upper=5.0,
            tol=1e-12,
            return_info=True,
        )
        (grad,) = torch.autograd.grad(z, theta)
        z = float(z.detach())
        out[solver] = (info.iterations, abs(float(grad) - 1 / (3 * z**2 + 1)))
    return out


def tour_optimisation(heading: str = "Optimisation layers") -> None:
    """Print the section: each derivative through a solve against its reference."""
    print(f"\n{heading}: minimize, least_squares, bounds, bracketing (float64).")
    print(f"   Ridge dw*/dλ by minimize against (XᵀX + λI)⁻¹Xᵀy: {ridge_hypergradient():.1e}")
    status, distance = maximum_left()
    print(f"   Started at a maximum: {status}, distance to a minimum {distance:.1e}")
    enzyme = enzyme_fit()
    print(
        f"   Michaelis–Menten fit, dVmax/d(rate) against central differences: "
        f"exact Hessian {enzyme['exact']:.1e}, Gauss–Newton only {enzyme['gauss_newton']:.1%}"
    )
    print(f"   Clipped quadratic, derivatives through the active set: {clipped_quadratic():.1e}")
    for solver, (iterations, error) in cubic_by_bracketing().items():
        print(f"   z³ + z = θ by {solver}: {iterations} iterations, dz/dθ error {error:.1e}")
