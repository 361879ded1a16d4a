"""The fixed and per-iteration cost of a small solve, against a hand-written eager loop.

Problem (float32, one sample of width 8, seed 0)::

    z = tanh(W z + x),   ‖W‖₂ = 0.9,   x ~ N(0, 0.01),   z0 = 0,   loss = Σ z²

``W`` is captured by the map (a closure variable), ``x`` is an argument; both require
grad. One *training step* is ``fixed_point(..., solver="fixed_point",
backward=Neumann(...))`` (Picard forward, Neumann backward), the loss and its
``backward()``. The eager loop does the same arithmetic by hand, as DEQ code commonly
does: Picard under ``no_grad`` with the same stopping test, one evaluation of ``f``
recorded at the solution, and a backward hook that runs the Neumann series
``w ← (∂f/∂z)ᵀ w + v`` by ``torch.autograd.grad`` with the same test.

Both converge at exactly ``k`` forward and ``k`` backward iterations: the tolerances
of each ``k`` are chosen so (between the residuals of iterations ``k − 1`` and ``k``,
which the map's contraction of about 0.9 keeps apart), with room in ``max_iter``, so
that every solve ends as a converged one does. Each is timed at two values of ``k``:
the fit ``time = a + b·k`` gives the fixed cost ``a`` and the cost per iteration ``b``
(one forward and one backward iteration).
The same for the forward alone (no input requires grad). One process, one thread, CPU
time, rounds interleaving every contender; medians over rounds. The counts (aten ops;
host reads: those that return a Python value; autograd-engine passes) come from one
more, untimed, step of each.

Run from the repository root: ``python benchmarks/small_solve.py``.
"""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]  # the checkout this file is in

import implicit  # noqa: E402

WIDTH = 8
KS = (4, 16)
ROUNDS = 21
CALLS = 40
#: Room for the solves beyond the iterations they converge in.
SPARE = 10


def problem(grad: bool = True):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(WIDTH, WIDTH, generator=gen)
    W = 0.9 * W / torch.linalg.matrix_norm(W, ord=2)
    x = 0.1 * torch.randn(1, WIDTH, generator=gen)
    return W.requires_grad_(grad), x.requires_grad_(grad)


def tolerances(k: int) -> tuple[float, float]:
    """The forward and the backward tolerance at which the library's solves converge at
    iteration ``k`` exactly: the geometric mean of the forward's residuals at ``k − 1``
    and ``k``, and the middle (in log scale) of the backward tolerances that end at
    ``k``."""
    W, x = problem(True)
    _, info = _solve(W, x, implicit.linear.Neumann(tol=1e-12, max_iter=1), 1e-12, k + 1, True)
    scale = float(torch.linalg.vector_norm(torch.tanh(x.detach())))  # max(‖z0‖, ‖f(z0)‖)
    forward = math.sqrt(info.history[k - 1] * info.history[k]) / (1 + scale)
    ending = [
        tol
        for tol in torch.logspace(-10, -1, 400, dtype=torch.float64).tolist()
        if library_step(W, x, k, info=True, tols=(forward, tol)).backward.iterations == k
    ]
    W.grad = x.grad = None
    return forward, math.sqrt(ending[0] * ending[-1])


def library_step(W, x, k: int, info: bool = False, tols: tuple[float, float] | None = None):
    forward, _, backward = SETTINGS[k] if tols is None else (*tols, _neumann(tols[1], k))
    # The forward alone is an inference call: nothing requires grad, grad mode off.
    with torch.enable_grad() if W.requires_grad else torch.no_grad():
        out = _solve(W, x, backward, forward, k + SPARE, info)
    z = out[0] if info else out
    if W.requires_grad:
        z.square().sum().backward()
    return out[1] if info else None


def _neumann(tol: float, k: int) -> implicit.linear.Neumann:
    return implicit.linear.Neumann(tol=tol, max_iter=k + SPARE)


def _solve(W, x, backward, tol: float, max_iter: int, info: bool):
    return implicit.fixed_point(
        lambda z, x: torch.tanh(z @ W.T + x),
        torch.zeros(1, WIDTH),
        x,
        solver="fixed_point",
        backward=backward,
        tol=tol,
        max_iter=max_iter,
        batched=True,
        on_failure="ignore",
        return_info=info,
    )


#: Per iteration count: the forward and backward tolerances, and the backward solver
#: (made once: solvers are reusable configuration).
SETTINGS: dict[int, tuple[float, float, implicit.linear.Neumann]] = {}


