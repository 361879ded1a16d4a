"""The Neumann iteration (implicit/linear/neumann.py), plain and on shifted operators."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from systems import (
    F64,
    check_solution,
    contraction,
    generator,
    operator,
    reports_true_residual,
    rhs_of,
    run,
)

import implicit
from implicit import linear
from implicit.linear import JacobianOperator
from implicit.linear.base import CONVERGED, DIVERGED, MAX_ITER, NONFINITE
from implicit.linear.operator import GraphJacobian


class TestNeumann:
    def test_damping_converges_where_the_plain_series_diverges(self):
        # F = −1.5 I: x ← F x − rhs diverges; with damping ½ the iteration matrix is
        # ½ I + ½ F = −¼ I.
        n = 4
        matrix = (-2.5 * torch.eye(n, dtype=F64)).unsqueeze(0)
        rhs = rhs_of(1, n, 0)
        plain = run(linear.Neumann(), operator(matrix), rhs, tol=1e-10, max_iter=60)
        damped = run(linear.Neumann(damping=0.5), operator(matrix), rhs, tol=1e-10, max_iter=60)
        # The residual grows like 1.5^k: 1000-fold at k = 18, seen at the check of k = 20.
        assert plain.codes.tolist() == [DIVERGED] and plain.iterations == 20
        check_solution(damped, matrix, rhs, 1e-10)
        assert damped.iterations <= 20

    @pytest.mark.parametrize("shifted", [True, False])
    def test_divergence_stops_early(self, shifted):
        # F = W with ‖W‖₂ = ρ(W) = 3 (symmetric): the series grows like 3^k. It ran to
        # max_iter and returned a gradient of 1e29 under a max_iter warning.
        gen = generator(2)
        w = torch.randn(2, 6, 6, generator=gen, dtype=F64)
        w = w + w.mT
        w = 3 * w / torch.linalg.matrix_norm(w, ord=2).reshape(2, 1, 1)
        rhs = rhs_of(2, 6, 2)
        if shifted:
            op = JacobianOperator.of_fixed_point(
                lambda z: torch.einsum("bij,bj->bi", w, z), torch.zeros_like(rhs)
            )
        else:
            op = operator(w.mT - torch.eye(6, dtype=F64))
        result = run(linear.Neumann(), op, rhs, tol=1e-10, max_iter=100)
        assert result.codes.tolist() == [DIVERGED, DIVERGED]
        assert result.iterations == 8  # 3^7 > 1000: seen at the second check
        assert bool((result.residual > 1000).all() & (result.residual < 1e5).all())
        assert reports_true_residual(result, w.mT - torch.eye(6, dtype=F64), rhs)
        never = run(linear.Neumann(divergence=None), op, rhs, tol=1e-10, max_iter=100)
        assert never.codes.tolist() == [MAX_ITER, MAX_ITER] and never.iterations == 100

    @pytest.mark.parametrize("check_every", [None, 2])
    def test_early_stops_per_problem_with_windows_apart(self, check_every):
        # Diagonal S per problem, x ← S x − rhs: factor 0.1 and 0.6 converge (each
        # residual halves over 4 and over 6 iterations), 0.95 does not halve over the 6
        # iterations of give_up_after (max_iter at 6), 3 grows 81-fold by the window
        # check at 4 (diverged). Read every iteration (None), the loop rules the stops
        # out on the host while every residual halves and the largest stays below
        # every divergence threshold; every 2 iterations, it computes their masks.
        factors = torch.tensor([0.1, 0.6, 0.95, 3.0], dtype=F64)
        rhs = rhs_of(4, 5, 3)
        op = JacobianOperator.of_fixed_point(
            lambda z: factors.unsqueeze(1) * z, torch.zeros_like(rhs)
        )
        solver = linear.Neumann(give_up_after=6, divergence=50, check_every=check_every)
        result = run(solver, op, rhs, tol=1e-10, max_iter=100)
        assert result.codes.tolist() == [CONVERGED, CONVERGED, MAX_ITER, DIVERGED]
        want = -rhs[:2] / (1 - factors[:2].unsqueeze(1))  # x = S x − rhs
        assert rel_err(result.x[:2], want) <= 1e-9
        # The slow problem keeps its sixth iterate, −rhs (1 + s + … + s⁵).
        assert rel_err(result.x[2], -rhs[2] * (1 - 0.95**6) / 0.05) <= 1e-12
        # The two fast problems alone, where no stop fires: the same iterates.
        alone_op = JacobianOperator.of_fixed_point(
            lambda z: factors[:2].unsqueeze(1) * z, torch.zeros_like(rhs[:2])
        )
        alone = run(
            solver,
            alone_op,
            rhs[:2],
            tol=1e-10,
            max_iter=100,
        )
        assert alone.codes.tolist() == [CONVERGED, CONVERGED]
        assert torch.equal(alone.x, result.x[:2])
        # Out of iterations after the fast problem ended: the other one ran out.
        target = 1e-10 * torch.linalg.vector_norm(rhs[:2], dim=1)
        allowed = torch.ones(2, dtype=torch.bool)
        short = solver.iterate(alone_op, rhs[:2], None, target=target, max_iter=20, allowed=allowed)
        assert short.codes.tolist() == [CONVERGED, MAX_ITER] and short.iterations == 20
        # give_up_after=3, off the window of 4: 0.8³ > ½ stops at 3, while every
        # problem runs; the fast one goes on to converge.
        slow = torch.tensor([0.1, 0.8], dtype=F64)
        solver = linear.Neumann(give_up_after=3, check_every=check_every)
        op = JacobianOperator.of_fixed_point(lambda z: slow.unsqueeze(1) * z, rhs[:2] * 0)
        result = run(solver, op, rhs[:2], tol=1e-10, max_iter=100)
        assert result.codes.tolist() == [CONVERGED, MAX_ITER]
        assert rel_err(result.x[1], -rhs[1] * (1 - 0.8**3) / 0.2) <= 1e-12

    def test_a_transient_hump_is_not_divergence(self):
        # F = [[0.5, 40], [0, 0.5]]: ρ = 0.5 but ‖F^k‖ grows to ~20 first.
        f = torch.tensor([[[0.5, 40.0], [0.0, 0.5]]], dtype=F64)
        matrix = f.mT - torch.eye(2, dtype=F64)
        rhs = torch.tensor([[0.0, 1.0]], dtype=F64)
        result = run(linear.Neumann(), operator(matrix), rhs, tol=1e-12, max_iter=200)
        check_solution(result, matrix, rhs, 1e-12)

    def test_overflow_stops_at_the_last_finite_iterate(self):
        matrix = (-5 * torch.eye(3, dtype=F64)).unsqueeze(0)
        never = linear.Neumann(divergence=None)
        result = run(never, operator(matrix), rhs_of(1, 3, 0), tol=1e-10, max_iter=5000)
        assert result.codes.tolist() == [NONFINITE]
        assert result.iterations < 1000
        # The returned iterate is the last one whose residual was finite.
        assert bool(torch.isfinite(result.x).all() and torch.isfinite(result.residual).all())

    def test_is_the_classic_deq_backward(self):
        # x_k = −Σ_{i<k} (Fᵀ)^i rhs: the truncated Neumann series, k = iterations.
        f = contraction(1, 5, 0.5, 0)
        rhs = rhs_of(1, 5, 0)
        result = run(
            linear.Neumann(max_iter=8),
            operator(f.mT - torch.eye(5, dtype=F64)),
            rhs,
            tol=1e-10,
            max_iter=8,
        )
        series = torch.zeros_like(rhs)
        term = rhs
        for _ in range(result.iterations):
            series = series - term
            term = term @ f[0]
        assert result.codes.tolist() == [MAX_ITER] and result.iterations == 8
        assert rel_err(result.x, series) <= 1e-13

    @pytest.mark.parametrize("shifted", [True, False])
    def test_rows_stop_on_their_own(self, shifted):
        # Per row F = 0.1 I (done in a few steps), −5 I (diverges after that) and
        # 0.7 I (slow): each row ends as it would alone. shifted: the classic DEQ
        # path, products of F from a recorded graph of f; otherwise products of A = F − I.
        n = 3
        scales = torch.tensor([0.1, -5.0, 0.7], dtype=F64)
        rhs = rhs_of(3, n, 0)

        def solve(rows):
            f = scales[rows].reshape(-1, 1, 1) * torch.eye(n, dtype=F64)
            if shifted:
                op = JacobianOperator.of_fixed_point(
                    lambda z: torch.einsum("bij,bj->bi", f.mT, z), torch.zeros_like(rhs[rows])
                )
                assert op.shifted
            else:
                op = operator(f - torch.eye(n, dtype=F64))
            return run(linear.Neumann(), op, rhs[rows], tol=1e-12, max_iter=5000)

        together = solve(slice(None))
        assert together.codes.tolist() == [CONVERGED, DIVERGED, CONVERGED]
        assert bool(torch.isfinite(together.x).all())
        for b in range(3):
            alone = solve(slice(b, b + 1))
            assert torch.equal(together.x[b], alone.x[0])
            assert alone.codes.tolist() == together.codes[b : b + 1].tolist()


class TestShiftedNeumann:
    """Neumann on a fixed point's adjoint, with products of ∂f/∂z (one pass per step)."""

    @staticmethod
    def operators(batch, n, norms, seed):
        """``A = Fᵀ − I`` per sample as a shifted graph (products of ``Fᵀ``) and as a
        plain one (products of ``A``); ``‖F_b‖₂ = norms[b]``."""
        gen = generator(seed)
        f = torch.randn(batch, n, n, generator=gen, dtype=F64)
        f = f * (torch.tensor(norms, dtype=F64) / torch.linalg.matrix_norm(f, ord=2))[:, None, None]

        def fixed_point_map(z):  # ∂/∂z = F (batched): its VJP is Fᵀ w
            return torch.einsum("bij,bj->bi", f, z)

        z = torch.zeros(batch, n, dtype=F64)
        shifted = JacobianOperator.of_fixed_point(fixed_point_map, z)
        plain = JacobianOperator(
            GraphJacobian.record(lambda z: fixed_point_map(z) - z, z), transposed=True
        )
        return shifted, plain, f.mT - torch.eye(n, dtype=F64)

    @pytest.mark.parametrize("x0", [None, "tensor"])
    def test_matches_the_plain_iteration(self, x0):
        # Contractions of different strengths: the samples converge at different steps.
        shifted, plain, matrix = self.operators(4, 6, [0.1, 0.5, 0.8, 0.95], seed=0)
        rhs = rhs_of(4, 6, 0)
        start = None if x0 is None else 0.3 * rhs_of(4, 6, 1)
        results = [
            run(linear.Neumann(x0=start), op, rhs, tol=1e-12, max_iter=1000)
            for op in (shifted, plain)
        ]
        assert shifted.shifted and not plain.shifted
        fast, slow = results
        assert fast.iterations == slow.iterations
        assert torch.equal(fast.codes, slow.codes) and bool((fast.codes == CONVERGED).all())
        assert rel_err(fast.x, slow.x) <= 1e-13
        check_solution(fast, matrix, rhs, 1e-12)
        assert reports_true_residual(fast, matrix, rhs)
        # One product per iteration (and one for a warm start's initial residual).
        assert shifted.products == fast.iterations + (x0 is not None)

    @pytest.mark.parametrize("check_every", [None, 4])
    def test_a_zero_right_hand_side_keeps_the_zero_start(self, check_every):
        # From zero, x = S x = 0 is made only where the loop needs it: a problem that
        # never moves (zero right-hand side) keeps it beside one that iterates, and a
        # solve in which none moves returns it, with the plain operator's answers.
        shifted, plain, matrix = self.operators(2, 5, [0.5, 0.5], seed=2)
        rhs = rhs_of(2, 5, 3)
        rhs[0] = 0
        solver = linear.Neumann(check_every=check_every)
        fast, slow = (run(solver, op, rhs, tol=1e-12, max_iter=100) for op in (shifted, plain))
        assert fast.codes.tolist() == slow.codes.tolist() == [CONVERGED, CONVERGED]
        assert torch.equal(fast.x[0], torch.zeros(5, dtype=F64))
        assert rel_err(fast.x, slow.x) <= 1e-13
        assert rel_err(fast.x[1], torch.linalg.solve(matrix[1], rhs[1])) <= 1e-10
        for rows in (slice(0, 1), slice(None)):
            zero = torch.zeros_like(rhs[rows])
            op = self.operators(zero.shape[0], 5, [0.5] * zero.shape[0], seed=2)[0]
            none = run(solver, op, zero, tol=1e-12, max_iter=100)
            assert none.iterations == 0 and none.codes.tolist() == [CONVERGED] * zero.shape[0]
            assert torch.equal(none.x, zero)

    def test_a_damped_iteration_uses_the_plain_products(self):
        shifted, _, matrix = self.operators(2, 4, [0.5, 0.5], seed=1)
        rhs = rhs_of(2, 4, 2)
        result = run(linear.Neumann(damping=0.7), shifted, rhs, tol=1e-10, max_iter=500)
        check_solution(result, matrix, rhs, 1e-10)


