"""``solve(A, b)`` by ``scipy.linalg``, made differentiable with ``implicit.custom_root``.

scipy knows nothing of autograd. ``custom_root`` hands it detached tensors, takes its
answer, and differentiates the optimality condition ``A z − b = 0`` instead: the
gradients with respect to ``A``, ``b`` and the tensor ``scale`` that ``g`` captures are
checked against ``torch.linalg.solve``'s own.

Run: ``python examples/custom_root_scipy_solve.py``
"""

from __future__ import annotations

import scipy.linalg
import torch

import implicit

generator = torch.Generator().manual_seed(0)
n = 6
A = torch.randn(n, n, generator=generator, dtype=torch.float64) + n * torch.eye(n)
A.requires_grad_()
b = torch.randn(n, generator=generator, dtype=torch.float64, requires_grad=True)
scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)  # read by g only


@implicit.custom_root(lambda z, A, b: A @ z - scale * b, tol=1e-12)
def solve(A: torch.Tensor, b: torch.Tensor):
    """Any code at all: here LAPACK through scipy, on numpy arrays."""
    return scipy.linalg.solve(A.numpy(), scale.item() * b.numpy())


def loss_of(z: torch.Tensor) -> torch.Tensor:
    return (z**2).sum() + z.sin().sum()


def main() -> float:
    z = solve(A, b)
    grads = torch.autograd.grad(loss_of(z), [A, b, scale])
    reference = torch.autograd.grad(loss_of(torch.linalg.solve(A, scale * b)), [A, b, scale])

    worst = 0.0
    for name, got, want in zip(["A", "b", "scale"], grads, reference):
        error = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
        worst = max(worst, error)
        print(f"d loss / d {name:5s} against torch.linalg.solve: relative error {error:.1e}")
    print(f"forward: {solve.last_info.status}; backward: {solve.last_info.backward.method}")
    assert worst < 1e-10, "custom_root's gradient is wrong"
    return worst


if __name__ == "__main__":
    main()