def eager_step(W, x, k: int) -> None:
    forward_tol, backward_tol, _ = SETTINGS[k]

    def f(z):
        return torch.tanh(z @ W.T + x)

    with torch.no_grad():
        z = torch.zeros(1, WIDTH)
        fz = f(z)
        r = fz - z
        threshold = forward_tol * (1 + max(z.norm(), fz.norm()).item())
        for _ in range(k + SPARE):
            z = fz
            fz = f(z)
            r = fz - z
            if r.norm().item() <= threshold:
                break
    if not W.requires_grad:
        return
    z = z.requires_grad_()
    new_z = f(z)

    def hook(v):
        handle.remove()  # the products below pass through new_z again
        w = v
        threshold = backward_tol * v.norm().item()
        for _ in range(k + SPARE):
            w_new = torch.autograd.grad(new_z, z, w, retain_graph=True)[0] + v
            done = (w_new - w).norm().item() <= threshold
            w = w_new
            if done:
                break
        return w

    handle = new_z.register_hook(hook)
    new_z.square().sum().backward()


class HostReads(TorchDispatchMode):
    """Counts the aten ops that hand a value to the host (``count``), and every aten op
    (``calls``: what a step costs in dispatches, whatever the tensors' size)."""

    NAMES = ("_local_scalar_dense", "is_nonzero", "equal")

    def __init__(self):
        super().__init__()
        self.count = self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if func.__name__.split(".")[0] in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


class EnginePasses:
    """Counts the calls into autograd's C++ engine (``backward()``, ``grad``)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        variable = torch.autograd.Variable
        self._engine = engine = variable._execution_engine
        counter = self

        class Counting:
            def run_backward(self, *args, **kwargs):
                counter.count += 1
                return engine.run_backward(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(engine, name)

        variable._execution_engine = Counting()
        return self

    def __exit__(self, *exc):
        torch.autograd.Variable._execution_engine = self._engine


def counts(step, W, x, k: int) -> tuple[int, int, int]:
    """Host reads, autograd-engine passes and aten ops of one ``step(W, x, k)``."""
    with HostReads() as reads, EnginePasses() as passes:
        step(W, x, k)
    W.grad = x.grad = None
    return reads.count, passes.count, reads.calls


def settle() -> None:
    """Choose the tolerances of every iteration count (once per process)."""
    for k in KS:
        if k not in SETTINGS:
            forward, backward = tolerances(k)
            SETTINGS[k] = (forward, backward, _neumann(backward, k))


def fit(times: dict[int, float]) -> tuple[float, float]:
    """``(a, b)`` with ``time = a + b·k`` through the two measured points."""
    (k1, t1), (k2, t2) = sorted(times.items())
    b = (t2 - t1) / (k2 - k1)
    return t1 - b * k1, b


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    settle()
    train = problem(True)
    frozen = problem(False)
    contenders = {
        "library": (library_step, train),
        "eager": (eager_step, train),
        "library forward": (library_step, frozen),
        "eager forward": (eager_step, frozen),
    }
    for k in KS:  # the iteration counts are what the fit assumes
        info = library_step(*train, k, info=True)
        assert info.iterations == info.backward.iterations == k, (k, info)
        assert info.status == info.backward.status == "converged", (k, info)
    samples = {(name, k): [] for name in contenders for k in KS}
    for _ in range(ROUNDS):
        for (name, k), times in samples.items():
            step, (W, x) = contenders[name]
            step(W, x, k)  # warm
            start = time.process_time()
            for _ in range(CALLS):
                step(W, x, k)
            times.append((time.process_time() - start) / CALLS)
            W.grad = x.grad = None
    median = {key: statistics.median(times) for key, times in samples.items()}
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, one thread")
    print(f"n = {WIDTH}, batch 1, k = {KS} forward and backward iterations; µs, CPU time")
    fits = {}
    for name, (step, (W, x)) in contenders.items():
        a, b = fit({k: median[name, k] for k in KS})
        fits[name] = a, b
        reads, passes, calls = counts(step, W, x, KS[0])
        print(
            f"  {name:16s} a = {a * 1e6:7.1f}  b = {b * 1e6:6.2f}   "
            f"(k = {KS[0]}: {calls} aten ops, {reads} host reads, {passes} engine passes)"
        )
    for what in ("", " forward"):
        (a_l, b_l), (a_e, b_e) = fits["library" + what], fits["eager" + what]
        print(
            f"  ratio{what or ' step':9s} fixed {a_l / a_e:5.2f}x   per iteration {b_l / b_e:5.2f}x"
        )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
