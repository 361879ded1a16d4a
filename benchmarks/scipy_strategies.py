"""Scipy solver: one scipy solve per sample, or one block solve of the whole batch?

Also: does handing hybr / lm the exact Jacobian (autograd) beat their finite
differences? Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/scipy_strategies.py [--quick]

Problem: the fixed point ``z = tanh(W z + x)`` (‖W‖₂ = 0.9), batched, float64,
``tol = 1e-8``; forward solve only (no graph). Prints the median wall time of
``repeats`` solves and the number of batched evaluations of ``g``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import implicit
from implicit.solvers.scipy import _WITH_JACOBIAN, METHODS


def problem(batch: int, n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=generator, dtype=torch.float64)
    w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(batch, n, generator=generator, dtype=torch.float64)
    return (lambda z, x: torch.tanh(z @ w.T + x)), x


def measure(solver, batch: int, n: int, repeats: int) -> tuple[float, int, str]:
    f, x = problem(batch, n)
    times = []
    for attempt in range(repeats + 1):  # the first (untimed) warms up torch and scipy
        start = time.perf_counter()
        _, info = implicit.fixed_point(
            f,
            torch.zeros_like(x),
            x,
            solver=solver,
            tol=1e-8,
            max_iter=200,
            batched=True,
            on_failure="ignore",
            return_info=True,
        )
        if attempt:
            times.append(time.perf_counter() - start)
    return statistics.median(times), info.f_evals, info.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    options = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [(1, 10), (16, 10), (64, 10), (16, 50)]
    if options.quick:
        sizes = [(1, 10), (16, 10)]
    repeats = 1 if options.quick else 3
    print(f"{'method':15s} {'B':>3s} {'n':>3s} {'variant':22s} {'ms':>9s} {'g evals':>8s}  status")
    for method in METHODS:
        variants = [("block", None), ("per_sample", None)]
        if method in _WITH_JACOBIAN:
            variants = [(s, j) for s in ("block", "per_sample") for j in (True, False)]
        variants.append(("auto", None))  # the default
        for batch, n in sizes:
            for strategy, jacobian in variants:
                solver = implicit.solvers.Scipy(method, strategy=strategy, jacobian=jacobian)
                seconds, evals, status = measure(solver, batch, n, repeats)
                label = strategy + ("" if jacobian is None else f", jacobian={jacobian}")
                print(
                    f"{method:15s} {batch:3d} {n:3d} {label:22s} {1e3 * seconds:9.1f} "
                    f"{evals:8d}  {status}"
                )


if __name__ == "__main__":
    main()