class TestDivergenceThroughTheBackward:
    """A fixed point whose map is not contractive, found by Newton: Neumann's series
    diverges; it ran all its iterations and returned a gradient of about 3^max_iter."""

    @staticmethod
    def problem():
        gen = generator(4)
        w = torch.randn(6, 6, generator=gen, dtype=F64)
        w = 3 * (w + w.T) / torch.linalg.matrix_norm(w + w.T, ord=2)
        b = torch.randn(6, generator=gen, dtype=F64, requires_grad=True)
        reference = torch.linalg.solve(torch.eye(6, dtype=F64) - w.T, torch.ones(6, dtype=F64))
        return (lambda z, b: w @ z + b), b, reference

    def solve(self, backward, on_failure="warn"):
        f, b, reference = self.problem()
        z, info = implicit.fixed_point(
            f, torch.zeros(6, dtype=F64), b, solver="newton", backward=backward, tol=1e-12,
            on_failure=on_failure, return_info=True,
        )  # fmt: skip
        assert info.status == "converged"
        return z, b, info, reference

    def test_stops_early_and_says_so(self):
        z, _, info, _ = self.solve("neumann")
        with pytest.warns(implicit.ConvergenceWarning, match="'diverged'.*not contractive"):
            z.sum().backward()
        assert info.backward.status == "diverged" and info.backward.iterations <= 8
        z, _, info, _ = self.solve("neumann", on_failure="raise")
        with pytest.raises(implicit.ConvergenceError) as caught:
            z.sum().backward()
        assert caught.value.info.status == "diverged"

    def test_auto_hands_it_to_gmres(self):
        z, b, info, reference = self.solve(linear.Auto(max_dense=0), on_failure="raise")
        z.sum().backward()
        assert info.backward.method == "neumann+gmres"
        assert rel_err(b.grad, reference) <= 1e-10


