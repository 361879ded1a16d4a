"""``python -m implicit``: a short tour that shows the library working.

Solves the seed notebook's problem ``z = tanh(W z + x)`` (``n = 10``) with every
forward solver and checks ``dz*/dx`` from the implicit backward against the closed
form ``−(∂g/∂z)⁻¹ ∂g/∂x = (I − D W)⁻¹ D`` with ``D = diag(1 − z*²)``.

Then trains a small DEQ classifier on scikit-learn's digits with the implicit backward
and with ``backward="unroll"`` and compares them (see ``implicit._tour_deq``; needs the
``[examples]`` extra).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import implicit
from implicit import _tour_deq


def seed_problem(n: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=generator, dtype=torch.float64)
    w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(n, generator=generator, dtype=torch.float64)
    return w, x


def tour_solvers(n: int = 10) -> list[dict[str, object]]:
    """One row per forward solver: convergence, cost and the gradient's error."""
    w, x = seed_problem(n)

    def f(z, x):
        return torch.tanh(w @ z + x)

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m implicit", description=__doc__.split("\n\n")[0]
    )
    _tour_deq.add_arguments(parser)
    options = parser.parse_args(argv)
    print(f"implicit {implicit.__version__} (torch {torch.__version__})\n")
    print("1. The seed problem z = tanh(W z + x), n = 10, ‖W‖₂ = 0.9, float64.")
    print("   dz*/dx from the implicit backward against the closed form (I − D W)⁻¹ D:\n")
    print(format_table(tour_solvers()))
    tour_deq(options)
    return 0


def tour_deq(options: argparse.Namespace) -> None:
    print("\n2. A DEQ classifier on scikit-learn's digits, trained with the implicit backward")
    print("   and, from the same initialisation, with backward='unroll':\n")
    _tour_deq.run(options, format_table)


if __name__ == "__main__":
    sys.exit(main())
