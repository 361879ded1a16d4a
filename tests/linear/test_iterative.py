"""What every iterative method shares (implicit.linear.IterativeSolver): warm start,
per-problem stop, true-residual restarts, zero right-hand sides, options, immutability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import rel_err
from systems import (
    F64,
    ITERATIVE,
    check_solution,
    contraction,
    generator,
    hard_and_easy,
    nonsymmetric,
    operator,
    reports_true_residual,
    rhs_of,
    run,
    spd,
    true_residual,
)

import implicit
from implicit import linear
from implicit.linear.base import CONVERGED, MAX_ITER


@pytest.mark.parametrize("method", ["cg", "bicgstab"])
def test_drifted_recurrence_is_restarted_from_the_true_residual(method, monkeypatch):
    # Near the attainable accuracy the recurrence's residual runs ahead of the true one.
    rounds = []
    cls = type(linear.resolve(method))
    iterate = cls.iterate

    def spy(self, op, rhs, x, **options):
        progress = iterate(self, op, rhs, x, **options)
        rounds.append((int(options["allowed"].sum()), progress.iterations))
        return progress

    monkeypatch.setattr(cls, "iterate", spy)
    matrix, rhs = spd(4, 30, 1e4, 0), rhs_of(4, 30, 0)
    tol = 10**-12.5
    result = run(cls(), operator(matrix), rhs, tol=tol, max_iter=3000)
    assert len(rounds) >= 2 and rounds[0][0] == 4 and rounds[1][0] >= 1
    check_solution(result, matrix, rhs, tol)
    # No budget left for the restart: the drifted problems are reported unconverged.
    first_round = rounds[0][1]
    result = run(cls(), operator(matrix), rhs, tol=tol, max_iter=first_round)
    truth = true_residual(matrix, result.x, rhs)
    assert result.codes.tolist() == [CONVERGED if r <= tol else MAX_ITER for r in truth]
    assert MAX_ITER in result.codes.tolist()
    # Below the attainable accuracy: restarts until max_iter, and no false claim.
    rounds.clear()
    result = run(cls(), operator(matrix), rhs, tol=1e-16, max_iter=300)
    assert result.codes.tolist() == [MAX_ITER] * 4 and result.iterations == 300
    assert reports_true_residual(result, matrix, rhs)


@pytest.mark.parametrize("method", sorted(ITERATIVE))
def test_per_problem_stop_freezes_the_easy_problems(method):
    matrix, rhs = hard_and_easy(method)
    solver = ITERATIVE[method]()
    together = run(solver, operator(matrix), rhs, tol=1e-10, max_iter=1000)
    check_solution(together, matrix, rhs, 1e-10)
    for b in (0, 2):
        alone = run(solver, operator(matrix[b : b + 1]), rhs[b : b + 1], tol=1e-10, max_iter=1000)
        assert alone.iterations < together.iterations / 2
        # Frozen once converged: more iterations would move x by about its residual
        # (~1e-11 of ‖x‖), far more than the round-off of batched products.
        assert rel_err(together.x[b], alone.x[0]) <= 1e-14


@pytest.mark.parametrize("method", ["cg", "gmres", "bicgstab"])
def test_jacobi_preconditioner_reduces_iterations(method):
    # Badly scaled, diagonally dominant (and symmetric, so SPD for cg).
    n = 30
    gen = generator(0)
    diagonal = torch.logspace(0, 4, n, dtype=F64)
    coupling = torch.rand(n, n, generator=gen, dtype=F64)
    coupling = 0.3 * (coupling + coupling.T) / n
    matrix = (torch.diag(diagonal) + coupling * diagonal.sqrt().outer(diagonal.sqrt())).unsqueeze(0)
    rhs = rhs_of(1, n, 0)
    inverse_diagonal = 1 / torch.diagonal(matrix, dim1=1, dim2=2)
    plain = run(linear.resolve(method), operator(matrix), rhs, tol=1e-10, max_iter=1000)
    jacobi = type(linear.resolve(method))(preconditioner=lambda r: r * inverse_diagonal)
    preconditioned = run(jacobi, operator(matrix), rhs, tol=1e-10, max_iter=1000)
    check_solution(plain, matrix, rhs, 1e-10)
    check_solution(preconditioned, matrix, rhs, 1e-10)
    assert preconditioned.iterations * 3 <= plain.iterations


class TestWarmStart:
    @pytest.mark.parametrize("method", sorted(ITERATIVE))
    def test_from_the_exact_solution(self, method):
        matrix, rhs = hard_and_easy(method)
        exact = torch.linalg.solve(matrix, rhs)
        saved = exact.clone()
        result = run(ITERATIVE[method](x0=exact), operator(matrix), rhs, tol=1e-10, max_iter=500)
        assert result.iterations <= 1
        check_solution(result, matrix, rhs, 1e-10)
        assert torch.equal(exact, saved)

    @pytest.mark.parametrize("method", sorted(ITERATIVE))
    def test_per_call_guess_takes_precedence_and_leaves_the_solver_unchanged(self, method):
        # The instance is configuration: a solve remembers nothing, and a per-call x0
        # (a layer's warm start) replaces the configured one for that call only.
        matrix, rhs = hard_and_easy(method)
        solver = ITERATIVE[method](x0=torch.zeros_like(rhs))
        before = repr(solver)
        cold = run(solver, operator(matrix), rhs, tol=1e-10, max_iter=1000)
        again = run(solver, operator(matrix), rhs, tol=1e-10, max_iter=1000)
        warm = run(solver, operator(matrix), rhs * 1.001, tol=1e-10, max_iter=1000, x0=cold.x)
        assert cold.iterations > 5 and again.iterations == cold.iterations
        assert torch.equal(again.x, cold.x) and repr(solver) == before
        assert warm.iterations < cold.iterations
        check_solution(warm, matrix, rhs * 1.001, 1e-10)

    def test_instances_are_immutable_and_compare_by_value(self):
        solver = linear.GMRES(restart=7)
        with pytest.raises(AttributeError):
            solver.restart = 3
        assert solver == linear.GMRES(restart=7) != linear.GMRES(restart=8)
        assert linear.Auto() == linear.Auto() and hash(linear.Dense()) == hash(linear.Dense())

    def test_previous_is_gone_with_a_pointer_to_the_layer(self):
        with pytest.raises(TypeError, match="warm_start_backward"):
            linear.GMRES(x0="previous")

    def test_broadcast_and_bad_shape(self):
        matrix, rhs = spd(3, 4, 5.0, 0), rhs_of(3, 4, 0)
        guess = torch.ones(4, dtype=torch.float32)  # broadcast over the batch, cast
        check_solution(
            run(linear.CG(x0=guess), operator(matrix), rhs, tol=1e-10, max_iter=50),
            matrix,
            rhs,
            1e-10,
        )
        with pytest.raises(ValueError, match="x0"):
            run(linear.CG(x0=torch.ones(5)), operator(matrix), rhs, tol=1e-10, max_iter=50)


@pytest.mark.parametrize("method", ["dense", "cg", "gmres", "bicgstab", "neumann"])
def test_zero_right_hand_side(method):
    matrix = spd(3, 4, 5.0, 0) / (-6 if method == "neumann" else 1)  # Neumann: ‖I + A‖ < 1
    rhs = rhs_of(3, 4, 0)
    rhs[1] = 0
    kwargs = {} if method == "dense" else {"x0": torch.full((3, 4), 0.5, dtype=F64)}
    result = run(
        type(linear.resolve(method))(**kwargs), operator(matrix), rhs, tol=1e-10, max_iter=200
    )
    assert torch.equal(result.x[1], torch.zeros(4, dtype=F64))
    assert result.codes.tolist() == [CONVERGED] * 3
    assert float(result.residual[1]) == 0
    everything_zero = run(
        linear.resolve(method), operator(matrix), torch.zeros_like(rhs), tol=1e-10, max_iter=200
    )
    assert torch.equal(everything_zero.x, torch.zeros_like(rhs))
    assert everything_zero.codes.tolist() == [CONVERGED] * 3
    if method != "dense":
        assert everything_zero.iterations == 0


@pytest.mark.parametrize("method", ["dense", "cg", "gmres", "bicgstab", "neumann", "one_step"])
def test_inputs_unchanged_and_float32(method):
    matrix = (spd(2, 5, 4.0, 0) / (-8 if method == "neumann" else 1)).float()
    rhs = rhs_of(2, 5, 0).float()
    saved = (matrix.clone(), rhs.clone())
    result = run(linear.resolve(method), operator(matrix), rhs, tol=1e-5, max_iter=100)
    assert torch.equal(matrix, saved[0]) and torch.equal(rhs, saved[1])
    assert result.x.dtype == torch.float32 and result.residual.dtype == torch.float32
    assert result.codes.tolist() == [CONVERGED, CONVERGED]
    if method != "one_step":
        assert float(true_residual(matrix, result.x, rhs).max()) <= 1e-5


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: linear.GMRES(restart=0), "restart"),
        (lambda: linear.GMRES(restart=True), "restart"),
        (lambda: linear.Neumann(damping=0), "damping"),
        (lambda: linear.Neumann(damping=1.5), "damping"),
        (lambda: linear.Neumann(damping=True), "damping"),
        (lambda: linear.Neumann(give_up_after=0), "give_up_after"),
        (lambda: linear.Neumann(preconditioner=lambda r: r), "no preconditioner"),
        (lambda: linear.Phantom(steps=0), "steps"),
        (lambda: linear.Phantom(damping=True), "damping"),
        (lambda: linear.Phantom(tol=1e-3), "not tol"),
        (lambda: implicit.solvers.FixedPoint(damping=True), "damping"),
        (lambda: implicit.solvers.Anderson(mixing=True), "mixing"),
        (lambda: implicit.solvers.Anderson(m=True), "m must"),
        (lambda: implicit.solvers.Broyden(check_every=True), "check_every"),
        (lambda: linear.Dense(ridge=-1.0), "ridge"),
        (lambda: linear.Dense(ridge=math.inf), "ridge"),
        (lambda: linear.Dense(chunk_size=0), "chunk_size"),
        (lambda: linear.CG(tol=0.0), r"CG\(tol"),
        (lambda: linear.BiCGStab(tol=math.nan), r"BiCGStab\(tol"),
        (lambda: linear.CG(max_iter=0), r"CG\(max_iter"),
        (lambda: linear.CG(max_iter=2.5), r"CG\(max_iter"),
        (lambda: linear.CG(x0="prev"), "x0"),
        (lambda: linear.Neumann(x0=[0.0]), "x0"),
        (lambda: linear.GMRES(x0=np.zeros(3)), "x0"),
        (lambda: linear.GMRES(preconditioner=3), "preconditioner"),
        (lambda: linear.Auto(max_dense=-1), "max_dense"),
        (lambda: linear.resolve("gmress"), "unknown backward 'gmress'"),
        (lambda: linear.GMRES(restrat=3), "restrat"),
    ],
)
def test_bad_options_name_the_argument(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize(
    "backward",
    [
        linear.GMRES(preconditioner=lambda r: -r, restart=3),
        linear.BiCGStab(preconditioner=lambda r: -r),
        linear.Neumann(damping=0.8),
    ],
    ids=["gmres", "bicgstab", "neumann"],
)
def test_instances_through_the_backward(backward):
    # For a fixed point (∂g/∂z)ᵀ = Jᵀ − I ≈ −I: M = −I is the natural preconditioner.
    w = contraction(1, 6, 0.8, 0)[0].requires_grad_()
    x = torch.randn(2, 6, dtype=F64, requires_grad=True)

    def gradients(mode):
        z = implicit.fixed_point(
            lambda z, x: torch.tanh(z @ w.T + x),
            torch.zeros(2, 6, dtype=F64),
            x,
            solver="fixed_point",
            backward=mode,
            batched=True,
            tol=1e-12,
            max_iter=500,
        )
        return torch.autograd.grad((z**2).sum(), [x, w])

    for got, want in zip(gradients(backward), gradients("dense")):
        assert rel_err(got, want) <= 1e-9


def test_transpose_of_an_iterative_state_solves_the_transposed_system():
    matrix, rhs = nonsymmetric(3, 8, 0.5, 2), rhs_of(3, 8, 2)
    gmres = linear.GMRES()
    state = gmres.transpose(gmres.init(operator(matrix, transpose=False)))
    check_solution(gmres.solve(state, rhs, tol=1e-11, max_iter=100), matrix.mT, rhs, 1e-11)


def _alone_cases():
    """``(method, matrix, rhs, tol, max_iter)``: batches whose problems end in every way
    a solve ends (converged, out of iterations, zero right-hand side, ill-conditioned,
    diverged)."""
    for method in sorted(ITERATIVE):
        matrix, rhs = hard_and_easy(method, n=12)
        yield method, matrix, rhs, 1e-10, 1000
        yield method, matrix, rhs, 1e-10, 3
        yield method, matrix, torch.cat([rhs[:2], torch.zeros_like(rhs[:1])]), 1e-10, 1000
    gen = generator(3)
    q1, _ = torch.linalg.qr(torch.randn(2, 10, 10, generator=gen, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(2, 10, 10, generator=gen, dtype=F64))
    singular = torch.stack([torch.logspace(0, 10, 10, dtype=F64), torch.ones(10, dtype=F64)])
    yield "gmres", q1 * singular.unsqueeze(1) @ q2.mT, rhs_of(2, 10, 3), 1e-6, 200
    grows = contraction(2, 6, 3.0, 4) - torch.eye(6, dtype=F64)
    yield "neumann", grows, rhs_of(2, 6, 4), 1e-10, 100


@pytest.mark.parametrize("case", list(_alone_cases()), ids=lambda case: case[0])
def test_one_problem_ends_as_in_a_batch(case):
    # A solve of one problem on the CPU tests its end on the host rather than by
    # per-problem bookkeeping: it reports what the batch's bookkeeping reports for it.
    method, matrix, rhs, tol, max_iter = case
    solver = ITERATIVE[method]()
    together = run(solver, operator(matrix), rhs, tol=tol, max_iter=max_iter)
    for b in range(rhs.shape[0]):
        alone = run(solver, operator(matrix[b : b + 1]), rhs[b : b + 1], tol=tol, max_iter=max_iter)
        assert alone.codes.tolist() == together.codes[b : b + 1].tolist()
        assert alone.codes.dtype == together.codes.dtype == torch.long
        assert rel_err(together.x[b], alone.x[0]) <= 1e-13
        for name in ("residual", "condition"):
            mine, theirs = getattr(alone, name)[0], getattr(together, name)[b]
            assert math.isnan(theirs) == math.isnan(mine)
            assert math.isnan(theirs) or abs(mine - theirs) <= 1e-6 * abs(theirs) + 1e-14
