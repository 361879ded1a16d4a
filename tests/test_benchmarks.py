"""The benchmark runner's own references and sections, at toy sizes (no timings checked)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import deq_step
import scalar_batch
import seed_newton


def test_deq_reference_gradient_matches_unrolled_autograd():
    p = deq_step.DEQProblem.make(3, 6)
    _, ref = deq_step.reference_grads(p)
    W, U, b, x = p.params(torch.float64)
    z = torch.zeros(3, 6, dtype=torch.float64)
    inj = x @ U.T + b
    for _ in range(300):
        z = torch.tanh(z @ W.T + inj)
    grads = torch.autograd.grad(z.square().mean(), (W, U, b))
    assert rel_err(torch.cat([g.flatten() for g in grads]), ref) <= 1e-12


def test_deq_section_counts_and_errors():
    rows, extra = deq_step.run(4, 8, rounds=1, quick=True, use_peers=False)
    assert set(extra["floors"]) == {"torch"}
    names = {row.name for row in rows}
    assert "implicit anderson / neumann" in names and "autograd through anderson (unroll)" in names
    for row in rows:
        assert row.f_evals >= 2 and row.vjps >= 1
        assert len(row.times) == 3 and math.isfinite(row.overhead)
        # float32 at tol ≤ 1e-5: the gradient to about the tolerance.
        assert row.error <= 1e-3
    fixed = next(r for r in rows if r.name == "implicit fixed_point / neumann" and r.tol == 1e-6)
    # Per step: every forward evaluation (discovery's included), one graph for the
    # backward; the adjoint's products and one pass for the partials.
    assert fixed.f_evals >= 3 and fixed.vjps >= 2


@pytest.mark.parametrize(("batch", "width"), [(4, 8), (16, 32)])
def test_eager_loop_is_the_arithmetic_of_fixed_point_neumann(batch, width):
    # The reference row must do what implicit fixed_point / neumann does, no more, no
    # less: the same counts and the same gradients (bitwise, where we checked).
    p = deq_step.DEQProblem.make(batch, width)
    found = []
    for contender in (
        deq_step.eager_loop_contender(p, 1e-6),
        deq_step.implicit_contender(p, "fixed_point", "neumann", 1e-6),
    ):
        deq_step._COUNTER.f_evals = deq_step._COUNTER.vjps = 0
        grads = deq_step.flat_grads(contender.make(deq_step._counted_tanh)())
        found.append((grads, deq_step._COUNTER.f_evals, deq_step._COUNTER.vjps))
    (eager, eager_f, eager_vjps), (library, library_f, library_vjps) = found
    assert (eager_f, eager_vjps) == (library_f, library_vjps)
    # Without the per-problem stops the two differ by 1.3e-6 here.
    assert rel_err(eager, library) <= 1e-7
    _, ref = deq_step.reference_grads(p)
    assert rel_err(eager, ref) <= 1e-5


@pytest.mark.parametrize(("n", "batch"), [(10, None), (6, 4)])
def test_seed_reference_matches_autograd_through_newton(n, batch):
    w, x, c = seed_newton.problem(n, batch)
    step, _, _ = seed_newton.newton_autograd_step(w, x, c, batched=batch is not None)
    got = torch.cat([g.flatten() for g in step()])
    assert rel_err(got, seed_newton.reference(w, x, c)) <= 1e-9


def test_scalar_section_at_a_small_batch():
    rows = scalar_batch.run(1, batch=300, subset=30)
    solution, gradients, loop, _ = rows
    assert solution.error <= 1e-10 and loop.error <= 1e-10
    assert gradients.error <= 1e-10
    assert all(row.median > 0 for row in rows)
