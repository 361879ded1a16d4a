"""Which forward solver and which backward mode, by kind of problem: measured.

Run from the repository root: ``python benchmarks/solver_choice.py`` (about a minute;
the output is ``benchmarks/results/solver_choice.txt``, quoted by docs/choosing.md).

Forward (float64, tol 1e-8, max_iter 500, batch B of independent problems):

* ``contractive``: ``z = tanh(W z + x)``, ``‖W‖₂ = 0.9``, B = 16, n = 32 (a DEQ cell);
* ``slow``: the same with ``W = 0.99 Q`` (``Q`` orthogonal) and ``x`` small, so that the
  map is barely contractive;
* ``oscillating``: ``z = x − 1.5 tanh(S z)``, ``S`` symmetric positive semi-definite with
  ``‖S‖₂ = 1``: ``∂f/∂z`` has eigenvalues down to −1.5, so plain Picard iteration
  diverges;
* ``root``: ``g = A z + z³ − b``, ``A`` symmetric positive definite with condition
  number 100, B = 16, n = 32: a root problem that is not a fixed point of a contraction;
* ``large``: ``contractive`` with one problem of n = 2000 (matrix-free territory).

Backward (the gradient of ``Σ c ⊙ z`` for ``contractive`` and ``root``, n = 32 and
n = 2000): time of ``backward()``, products used, relative error against ``dense`` at
``tol = 1e-12``.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch

import implicit

torch.set_num_threads(1)
F64 = torch.float64
REPEATS = 5


def orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]


def problems() -> dict[str, tuple[str, object, torch.Tensor, tuple]]:
    """name -> (kind, function, z0, args): kind is "fixed_point" or "root"."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    w = torch.randn(32, 32, generator=gen, dtype=F64)
    w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(16, 32, generator=gen, dtype=F64)
    out["contractive"] = ("fixed_point", lambda z, x: torch.tanh(z @ w.T + x), x * 0, (x,))
    q = 0.99 * orthogonal(32, gen)
    xs = 0.01 * torch.randn(16, 32, generator=gen, dtype=F64)
    out["slow"] = ("fixed_point", lambda z, x: torch.tanh(z @ q.T + x), xs * 0, (xs,))
    s = torch.randn(32, 32, generator=gen, dtype=F64)
    s = s @ s.T
    s /= torch.linalg.matrix_norm(s, ord=2)
    out["oscillating"] = ("fixed_point", lambda z, x: x - 1.5 * torch.tanh(z @ s), x * 0, (x,))
    eigen = torch.logspace(0, 2, 32, dtype=F64)
    basis = orthogonal(32, gen)
    a = (basis * eigen) @ basis.T
    b = 10 * torch.randn(16, 32, generator=gen, dtype=F64)
    out["root"] = ("root", lambda z, b: z @ a + z**3 - b, b * 0, (b,))
    big = torch.randn(2000, 2000, generator=gen, dtype=F64)
    big *= 0.9 / torch.linalg.matrix_norm(big, ord=2)
    xb = torch.randn(2000, generator=gen, dtype=F64)
    out["large"] = ("fixed_point", lambda z, x: torch.tanh(big @ z + x), xb * 0, (xb,))
    return out


SOLVERS = {
    "fixed_point": ("fixed_point", {}),
    "fixed_point(damping=0.5)": ("fixed_point", {"damping": 0.5}),
    "anderson": ("anderson", {}),
    "anderson(m=20)": ("anderson", {"m": 20}),
    "newton": ("newton", {}),
    "broyden": ("broyden", {}),
    "scipy(hybr)": ("scipy", {"method": "hybr"}),
}


def run(kind, fn, z0, args, solver, options, backward="auto", batched=None):
    front = implicit.fixed_point if kind == "fixed_point" else implicit.root_solve
    batched = z0.dim() == 2 if batched is None else batched
    return front(
        fn,
        z0,
        *args,
        solver=solver,
        backward=backward,
        tol=1e-8,
        max_iter=500,
        batched=batched,
        on_failure="ignore",
        return_info=True,
        **options,
    )


def median_ms(call) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def forward_table() -> list[str]:
    lines = [
        f"{'problem':12s} {'solver':26s} {'status':10s} {'iters':>6s} {'f evals':>8s} {'ms':>9s}"
    ]
    for name, (kind, fn, z0, args) in problems().items():
        for label, (solver, options) in SOLVERS.items():
            if name == "large" and solver == "scipy":
                continue  # hybr factorises a dense 2000 × 2000 matrix per step: not its regime
            _, info = run(kind, fn, z0, args, solver, options)
            ms = median_ms(lambda: run(kind, fn, z0, args, solver, options))  # noqa: B023
            lines.append(
                f"{name:12s} {label:26s} {info.status:10s} {info.iterations:6d} "
                f"{info.f_evals:8d} {ms:9.1f}"
            )
        lines.append("")
    return lines


def backward_seconds(kind, fn, z0, x, c, solver, mode) -> float:
    """The time of ``backward()`` alone, after a fresh forward solve."""
    z, _ = run(kind, fn, z0, (x,), solver, {}, backward=mode)
    start = time.perf_counter()
    torch.autograd.grad((c * z).sum(), x)
    return time.perf_counter() - start


def backward_table() -> list[str]:
    lines = [
        f"{'problem':12s} {'n':>5s} {'backward':10s} {'status':10s} {'iters':>6s} "
        f"{'products':>9s} {'ms':>8s} {'rel. error':>11s}"
    ]
    every = problems()
    cases = [("contractive", every["contractive"]), ("large", every["large"])]
    cases.append(("root", every["root"]))
    for name, (kind, fn, z0, args) in cases:
        solver = "anderson" if kind == "fixed_point" else "newton"
        x = args[0].clone().requires_grad_()
        c = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1), dtype=F64)

        z, _ = run(kind, fn, z0, (x,), solver, {}, backward=implicit.linear.Dense(tol=1e-12))
        (reference,) = torch.autograd.grad((c * z).sum(), x)
        modes = ["dense", "gmres", "bicgstab", "neumann", "phantom", "one_step"]
        modes += ["cg"] if kind == "root" else ["unroll"]
        for mode in modes:
            if kind == "root" and mode in ("neumann", "phantom", "one_step"):
                continue  # they assume ∂g/∂z ≈ −I (fixed points), which a root problem lacks
            z, info = run(kind, fn, z0, (x,), solver, {}, backward=mode)
            loss = (c * z).sum()

            (grad,) = torch.autograd.grad(loss, x)
            ms = 1e3 * statistics.median(
                backward_seconds(kind, fn, z0, x, c, solver, mode) for _ in range(REPEATS)
            )
            error = float(
                torch.linalg.vector_norm(grad - reference) / torch.linalg.vector_norm(reference)
            )
            bw = info.backward
            status, iters, products = (
                (bw.status, bw.iterations, bw.matvecs) if bw is not None else ("-", 0, 0)
            )
            n = z0.shape[-1]
            lines.append(
                f"{name:12s} {n:5d} {mode:10s} {status:10s} {iters:6d} {products:9d} "
                f"{ms:8.1f} {error:11.1e}"
            )
        lines.append("")
    return lines


def main() -> None:
    warnings.simplefilter("ignore")
    print(__doc__.split("\n\n")[0])
    print(f"torch {torch.__version__}, 1 thread, float64; median of {REPEATS} runs\n")
    print("\n".join(forward_table()))
    print("\n".join(backward_table()))


if __name__ == "__main__":
    main()
