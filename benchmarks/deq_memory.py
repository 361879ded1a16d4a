"""Peak memory of a DEQ training step against ``max_iter``: implicit backward vs unroll.

One step is a forward solve of ``z = tanh(W z + x)`` (batch × width, float32) and
``loss.backward()`` to ``W``, ``x`` and the bias. The tolerance is unreachable, so every
solve runs exactly ``max_iter`` iterations (and the iterative backward modes
``max_iter`` iterations too). Each configuration runs in a fresh process and reports:

* ``alloc``: the most memory torch's allocator held during the step, above the level
  at its start (``implicit._memory.peak_memory``: CPU allocation/free events of
  ``torch.profiler``, or ``torch.cuda.max_memory_allocated`` on a GPU);
* ``rss``: the growth of the process's peak resident set size (``ru_maxrss``) over the
  step (after a warm-up step on two samples, without the profiler): what the operating
  system saw, allocator caching and page granularity included;
* ``seconds``: the wall time of that step.

Run: ``python benchmarks/deq_memory.py`` (add ``--batch 128 --width 256`` for a quick
look). Results for the default sizes: ``benchmarks/results/deq_memory.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(mode: str, max_iter: int, batch: int, width: int, solver: str, device: str) -> dict:
    """One training step in this process; its peak memory and time."""
    import torch

    import implicit
    from implicit._memory import peak_memory

    torch.manual_seed(0)
    cell = torch.nn.Linear(width, width, device=device)
    with torch.no_grad():
        cell.weight.mul_(0.5 / torch.linalg.matrix_norm(cell.weight, ord=2))
    x = torch.randn(batch, width, device=device, requires_grad=True)
    deq = implicit.DEQ(
        lambda z, x: torch.tanh(cell(z) + x),
        solver=solver,
        backward=mode,
        tol=1e-30,  # unreachable: exactly max_iter iterations
        max_iter=max_iter,
        on_failure="ignore",
    )

    def step(x: torch.Tensor) -> None:
        deq(x).pow(2).mean().backward()

    # Warm up on two samples: the first backward imports and initialises parts of torch
    # (tens of MiB of resident memory) that would otherwise be counted below.
    step(x[:2].detach().requires_grad_())
    rss_before = _current_rss()
    start = time.perf_counter()
    step(x)
    seconds = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    # The allocator's view comes from a second step under the profiler, whose own
    # records would otherwise inflate the resident set measured above.
    _, peak = peak_memory(lambda: step(x), device)
    info = deq.last_info
    return {
        "mode": mode,
        "max_iter": max_iter,
        "iterations": info.iterations,
        "backward iterations": info.backward.iterations if info.backward else None,
        "backward status": info.backward.status if info.backward else None,
        "alloc MiB": peak / 2**20,
        "rss MiB": max(0, rss_peak - rss_before) / 2**20,
        "seconds": seconds,
    }


def _current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--max-iter", type=int, nargs="+", default=[20, 60, 200])
    parser.add_argument("--modes", nargs="+", default=["auto", "neumann", "gmres", "unroll"])
    parser.add_argument("--solver", default="anderson")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: MODE,MAX_ITER
    options = parser.parse_args()
    if options.one:
        mode, max_iter = options.one.split(",")
        row = measure(
            mode, int(max_iter), options.batch, options.width, options.solver, options.device
        )
        print(json.dumps(row))
        return
    print(
        f"DEQ training step, batch {options.batch} × width {options.width}, float32, "
        f"solver {options.solver!r}, device {options.device}, one process per row\n"
    )
    header = f"{'mode':<9} {'max_iter':>8} {'iters':>6} {'bwd iters':>9} {'bwd status':>10} "
    header += f"{'alloc MiB':>10} {'rss MiB':>9} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KINETO_LOG_LEVEL": "5"}
    for mode in options.modes:
        for max_iter in options.max_iter:
            command = [
                sys.executable,
                __file__,
                "--one",
                f"{mode},{max_iter}",
                "--batch",
                str(options.batch),
                "--width",
                str(options.width),
                "--solver",
                options.solver,
                "--device",
                options.device,
            ]
            output = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            row = json.loads(output.stdout.strip().splitlines()[-1])
            backward = "-" if row["backward iterations"] is None else row["backward iterations"]
            status = row["backward status"] or "-"
            print(
                f"{row['mode']:<9} {row['max_iter']:>8} {row['iterations']:>6} {backward:>9} "
                f"{status:>10} "
                f"{row['alloc MiB']:>10.1f} {row['rss MiB']:>9.1f} {row['seconds']:>8.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
