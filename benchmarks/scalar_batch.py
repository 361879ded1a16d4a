"""A large batch of independent scalar root problems against a per-problem scipy loop.

Kepler's equation ``E − e sin E = M`` for ``B = 100,000`` orbits (float64, eccentricity
``e ∈ [0, 0.9]``, mean anomaly ``M ∈ [0, 2π)``, start ``E₀ = M``, ``tol = 1e-12``):

* **implicit**: one ``root_solve(..., batched=True)`` (Newton, each problem stopped on
  its own) and, for the step with gradients, ``∂E/∂e`` and ``∂E/∂M`` of ``Σ E`` from the
  implicit backward (dense, ``n = 1`` per problem);
* **scipy loop**: ``scipy.optimize.newton`` called once per problem with the exact
  derivative, the way one solves a scalar equation with scipy. A loop over 100,000
  problems takes minutes, so a subset is timed and the time scaled to the batch (said
  in the table);
* **scipy vectorised**: ``scipy.optimize.newton`` on the whole array at once (its
  vectorised mode), for reference.

Gradients are checked against the closed form ``∂E/∂M = 1 / (1 − e cos E)``,
``∂E/∂e = sin E / (1 − e cos E)``; solutions against the vectorised scipy answer.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.optimize
import torch
from _common import Row, clock

import implicit

BATCH = 100_000
SUBSET = 2_000
TOL = 1e-12


def problem(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    e = 0.9 * torch.rand(batch, generator=gen, dtype=torch.float64)
    m = 2 * math.pi * torch.rand(batch, generator=gen, dtype=torch.float64)
    return e, m


def kepler(E, e, M):
    return E - e * torch.sin(E) - M


def _median_time(call, repeats: int) -> float:
    call()
    samples = []
    for _ in range(repeats):
        start = clock()
        call()
        samples.append(clock() - start)
    samples.sort()
    return samples[len(samples) // 2]


def run(repeats: int, batch: int = BATCH, subset: int = SUBSET) -> list[Row]:
    e, m = problem(batch)
    e_np, m_np = e.numpy(), m.numpy()

    def f_np(E, e, M):
        return E - e * np.sin(E) - M

    def fprime_np(E, e, M):
        return 1 - e * np.cos(E)

    vectorised = scipy.optimize.newton(f_np, m_np, fprime_np, args=(e_np, m_np), tol=TOL)
    reference = torch.from_numpy(vectorised)
    closed_form = torch.cat([torch.sin(reference), torch.ones_like(reference)]) / torch.cat(
        [1 - e * torch.cos(reference)] * 2
    )

    def implicit_forward():
        with torch.no_grad():
            return implicit.root_solve(
                kepler, m.clone(), e, m, solver="newton", tol=TOL, batched=True, return_info=True
            )

    leaves = (e.clone().requires_grad_(), m.clone().requires_grad_())

    def implicit_step():
        E = implicit.root_solve(kepler, m.clone(), *leaves, solver="newton", tol=TOL, batched=True)
        return torch.autograd.grad(E.sum(), leaves)

    def scipy_loop():
        out = np.empty(subset)
        for i in range(subset):
            out[i] = scipy.optimize.newton(
                f_np, m_np[i], fprime_np, args=(e_np[i], m_np[i]), tol=TOL
            )
        return out

    def scipy_vectorised():
        return scipy.optimize.newton(f_np, m_np, fprime_np, args=(e_np, m_np), tol=TOL)

    rows = []
    E, info = implicit_forward()
    solution_error = float((E - reference).abs().max())
    row = Row("implicit root_solve, newton, batched (forward)", group="implicit", tol=TOL)
    row.times = [_median_time(implicit_forward, repeats)]
    row.error = solution_error
    row.f_evals = info.f_evals
    row.note = f"{info.iterations} Newton iterations (the slowest problem); largest error of E"
    rows.append(row)

    grads = implicit_step()
    row = Row("implicit root_solve, newton, batched (forward + gradients)", group="implicit")
    row.tol = TOL
    row.times = [_median_time(implicit_step, repeats)]
    got = torch.cat([g.detach() for g in grads])
    row.error = float(
        torch.linalg.vector_norm(got - closed_form) / torch.linalg.vector_norm(closed_form)
    )
    row.note = "relative error of (∂E/∂e, ∂E/∂M) against the closed form"
    rows.append(row)

    loop = scipy_loop()
    row = Row("scipy.optimize.newton, one call per problem (forward)", group="scipy", tol=TOL)
    row.times = [_median_time(scipy_loop, max(1, repeats // 3)) * batch / subset]
    row.error = float(np.abs(loop - vectorised[:subset]).max())
    row.note = f"timed on {subset:,} problems, scaled by {batch // subset} to {batch:,}"
    rows.append(row)

    row = Row("scipy.optimize.newton, vectorised (forward)", group="scipy", tol=TOL)
    row.times = [_median_time(scipy_vectorised, repeats)]
    row.error = 0.0
    row.note = "the reference solution"
    rows.append(row)
    return rows
