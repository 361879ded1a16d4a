"""Do the forward's secant estimates of the inverse Jacobian pay in the backward?

Broyden and Anderson end their solve with an estimate ``M ≈ (∂g/∂z)⁻¹`` (their hint,
an ``implicit.linear.LowRankInverse``). ``GMRES(use_hints=True)`` preconditions the
adjoint system with ``Mᵀ``: still an exact solve, in fewer products where the estimate
is good (SHINE, Ramzi et al. 2022, uses ``M`` alone, inexactly). Per problem, the
vector-Jacobian products (VJPs) of the backward's linear solve and the relative error
of the gradient against a dense float64 solve, for the default backward (``"auto"``),
GMRES, GMRES with the hint, and ``Mᵀ v`` alone (one product, to show how good the
estimate is by itself). The forward and backward tolerance is ``1e-6``; equal
accuracy is read off the error column.

Problems (float64):

* the benchmark's equilibrium model ``z = tanh(W z + U x)``, ``‖W‖₂ = 0.9`` (and 0.99),
  at the sizes of ``deq_step.py``;
* a linear fixed point ``z = S z + b`` with ``S`` symmetric, spectrum in
  ``[−0.5, 0.995]`` (slow for Neumann; Anderson with ``m = 20``);
* a nonsymmetric root ``A z + 0.1 tanh(z) = b``, ``A = 2I + 1.5 G/√n`` (Broyden with
  ``memory`` 20 and 50).

Run from the repository root: ``python benchmarks/hints.py`` (about a minute); the
output is ``benchmarks/results/hints.txt``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import implicit  # noqa: E402
from implicit import linear  # noqa: E402
from implicit.adjoint.problems import RootProblem  # noqa: E402

F64 = torch.float64
TOL = 1e-6


def deq(batch: int, width: int, norm: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(width, width, generator=gen, dtype=F64)
    w *= norm / torch.linalg.matrix_norm(w, ord=2)
    u = torch.randn(width, width, generator=gen, dtype=F64) / math.sqrt(width)
    x = torch.randn(batch, width, generator=gen, dtype=F64) @ u.T

    def g(z, x):
        return torch.tanh(z @ w.T + x) - z

    return g, x


def linear_fixed_point(batch: int = 4, n: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    s = q @ torch.diag(torch.linspace(-0.5, 0.995, n, dtype=F64)) @ q.T
    b = torch.randn(batch, n, generator=gen, dtype=F64)
    return (lambda z, b: z @ s.T + b - z), b


def nonsymmetric_root(batch: int = 4, n: int = 200, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = 2 * torch.eye(n, dtype=F64) + 1.5 * torch.randn(n, n, generator=gen, dtype=F64) / n**0.5
    b = torch.randn(batch, n, generator=gen, dtype=F64)
    return (lambda z, b: z @ a.T + 0.1 * torch.tanh(z) - b), b


def backward(g, x, solver, options, mode):
    """The backward's products and the gradient ``∇x mean(z²)``."""
    x = x.clone().requires_grad_()
    z, info = implicit.root_solve(
        g,
        torch.zeros_like(x),
        x,
        solver=solver,
        backward=mode,
        tol=TOL,
        max_iter=500,
        batched=True,
        return_info=True,
        **options,
    )
    (grad,) = torch.autograd.grad(z.square().mean(), x)
    return info.backward.matvecs, grad, info


def estimate_alone(g, x, solver, options):
    """``x``'s gradient with the adjoint ``Mᵀ v`` (no solve), and its products (one)."""
    hints = []
    keep = RootProblem.solve

    def spy(self, z0, inputs):
        z = keep(self, z0, inputs)
        hints.append(self.hint)
        return z

    RootProblem.solve = spy
    try:
        x = x.clone().requires_grad_()
        z = implicit.root_solve(
            g,
            torch.zeros_like(x),
            x,
            solver=solver,
            backward=linear.GMRES(use_hints=True),
            tol=TOL,
            max_iter=500,
            batched=True,
            **options,
        )
    finally:
        RootProblem.solve = keep
    v = 2 * z.detach() / z.numel()
    w = hints[-1].solve(v, transposed=True)
    # −(∂g/∂x)ᵀ w with ∂g/∂x = ∂g/∂z at fixed z only through x: one vector-Jacobian product.
    _, pullback = torch.func.vjp(lambda x: g(z.detach(), x), x.detach())
    return -pullback(w)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


#: Anderson extrapolating from the start (``start_ratio=0``): on these cells the default
#: takes plain mixing steps throughout and keeps no estimate.
EXTRAPOLATE = {"start_ratio": 0.0}
CASES = [
    ("DEQ 64 x 256, |W| 0.9", lambda: deq(64, 256, 0.9), "anderson", EXTRAPOLATE),
    ("DEQ 64 x 256, |W| 0.9", lambda: deq(64, 256, 0.9), "broyden", {}),
    ("DEQ 16 x 128, |W| 0.99", lambda: deq(16, 128, 0.99), "anderson", EXTRAPOLATE),
    ("DEQ 256 x 512, |W| 0.9", lambda: deq(256, 512, 0.9), "anderson", EXTRAPOLATE),
    ("linear fixed point, spectrum to 0.995", linear_fixed_point, "anderson", {"m": 20}),
    ("nonsymmetric root", nonsymmetric_root, "broyden", {}),
    ("nonsymmetric root", nonsymmetric_root, "broyden", {"memory": 50}),
]


def main() -> None:
    torch.set_num_threads(1)
    lines = [
        "VJPs of the backward's linear solve (relative error of the gradient against a "
        f"dense solve), tol {TOL}",
        "",
        f"{'problem':40s} {'forward':20s} {'auto':>16s} {'gmres':>16s} {'gmres+hint':>16s}"
        f" {'hint alone':>16s}",
    ]
    for label, make, solver, options in CASES:
        g, x = make()
        _, reference, _ = backward(g, x, solver, options, linear.Dense())
        cells = []
        for mode in ("auto", linear.GMRES(), linear.GMRES(use_hints=True)):
            products, grad, _ = backward(g, x, solver, options, mode)
            cells.append(f"{products:4d} ({rel_err(grad, reference):.0e})")
        alone = estimate_alone(g, x, solver, options)
        cells.append(f"   1 ({rel_err(alone, reference):.0e})")
        name = solver + "".join(f", {k}={v}" for k, v in options.items())
        lines.append(f"{label:40s} {name:20s} " + " ".join(f"{c:>16s}" for c in cells))
        print(lines[-1], flush=True)
    out = ROOT / "benchmarks" / "results" / "hints.txt"
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
