"""Anderson acceleration (implicit/solvers/anderson.py)."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import TanhProblem, assert_fixed_point, contractive_matrix, rel_err
from solver_checks import (
    contractive_maps_test,
    counting_test,
    exact_root_unroll_test,
    nonfinite_test,
    tanh_test,
    unroll_test,
)
from torch.utils._python_dispatch import TorchDispatchMode

import implicit
from implicit.solvers import Anderson, Residual

test_converges_on_tanh_problem = tanh_test("anderson")
test_history_longer_than_the_problem = tanh_test("anderson", m=12)  # n = 6: singular Gram
test_converges_with_mixing = tanh_test("anderson", mixing=0.5)
test_unroll_matches_unrolled_reference = unroll_test("anderson")
test_unroll_past_an_exact_root = exact_root_unroll_test("anderson")
test_counts_every_evaluation = counting_test("anderson")
# Plain mixing steps on this problem (it contracts fast): Picard's bound.
test_stops_nonfinite_samples = nonfinite_test("anderson", within=40)
test_stops_nonfinite_samples_extrapolating = nonfinite_test("anderson", start_ratio=0.0)
test_random_contractive_maps = contractive_maps_test("anderson")


def test_is_the_default_of_fixed_point():
    p = TanhProblem()
    _, info = implicit.fixed_point(p.f, p.z0, p.x, batched=True, return_info=True)
    assert info.solver == "anderson" and info.status == "converged"


def test_root_problem_with_known_root():
    # g(z) = b − M z − tanh(z)/10 with M SPD, spectrum in [0.3, 1.2]: z + g(z) contracts.
    generator = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    m = q @ torch.diag(torch.linspace(0.3, 1.2, 5, dtype=torch.float64)) @ q.T
    root = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    b = root @ m.T + 0.1 * torch.tanh(root)

    def g(z, b):
        return b - z @ m.T - 0.1 * torch.tanh(z)

    z, info = implicit.root_solve(
        g,
        torch.zeros_like(b),
        b,
        solver="anderson",
        batched=True,
        tol=1e-12,
        max_iter=100,
        return_info=True,
    )
    assert info.status == "converged"
    assert rel_err(z, root) <= 1e-10


def test_accelerates_slow_fixed_point_iteration():
    p = TanhProblem(n=8, batch=2, norm=0.99)
    kwargs = {"batched": True, "tol": 1e-10, "max_iter": 2000, "return_info": True}
    _, picard = implicit.fixed_point(p.f, p.z0, p.x, solver="fixed_point", **kwargs)
    z, info = implicit.fixed_point(p.f, p.z0, p.x, solver="anderson", **kwargs)
    assert info.status == "converged"
    assert_fixed_point(p.f, z, p.x, z0=p.z0, tol=1e-10)
    assert info.iterations < picard.iterations / 2


def test_sample_without_root_does_not_stop_the_others():
    # Sample 1 solves 1 + sin(z)/10 = 0, which has no solution; the others are the tanh map's.
    p = TanhProblem(n=4, batch=3)
    bad = torch.tensor([False, True, False]).unsqueeze(1)

    def g(z, x):
        return torch.where(bad, 1 + 0.1 * torch.sin(z), p.f(z, x) - z)

    with pytest.warns(implicit.ConvergenceWarning, match="1 of 3"):
        z, info = implicit.root_solve(
            g,
            p.z0,
            p.x,
            solver="anderson",
            batched=True,
            tol=1e-10,
            max_iter=60,
            return_info=True,
        )
    assert info.converged.tolist() == [True, False, True]
    assert info.status == "max_iter" and info.iterations == 60
    assert torch.isfinite(z).all()
    good = [0, 2]
    assert bool((torch.linalg.vector_norm(g(z, p.x)[good], dim=1) <= 1e-10).all())


@pytest.mark.parametrize("m", [5, 20])
def test_nearly_repeated_direction_neither_stalls_nor_blows_up(m):
    # All residual differences point almost along u: the history's Gram matrix is
    # nearly singular at once, and singular when m = 20 > n = 8 (an unguarded
    # least-squares solve fails here).
    n = 8
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(n, generator=generator, dtype=torch.float64)
    u = u / torch.linalg.vector_norm(u)
    w = 0.99 * torch.outer(u, u) + 1e-8 * contractive_matrix(n, 1.0, seed=1)
    x = torch.randn(3, n, generator=generator, dtype=torch.float64)

    def f(z, x):
        return torch.tanh(z @ w.T + x)

    z0 = torch.zeros(3, n, dtype=torch.float64)
    # An unreachable tolerance: keep iterating long after the residual hits rounding.
    z, info = implicit.fixed_point(
        f,
        z0,
        x,
        solver="anderson",
        m=m,
        batched=True,
        tol=1e-300,
        max_iter=80,
        on_failure="ignore",
        return_info=True,
    )
    history = torch.tensor(info.history)
    assert torch.isfinite(history).all() and torch.isfinite(z).all()
    reached = int((history <= 1e-12).nonzero()[0])
    assert reached <= 25  # plain fixed-point iteration needs about 70
    assert float(history[reached:].max()) <= 1e-11


def _one_step(solver, step_back, residual_change):
    """One Anderson step on g(z) = 1 − z from z = (2, 0), with one step of history."""
    fn = Residual(lambda z: 1 - z, lambda z: z.new_zeros(z.shape[0]))
    z = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    r = fn(z)
    previous = z - torch.tensor([step_back], dtype=torch.float64)
    state = solver.init(fn, previous, r - torch.tensor([residual_change], dtype=torch.float64))
    z_next, _, state = solver.step(fn, z, r, state)
    return z, r, z_next, state


def test_exploding_coefficients_fall_back_to_the_mixing_step():
    # The residual barely changed over the last step (1e-6 for a unit step): cancelling
    # it would take γ ≈ 1e6 times that step.
    solver = Anderson(m=3, mixing=0.5, max_coefficient=100.0)
    z, r, z_next, state = _one_step(solver, [1.0, 0.0], [1e-6, 0.0])
    assert torch.equal(z_next, z + 0.5 * r)
    assert not state.valid.any()  # the history restarts
    # With a larger bound the same history is used (the fallback is what made the step).
    solver = Anderson(m=3, mixing=0.5, max_coefficient=1e7)
    z, r, z_next, state = _one_step(solver, [1.0, 0.0], [1e-6, 0.0])
    assert not torch.allclose(z_next, z + 0.5 * r) and state.valid.any()


def test_the_first_step_is_the_mixing_step_and_takes_no_slot():
    solver = Anderson(m=3, mixing=0.5, start_ratio=0.0)
    fn = Residual(lambda z: 1 - z, lambda z: z.new_zeros(z.shape[0]))
    z = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    r = fn(z)
    state = solver.init(fn, z, r)
    z_next, r_next, after_first = solver.step(fn, z, r, state)
    assert torch.equal(z_next, z + 0.5 * r) and after_first is state
    # The second step remembers the first in the first slot: all m slots hold real steps.
    _, _, after_second = solver.step(fn, z_next, r_next, after_first)
    assert after_second.valid.tolist() == [[True, False, False]]


def test_zero_residual_change_is_not_remembered():
    solver = Anderson(m=3)
    z, r, z_next, state = _one_step(solver, [1.0, 0.0], [0.0, 0.0])
    assert torch.equal(z_next, z + r) and not state.valid.any()


def test_a_step_from_a_point_with_no_reading_starts_the_history():
    # init at one point, the step from another: no largest residual is known before the
    # step (the driver's first step is from init's point, and its later ones know the
    # reading before them), so no fast contraction is either, and the step is kept.
    solver = Anderson(m=3, start_ratio=0.5)
    # The residual fell a thousandfold over that step: fast, had it been read.
    *_, state = _one_step(solver, [1.0, 0.0], [-1000.0, 0.0])
    assert state.dr is not None and state.valid.any()


def test_float32():
    p = TanhProblem(n=6, batch=3, norm=0.9, dtype=torch.float32)
    z, info = implicit.fixed_point(
        p.f, p.z0, p.x, solver="anderson", batched=True, tol=1e-5, return_info=True
    )
    assert info.status == "converged" and z.dtype == torch.float32
    assert_fixed_point(p.f, z, p.x, z0=p.z0, tol=1e-5)


def test_misspelt_and_invalid_options():
    p = TanhProblem()
    with pytest.raises(TypeError, match="'mm'"):
        implicit.fixed_point(p.f, p.z0, p.x, solver="anderson", mm=3)
    for bad in [{"m": 0}, {"m": 2.5}, {"mixing": 0.0}, {"mixing": 1.5}]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            Anderson(**bad)
    with pytest.raises(ValueError, match="regularization"):
        Anderson(regularization=-1.0)
    with pytest.raises(ValueError, match="max_coefficient"):
        Anderson(max_coefficient=0.0)


@pytest.mark.parametrize("max_coefficient", [1e4, 3.0])
def test_history_in_place_and_recorded_give_the_same_iterates(max_coefficient):
    # The implicit forward (no graph) updates the history in place; with a graph
    # (backward="unroll") it copies. Both must take the same steps, restarts included
    # (a small max_coefficient makes some steps fall back to plain mixing).
    p = TanhProblem(n=6, batch=4, norm=0.9)
    options = dict(
        solver="anderson",
        max_coefficient=max_coefficient,
        batched=True,
        tol=1e-12,
        max_iter=60,
        return_info=True,
    )
    with torch.no_grad():
        z_in_place, info_in_place = implicit.fixed_point(p.f, p.z0, p.x, **options)
    z_recorded, info_recorded = implicit.fixed_point(p.f, p.z0, p.x, backward="unroll", **options)
    assert z_recorded.requires_grad
    assert rel_err(z_recorded, z_in_place) <= 1e-13
    assert info_recorded.iterations == info_in_place.iterations
    assert info_recorded.history == pytest.approx(info_in_place.history, rel=1e-8, abs=1e-14)


def _contraction_problem(rate):
    """``f(z) = rate · z + x``, the same rate in every direction: plain mixing shrinks
    the residual by exactly ``rate`` per step."""
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(2, 6)

    def f(z, x):
        return rate * z + x

    return f, torch.zeros_like(x), x, x / (1 - rate)


def test_plain_mixing_while_it_contracts_fast():
    # Contraction 0.3 < start_ratio: Picard's iterates exactly, and no history kept.
    f, z0, x, root = _contraction_problem(0.3)
    kwargs = {"batched": True, "tol": 1e-12, "return_info": True}
    z, info = implicit.fixed_point(f, z0, x, solver="anderson", **kwargs)
    z_picard, picard = implicit.fixed_point(f, z0, x, solver="fixed_point", **kwargs)
    assert info.status == "converged" and rel_err(z, root) <= 1e-11
    assert torch.equal(z, z_picard) and info.history == picard.history
    # start_ratio=0: classic Anderson, which solves a linear map in a few steps.
    _, classic = implicit.fixed_point(f, z0, x, solver="anderson", start_ratio=0.0, **kwargs)
    assert classic.iterations < info.iterations


def test_plain_mixing_steps_cost_what_picard_s_steps_cost():
    # The start test reads the largest residual norm the driver has read already: a
    # plain mixing step makes the calls of a Picard step (one norm pass each), the whole
    # solve two more (the first step's norm and the history's test, made once).
    f, z0, x, _ = _contraction_problem(0.3)
    counts = {}
    for solver in ("anderson", "fixed_point"):
        with torch.no_grad(), _OpCounter() as ops:
            implicit.fixed_point(f, z0, x, solver=solver, batched=True, tol=1e-12)
        counts[solver] = ops.counts
    assert counts["anderson"]["linalg_vector_norm"] == counts["fixed_point"]["linalg_vector_norm"]
    extra = sum(counts["anderson"].values()) - sum(counts["fixed_point"].values())
    assert 0 <= extra <= 2, (counts["anderson"], counts["fixed_point"])


class _OpCounter(TorchDispatchMode):
    """Counts the aten calls by name (``mm``, ``linalg_vector_norm``, ...)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def test_extrapolates_from_the_first_slow_step():
    f, z0, x, root = _contraction_problem(0.8)
    kwargs = {"batched": True, "tol": 1e-12, "return_info": True}
    z, info = implicit.fixed_point(f, z0, x, solver="anderson", **kwargs)
    _, classic = implicit.fixed_point(f, z0, x, solver="anderson", start_ratio=0.0, **kwargs)
    assert info.status == "converged" and rel_err(z, root) <= 1e-11
    # The first step is plain either way; the second finds 0.8 > 0.5 and the history
    # starts with that step: the same iterates as classic Anderson.
    assert info.history == pytest.approx(classic.history, rel=1e-12, abs=1e-15)


