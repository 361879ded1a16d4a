"""The DEQ training step, side by side: implicit, unrolled autograd, TorchDEQ, jaxopt.

Problem (float32, B samples of width D, seed 0)::

    z = tanh(W z + U x + b),   ‖W‖₂ = 0.9,   U ~ N(0, 1/D),   b ~ N(0, 0.01),
    x ~ N(0, 1),   z0 = 0,     loss = mean(z²)

One *step* is what a training loop does per batch: the injection ``U x + b``, the
fixed-point solve (forward), the loss and the gradients with respect to ``W``, ``U`` and
``b`` (backward). Every contender runs that same step; TorchDEQ and jaxopt are called
through their public APIs (optional: ``pip install "implicit[bench]"``).

Per contender: the median time of the step, the evaluations of ``f`` and the
vector-Jacobian products (VJPs) it made (counted by running the step once more with a
counting ``tanh``), the overhead ratio ``time / (f_evals · t_f + VJPs · t_vjp)`` with
``t_f`` and ``t_vjp`` measured here for the contender's own framework, and the relative
error of ``(∇W, ∇U, ∇b)`` against a float64 reference (see :func:`reference_grads`).

The main table runs every contender at ``tol = 1e-6``; the sweeps run implicit's
default (``anderson / auto``) and the eager loop from 1e-3 to 1e-7, TorchDEQ at 1e-5
and 1e-6, jaxopt from 1e-3 to 1e-6, so that each peer row meets implicit's fastest run
at equal or better gradient error. The tolerances mean:

* implicit stops sample ``b`` when ``‖f(z)_b − z_b‖ ≤ tol · (1 + ‖f(z0)_b‖)`` and the
  adjoint solve when ``‖(∂g/∂z)ᵀw − v‖ ≤ tol · ‖v‖`` per sample;
* TorchDEQ runs ``stop_mode="rel"``: ``‖f(z)_b − z_b‖ ≤ tol · ‖f(z)_b‖`` per sample
  (forward) and the same on its backward fixed-point iteration;
* jaxopt treats the batch as one problem (its ``tol`` bounds the norm over the whole
  batch): it gets ``tol · ‖(1 + ‖f(z0)_b‖)_b‖₂``, the root mean square of implicit's
  per-sample thresholds, and its linear solve ``tol`` (relative to ‖v‖).

The gradient error column says whether the comparison is fair: a speed ratio counts
only between rows of equal or better error.
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from _common import Row, timed_blocks

import implicit

#: The tolerance of the main table; the sweeps add the others.
TOL = 1e-6
MAX_ITER = 100


@dataclass
class DEQProblem:
    """The parameters and data of one size, in float32 (and float64 for the reference)."""

    batch: int
    width: int
    W: torch.Tensor
    U: torch.Tensor
    b: torch.Tensor
    x: torch.Tensor

    @classmethod
    def make(cls, batch: int, width: int, seed: int = 0) -> DEQProblem:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(width, width, generator=gen, dtype=torch.float64)
        w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
        u = torch.randn(width, width, generator=gen, dtype=torch.float64) / math.sqrt(width)
        b = 0.1 * torch.randn(width, generator=gen, dtype=torch.float64)
        x = torch.randn(batch, width, generator=gen, dtype=torch.float64)
        return cls(batch, width, w, u, b, x)

    def params(self, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
        """Fresh leaf copies of ``(W, U, b)`` that require grad, and ``x``."""
        leaves = tuple(t.to(dtype).clone().requires_grad_() for t in (self.W, self.U, self.b))
        return (*leaves, self.x.to(dtype))

    def thresholds(self, tol: float) -> torch.Tensor:
        """implicit's per-sample stopping thresholds ``tol · (1 + ‖f(z0)_b‖)``."""
        inj = self.x @ self.U.T + self.b
        return tol * (1 + torch.linalg.vector_norm(torch.tanh(inj), dim=1))


