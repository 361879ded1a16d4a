"""Warm-started adjoint solves in a training loop: the last adjoint solution as ``x0``
against a cold start.

The DEQ of section 1 (64 × 256, float32, Anderson forward, tol 1e-6) trained by
SGD for a few steps; warm, each adjoint solve starts from the last one's solution
(``info.backward.solution`` passed on as the backward's ``x0``, as
``DEQ(warm_start_backward=True)`` does). Two loops:
the same batch at every step (full-batch training: consecutive adjoint solutions are
close) and a fresh batch at every step (they are not). Reported: products of the
adjoint solve per step (mean) and CPU time per step (median).
"""

from __future__ import annotations

import statistics

import torch
from _common import Row, clock
from deq_step import DEQProblem

import implicit

STEPS = 25
LEARNING_RATE = 0.05


def _train(make, warm: bool, fresh_batches: bool, steps: int) -> tuple[float, float]:
    p = DEQProblem.make(64, 256)
    W, U, b, x = p.params()
    gen = torch.Generator().manual_seed(1)
    products, times, guess = [], [], None
    for _ in range(steps):
        backward = make(guess)
        if fresh_batches:
            x = torch.randn(x.shape, generator=gen)
        start = clock()
        inj = x @ U.T + b
        z, info = implicit.fixed_point(
            lambda z, inj: torch.tanh(z @ W.T + inj),
            torch.zeros_like(inj),
            inj,
            backward=backward,
            tol=1e-6,
            batched=True,
            return_info=True,
        )
        grads = torch.autograd.grad(z.square().mean(), (W, U, b))
        with torch.no_grad():
            for param, grad in zip((W, U, b), grads):
                param -= LEARNING_RATE * grad / grad.norm()
        times.append(clock() - start)
        products.append(info.backward.matvecs)
        guess = info.backward.solution if warm else None
    # The first step of every loop starts cold.
    return statistics.mean(products[1:]), statistics.median(times[1:])


def run(steps: int = STEPS) -> list[Row]:
    rows = []
    for fresh in (False, True):
        data = "fresh batch each step" if fresh else "same batch each step"
        for name, make in (
            ("neumann", lambda x0: implicit.linear.Neumann(x0=x0)),
            ("gmres", lambda x0: implicit.linear.GMRES(x0=x0)),
        ):
            for warm in (False, True):
                products, time = _train(make, warm, fresh, steps)
                start = "warm (last solution as x0)" if warm else "cold (x0=None)"
                row = Row(f"{name}, {start}, {data}", group=name, tol=1e-6, times=[time])
                row.vjps = products
                rows.append(row)
    return rows
