"""``python -m implicit``: a short tour that shows the library working.

Each section solves a problem with ``implicit`` and checks the derivative it gets
against an independent answer (a closed form, another solver, torch's own solve):

1. ``z = tanh(W z + x)`` (``n = 10``) with every forward solver; ``dz*/dx`` from the
   implicit backward against the closed form ``(I − D W)⁻¹ D``, ``D = diag(1 − z*²)``.
2. ``implicit_inverse_layer``: ``asin`` by numpy as the inverse of ``torch.sin``.
3. ``scipy.linalg.solve`` made differentiable by ``custom_root``.
4. ``dz*/dx`` through Anderson acceleration against Newton and the implicit function
   theorem by hand.
5. Bilevel: per-feature ridge penalties tuned through an inner solve (the
   hypergradient and a Hessian-vector product against the closed form).
6. Optimisation layers: a ridge hypergradient through ``minimize``, a least-squares
   fit with the exact Hessian, derivatives through bounds and brackets
   (``implicit._tour_optim``).
7. Trains a small DEQ classifier on scikit-learn's digits with the implicit backward
   and with ``backward="unroll"`` and compares them (``implicit._tour_deq``; needs the
   ``[examples]`` extra).

Sections 2-4 are the scripts of ``examples/`` in brief.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

import numpy as np
import scipy.linalg
import torch

import implicit
from implicit import _tour_deq, _tour_optim


def tanh_problem(n: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=generator, dtype=torch.float64)
    w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(n, generator=generator, dtype=torch.float64)
    return w, x


def tour_solvers(n: int = 10) -> list[dict[str, object]]:
    """One row per forward solver: convergence, cost and the gradient's error."""
    w, x = tanh_problem(n)

    def f(z, x):
        return torch.tanh(w @ z + x)

    # torch.func compiles its first call of each kind: keep that out of the timings.
    torch.func.jacrev(lambda x: implicit.fixed_point(f, torch.zeros(n, dtype=x.dtype), x))(x)
    rows = []
    for name in sorted(implicit.solvers.NAMES):
        start = time.perf_counter()
        z, info = implicit.fixed_point(
            f,
            torch.zeros(n, dtype=torch.float64),
            x,
            solver=name,
            tol=1e-10,
            max_iter=500,
            return_info=True,
        )
        jac = torch.func.jacrev(
            lambda x, name=name: implicit.fixed_point(
                f, torch.zeros(n, dtype=torch.float64), x, solver=name, tol=1e-10, max_iter=500
            )
        )(x)
        elapsed = time.perf_counter() - start
        d = 1 - z**2
        closed_form = torch.linalg.solve(
            torch.eye(n, dtype=torch.float64) - d[:, None] * w, torch.diag(d)
        )
        error = float(
            torch.linalg.matrix_norm(jac - closed_form) / torch.linalg.matrix_norm(closed_form)
        )
        rows.append(
            {
                "solver": name,
                "status": info.status,
                "iterations": info.iterations,
                "f_evals": info.f_evals,
                "residual": float(info.residual),
                "dz/dx rel. error": error,
                "time [ms]": 1e3 * elapsed,
            }
        )
    return rows


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def tour_inverse_layer() -> float:
    """``implicit_inverse_layer``: ``dz/dy`` against ``1 / sqrt(1 − y²)``, the worst error."""
    data = torch.linspace(-0.95, 0.95, 201, requires_grad=True)
    y = implicit.implicit_inverse_layer(
        data, lambda y: torch.from_numpy(np.arcsin(y.numpy())), forward_func=torch.sin
    )
    y.backward(torch.ones_like(y))
    expected = 1 / torch.sqrt(1 - data.detach() ** 2)
    return float(((data.grad - expected).abs() / expected).max())


def tour_custom_root(n: int = 10) -> float:
    """``scipy.linalg.solve`` under ``custom_root``; gradients against torch's solve's."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=generator, dtype=torch.float64) + n * torch.eye(n)
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    a.requires_grad_()
    b.requires_grad_()
    solve = implicit.custom_root(lambda z, a, b: a @ z - b, tol=1e-12)(
        lambda a, b: scipy.linalg.solve(a.numpy(), b.numpy())
    )
    grads = torch.autograd.grad(solve(a, b).sin().sum(), [a, b])
    refs = torch.autograd.grad(torch.linalg.solve(a, b).sin().sum(), [a, b])
    return max(_relative(got, want) for got, want in zip(grads, refs))


def tour_anderson(n: int = 10) -> float:
    """``dz*/dx`` through Anderson against Newton's root and the IFT by hand."""
    w, x = tanh_problem(n)
    z0 = torch.zeros(n, dtype=torch.float64)

    def g(z, x):
        return torch.tanh(w @ z + x) - z

    through_anderson = torch.func.jacrev(
        lambda x: implicit.fixed_point(
            lambda z, x: torch.tanh(w @ z + x), z0, x, solver="anderson", tol=1e-12
        )
    )(x)
    z = implicit.root_solve(g, z0, x, solver="newton", tol=1e-12)
    by_hand = -torch.linalg.solve(
        torch.func.jacrev(g, argnums=0)(z, x), torch.func.jacrev(g, argnums=1)(z, x)
    )
    return _relative(through_anderson, by_hand)