def reference_grads(p: DEQProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z*, (∇W, ∇U, ∇b))`` in float64, by hand, from no library but torch's matmul.

    ``z*`` by Picard iteration to a step below ``1e-15 · ‖z‖`` (the map is a
    contraction); the adjoint ``u = v + (∂f/∂z)ᵀ u`` by its Neumann series to the same
    level; then ``a = (1 − z²) ⊙ u``, ``∇W = aᵀ z``, ``∇U = aᵀ x``, ``∇b = Σ_b a``.
    """
    inj = p.x @ p.U.T + p.b
    z = torch.zeros_like(inj)
    for _ in range(10_000):
        z_next = torch.tanh(z @ p.W.T + inj)
        done = torch.linalg.vector_norm(z_next - z) <= 1e-15 * torch.linalg.vector_norm(z_next)
        z = z_next
        if done:
            break
    d = 1 - z * z
    v = 2 * z / z.numel()  # d mean(z²) / dz
    u = v
    for _ in range(10_000):
        u_next = v + (d * u) @ p.W
        done = torch.linalg.vector_norm(u_next - u) <= 1e-15 * torch.linalg.vector_norm(u_next)
        u = u_next
        if done:
            break
    a = d * u
    grads = torch.cat([(a.T @ z).flatten(), (a.T @ p.x).flatten(), a.sum(0)])
    return z, grads


def flat_grads(grads) -> torch.Tensor:
    return torch.cat([torch.as_tensor(_numpy(g)).to(torch.float64).flatten() for g in grads])


def _numpy(g):
    return g.detach().numpy() if isinstance(g, torch.Tensor) else g


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


# -- counting ------------------------------------------------------------------------
class Counter:
    """Evaluations of ``f`` and VJPs through it, counted by a counting ``tanh``."""

    def __init__(self):
        self.f_evals = 0
        self.vjps = 0


_COUNTER = Counter()


class _CountedTanh(torch.autograd.Function):
    """``tanh`` whose backward counts one VJP (the step's only nonlinearity)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        _COUNTER.vjps += 1
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def _counted_tanh(x):
    _COUNTER.f_evals += 1
    return _CountedTanh.apply(x)


# -- the contenders --------------------------------------------------------------------
@dataclass
class Contender:
    """A named step factory: ``make(tanh) -> step()``, where ``step()`` returns grads."""

    name: str
    make: Callable[[Callable], Callable[[], object]]
    tol: float
    framework: str = "torch"
    group: str = "implicit"
    note: str = ""


def implicit_contender(p: DEQProblem, solver: str, backward, tol: float, label: str | None = None):
    W, U, b, x = p.params()

    def make(tanh):
        def f(z, inj):  # W is captured, like a module parameter
            return tanh(z @ W.T + inj)

        def step():
            inj = x @ U.T + b
            z = implicit.fixed_point(
                f,
                torch.zeros_like(inj),
                inj,
                solver=solver,
                backward=backward() if callable(backward) else backward,
                tol=tol,
                max_iter=MAX_ITER,
                batched=True,
            )
            return torch.autograd.grad(z.square().mean(), (W, U, b))

        return step

    name = label or f"implicit {solver} / {getattr(backward, 'name', backward)}"
    group = "unroll" if backward == "unroll" else "implicit"
    return Contender(name, make, tol, group=group)


def eager_loop_contender(p: DEQProblem, tol: float) -> Contender:
    """``implicit fixed_point / neumann`` written out as a plain torch loop: the same
    arithmetic and the same per-problem stops, without the library.

    Picard with implicit's test ``‖f(z)_b − z_b‖ ≤ tol · (1 + max(‖z0_b‖, ‖f(z0)_b‖))``
    (a finished problem keeps its iterate), then the adjoint ``u = v + (∂f/∂z)ᵀ u`` by
    Neumann on one graph of ``f`` recorded at ``z*``, each problem stopped at
    ``‖u − (∂f/∂z)ᵀu − v‖ ≤ tol · ‖v‖``, then the parameter gradients from the same
    graph. What eager PyTorch costs for this step: the library's own overhead is the
    gap between this row and implicit's.
    """
    W, U, b, x = p.params()

    def make(tanh):
        def f(z, inj):
            return tanh(z @ W.T + inj)

        def step():
            inj = x @ U.T + b
            with torch.no_grad():
                z = torch.zeros_like(inj)
                r = f(z, inj) - z
                scale = torch.maximum(_row_norms(z), _row_norms(z + r))
                threshold = tol * (1 + scale)
                done = _row_norms(r) <= threshold
                for _ in range(MAX_ITER):
                    if bool(done.all()):
                        break
                    z_new = z + r
                    r_new = f(z_new, inj) - z_new
                    z, r = _keep_finished(done, z, z_new), _keep_finished(done, r, r_new)
                    done = done | (_row_norms(r) <= threshold)
            z = z.requires_grad_()
            inj_leaf = inj.detach().requires_grad_()
            with torch.enable_grad():
                out = f(z, inj_leaf)
            v = 2 * z.detach() / z.numel()  # d mean(z²) / dz
            target = tol * _row_norms(v)
            u = v
            (q,) = torch.autograd.grad(out, z, u, retain_graph=True)  # (∂f/∂z)ᵀ u
            done = _row_norms(q) <= target  # the residual of u = v is (∂f/∂z)ᵀ v
            for _ in range(MAX_ITER):
                if bool(done.all()):
                    break
                u_new = v + q
                (q_new,) = torch.autograd.grad(out, z, u_new, retain_graph=True)
                residual = q_new - q  # u_new − (∂f/∂z)ᵀ u_new − v
                u, q = _keep_finished(done, u, u_new), _keep_finished(done, q, q_new)
                done = done | (_row_norms(residual) <= target)
            grad_w, grad_inj = torch.autograd.grad(out, (W, inj_leaf), u)
            return (grad_w, *torch.autograd.grad(inj, (U, b), grad_inj))

        return step

    return Contender(
        "eager loop, same arithmetic as fixed_point / neumann", make, tol, group="eager loop"
    )


def _row_norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=1)


