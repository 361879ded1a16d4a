"""The benchmark runner's own references and sections, at toy sizes (no timings checked)."""

from __future__ import annotations

import importlib
import math
import os
import string
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import anderson_step
import deq_step
import mixed_precision
import scalar_batch
import seed_newton
import small_solve
import walk
from _common import Row

import implicit


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


@pytest.mark.parametrize("precision", list(mixed_precision.PRECISIONS))
def test_mixed_precision_rows_at_a_toy_size(precision):
    # Its float64 reference is the float64 step: the float32 row is float32-accurate,
    # the others within a few units of their half dtype.
    row = mixed_precision.measure(precision, 4, 16, 1e-3, repeats=1)
    assert row["forward"].startswith("converged") and row["backward"].startswith("converged")
    limit = 1e-2 if precision == "float32" else 0.1
    assert all(0 <= row[key] <= limit for key in ("z", "dL/dx", "dL/dW")), row


def test_deq_section_counts_and_errors():
    rows, extra = deq_step.run(4, 8, rounds=1, quick=True, use_peers=False)
    assert set(extra["floors"]) == {"torch"} and set(extra["kernels"]) == {"torch"}
    assert all(0 < t < math.inf for t in extra["kernels"]["torch"])
    names = {row.name for row in rows}
    assert "implicit anderson / neumann" in names and "autograd through anderson (unroll)" in names
    for row in rows:
        assert row.f_evals >= 2 and row.vjps >= 1
        assert len(row.times) == 3 and math.isfinite(row.overhead)
        # float32: the gradient to about the tolerance (the sweeps go up to 1e-3).
        assert row.error <= max(1e-3, 10 * row.tol)
    fixed = next(r for r in rows if r.name == "implicit fixed_point / neumann" and r.tol == 1e-6)
    # Per step: every forward evaluation (discovery's included), one graph for the
    # backward; the adjoint's products and one pass for the partials.
    assert fixed.f_evals >= 3 and fixed.vjps >= 2


@pytest.mark.parametrize(("batch", "width"), [(4, 8), (16, 32)])
def test_eager_loop_is_the_arithmetic_of_fixed_point_neumann(batch, width):
    # The reference row must do what implicit fixed_point / neumann does, no more, no
    # less: the same counts and the same gradients (bitwise, where we checked). (f hands
    # no value to Python: the library looks for captures at z0 only, in the evaluation
    # whose residual the solver reuses.)
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


@pytest.mark.parametrize(("n", "batch"), [(10, None), (6, 4)])
def test_seed_floor_differentiates_g_at_its_root(n, batch):
    w, x, c = seed_newton.problem(n, batch)
    forward, (w_leaf, x_leaf) = seed_newton.one_vjp(w, x)
    g = forward()
    assert float(torch.linalg.vector_norm(g.detach())) <= 1e-12
    # One VJP of g = tanh(W z + x) − z at the root z, z held: ∇x = D c, ∇W = (D c)ᵀ z
    # with D = diag(1 − z²).
    grad_w, grad_x = torch.autograd.grad((c * g).sum(), (w_leaf, x_leaf))
    z = torch.zeros_like(x)
    for _ in range(2000):
        z = torch.tanh(z @ w.T + x)
    pre = (1 - z * z) * c
    assert rel_err(grad_x, pre) <= 1e-12
    assert rel_err(grad_w, pre.reshape(-1, n).T @ z.reshape(-1, n)) <= 1e-12


def _row(name, group, ms, error=None, floor_ms=None, tol=1e-6, note=""):
    return Row(
        name,
        group=group,
        tol=tol,
        times=[ms / 1e3],
        error=error,
        floor=None if floor_ms is None else floor_ms / 1e3,
        note=note,
        overhead_median=None if floor_ms is None else ms / floor_ms,
    )


@pytest.fixture
def runner(monkeypatch):
    # Importing the runner pins the process to one core: not the test process.
    monkeypatch.setattr(os, "sched_setaffinity", lambda *args: None, raising=False)
    return importlib.import_module("run")


