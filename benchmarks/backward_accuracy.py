"""Worst relative gradient error of every backward mode against its reference.

Run from the repository root: ``python benchmarks/backward_accuracy.py [cases]``.

* Random contractive maps ``z = tanh(W_b z + x_b)`` (batch 1..4, n 1..8, ‖W_b‖₂ in
  [0.1, 0.9], float64, tol 1e-12), solved with ``solver="fixed_point"``: the gradient of
  ``Σ c ⊙ sin z`` with respect to ``x`` and ``W`` against plain autograd through 500
  unrolled iterations (``dense``, ``gmres``, ``bicgstab``, ``neumann``, ``auto``,
  ``auto-iter`` = ``Auto(max_dense=0)``, ``one_step``), and ``dz/dx`` against the
  closed form ``(I − D W)⁻¹ D``,
  ``D = diag(1 − z²)`` (``unroll`` and, again, the exact modes).
* Random convex energies (``g = A z + tanh z − b``, ``A`` SPD with condition number up
  to 100): the gradient with ``cg`` against the closed form ``(A + diag sech² z)⁻¹ c``.
"""

from __future__ import annotations

import math
import random
import sys

import torch

import implicit
from implicit.solvers import Solver

torch.set_num_threads(1)
F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def contractive(rng: random.Random):
    batch, n, norm = rng.randint(1, 4), rng.randint(1, 8), rng.uniform(0.1, 0.9)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    w = torch.randn(batch, n, n, generator=gen, dtype=F64)
    w = (w * (norm / torch.linalg.matrix_norm(w, ord=2).reshape(batch, 1, 1))).requires_grad_()
    x = torch.randn(batch, n, generator=gen, dtype=F64, requires_grad=True)
    c = torch.randn(batch, n, generator=gen, dtype=F64)

    def f(z, x):
        return torch.tanh(torch.einsum("bij,bj->bi", w, z) + x)

    return f, w, x, c


def fixed_point_errors(mode, rng: random.Random) -> tuple[float, float]:
    """(vs unrolled autograd, vs closed-form dz/dx) for one random problem."""
    f, w, x, c = contractive(rng)
    z0 = torch.zeros_like(x)
    options = dict(solver="fixed_point", batched=True, tol=1e-12, max_iter=1000)
    z = implicit.fixed_point(f, z0, x, backward=mode, on_failure="ignore", **options)
    grads = torch.autograd.grad((c * z.sin()).sum(), [x, w])
    z_ref = z0
    for _ in range(500):
        z_ref = f(z_ref, x)
    refs = torch.autograd.grad((c * z_ref.sin()).sum(), [x, w])
    unrolled = max(rel_err(g, r) for g, r in zip(grads, refs))
    # dz_b/dx_b per sample, against (I − D W)⁻¹ D.
    jac = torch.func.jacrev(
        lambda x: implicit.fixed_point(f, z0, x, backward=mode, on_failure="ignore", **options)
    )(x.detach())
    batch, n = x.shape
    per_sample = torch.stack([jac[b, :, b, :] for b in range(batch)])
    d = 1 - z.detach() ** 2
    closed = torch.linalg.solve(
        torch.eye(n, dtype=F64) - d.unsqueeze(2) * w.detach(), torch.diag_embed(d)
    )
    return unrolled, rel_err(per_sample, closed)


class Descent(Solver):
    """z ← z − step · g(z): Picard on −g, for roots of gradients of convex energies."""

    name = "descent"

    def __init__(self, step: float):
        super().__init__()
        self.step_size = step

    def step(self, fn, z, r, state):
        z = z - self.step_size * r
        return z, fn(z), state


def cg_error(rng: random.Random) -> float:
    batch, n, condition = rng.randint(1, 4), rng.randint(1, 8), rng.uniform(1, 100)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=F64))
    a = (q * torch.logspace(0, math.log10(condition), n, dtype=F64)) @ q.mT
    b = torch.randn(batch, n, generator=gen, dtype=F64, requires_grad=True)
    c = torch.randn(batch, n, generator=gen, dtype=F64)

    def g(z, b):
        return torch.einsum("bij,bj->bi", a, z) + torch.tanh(z) - b

    z = implicit.root_solve(
        g,
        torch.zeros_like(b),
        b,
        solver=Descent(1 / (condition + 1)),
        backward="cg",
        batched=True,
        tol=1e-12,
        max_iter=20000,
    )
    (grad,) = torch.autograd.grad((c * z).sum(), [b])
    jac = a + torch.diag_embed(1 - torch.tanh(z.detach()) ** 2)
    return rel_err(grad, torch.linalg.solve(jac, c))


def main(cases: int) -> None:
    rows = []
    modes = ["dense", "gmres", "bicgstab", "neumann", "auto", "unroll", "one_step"]
    # Auto above max_dense: Neumann while it contracts well, then GMRES.
    modes.insert(5, ("auto-iter", implicit.linear.Auto(max_dense=0)))
    for mode in modes:
        label, backward = mode if isinstance(mode, tuple) else (mode, mode)
        rng = random.Random(label)
        errors = [fixed_point_errors(backward, rng) for _ in range(cases)]
        rows.append(
            (
                label,
                "unrolled autograd (500 it.) / closed-form dz/dx",
                max(e[0] for e in errors),
                max(e[1] for e in errors),
            )
        )
    rng = random.Random("cg")
    rows.append(
        ("cg", "closed form (A + diag sech² z)⁻¹", max(cg_error(rng) for _ in range(cases)), None)
    )
    print(f"{cases} random problems per mode, float64, worst relative error:\n")
    print(f"{'mode':9s} {'reference':50s} {'vs unrolled/closed':>19s} {'dz/dx closed form':>18s}")
    for mode, reference, first, second in rows:
        second_text = "" if second is None else f"{second:.2e}"
        print(f"{mode:9s} {reference:50s} {first:19.2e} {second_text:>18s}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
