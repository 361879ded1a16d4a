"""What capture discovery at the solution costs: one more evaluation of ``f``.

From the repository root::

    python benchmarks/recapture.py

A DEQ step ``z = tanh(z Wᵀ + x)`` (``W`` captured, ``x`` explicit, both requiring
grad; Anderson at ``tol=1e-4``, the default backward) at three sizes: the time of one
evaluation of ``f``, of the discovery at the solution (``f`` under the recording mode),
and of the whole solve and backward, best of 5 repeats on one thread.
"""

from __future__ import annotations

import time
from functools import partial

import torch

import implicit
from implicit._problem import Problem


def best_of(fn, repeats: int) -> float:
    """Microseconds per call, the best of 5 runs of ``repeats`` calls."""
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("batch   n   f (µs)  discovery at z* (µs)  solve + backward (µs)  share")
    for batch, n in ((4, 8), (32, 64), (64, 256)):
        w = (0.5 * torch.randn(n, n) / n**0.5).requires_grad_()
        x = torch.randn(batch, n, requires_grad=True)

        def f(z, x, w=w):
            return torch.tanh(z @ w.T + x)

        def step(f=f, x=x, batch=batch, n=n):
            z = implicit.fixed_point(f, torch.zeros(batch, n), x, batched=True, tol=1e-4)
            z.sum().backward()

        problem = Problem(f, torch.zeros(batch, n), (x,), batched=True, form="fixed_point")
        z = torch.randn(batch, n)
        problem.discover(z)
        with torch.no_grad():
            evaluation = best_of(partial(f, z, x), 200)
        discovery = best_of(partial(problem.rediscover, z), 200)
        total = best_of(step, 20)
        print(
            f"{batch:5d} {n:3d} {evaluation:8.1f} {discovery:21.1f} {total:22.1f}"
            f"  {100 * discovery / total:4.1f}%"
        )


if __name__ == "__main__":
    main()