def test_match_takes_the_fastest_row_as_accurate_and_the_least_floor(runner):
    peer = _row("TorchDEQ", "TorchDEQ", 100.0, error=1e-6)
    rows = [
        peer,
        _row("fast but inexact", "implicit", 10.0, error=1e-3, floor_ms=5.0),
        _row("accurate", "implicit", 40.0, error=5e-7, floor_ms=30.0),
        _row("accurate, fewer products", "implicit", 50.0, error=1e-6, floor_ms=20.0),
        _row("eager, inexact", "eager loop", 1.0, error=1e-3, floor_ms=0.5),
        _row("eager", "eager loop", 25.0, error=1e-6, floor_ms=20.0),
    ]
    found = runner.match(peer, rows)
    assert found.best.name == "accurate"
    assert found.ratio == pytest.approx(100 / 40)
    assert found.eager == pytest.approx(100 / 25)
    assert found.bound == pytest.approx(100 / 20)
    none = runner.match(_row("exact peer", "jaxopt", 5.0, error=1e-12), rows)
    assert none.best is None and math.isnan(none.ratio)


def test_targets_section_reads_each_target_off_the_rows(runner):
    # The goals are for the default (anderson / auto) against each peer at its best: the
    # least ratio over the peer's rows. A faster non-default row does not count.
    default = "implicit anderson / auto"
    small = [
        _row("TorchDEQ anderson / fixed_point_iter", "TorchDEQ", 30.0, error=1e-6),
        _row("TorchDEQ anderson / fixed_point_iter", "TorchDEQ", 20.0, error=1e-5, tol=1e-5),
        _row("jaxopt anderson / normal_cg (jit)", "jaxopt", 4.0, error=2e-6),
        _row(default, "implicit", 5.0, error=1e-6, floor_ms=3.5),
        _row(default, "implicit", 4.0, error=1e-5, floor_ms=2.8, tol=1e-5),
        _row("implicit fixed_point / neumann", "implicit", 3.0, error=1e-6, floor_ms=3.5),
        _row("eager", "eager loop", 4.5, error=1e-6, floor_ms=3.5),
    ]
    big = [
        _row("TorchDEQ anderson / fixed_point_iter", "TorchDEQ", 100.0, error=5e-7),
        _row(default, "implicit", 66.0, error=4e-7, floor_ms=56.0),
        _row("implicit fixed_point / neumann", "implicit", 66.0, error=4e-7, floor_ms=56.0),
        _row("eager", "eager loop", 63.0, error=4e-7, floor_ms=56.0),
        _row("eager", "eager loop", 40.0, error=3e-6, floor_ms=30.0, tol=1e-5),
    ]
    seed = [
        _row("implicit newton / dense (n = 10, 1 problem)", "implicit newton / dense", 1.0),
        _row("by hand (n = 10, 1 problem)", "autograd through newton, Jacobian by hand", 1.0),
        _row("one VJP (n = 10, 1 problem)", "one VJP", math.nan),
    ]
    for row, backward_ms in zip(seed, ("0.400", "0.280", "0.040")):
        row.note = backward_ms
    page = runner.targets_section({"64x256": small, "256x512": big}, seed)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in page.splitlines()}
    torchdeq_small = next(v for k, v in lines.items() if "TorchDEQ" in k and "64 × 256" in k)
    # Against the 1e-5 row: 20 / 4 (the 1e-6 row gives 30 / 5); the eager loop's and the
    # floor's least ratios: 20 / 4.5 and 20 / 2.8.
    assert "5.00× (1e-05 against" in torchdeq_small
    assert "| 4.44× | 7.14× | yes |" in torchdeq_small
    torchdeq_big = next(v for k, v in lines.items() if "TorchDEQ" in k and "256 × 512" in k)
    assert "1.52× (" in torchdeq_big and "| 1.59× | 1.79× | no |" in torchdeq_big
    jaxopt = next(v for k, v in lines.items() if "jaxopt" in k)
    assert "0.80× (" in jaxopt and "| 0.89× | 1.14× | no |" in jaxopt
    assert not any("jaxopt" in k and "256 × 512" in k for k in lines)
    # A peer row more accurate than every default run fails the goal, whatever the rest.
    exact = _row("TorchDEQ anderson / fixed_point_iter", "TorchDEQ", 1e3, error=1e-9, tol=1e-7)
    page = runner.targets_section({"64x256": [*small, exact]}, None)
    line = next(v for v in page.splitlines() if "TorchDEQ at its best" in v)
    assert "1 peer rows more accurate than any" in line and line.endswith("| no |")
    overhead = next(v for k, v in lines.items() if k.startswith("overhead"))
    assert "| 1.18 | 1.12 | 1 | yes |" in overhead  # the eager loop at the main tolerance
    newton_line = next(v for k, v in lines.items() if k.startswith("Newton n = 10"))
    assert "| 0.70× | – | 7.00× (one VJP) | no |" in newton_line


