"""The driver every iterative solver runs in (implicit/solvers/base.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TanhProblem, contractive_matrix, rel_err
from solver_checks import counting_test
from torch.utils._python_dispatch import TorchDispatchMode

import implicit
from implicit._batch import Factorization
from implicit.solvers import Residual

test_picard_counts_every_evaluation = counting_test("fixed_point")
test_scipy_counts_every_evaluation = counting_test("scipy")


def problems(batch=5, n=4):
    """Contractions of different strengths (the problems finish at different steps):
    ``f(z, x, w)`` for a batch, the matrices ``w`` and the data ``x``."""
    norms = torch.linspace(0.1, 0.9, batch, dtype=torch.float64)
    w = torch.stack([contractive_matrix(n, float(s), seed=i) for i, s in enumerate(norms)])
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def f(z, x, w):
        return torch.tanh(torch.einsum("bij,bj->bi", w, z) + x)

    return f, x, w


def solve_batch_and_each_row(f, z0, *args, check_every):
    """Picard on the whole batch and on each row alone (float64, tol 1e-10): asserts that
    every row ends as it would alone (iterate and residual, bitwise); returns the
    batch's iterate and report and the rows' reports."""
    solver = implicit.solvers.FixedPoint(check_every=check_every)
    options = dict(
        solver=solver, batched=True, tol=1e-10, max_iter=200, return_info=True, on_failure="ignore"
    )
    z, info = implicit.fixed_point(f, z0, *args, **options)
    alone = []
    for b in range(z0.shape[0]):
        rows = slice(b, b + 1)
        z_b, info_b = implicit.fixed_point(f, z0[rows], *(a[rows] for a in args), **options)
        assert torch.equal(z[b], z_b[0])
        assert float(info.residual[b]) == float(info_b.residual[0])
        alone.append(info_b)
    return z, info, alone


@pytest.mark.parametrize("check_every", [1, 3])
def test_each_problem_stops_where_it_would_alone(check_every):
    # With check_every=1 (the CPU default) the driver skips the per-problem bookkeeping
    # while no problem has finished; with 3 it always does it. Either way a problem
    # stops changing once converged: the same answer and count as when solved alone.
    f, x, w = problems()
    _, info, alone = solve_batch_and_each_row(f, torch.zeros_like(x), x, w, check_every=check_every)
    assert info.iterations == max(i.iterations for i in alone)
    assert len({i.iterations for i in alone}) > 1  # they did finish at different steps
    assert bool(info.converged.all())
    # The history is the worst residual after each iteration: non-increasing here.
    assert info.history[0] == max(float(i.history[0]) for i in alone)


@pytest.mark.parametrize("check_every", [1, 3])
def test_a_problem_that_blows_up_after_another_finished(check_every):
    # Row 0 converges at once, row 1 overflows at the third step (after row 0 has
    # stopped), row 2 converges slowly: each ends as it would alone, the overflowing
    # one at its last finite iterate.
    scale = torch.tensor([[0.0], [1e150], [0.5]], dtype=torch.float64)
    shift = torch.tensor([[0.3], [1.0], [0.2]], dtype=torch.float64)

    def f(z, scale, shift):
        return scale * z + shift

    z0 = torch.ones(3, 1, dtype=torch.float64)
    z, info, alone = solve_batch_and_each_row(f, z0, scale, shift, check_every=check_every)
    assert info.status == "nonfinite"
    assert info.converged.tolist() == [True, False, True]
    # z₁ = 1e150 + 1 is the last iterate whose residual (1e300 − z₁) is finite.
    assert float(z[1]) == pytest.approx(1e150, rel=1e-12)
    assert alone[0].iterations == 1 and alone[1].iterations == 2 and alone[2].iterations > 20
    assert info.iterations == alone[2].iterations
    assert math.isinf(info.history[2])  # the overflow shows in the history


@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_a_problem_that_blows_up_before_any_finished(kind, check_every):
    # Row 0 turns non-finite at its third evaluation while row 1 (slow) still runs: no
    # problem has finished, so with check_every=1 the driver is on its fast path then.
    # Each row ends as it would alone, row 0 at its last finite iterate.
    slope = torch.tensor([[0.5], [0.2]], dtype=torch.float64)

    def f(z, slope):
        step = slope * z + 3
        if kind == "inf":
            return torch.where(z > 5, math.inf, step)
        return torch.where(z > 5, math.nan, step)

    z0 = torch.ones(2, 1, dtype=torch.float64)
    z, info, alone = solve_batch_and_each_row(f, z0, slope, check_every=check_every)
    assert info.status == "nonfinite"
    assert info.converged.tolist() == [False, True]
    # 1 → 3.5 → 4.75 → 5.375, whose image is not finite: 4.75 has the last finite residual.
    assert float(z[0]) == 4.75
    assert float(z[1]) == pytest.approx(3 / 0.8, rel=1e-9)
    assert [i.status for i in alone] == ["nonfinite", "converged"]


ITERATIVE = ["fixed_point", "anderson", "newton", "broyden"]


@pytest.mark.parametrize("solver", [*ITERATIVE, "scipy"])
def test_an_infinite_scale_never_passes_the_test(solver):
    # f(z0) = e¹⁰⁰ − 2 overflows float32: the scale max(‖z0‖, ‖f(z0)‖) of the stopping
    # test is infinite, and inf ≤ inf would pass it.
    with pytest.warns(implicit.ConvergenceWarning, match="nonfinite"):
        z, info = implicit.fixed_point(
            lambda z: torch.exp(z) - 2, torch.full((3,), 100.0), solver=solver, return_info=True
        )
    assert info.status == "nonfinite" and not bool(info.converged)
    assert info.iterations == 0 and torch.equal(z, torch.full((3,), 100.0))


@pytest.mark.parametrize("solver", [*ITERATIVE, "scipy"])
def test_an_infinite_iterate_never_passes_the_test(solver):
    # g(z) = 1 − tanh(z) vanishes at z = ∞: a finite (zero) residual at an infinite
    # iterate. In a batch, the other problems go on and converge.
    z0 = torch.tensor([[math.inf], [0.0], [1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0], [0.5], [-0.5]], dtype=torch.float64)
    with pytest.warns(implicit.ConvergenceWarning, match="'nonfinite' for 1 of 3"):
        z, info = implicit.root_solve(
            lambda z, b: b - torch.tanh(z),
            z0,
            b,
            solver=solver,
            batched=True,
            tol=1e-12,
            return_info=True,
        )
    assert info.status == "nonfinite" and info.converged.tolist() == [False, True, True]
    assert torch.allclose(z[1:], torch.atanh(b[1:]), rtol=1e-10, atol=0)


@pytest.mark.parametrize("solver", ITERATIVE)
def test_a_sample_with_an_infinite_scale_does_not_stop_the_others(solver):
    f, x, w = problems(batch=3)
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    z0[1, 2] = math.inf
    with pytest.warns(implicit.ConvergenceWarning, match="'nonfinite' for 1 of 3"):
        z, info = implicit.fixed_point(
            f, z0, x, w, solver=solver, batched=True, tol=1e-10, return_info=True
        )
    assert info.converged.tolist() == [True, False, True]
    assert torch.isnan(info.residual[1])
    assert torch.equal(z[1], z0[1])


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("check_every", [1, 3])
def test_a_problem_whose_iterate_turns_infinite_with_a_finite_residual(check_every, alone):
    # Picard on g(z) = b − tanh(z), replaced by the finite 1e308 beyond z = 5: problem 0
    # (b = 2, no root) walks past 5 and overflows, z = 1e308 + 1e308 = ∞, where its
    # residual is still finite (and large). It never counts as converged and ends
    # "nonfinite", alone (every iteration on the driver's fast path) or beside
    # problem 1 (b = 0.5), which converges.
    def g(z, b):
        return torch.where(z > 5, 1e308, b - torch.tanh(z))

    b = torch.tensor([[2.0], [0.5]], dtype=torch.float64)[: 1 if alone else 2]
    _, info = implicit.root_solve(
        g,
        torch.ones_like(b),
        b,
        solver=implicit.solvers.FixedPoint(check_every=check_every),
        batched=True,
        tol=1e-10,
        max_iter=100,
        return_info=True,
        on_failure="ignore",
    )
    assert info.converged.tolist() == ([False] if alone else [False, True])
    assert info.status == "nonfinite"


class _PicardWithHint(implicit.solvers.FixedPoint):
    """Picard that hands the backward the factorisation of ``∂g/∂z`` at its last
    iterate: a solver of one's own using the typed channel (``Solver.hint``)."""

    def init(self, fn, z, r):
        return {"fn": fn}

    def step(self, fn, z, r, state):
        z_new, r_new, _ = super().step(fn, z, r, None)
        return z_new, r_new, {"fn": fn, "z": z_new}

    def hint(self, state):
        blocks = state["fn"].linearize(state["z"])[1].dense()
        return implicit.linear.NearbyFactorization(Factorization.of(blocks))


