"""A DEQ training step in mixed precision: gradient errors against float64, and times.

One step is a forward solve of ``z = tanh(W z + x)`` (``‖W‖₂ = 0.7``, batch × width)
and ``loss.backward()`` of ``Σ z²`` to ``x`` and ``W``, in five precisions:

* ``float32``: the reference of what float32 gives at the same tolerance;
* ``autocast bf16`` / ``autocast fp16``: float32 states and parameters, the cell run
  under ``torch.autocast(device_type="cpu", dtype=...)`` (its matrix product in half
  precision); the solvers' and the backward's arithmetic in float32;
* ``bf16 states`` / ``fp16 states``: the cell and the state in half precision; the
  solvers' norms, small systems and the backward's linear solves in float32 around
  products evaluated in the half dtype (``implicit/_batch.py``), the answer and the
  gradients in the half dtype.

For each: the forward and backward statuses, the relative errors of ``z``, ``∂L/∂x``
and ``∂L/∂W`` against the same step in float64 (tolerance 1e-12; the half-precision
rows from the inputs rounded to their dtype), and the median time of a step. Two
tolerances: the ``DEQ`` default (1e-4) and 1e-3.

Run from the repository root: ``python benchmarks/mixed_precision.py`` (under a
minute); the output is ``benchmarks/results/mixed_precision.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import implicit  # noqa: E402

#: name: (the dtype of the cell and the state, the autocast dtype or None)
PRECISIONS = {
    "float32": (torch.float32, None),
    "autocast bf16": (torch.float32, torch.bfloat16),
    "autocast fp16": (torch.float32, torch.float16),
    "bf16 states": (torch.bfloat16, None),
    "fp16 states": (torch.float16, None),
}


def cell(width: int, dtype: torch.dtype) -> torch.nn.Linear:
    """The same ``Linear`` (``‖W‖₂ = 0.7``) in ``dtype`` for every call."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(width, width)
    with torch.no_grad():
        layer.weight.mul_(0.7 / torch.linalg.matrix_norm(layer.weight, ord=2))
    return layer.to(dtype)


def step(layer, x, autocast, tol):
    """One training step; ``z``, the gradients, the report and the warnings' statuses."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad()
    deq = implicit.DEQ(lambda z, x: torch.tanh(layer(z) + x), tol=tol, on_failure="ignore")
    context = (
        torch.autocast(device_type="cpu", dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    with context:
        z = deq(x)
        loss = z.float().square().sum()
    loss.backward()
    return z.detach(), x.grad, layer.weight.grad, deq.last_info


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def measure(name: str, batch: int, width: int, tol: float, repeats: int) -> dict:
    dtype, autocast = PRECISIONS[name]
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(1)).to(dtype)
    layer = cell(width, dtype)
    z, gx, gw, info = step(layer, x, autocast, tol)
    # The reference: the same step in float64 from the inputs as this row sees them.
    reference = cell(width, torch.float64)
    reference.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    z64, gx64, gw64, _ = step(reference, x.double(), None, 1e-12)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(layer, x, autocast, tol)
        times.append(time.perf_counter() - start)
    return {
        "precision": name,
        "tol": tol,
        "forward": f"{info.status} ({info.iterations})",
        "backward": f"{info.backward.status} ({info.backward.iterations})",
        "z": relative_error(z, z64),
        "dL/dx": relative_error(gx, gx64),
        "dL/dW": relative_error(gw, gw64),
        "ms": 1e3 * statistics.median(times),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux), else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(
        f"DEQ training step, batch {options.batch} × width {options.width}, "
        f"torch {torch.__version__}, {cpu_model()}, "
        f"one thread; errors relative to the step in float64\n"
    )
    header = (
        f"{'precision':<14} {'tol':>6} {'forward':>15} {'backward':>15} "
        f"{'z':>8} {'dL/dx':>8} {'dL/dW':>8} {'ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for tol in options.tol:
        for name in PRECISIONS:
            row = measure(name, options.batch, options.width, tol, options.repeats)
            print(
                f"{row['precision']:<14} {row['tol']:>6.0e} {row['forward']:>15} "
                f"{row['backward']:>15} {row['z']:>8.1e} {row['dL/dx']:>8.1e} "
                f"{row['dL/dW']:>8.1e} {row['ms']:>7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
