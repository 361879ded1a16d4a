"""dz*/dx through Anderson acceleration, checked by the implicit function theorem by hand.

``z* = tanh(W z* + x)`` (n = 10, ‖W‖₂ = 0.9) is solved by Anderson acceleration; its
Jacobian ``dz*/dx`` comes from ``implicit``'s backward (``torch.func.jacrev`` over the
solve). The check solves the same equation as a root problem by Newton's method and
applies the implicit function theorem by hand, from Jacobians of ``g`` at Newton's
root: ``dz*/dx = −(∂g/∂z)⁻¹ ∂g/∂x``.

Run: ``python examples/anderson_dzdx.py``
"""

from __future__ import annotations

import torch

import implicit

n = 10
generator = torch.Generator().manual_seed(0)
W = torch.randn(n, n, generator=generator, dtype=torch.float64)
W *= 0.9 / torch.linalg.matrix_norm(W, ord=2)
x = torch.randn(n, generator=generator, dtype=torch.float64)
z0 = torch.zeros(n, dtype=torch.float64)


def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(W @ z + x)


def g(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f(z, x) - z


def anderson(x: torch.Tensor) -> torch.Tensor:
    return implicit.fixed_point(f, z0, x, solver="anderson", tol=1e-12, max_iter=200)


def main() -> float:
    z_anderson, info = implicit.fixed_point(
        f, z0, x, solver="anderson", tol=1e-12, max_iter=200, return_info=True
    )
    dzdx_anderson = torch.func.jacrev(anderson)(x)

    z_newton = implicit.root_solve(g, z0, x, solver="newton", tol=1e-12)
    dg_dz = torch.func.jacrev(g, argnums=0)(z_newton, x)
    dg_dx = torch.func.jacrev(g, argnums=1)(z_newton, x)
    dzdx_ift = -torch.linalg.solve(dg_dz, dg_dx)

    gap = float(torch.linalg.vector_norm(z_anderson - z_newton))
    error = float(
        torch.linalg.matrix_norm(dzdx_anderson - dzdx_ift) / torch.linalg.matrix_norm(dzdx_ift)
    )
    print(f"Anderson: {info.status} in {info.iterations} iterations")
    print(f"‖z_anderson − z_newton‖ = {gap:.1e}")
    print(f"dz*/dx through Anderson against Newton + the IFT by hand: relative error {error:.1e}")
    assert error < 1e-9, "dz*/dx through Anderson is wrong"
    return error


if __name__ == "__main__":
    main()