@pytest.mark.parametrize("backward", ["dense", "gmres"])
def test_a_solver_hands_the_backward_a_typed_hint(backward):
    # 16 problems of 24 unknowns: Dense refines with the hint in a product or two and
    # gets the closed-form gradient; GMRES does not use it. The user's report never
    # holds the hint.
    p = TanhProblem(n=24, batch=16, norm=0.5)
    z, info = implicit.fixed_point(
        p.f,
        p.z0,
        p.x,
        solver=_PicardWithHint(),
        backward=backward,
        batched=True,
        tol=1e-12,
        max_iter=200,
        return_info=True,
    )
    assert info.hint is None
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=z.dtype)
    (grad,) = torch.autograd.grad(z, p.x, v)
    expected = (p.closed_form_dzdx(z).transpose(1, 2) @ v.unsqueeze(2)).squeeze(2)
    assert rel_err(grad, expected) <= 1e-10
    assert info.backward.method == ("dense+refine" if backward == "dense" else "gmres")
    if backward == "dense":
        assert info.backward.matvecs <= 2


def test_newton_returns_its_factorisation_as_a_hint():
    p = TanhProblem(n=6, batch=3)
    fn = Residual(lambda z: p.g(z, p.x.detach()), lambda z, r: torch.zeros(3, dtype=z.dtype))
    _, info = implicit.solvers.Newton().solve(fn, p.z0, None, tol=1e-10, max_iter=50)
    assert isinstance(info.hint, implicit.linear.NearbyFactorization)
    _, info = implicit.solvers.FixedPoint().solve(fn, p.z0, None, tol=1e-10, max_iter=200)
    assert info.hint is None


