"""Newton on a small fixed point: the implicit gradient against autograd through Newton.

Problem (float64): ``z = tanh(W z + x)`` with ``n = 10``, ``‖W‖₂ = 0.9``, one problem
and a batch of 64, and ``n = 100`` for a batch of 64; the loss ``Σ c ⊙ z`` with fixed
``c``; the gradient with respect to ``W`` and ``x``.

* **implicit**: ``implicit.root_solve(g, z0, x, solver="newton", backward="dense")``;
  the forward records no graph, the backward is one dense solve with ``(∂g/∂z)ᵀ``
  (refined from Newton's last factorisation where that pays, see ``implicit.linear.Dense``);
  also with ``Newton(jacobian_reuse=0.5)``, which reuses a factorisation while the
  residual halves at every step (linear convergence, so its error is the tolerance's).
* **autograd through Newton**: the same Newton iteration written in plain torch,
  recorded by autograd and differentiated through every iteration, with the Jacobian
  either by hand, ``∂g/∂z = diag(1 − tanh²(Wz + x)) W − I`` (the strongest way to
  write it, when one can), or by ``torch.func.jacrev`` (what a generic ``g`` needs,
  and what implicit knows of ``g``).

* **one VJP of g at the root**: the loss's gradient through a single evaluation of
  ``g`` at the root, which every implicit backward ends with (the adjoint solve comes
  on top): the least an implicit backward can cost here, against which the backward
  of autograd through Newton sets how much faster any implicit gradient could be.

Both stop at ``‖g(z)‖ ≤ 1e-10`` per problem; the reference gradient is the closed form
``∇x = D (I − W D)⁻ᵀ c``, ``∇W = ∇x zᵀ`` with ``D = diag(1 − z²)`` at a float64 root.
Timed: the whole step (forward and backward) and the backward alone.
"""

from __future__ import annotations

from functools import partial

import torch
from _common import Row, clock, per_call

import implicit

TOL = 1e-10
#: (unknowns, batch): a single small problem, a batch of them, a wider layer.
CASES = ((10, None), (10, 64), (100, 64))


def problem(n: int, batch: int | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=gen, dtype=torch.float64)
    w *= 0.9 / torch.linalg.matrix_norm(w, ord=2)
    shape = (n,) if batch is None else (batch, n)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    c = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return w, x, c


def root(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``z = tanh(W z + x)`` by 2,000 Picard steps (contraction 0.9: to rounding level)."""
    z = torch.zeros_like(x)
    for _ in range(2000):
        z = torch.tanh(z @ w.T + x)
    return z


def reference(w, x, c) -> torch.Tensor:
    """``(∇W, ∇x)`` flattened, by the closed form at a converged root."""
    n = w.shape[0]
    xs, cs = x.reshape(-1, n), c.reshape(-1, n)
    z = root(w, xs)
    d = 1 - z * z
    eye = torch.eye(n, dtype=w.dtype)
    # The adjoint λ = c + Wᵀ D λ per problem, then ∂loss/∂(W z + x) = D λ.
    a = eye - w.T.unsqueeze(0) * d.unsqueeze(1)  # I − Wᵀ diag(d_b)
    adjoint = torch.linalg.solve(a, cs.unsqueeze(2)).squeeze(2)
    grad_pre = d * adjoint
    grad_w = grad_pre.T @ z
    return torch.cat([grad_w.flatten(), grad_pre.reshape(x.shape).flatten()])


def implicit_step(w, x, c, batched: bool, jacobian_reuse: float | None = None):
    w = w.clone().requires_grad_()
    x = x.clone().requires_grad_()

    def g(z, x):
        return torch.tanh(z @ w.T + x) - z

    def forward():
        return implicit.root_solve(
            g,
            torch.zeros_like(x),
            x,
            solver=implicit.solvers.Newton(linear="dense", jacobian_reuse=jacobian_reuse),
            backward="dense",
            tol=TOL,
            batched=batched,
        )

    def step():
        return torch.autograd.grad((c * forward()).sum(), (w, x))

    return step, forward, (w, x)


def newton_autograd_step(w, x, c, batched: bool, jacobian: str = "analytic"):
    w = w.clone().requires_grad_()
    x = x.clone().requires_grad_()
    n = w.shape[0]
    eye = torch.eye(n, dtype=w.dtype)

    def g_one(z, x):
        return torch.tanh(w @ z + x) - z

    jacrev = torch.func.vmap(torch.func.jacrev(g_one))

    def forward():
        xs = x.reshape(-1, n)
        z = torch.zeros_like(xs)
        for _ in range(50):
            t = torch.tanh(z @ w.T + xs)
            residual = t - z
            if bool((torch.linalg.vector_norm(residual, dim=1) <= TOL).all()):
                break
            # ∂g/∂z per problem, by hand or by autograd.
            by_hand = jacobian == "analytic"
            jac = (1 - t * t).unsqueeze(2) * w - eye if by_hand else jacrev(z, xs)
            z = z - torch.linalg.solve(jac, residual)
        return z.reshape(x.shape)

    def step():
        return torch.autograd.grad((c * forward()).sum(), (w, x))

    return step, forward, (w, x)


def one_vjp(w, x):
    """What every implicit backward needs at the least: one VJP of ``g`` at the root,
    from the loss to ``(W, x)`` (the parameter product; the adjoint solve comes on top).
    A floor for the backward column, not a way to differentiate."""
    w = w.clone().requires_grad_()
    x = x.clone().requires_grad_()
    with torch.no_grad():
        z = root(w, x)

    def forward():
        return torch.tanh(z @ w.T + x) - z

    return forward, (w, x)


def _backward_only(forward, leaves, c) -> float:
    """Median CPU time of the backward alone (a fresh forward, untimed, before each)."""
    samples = []
    for _ in range(15):
        z = forward()
        loss = (c * z).sum()
        start = clock()
        torch.autograd.grad(loss, leaves)
        samples.append(clock() - start)
    samples.sort()
    return samples[len(samples) // 2]


def run(rounds: int) -> list[Row]:
    rows = []
    for n, batch in CASES:
        w, x, c = problem(n, batch)
        ref = reference(w, x, c)
        label = f"n = {n}, " + ("1 problem" if batch is None else f"batch {batch}")
        for name, make in (
            ("implicit newton / dense", implicit_step),
            (
                "implicit newton (jacobian_reuse=0.5) / dense",
                partial(implicit_step, jacobian_reuse=0.5),
            ),
            ("autograd through newton, Jacobian by hand", newton_autograd_step),
            (
                "autograd through newton, Jacobian by jacrev",
                partial(newton_autograd_step, jacobian="jacrev"),
            ),
        ):
            step, forward, leaves = make(w, x, c, batched=batch is not None)
            grads = step()
            error = float(
                torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]) - ref)
                / torch.linalg.vector_norm(ref)
            )
            full = per_call(step, number=20, repeats=max(5, rounds))
            backward = _backward_only(forward, leaves, c)
            row = Row(f"{name} ({label})", group=name, tol=TOL, times=[full], error=error)
            row.note = f"{backward * 1e3:.3f}"  # backward alone, ms
            rows.append(row)
        forward, leaves = one_vjp(w, x)
        floor = Row(f"one VJP of g at the root, the floor of any backward ({label})")
        floor.group = "one VJP"
        floor.note = f"{_backward_only(forward, leaves, c) * 1e3:.3f}"
        rows.append(floor)
    return rows