class TestStagnation:
    """A tolerance below what the dtype resolves: the residual stagnates at rounding
    level, and the solve stops there with status "stagnated" rather than iterate to
    max_iter (or, under auto, hand the problem to a GMRES that cannot do better)."""

    @staticmethod
    def deq_step(backward, tol, dtype=torch.float32, max_iter=200):
        """``∇ Σ z`` to ``x`` for ``z = tanh(W z + x)`` (‖W‖₂ = 0.5, 3 × 80), solved
        in ``dtype``, and the forward's report; the float64 reference by the implicit
        function theorem in closed form."""
        gen = generator(5)
        w = torch.randn(80, 80, generator=gen, dtype=F64)
        w = 0.5 * w / torch.linalg.matrix_norm(w, ord=2)
        x64 = torch.randn(3, 80, generator=gen, dtype=F64)
        x = x64.to(dtype).requires_grad_()
        z, info = implicit.fixed_point(
            lambda z, x: torch.tanh(z @ w.to(dtype).T + x), torch.zeros_like(x), x,
            backward=backward, tol=tol, max_iter=max_iter, batched=True,
            on_failure="ignore", return_info=True,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(z.sum(), x)
        z64 = z.detach().double()
        for _ in range(200):
            z64 = torch.tanh(z64 @ w.T + x64)
        d = 1 - torch.tanh(z64 @ w.T + x64) ** 2  # σ'(W z + x), (B, n)
        eye = torch.eye(80, dtype=F64)
        # ∇x Σ z = (I − diag(d) W)⁻ᵀ d... per row: (diag(d)(I − W diag(d))⁻¹)ᵀ 1.
        system = eye - w.mT.unsqueeze(0) * d.unsqueeze(1)  # (I − W diag(d))ᵀ = I − diag(d)Wᵀ
        reference = d * torch.linalg.solve(system, torch.ones_like(d))
        return grad, info, reference

    def test_neumann_stops_at_rounding_level(self):
        grad, info, reference = self.deq_step(linear.Neumann(), tol=1e-12)
        report = info.backward
        # (A problem whose recomputed residual happens to round to zero has converged.)
        assert report.status == "stagnated"
        assert torch.equal(report.converged, report.residual <= 1e-12)
        assert report.iterations <= 40  # where it stagnated, not max_iter = 200
        # As good as float32 allows: the residual a few units of rounding.
        assert float(report.residual.max()) <= 8 * torch.finfo(torch.float32).eps
        assert rel_err(grad.double(), reference) <= 1e-5

    def test_auto_keeps_neumann_and_reports_it(self):
        grad, info, reference = self.deq_step("auto", tol=1e-12)
        report = info.backward
        assert report.method == "neumann" and report.status == "stagnated"
        assert report.iterations <= 40
        assert rel_err(grad.double(), reference) <= 1e-5
        # The same problem in float64 (rounding level 5e-9 times lower) converges.
        grad64, info64, reference = self.deq_step("auto", tol=1e-12, dtype=F64)
        assert info64.backward.status == "converged"
        assert rel_err(grad64, reference) <= 1e-10

    def test_reported_through_on_failure(self):
        gen = generator(6)
        w = torch.randn(70, 70, generator=gen)
        w = 0.5 * w / torch.linalg.matrix_norm(w, ord=2)
        x = torch.randn(2, 70, generator=gen, requires_grad=True)
        # The forward at its default tol (reached on every CPU); the backward's tol is
        # below float32's rounding level, where Neumann stagnates.
        backward = linear.Neumann(tol=1e-12, max_iter=100)
        for on_failure in ("warn", "raise"):
            z = implicit.fixed_point(
                lambda z, x: torch.tanh(z @ w.T + x), torch.zeros_like(x), x,
                batched=True, on_failure=on_failure, backward=backward,
            )  # fmt: skip
            if on_failure == "warn":
                with pytest.warns(implicit.ConvergenceWarning, match="'stagnated'.*rounding"):
                    z.sum().backward()
            else:
                with pytest.raises(implicit.ConvergenceError) as caught:
                    z.sum().backward()
                assert caught.value.info.status == "stagnated"

    def test_a_slow_contraction_is_not_stagnation(self):
        # S = 0.97 I in float32, tol 1e-5: the residual decreases slowly, far above
        # rounding level; auto hands it to GMRES, which solves it.
        s = torch.full((2, 70), 0.97)
        x = torch.ones(2, 70, requires_grad=True)
        z, info = implicit.fixed_point(
            lambda z, x: s * z + x, torch.zeros_like(x), x, solver="newton", tol=1e-5,
            batched=True, on_failure="raise", return_info=True,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(z.sum(), x)
        assert info.backward.method == "neumann+gmres" and info.backward.status == "converged"
        assert rel_err(grad, 1 / (1 - s)) <= 1e-5