class _DriverCalls(TorchDispatchMode):
    """Counts the aten calls made outside the residual (``inside`` > 0 while in it)."""

    def __init__(self):
        super().__init__()
        self.count = self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not self.inside
        return func(*args, **(kwargs or {}))


def test_one_problem_s_bookkeeping():
    # Read every iteration (on the CPU), one problem costs the evaluations of g, three
    # calls per iteration (the step, the residual's norm, its read) and a few per solve:
    # the test, the report. Counted outside g, over solves of different lengths.
    w = contractive_matrix(6, 0.5, seed=0)
    x = torch.randn(1, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def calls(tol, max_iter):
        with _DriverCalls() as counter:

            def g(z):
                counter.inside += 1
                try:
                    return torch.tanh(z @ w.T + x) - z
                finally:
                    counter.inside -= 1

            z0 = torch.zeros(1, 6, dtype=torch.float64)
            _, info = implicit.solvers.FixedPoint().solve(
                Residual(g), z0, None, tol=tol, max_iter=max_iter
            )
        return counter.count, info

    short, info_short = calls(1e-300, 5)
    long, info_long = calls(1e-300, 10)
    assert info_short.status == info_long.status == "max_iter"
    assert long - short == 3 * 5
    converged, info = calls(1e-8, 100)
    assert info.status == "converged" and 5 < info.iterations < 100
    assert converged - 3 * info.iterations <= 24  # 48 before the driver's fast ending


@pytest.mark.parametrize("batch", [1, 3])
def test_observe_receives_the_largest_residual_norm_the_driver_read(batch):
    # A method that watches the batch's progress sees, before each step, the largest
    # residual norm of the iterate it steps from: the driver's history, as read.
    seen = []

    class Watching(implicit.solvers.FixedPoint):
        def observe(self, state, largest):
            seen.append(largest)
            return state

    W = contractive_matrix(6, 0.8, seed=1)
    x = torch.randn(batch, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, info = implicit.fixed_point(
        lambda z, x: torch.tanh(z @ W.T + x),
        torch.zeros(batch, 6, dtype=torch.float64),
        x,
        solver=Watching(),
        tol=1e-10,
        return_info=True,
    )
    assert info.status == "converged"
    # The last iterate ends the loop: the driver reads it but no step follows.
    assert seen == info.history[:-1]
    seen.clear()
    implicit.fixed_point(
        lambda z, x: torch.tanh(z @ W.T + x),
        torch.zeros(batch, 6, dtype=torch.float64),
        x,
        solver=Watching(check_every=4),  # no host read per iteration: nothing to hand on
        tol=1e-10,
    )
    assert seen == []