def test_a_stopped_problem_does_not_start_extrapolation():
    # Problem 0 converges at once (its residual then stays put); problem 1 contracts
    # fast. Nothing is slow: plain mixing to the end.
    f, z0, x, _ = _contraction_problem(0.3)
    z0 = z0.clone()
    z0[0] = x[0] / 0.7
    state_seen = []
    solver = Anderson()
    fn = Residual(lambda z, x: f(z, x) - z, args=(x,))
    original = solver.step

    def step(fn, z, r, state):
        out = original(fn, z, r, state)
        state_seen.append(out[2])
        return out

    object.__setattr__(solver, "step", step)
    _, info = solver.solve(fn, z0, None, tol=1e-12, max_iter=100)
    assert info.converged.all() and all(state.dr is None for state in state_seen)
    assert info.hint is None  # nothing learned about the Jacobian


def test_extrapolates_from_the_start_where_the_loop_reads_the_host_rarely():
    # check_every > 1 (an accelerator's default): no host read per step for the test.
    f, z0, x, _ = _contraction_problem(0.3)
    fn = Residual(lambda z, x: f(z, x) - z, args=(x,))
    r0 = fn(z0)
    assert Anderson(check_every=4).init(fn, z0, r0).dr is not None
    assert Anderson(check_every=1).init(fn, z0, r0).dr is None


def test_start_ratio_is_checked():
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="start_ratio"):
            Anderson(start_ratio=bad)
