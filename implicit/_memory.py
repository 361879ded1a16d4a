"""Peak memory of one call, measured from the tensor allocator (CPU or CUDA).

``tracemalloc`` and process statistics do not see torch's allocations precisely (the
first not at all, the second only as pages, and only as a process-wide high-water
mark), so the tour and the benchmarks measure the allocator itself:

* CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak;
* CPU: the allocation and free events of ``torch.profiler`` (``profile_memory=True``),
  replayed in time order.

Either way the result is the highest number of bytes held by torch tensors during the
call, above the level at its start: activations, the autograd graph, gradients and
temporaries, but not memory allocated outside torch (Python objects, BLAS buffers). On
the CPU, a block allocated before the call and freed during it is not seen (the profiler
has no record of its size): the result is then the peak of what the call itself
allocated, an upper bound of the rise over the starting level.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


def peak_memory(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Run ``fn()`` and return its result and the peak bytes it allocated on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures 'cpu' and 'cuda' devices, not {device.type!r}")
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # Kineto logs its start and stop, and the allocator notes every block freed that was
    # allocated before the profiler started, on the C-level stderr: discard those lines.
    with _native_stderr_discarded():
        prof.start()
        try:
            result = fn()
        finally:
            prof.stop()
    # Kineto's raw events: one "[memory]" event per allocation (+bytes) or free (-bytes).
    changes = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return result, peak


@contextlib.contextmanager
def _native_stderr_discarded() -> Iterator[None]:
    """Discard what native code writes to file descriptor 2 meanwhile.

    Python's ``sys.stderr`` (warnings, progress bars) keeps writing to the real stream.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    try:
        with (
            open(os.devnull, "w") as devnull,
            os.fdopen(os.dup(saved), "w", buffering=1, errors="backslashreplace") as real,
        ):
            sys.stderr = real
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                real.flush()
                sys.stderr = python_stderr
                os.dup2(saved, 2)
    finally:
        os.close(saved)