def tour_bilevel(features: int = 6, samples: int = 20) -> dict[str, float]:
    """A bilevel problem's derivatives through a solve, against the closed form.

    The inner problem fits ridge regression with one penalty ``exp(θ_j)`` per feature by
    ``root_solve`` on its optimality condition; the outer loss is the validation error.
    Returns the relative errors of the hypergradient ``dL/dθ`` (implicit backward) and of
    a Hessian-vector product (double backward) against autograd through
    ``w* = (XᵀX + diag(exp θ))⁻¹ Xᵀy``.
    """
    generator = torch.Generator().manual_seed(2)
    x_train, x_val = (
        torch.randn(samples, features, generator=generator, dtype=torch.float64) for _ in range(2)
    )
    y_train, y_val = (
        torch.randn(samples, generator=generator, dtype=torch.float64) for _ in range(2)
    )

    def optimality(w, theta):
        return x_train.T @ (x_train @ w - y_train) + theta.exp() * w

    def fit(theta):
        w0 = torch.zeros(features, dtype=torch.float64)
        return implicit.root_solve(optimality, w0, theta, backward="cg", tol=1e-12)

    def closed_form(theta):
        gram = x_train.T @ x_train + torch.diag(theta.exp())
        return torch.linalg.solve(gram, x_train.T @ y_train)

    def derivatives(fit):
        theta = torch.zeros(features, dtype=torch.float64, requires_grad=True)
        loss = 0.5 * ((x_val @ fit(theta) - y_val) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        (hvp,) = torch.autograd.grad(grad, theta, grad_outputs=torch.ones_like(grad))
        return grad.detach(), hvp

    (grad, hvp), (grad_ref, hvp_ref) = derivatives(fit), derivatives(closed_form)
    return {"hypergradient": _relative(grad, grad_ref), "hvp": _relative(hvp, hvp_ref)}


def format_table(rows: list[dict[str, object]]) -> str:
    headers = list(rows[0])

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.2e}" if value < 1e-2 or value >= 1e4 else f"{value:.2f}"
        return str(value)

    cells = [[cell(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


DESCRIPTION = """\
A short tour of implicit: each section solves a problem and checks the derivative it
gets against an independent answer (a closed form, another solver, torch's own solve).

  1. z = tanh(W z + x) with every forward solver, dz*/dx against the closed form
  2. implicit_inverse_layer: asin by numpy as the inverse of torch.sin
  3. scipy.linalg.solve made differentiable by implicit.custom_root
  4. dz*/dx through Anderson acceleration against Newton and the theorem by hand
  5. bilevel: ridge penalties tuned through an inner solve (double backward)
  6. optimisation layers: minimize, least_squares, bounds and brackets
  7. a DEQ classifier on scikit-learn's digits, implicit backward against unroll
"""

EPILOG = f"""\
The tour takes {_tour_deq.DURATION}, most of it section 7 (training the classifier
twice); --fast trains it for one epoch on 500 images and takes {_tour_deq.FAST_DURATION}.
Section 7 needs the [examples] extra:
  {_tour_deq.INSTALL_HINT}
"""

SOLVER_COLUMNS = """\
   iterations: the solver's iterations; f_evals: evaluations of f (a line search or a
   Jacobian may take more than one per iteration); residual: ‖f(z) − z‖ where it
   stopped (tol 1e-10); dz/dx rel. error: the relative error of the 10 × 10 Jacobian
   dz*/dx (torch.func.jacrev through the solve) against the closed form; time: the
   solve and the Jacobian together, wall clock (scipy converts z to numpy and back
   at every evaluation)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m implicit",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _tour_deq.add_arguments(parser)
    options = parser.parse_args(argv)
    started = time.perf_counter()
    print(f"implicit {implicit.__version__} (torch {torch.__version__})")
    duration = _tour_deq.FAST_DURATION if options.fast else _tour_deq.DURATION
    print(f"This tour takes {duration}", end="")
    print("." if options.fast else "; python -m implicit --fast is quicker.")
    print("\n1. z = tanh(W z + x), n = 10, ‖W‖₂ = 0.9, float64, solved by every forward solver.")
    print("   dz*/dx from the implicit backward against the closed form (I − D W)⁻¹ D:\n")
    print(textwrap.indent(format_table(tour_solvers()), "   "))
    print(SOLVER_COLUMNS)
    print("\n2. implicit_inverse_layer: z = asin(y) by numpy, the inverse of torch.sin.")
    print(
        f"   dz/dy against 1/sqrt(1 − y²), float32: max relative error {tour_inverse_layer():.1e}"
    )
    print("\n3. scipy.linalg.solve(A, b) made differentiable by implicit.custom_root.")
    print(f"   Gradients against torch.linalg.solve's: relative error {tour_custom_root():.1e}")
    print("\n4. dz*/dx through Anderson acceleration (torch.func.jacrev over the solve).")
    print(f"   Against Newton's root and −(∂g/∂z)⁻¹ ∂g/∂x: relative error {tour_anderson():.1e}")
    print("\n5. Bilevel: per-feature ridge penalties tuned through an inner solve.")
    errors = tour_bilevel()
    print(
        f"   Against the closed form: hypergradient {errors['hypergradient']:.1e}, "
        f"Hessian-vector product (double backward) {errors['hvp']:.1e}"
    )
    print("   The whole bilevel loop (Newton–CG on Hessian-vector products): examples/bilevel.py")
    _tour_optim.tour_optimisation("6. Optimisation layers")
    tour_deq(options)
    print(f"\nThe tour took {time.perf_counter() - started:.0f} s.")
    return 0


def tour_deq(options: argparse.Namespace) -> None:
    print("\n7. A DEQ classifier on scikit-learn's digits, trained with the implicit backward")
    print("   and, from the same initialisation, with backward='unroll':\n")
    _tour_deq.run(options, format_table)


if __name__ == "__main__":
    sys.exit(main())
