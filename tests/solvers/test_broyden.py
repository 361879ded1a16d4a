"""Limited-memory Broyden (implicit/solvers/broyden.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TanhProblem, rel_err
from solver_checks import (
    MonotoneCubic,
    bounded_test,
    contractive_maps_test,
    counting_test,
    exact_root_unroll_test,
    nonfinite_test,
    replace_at,
    tanh_test,
    unroll_test,
    unwritten_slots_test,
)

import implicit
from implicit.solvers import Broyden, Residual
from implicit.solvers.broyden import HALVINGS

test_converges_on_tanh_problem = tanh_test("broyden")
test_converges_with_short_memory = tanh_test("broyden", memory=1)
test_converges_without_line_search = tanh_test("broyden", line_search=False)
test_unroll_matches_unrolled_reference = unroll_test("broyden")
test_unroll_past_an_exact_root = exact_root_unroll_test("broyden")
test_counts_every_evaluation = counting_test("broyden")
test_stops_nonfinite_samples = nonfinite_test("broyden")
test_stops_nonfinite_samples_without_line_search = nonfinite_test("broyden", line_search=False)
test_random_contractive_maps = contractive_maps_test("broyden")
# A restart adds an evaluation (and a Jacobian-vector product) to its iteration.
test_line_search_trials_count_against_max_iter = bounded_test("broyden", 2)
test_unwritten_history_slots_are_never_read = unwritten_slots_test(
    "broyden",
    ("u", "v"),
    before_step=replace_at(6, restart=torch.tensor([True, False, True])),
    memory=4,
)


def test_root_of_monotone_cubic():
    # ∂g/∂z is positive definite here: the fixed-point guess H₀ = −I would point uphill.
    p = MonotoneCubic(n=5, batch=3)
    z, info = implicit.root_solve(
        p.g, p.z0, p.b, solver="broyden", batched=True, tol=1e-12, return_info=True
    )
    assert info.status == "converged" and rel_err(z, p.root) <= 1e-10


def test_sample_without_root_does_not_stop_the_others():
    # Sample 1 solves z² + 1 = 0, which has no real solution.
    c = torch.tensor([[4.0, 9.0], [-1.0, -1.0], [1.0, 0.25]], dtype=torch.float64)
    z0 = torch.ones(3, 2, dtype=torch.float64)

    def g(z, c):
        return z**2 - c

    with pytest.warns(implicit.ConvergenceWarning, match="1 of 3"):
        z, info = implicit.root_solve(
            g,
            z0,
            c,
            solver="broyden",
            batched=True,
            tol=1e-12,
            max_iter=40,
            return_info=True,
        )
    assert info.converged.tolist() == [True, False, True]
    assert info.status == "max_iter" and info.iterations == 40
    assert torch.isfinite(z).all()
    assert rel_err(z[[0, 2]], c[[0, 2]].sqrt()) <= 1e-12


def _linear(jacobian: torch.Tensor, b: torch.Tensor) -> Residual:
    """The residual ``g(z) = J z − b`` per sample."""
    return Residual(lambda z: z @ jacobian.T - b, lambda z: z.new_zeros(z.shape[0]))


def test_failed_line_search_restarts_from_a_descent_direction():
    # g(z) = −z − b (∂g/∂z = −I) with a corrupted estimate H = +I: the step goes uphill.
    b = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    fn = _linear(-torch.eye(2, dtype=torch.float64), b)
    z = torch.zeros(1, 2, dtype=torch.float64)
    r = fn(z)
    solver = Broyden()
    state = dataclasses.replace(
        solver.init(fn, z, r), h0=torch.ones(1, dtype=torch.float64), restart=torch.tensor([False])
    )
    # One trial per iteration: the full step and HALVINGS halvings fail, and the sample
    # stays where it is, its H unchanged, until it gives up and restarts.
    for _ in range(HALVINGS + 1):
        assert not bool(state.restart.any())
        z1, r1, state = solver.step(fn, z, r, state)
        assert torch.equal(z1, z) and torch.equal(r1, r)
        assert torch.equal(state.h0, torch.ones(1, dtype=torch.float64))
    assert bool(state.restart.all()) and state.pending is None
    # The restart rescales H₀ by the Jacobian's Rayleigh quotient (−1): an exact step.
    z2, r2, state = solver.step(fn, z1, r1, state)
    assert rel_err(z2, -b) <= 1e-15 and float(r2.abs().max()) <= 1e-15


def test_degenerate_update_restarts():
    # A 90° rotation: sᵀ H y = 0 for every step along a scalar multiple of g.
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    fn = _linear(rotation, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    z = torch.zeros(1, 2, dtype=torch.float64)
    r = fn(z)
    solver = Broyden(line_search=False)
    z1, r1, state = solver.step(fn, z, r, solver.init(fn, z, r))
    assert not torch.equal(z1, z) and torch.isfinite(r1).all()
    filled = slice(None, state.filled)
    assert bool(state.restart.all()) and state.filled == 1
    assert not state.u[:, filled].any() and not state.v[:, filled].any()


def test_misspelt_and_invalid_options():
    p = TanhProblem()
    with pytest.raises(TypeError, match="'memmory'"):
        implicit.fixed_point(p.f, p.z0, p.x, solver="broyden", memmory=3)
    for bad in [0, 1.5, True]:
        with pytest.raises(ValueError, match="memory"):
            Broyden(memory=bad)