def _keep_finished(done: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` in the rows still running, ``old`` in the finished ones."""
    return torch.where(done.unsqueeze(1), old, new) if bool(done.any()) else new


def torchdeq_contender(p: DEQProblem, b_solver: str, tol: float):
    from torchdeq import get_deq

    W, U, b, x = p.params()
    deq = get_deq(
        f_solver="anderson",
        b_solver=b_solver,
        ift=True,
        f_tol=tol,
        b_tol=tol,
        f_stop_mode="rel",
        b_stop_mode="rel",
        f_max_iter=MAX_ITER,
        b_max_iter=MAX_ITER,
    )

    def make(tanh):
        def step():
            inj = x @ U.T + b
            zs, _ = deq(lambda z: tanh(z @ W.T + inj), torch.zeros_like(inj))
            return torch.autograd.grad(zs[-1].square().mean(), (W, U, b))

        return step

    return Contender(f"TorchDEQ anderson / {b_solver}", make, tol, group="TorchDEQ")


def jaxopt_contender(p: DEQProblem, solver: str, linear: str, tol: float):
    import jax
    import jax.numpy as jnp
    import jaxopt

    params = tuple(jnp.asarray(t.to(torch.float32).numpy()) for t in (p.W, p.U, p.b))
    x = jnp.asarray(p.x.to(torch.float32).numpy())
    z0 = jnp.zeros((p.batch, p.width), dtype=jnp.float32)
    # The batch is one problem for jaxopt: the RMS of implicit's per-sample thresholds.
    batch_tol = float(torch.linalg.vector_norm(p.thresholds(tol)))
    solve = {
        "gmres": partial(jaxopt.linear_solve.solve_gmres, tol=tol),
        "normal_cg": partial(jaxopt.linear_solve.solve_normal_cg, tol=tol),
    }[linear]
    cls = {"anderson": jaxopt.AndersonAcceleration, "fixed_point": jaxopt.FixedPointIteration}[
        solver
    ]

    def make(tanh):
        def loss(params, x):
            w, u, b = params
            inj = x @ u.T + b
            fixed = cls(
                fixed_point_fun=lambda z, w, inj: tanh(z @ w.T + inj),
                tol=batch_tol,
                maxiter=MAX_ITER,
                implicit_diff=True,
                implicit_diff_solve=solve,
            )
            z = fixed.run(z0, w, inj).params
            return jnp.mean(z**2)

        grad = jax.jit(jax.grad(loss))

        def step():
            return jax.block_until_ready(grad(params, x))

        return step

    return Contender(
        f"jaxopt {solver} / {linear} (jit)", make, tol, framework="jax", group="jaxopt"
    )


def _jax_counted_tanh():
    import jax
    import jax.numpy as jnp

    def count_f():
        _COUNTER.f_evals += 1

    def count_vjp():
        _COUNTER.vjps += 1

    @jax.custom_vjp
    def tanh(x):
        jax.debug.callback(count_f)
        return jnp.tanh(x)

    def forward(x):
        jax.debug.callback(count_f)
        y = jnp.tanh(x)
        return y, y

    def backward(y, grad):
        jax.debug.callback(count_vjp)
        return (grad * (1 - y * y),)

    tanh.defvjp(forward, backward)
    return tanh


# -- floors ----------------------------------------------------------------------------
#: Products per probe call: the floor probes run with the contenders, in every round.
PROBE = 10


def torch_probes(p: DEQProblem, z_star: torch.Tensor) -> tuple[Callable, Callable]:
    """Calls of ``PROBE`` evaluations of ``f`` and of ``PROBE`` VJPs in eager torch,
    chained as a solver meets them (each input the previous output: fresh memory).

    ``f``: Picard steps ``z ← f(z)`` from ``z*``; VJP: the adjoint iteration
    ``u ← (∂f/∂z)ᵀ u / 2`` on a graph of ``f`` recorded at ``z*`` (``W`` requiring
    grad, as in training).
    """
    W, U, b, x = p.params()
    inj = (x @ U.T + b).detach()
    z = z_star.to(torch.float32)
    leaf = z.clone().requires_grad_()
    out = torch.tanh(leaf @ W.T + inj)

    @torch.no_grad()
    def evaluations():
        state = z
        for _ in range(PROBE):
            state = torch.tanh(state @ W.T + inj)

    def products():
        u = torch.ones_like(z)
        for _ in range(PROBE):
            (grad,) = torch.autograd.grad(out, leaf, u, retain_graph=True)
            u = 0.5 * grad

    return evaluations, products


def torch_kernel_probes(p: DEQProblem, z_star: torch.Tensor) -> tuple[Callable, Callable]:
    """``f``'s two kernels alone in eager torch, ``PROBE`` chained calls each: the
    product ``z Wᵀ`` and ``tanh``. They say where ``t_f`` goes, framework against
    framework (no library is involved)."""
    W = p.W.to(torch.float32)
    z = z_star.to(torch.float32)

    @torch.no_grad()
    def products():
        state = z
        for _ in range(PROBE):
            state = state @ W.T

    @torch.no_grad()
    def tanhs():
        state = z
        for _ in range(PROBE):
            state = torch.tanh(state)

    return products, tanhs


def jax_probes(p: DEQProblem, z_star: torch.Tensor) -> tuple[Callable, Callable]:
    """The same probes in compiled JAX (one compiled loop each)."""
    import jax
    import jax.numpy as jnp

    w = jnp.asarray(p.W.to(torch.float32).numpy())
    inj = jnp.asarray((p.x @ p.U.T + p.b).to(torch.float32).numpy())
    z = jnp.asarray(z_star.to(torch.float32).numpy())

    def f(z):
        return jnp.tanh(z @ w.T + inj)

    _, vjp = jax.vjp(f, z)
    evals = jax.jit(lambda z: jax.lax.fori_loop(0, PROBE, lambda _, z: f(z), z))
    vjps = jax.jit(lambda u: jax.lax.fori_loop(0, PROBE, lambda _, u: 0.5 * vjp(u)[0], u))
    return (lambda: jax.block_until_ready(evals(z))), (lambda: jax.block_until_ready(vjps(z)))


def jax_kernel_probes(p: DEQProblem, z_star: torch.Tensor) -> tuple[Callable, Callable]:
    """The kernel probes in compiled JAX (one compiled loop each)."""
    import jax
    import jax.numpy as jnp

    w = jnp.asarray(p.W.to(torch.float32).numpy())
    z = jnp.asarray(z_star.to(torch.float32).numpy())
    products = jax.jit(lambda z: jax.lax.fori_loop(0, PROBE, lambda _, z: z @ w.T, z))
    tanhs = jax.jit(lambda z: jax.lax.fori_loop(0, PROBE, lambda _, z: jnp.tanh(z), z))
    return (
        (lambda: jax.block_until_ready(products(z))),
        (lambda: jax.block_until_ready(tanhs(z))),
    )


# -- the section ----------------------------------------------------------------------
#: The default configuration (the front doors' and ``DEQ``'s): the goals are set for it.
DEFAULT = "implicit anderson / auto"
#: implicit's default and the eager loop at each of these (``fixed_point / neumann`` at
#: the decades); each peer at its own range, so that every peer row meets implicit's
#: fastest run at equal or better error.
IMPLICIT_SWEEP = (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
TORCHDEQ_SWEEP = (1e-5, 1e-6)
#: jaxopt's ``tol`` bounds the norm over the whole batch: its error falls slower.
JAXOPT_SWEEP = (1e-3, 1e-4, 1e-5, 1e-6)


def contenders(
    p: DEQProblem, peers: dict[str, bool], quick: bool, scaling: bool = False
) -> list[Contender]:
    """The main table (every contender at ``TOL``) and the tolerance sweeps; with
    ``scaling``, only the default, the eager loop and the peers' sweeps."""
    if scaling:
        out = []
    else:
        solvers = (
            ["anderson", "fixed_point"]
            if quick
            else ["anderson", "fixed_point", "broyden", "newton"]
        )
        # "auto" first: the default (Neumann while it contracts well, then GMRES).
        backwards = (
            ["auto", "gmres", "neumann"]
            if quick
            else ["auto", "gmres", "bicgstab", "neumann", "one_step"]
        )
        out = [implicit_contender(p, s, bw, TOL) for s in solvers for bw in backwards]
        out.append(
            implicit_contender(p, "anderson", "unroll", TOL, "autograd through anderson (unroll)")
        )
    for tol in IMPLICIT_SWEEP:
        if tol != TOL or scaling:
            out.append(implicit_contender(p, "anderson", "auto", tol))
            if not scaling and math.log10(tol).is_integer():
                out.append(implicit_contender(p, "fixed_point", "neumann", tol))
        out.append(eager_loop_contender(p, tol))
    if peers["torchdeq"]:
        for tol in TORCHDEQ_SWEEP:
            out.append(torchdeq_contender(p, "fixed_point_iter", tol))
            if tol == TOL and not scaling:
                out.append(torchdeq_contender(p, "anderson", tol))
    if peers["jaxopt"]:
        for tol in JAXOPT_SWEEP:
            out += [
                jaxopt_contender(p, "anderson", "gmres", tol),
                jaxopt_contender(p, "anderson", "normal_cg", tol),
            ]
            if tol == TOL and not quick and not scaling:
                out.append(jaxopt_contender(p, "fixed_point", "gmres", tol))
    return out


def available_peers(use_peers: bool = True) -> dict[str, bool]:
    found = {}
    for module in ("torchdeq", "jaxopt"):
        try:
            found[module] = use_peers and bool(__import__(module))
        except ImportError:
            found[module] = False
    if found["jaxopt"]:
        import jax

        # On the calling thread: each call's work is done when it returns, and the
        # probes of compiled f measure it steadily (asynchronously, 0.02-0.9 ms for the
        # same ten evaluations).
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return found


def run(
    batch: int,
    width: int,
    rounds: int,
    quick: bool = False,
    use_peers: bool = True,
    scaling: bool = False,
) -> tuple[list[Row], dict]:
    """Time every contender at one size; returns the rows and what the reader needs.

    The floor probes (``PROBE`` chained evaluations of ``f``, ``PROBE`` chained VJPs, per
    framework) run in every round with the contenders, so that each round's overhead
    ratio divides times taken under the same conditions; a row's overhead is the
    median over rounds.
    """
    p = DEQProblem.make(batch, width)
    z_star, ref = reference_grads(p)
    peers = available_peers(use_peers)
    entries = contenders(p, peers, quick, scaling)
    calls: dict[str, Callable] = {}
    calls["probe torch f"], calls["probe torch vjp"] = torch_probes(p, z_star)
    calls["probe torch product"], calls["probe torch tanh"] = torch_kernel_probes(p, z_star)
    if peers["jaxopt"]:
        calls["probe jax f"], calls["probe jax vjp"] = jax_probes(p, z_star)
        calls["probe jax product"], calls["probe jax tanh"] = jax_kernel_probes(p, z_star)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence shows in the counts and errors
        for entry in entries:
            row = Row(entry.name, group=entry.group, tol=entry.tol, note=entry.framework)
            tanh = _jax_counted_tanh() if entry.framework == "jax" else _counted_tanh
            _COUNTER.f_evals = _COUNTER.vjps = 0
            grads = entry.make(tanh)()
            row.f_evals, row.vjps = _COUNTER.f_evals, _COUNTER.vjps
            row.error = rel_err(flat_grads(grads), ref)
            rows.append(row)
            plain = _jax_plain_tanh() if entry.framework == "jax" else torch.tanh
            calls[_key(row)] = entry.make(plain)
        block = 3
        times = timed_blocks(calls, rounds, block)
    per_round = {
        key: [statistics.median(t[i : i + block]) for i in range(0, len(t), block)]
        for key, t in times.items()
    }
    floors, kernels = {}, {}
    for framework in ("torch", "jax"):
        if f"probe {framework} f" in per_round:
            t_f = [t / PROBE for t in per_round[f"probe {framework} f"]]
            t_vjp = [t / PROBE for t in per_round[f"probe {framework} vjp"]]
            floors[framework] = (statistics.median(t_f), statistics.median(t_vjp), t_f, t_vjp)
            kernels[framework] = tuple(
                statistics.median(per_round[f"probe {framework} {kernel}"]) / PROBE
                for kernel in ("product", "tanh")
            )
    for row in rows:
        row.times = times[_key(row)]
        _, _, t_f, t_vjp = floors[row.note]
        ratios = [
            time / (row.f_evals * f + row.vjps * v)
            for time, f, v in zip(per_round[_key(row)], t_f, t_vjp)
        ]
        row.overhead_median = statistics.median(ratios)
        row.floor = row.f_evals * floors[row.note][0] + row.vjps * floors[row.note][1]
        row.note = ""
    return rows, {
        "floors": {k: v[:2] for k, v in floors.items()},
        "kernels": kernels,
        "peers": peers,
    }


def _key(row: Row) -> str:
    return f"{row.name} @ {row.tol:g}"


def _jax_plain_tanh():
    import jax.numpy as jnp

    return jnp.tanh


def configure_jax_threads() -> None:
    """One intra-op thread for XLA, as for torch (set before jax is imported).

    :func:`available_peers` also turns JAX's asynchronous dispatch off.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        os.environ["XLA_FLAGS"] = (
            flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()
