"""torch.func transforms through a solve: what folding the vmapped slices buys.

``vmap`` (and ``jacrev`` / ``jacfwd`` / ``hessian``, which vmap the backward or the
tangent solve) used to solve one vmapped slice after another. The core now folds the
slices into the batch of one solve; where only the right-hand sides differ (a Jacobian's
rows) the system is linearised once for all of them. Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/transforms.py

Problem: the fixed point ``z = tanh(W z + x)`` (‖W‖₂ = 0.7), float64,
``tol = 1e-12``, Anderson forward. Prints the median wall time of ``repeats`` runs after
one warm-up run. To compare with another version of the package, point ``PYTHONPATH`` at
it (results/transforms.txt holds both columns).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import implicit


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: torch.func traces and caches on first use
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def cases(n: int, backward: str):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=generator, dtype=torch.float64)
    w *= 0.7 / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(n, generator=generator, dtype=torch.float64)
    xs = torch.randn(16, 8, n, generator=generator, dtype=torch.float64)

    def solve(x, batched=False):
        return implicit.fixed_point(
            lambda z, x: torch.tanh(z @ w.T + x),
            torch.zeros_like(x),
            x,
            backward=backward,
            batched=batched,
            tol=1e-12,
            max_iter=500,
        )

    def loss(x):
        return solve(x).pow(2).sum()

    return {
        "jacrev": lambda: torch.func.jacrev(solve)(x),
        "jacfwd": lambda: torch.func.jacfwd(solve)(x),
        "hessian": lambda: torch.func.hessian(loss)(x),
        "vmap, 16 x (8 batched)": lambda: torch.func.vmap(lambda x: solve(x, batched=True))(xs),
        "vmap(grad), 16": lambda: torch.func.vmap(torch.func.grad(loss))(xs[:, 0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"implicit from {implicit.__file__}")
    print(f"{'n':>3}  {'backward':8}  {'transform':24}  {'median [ms]':>11}")
    for n in (8, 32):
        for backward in ("dense", "gmres"):
            for name, fn in cases(n, backward).items():
                print(f"{n:>3}  {backward:8}  {name:24}  {timed(fn, args.repeats):11.1f}")


if __name__ == "__main__":
    main()
