"""What an extrapolating Anderson step costs beside a Picard step, on a DEQ cell.

Problem (float32, seed 0)::

    z = tanh(W z + x),   ‖W‖₂ = 0.99,   x ~ N(0, 1),   z0 = 0

at batch × width 64 × 256 and 256 × 512. The contraction is slow, so Anderson (its
defaults, ``m = 5``) extrapolates from its second step on. Each solver runs the forward
solve alone (no input requires grad) with a tolerance no iterate meets, so that it
takes exactly ``max_iter`` iterations, at two values of ``max_iter``: the fit
``time = a + b·k`` gives the cost of one iteration ``b`` (one evaluation of ``f``, the
solver's step and the driver's test). The counts (aten ops and host reads per
iteration: those that return a Python value) come from one more, untimed, solve at each
``max_iter``. One process, one thread, CPU time, rounds interleaving every contender;
medians over rounds.

Run from the repository root: ``python benchmarks/anderson_step.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]  # the checkout this file is in

from small_solve import HostReads, cpu_model, fit  # noqa: E402

import implicit  # noqa: E402

SIZES = ((64, 256), (256, 512))
KS = (10, 30)
ROUNDS = 11
SOLVERS = {"picard": "fixed_point", "anderson": "anderson"}


def problem(batch: int, width: int):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(width, width, generator=gen)
    W = 0.99 * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(batch, width, generator=gen)
    return W, x


def solve(solver: str, W: torch.Tensor, x: torch.Tensor, k: int):
    """The forward solve, ``k`` iterations exactly (its tolerance is never met)."""
    return implicit.fixed_point(
        lambda z, x: torch.tanh(z @ W.T + x),
        torch.zeros_like(x),
        x,
        solver=solver,
        tol=1e-30,
        max_iter=k,
        batched=True,
        on_failure="ignore",
        return_info=True,
    )


def per_iteration_counts(solver: str, W: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Aten ops and host reads per iteration (the difference between the two ``k``)."""
    seen = []
    for k in KS:
        with HostReads() as reads:
            solve(solver, W, x, k)
        seen.append((reads.calls, reads.count))
    (ops1, reads1), (ops2, reads2) = seen
    return (ops2 - ops1) / (KS[1] - KS[0]), (reads2 - reads1) / (KS[1] - KS[0])


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, one thread")
    print(f"z = tanh(W z + x), ‖W‖₂ = 0.99, k = {KS} iterations; µs per iteration, CPU time")
    for batch, width in SIZES:
        W, x = problem(batch, width)
        for solver in SOLVERS.values():  # the iteration counts are what the fit assumes
            _, info = solve(solver, W, x, KS[0])
            assert info.iterations == KS[0] and info.status == "max_iter", info
        samples = {(name, k): [] for name in SOLVERS for k in KS}
        with torch.no_grad():
            for _ in range(ROUNDS):
                for (name, k), times in samples.items():
                    solve(SOLVERS[name], W, x, k)  # warm
                    start = time.process_time()
                    solve(SOLVERS[name], W, x, k)
                    times.append(time.process_time() - start)
        per = {}
        for name, solver in SOLVERS.items():
            _, per[name] = fit({k: statistics.median(samples[name, k]) for k in KS})
            ops, reads = per_iteration_counts(solver, W, x)
            print(
                f"  {batch:3d} × {width:3d}  {name:8s}  b = {per[name] * 1e6:7.1f}   "
                f"({ops:.0f} aten ops, {reads:.0f} host reads per iteration)"
            )
        ratio = per["anderson"] / per["picard"]
        print(f"  {batch:3d} × {width:3d}  anderson / picard  {ratio:.2f}x")


if __name__ == "__main__":
    main()