def test_scalar_section_at_a_small_batch():
    rows = scalar_batch.run(1, batch=300, subset=30)
    solution, gradients, loop, _ = rows
    assert solution.error <= 1e-10 and loop.error <= 1e-10
    assert gradients.error <= 1e-10
    assert all(row.median > 0 for row in rows)


def test_the_page_carries_the_generators_current_text(runner):
    """docs/benchmarks.md is generated: its prose must be what run.py writes today, so that
    a change of wording made in one place and not the other is caught."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    header = [text for text, *_ in string.Formatter().parse(runner.HEADER) if text]
    prose = [*header, runner.DEQ_INTRO, runner.targets_section({}, None).split("\n\n|")[0]]
    for module in (seed_newton, scalar_batch, importlib.import_module("warm_start")):
        prose.append(module.__doc__.split("\n\n", 1)[1])
    missing = [text[:60] for text in prose if text not in page]
    assert not missing, f"docs/benchmarks.md lacks the generator's text: {missing}"


def test_the_default_solve_walks_a_bounded_part_of_the_library():
    # One default fixed_point and its backward (benchmarks/walk.py): the functions and
    # files of the package it runs. The bound is the count when it was set; a change
    # that adds a layer to the default path must say why, here.
    functions = walk.walk()
    files = {path for path, _, _ in functions}
    # The public fallbacks of torch's private names take a few more calls.
    limit = 73 if implicit._torch.FALLBACKS else 70
    listing = "\n".join(f"{path}:{line} {name}" for path, line, name in functions)
    assert len(functions) <= limit, f"{len(functions)} functions:\n{listing}"
    assert len(files) <= 11, f"{len(files)} files: {sorted(files)}"


def test_the_small_solve_runs_the_iterations_its_fit_assumes():
    # benchmarks/small_solve.py fits time = a + b·k from two iteration counts: both the
    # forward and the backward must converge in exactly k iterations, the eager loop too.
    small_solve.settle()
    W, x = small_solve.problem(True)
    for k in small_solve.KS:
        info = small_solve.library_step(W, x, k, info=True)
        assert info.iterations == info.backward.iterations == k
        assert info.status == info.backward.status == "converged"
        _, passes, _ = small_solve.counts(small_solve.eager_step, W, x, k)
        assert passes == k + 1  # the step's backward, then one per Neumann term
        # The eager forward: the threshold's two reads, then one per iteration.
        reads, _, _ = small_solve.counts(small_solve.eager_step, *small_solve.problem(False), k)
        assert reads == k + 2
    reads, passes, calls = small_solve.counts(small_solve.library_step, W, x, small_solve.KS[0])
    assert reads > 0 and passes == small_solve.KS[0] + 2  # and the pullback
    assert calls > reads
    assert small_solve.fit({4: 3.0, 24: 13.0}) == (1.0, 0.5)


def test_the_anderson_step_runs_the_iterations_its_fit_assumes():
    # benchmarks/anderson_step.py fits time = a + b·k: each solve runs exactly max_iter
    # iterations, and Anderson extrapolates (more operations per iteration than Picard).
    W, x = anderson_step.problem(3, 16)
    for solver in anderson_step.SOLVERS.values():
        for k in anderson_step.KS:
            _, info = anderson_step.solve(solver, W, x, k)
            assert info.iterations == k and info.status == "max_iter"
    picard, anderson = (
        anderson_step.per_iteration_counts(solver, W, x)
        for solver in anderson_step.SOLVERS.values()
    )
    assert 0 < picard[0] < anderson[0] and picard[1] >= 1


def test_the_default_takes_picards_steps_on_the_benchmark_cell():
    # The DEQ cell contracts its residual about threefold per plain step: the default
    # Anderson never extrapolates there, and its step is fixed_point / neumann's
    # arithmetic (the same counts, the same gradients). Width 128: above auto's dense
    # size, where it runs Neumann.
    p = deq_step.DEQProblem.make(16, 128)
    found = []
    for solver, backward in (("anderson", "auto"), ("fixed_point", "neumann")):
        deq_step._COUNTER.f_evals = deq_step._COUNTER.vjps = 0
        contender = deq_step.implicit_contender(p, solver, backward, 1e-6)
        grads = deq_step.flat_grads(contender.make(deq_step._counted_tanh)())
        found.append((deq_step._COUNTER.f_evals, deq_step._COUNTER.vjps, grads))
    (f_default, vjps_default, default), (f_picard, vjps_picard, picard) = found
    assert (f_default, vjps_default) == (f_picard, vjps_picard)
    assert torch.equal(default, picard)
