"""Condition estimates and the "ill_conditioned" status (linear/dense.py, linear/_condition.py)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from conftest import EXACT_MODES
from systems import F64, generator, operator, rhs_of, run

import implicit
from implicit import linear
from implicit._results import condition_limit
from implicit.linear.base import BREAKDOWN, CONVERGED, ILL_CONDITIONED, MAX_ITER


def with_condition(batch: int, n: int, condition: float, seed: int, dtype=F64) -> torch.Tensor:
    """Non-symmetric matrices with singular values log-spaced over ``[1, condition]``."""
    gen = generator(seed)
    q1, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=F64))
    singular = torch.logspace(0, math.log10(condition), n, dtype=F64)
    return (q1 * singular.unsqueeze(1) @ q2.mT).to(dtype)


class TestDense:
    @pytest.mark.parametrize("condition", [1.0, 1e3, 1e6, 1e9, 1e12])
    @pytest.mark.parametrize("transpose", [False, True])
    def test_estimates_kappa_1(self, condition, transpose):
        # Within a factor 3 above the limit (Hager's estimator refines the free estimate
        # from a hundredth of the limit on), a cruder free estimate far below it.
        matrix = with_condition(4, 12, condition, 0)
        result = run(linear.Dense(), operator(matrix, transpose), rhs_of(4, 12, 0), tol=1e-10)
        truth = torch.linalg.cond(matrix, p=1)
        low = 3 if condition > condition_limit(F64) else 100
        estimate = result.condition
        assert bool(((estimate <= truth * 1.0001) & (estimate >= truth / low)).all())
        for code, flagged in zip(result.codes.tolist(), truth > condition_limit(F64)):
            # (A direct solve whose residual is above √eps is a breakdown.)
            assert code in ((ILL_CONDITIONED, BREAKDOWN) if flagged else (CONVERGED,))

    def test_per_problem_and_singular(self):
        matrix = torch.stack(
            [torch.eye(3, dtype=F64), torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=F64))]
        )
        result = run(linear.Dense(), operator(matrix), rhs_of(2, 3, 0), tol=1e-10)
        assert float(result.condition[0]) == pytest.approx(1.0)
        assert result.condition[1] == math.inf and result.codes[1] != CONVERGED

    def test_float32_limit(self):
        matrix = with_condition(2, 8, 1e5, 1, torch.float32)
        result = run(linear.Dense(), operator(matrix), rhs_of(2, 8, 0).float(), tol=1e-5)
        assert result.codes.tolist() == [ILL_CONDITIONED] * 2
        assert bool((result.condition > condition_limit(torch.float32)).all())

    def test_refinement_after_newton_reports_the_same_estimate(self):
        # Newton's factorisation near the root stands in for the Jacobian (dense+refine).
        gen = generator(3)
        n, batch = 24, 8
        a = with_condition(1, n, 1e9, 3)[0]
        b = torch.randn(batch, n, generator=gen, dtype=F64, requires_grad=True)

        def g(z, b):
            return z @ a.T + 0.01 * torch.tanh(z) - b

        reports = []
        # Newton's dense inner solve hands its factorisation over, the Krylov one none.
        for inner in ("dense", "krylov"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                z, info = implicit.root_solve(
                    g, torch.zeros(batch, n, dtype=F64), b, batched=True, tol=1e-9,
                    solver=implicit.solvers.Newton(linear=inner), backward="dense",
                    return_info=True,
                )  # fmt: skip
                z.sum().backward()
            reports.append(info.backward)
            assert any("ill-conditioned" in str(w.message) for w in caught)
        refined, direct = reports
        assert refined.method == "dense+refine" and direct.method == "dense"
        assert refined.status == direct.status == "ill_conditioned"
        ratio = refined.condition / direct.condition
        assert bool(((ratio > 0.5) & (ratio < 2)).all())


class TestIterative:
    @pytest.mark.parametrize("method", ["gmres", "bicgstab"])
    def test_a_lower_bound_that_sees_the_amplification(self, method):
        matrix = with_condition(3, 10, 1e10, 2)
        rhs = rhs_of(3, 10, 2)
        solver = linear.resolve(method)
        result = run(solver, operator(matrix), rhs, tol=1e-13, max_iter=200)
        truth = torch.linalg.cond(matrix)
        assert bool((result.condition <= truth * 1.0001).all())
        assert bool((result.condition > condition_limit(F64)).all())
        assert set(result.codes.tolist()) <= {ILL_CONDITIONED, MAX_ITER}

    def test_flagged_per_problem_when_every_problem_converged(self):
        # Diagonal systems, solved by GMRES in 3 iterations: κ = 1e10 (the estimate
        # sees about κ/3, above 1/√eps) beside the identity (estimate 1).
        matrix = torch.stack(
            [torch.diag(torch.tensor([1.0, 1e-5, 1e-10], dtype=F64)), torch.eye(3, dtype=F64)]
        )
        rhs = torch.ones(2, 3, dtype=F64)
        result = run(linear.GMRES(), operator(matrix), rhs, tol=1e-8, max_iter=50)
        assert result.codes.tolist() == [ILL_CONDITIONED, CONVERGED]
        assert float(result.condition[0]) > condition_limit(F64)
        assert float(result.condition[1]) == pytest.approx(1.0)
        assert bool((result.residual <= 1e-8).all())

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
    def test_one_problem_read_on_the_host_as_the_tensor_compares(self, dtype):
        # One solved problem's flag is read on the host (condition.item() > limit); a
        # tensor's comparison rounds the limit to its dtype: the same test only if no
        # number of the dtype lies between the limit and its rounding.
        limit = condition_limit(dtype)
        nearest = torch.tensor([limit], dtype=dtype)
        for step in (-math.inf, math.inf):
            around = torch.cat([nearest, torch.nextafter(nearest, torch.full_like(nearest, step))])
            assert (around > limit).tolist() == [value > limit for value in around.tolist()]

    def test_one_problem_flagged_as_in_a_batch(self):
        # Float32, GMRES in 8 iterations: the estimates above and below the limit.
        matrix = with_condition(2, 8, 1e5, 1, torch.float32)
        matrix[1] = torch.eye(8)
        rhs = rhs_of(2, 8, 0).float()
        together = run(linear.GMRES(), operator(matrix), rhs, tol=1e-3, max_iter=50)
        assert together.codes.tolist() == [ILL_CONDITIONED, CONVERGED]
        for b in range(2):
            alone = run(
                linear.GMRES(), operator(matrix[b : b + 1]), rhs[b : b + 1], tol=1e-3, max_iter=50
            )
            assert alone.codes.tolist() == together.codes[b : b + 1].tolist()
            assert (float(alone.condition) > condition_limit(torch.float32)) == (b == 0)

    def test_zero_right_hand_side_is_not_measured(self):
        matrix = with_condition(2, 5, 10.0, 0)
        rhs = torch.stack([rhs_of(1, 5, 0)[0], torch.zeros(5, dtype=F64)])
        result = run(linear.GMRES(), operator(matrix), rhs, tol=1e-12, max_iter=50)
        assert math.isfinite(float(result.condition[0])) and math.isnan(result.condition[1])
        assert result.codes.tolist() == [CONVERGED, CONVERGED]

    def test_cg_and_neumann(self):
        spd = with_condition(2, 6, 1.0, 0)  # orthogonal: well conditioned
        spd = spd @ spd.mT + 1e-10 * torch.eye(6, dtype=F64)
        spd = spd.mT @ torch.diag(torch.logspace(0, 10, 6, dtype=F64)) @ spd
        result = run(linear.CG(), operator(spd), rhs_of(2, 6, 1), tol=1e-14, max_iter=500)
        assert bool((result.condition > 1e3).all())
        contraction = 0.5 * with_condition(2, 6, 1.0, 1) - torch.eye(6, dtype=F64)
        result = run(
            linear.Neumann(), operator(contraction), rhs_of(2, 6, 1), tol=1e-12, max_iter=100
        )
        # ‖A‖ ≤ 1.5 and ‖A⁻¹‖ ≤ 2: κ₂ ≤ 3.
        assert result.codes.tolist() == [CONVERGED] * 2
        assert bool(((result.condition >= 1 / 3) & (result.condition <= 3)).all())


class TestThroughTheBackward:
    def nearly_singular(self, dtype, smallest):
        # The example of issue 18: a root whose Jacobian is nearly singular gave a huge
        # gradient and no word about it.
        a = with_condition(1, 6, 1 / smallest, 5, dtype)[0]
        c = torch.ones(6, dtype=dtype, requires_grad=True)
        return a, c

    @pytest.mark.parametrize("dtype, smallest", [(F64, 1e-9), (torch.float32, 1e-5)])
    @pytest.mark.parametrize("method", ["auto", "dense", "gmres"])
    def test_reported_under_on_failure(self, dtype, smallest, method):
        a, c = self.nearly_singular(dtype, smallest)
        backward = dataclasses.replace(linear.resolve(method), tol=1e-12 if dtype == F64 else 1e-6)
        # A black box's answer: the forward's own residual test is not what is tested.
        z, info = implicit.root_solve(
            lambda z, c: a @ z - c, torch.linalg.solve(a, c.detach()), c,
            backward=backward, tol=1.0, return_info=True,
        )  # fmt: skip
        with pytest.warns(implicit.ConvergenceWarning, match="ill-conditioned: condition estimate"):
            z.sum().backward(retain_graph=True)
        assert info.backward.status == "ill_conditioned"
        assert not bool(info.backward.converged)
        assert info.backward.condition.shape == ()
        truth = torch.linalg.cond(a.double())
        assert float(info.backward.condition) <= 3 * float(truth)
        # The gradient is still the solve's answer: A⁻ᵀ 1, to the accuracy κ allows.
        reference = torch.linalg.solve(a.double().T, torch.ones(6, dtype=F64))
        error = torch.linalg.vector_norm(c.grad.double() - reference) / reference.norm()
        assert float(error) < 1e-2
        c.grad = None
        with pytest.raises(implicit.ConvergenceError) as caught:
            implicit.root_solve(
                lambda z, c: a @ z - c, z.detach(), c, backward=backward, tol=1.0,
                on_failure="raise",
            ).sum().backward()  # fmt: skip
        assert caught.value.info.status == "ill_conditioned"

    @pytest.mark.parametrize("backward", EXACT_MODES)
    def test_well_conditioned_is_quiet_and_measured(self, backward):
        gen = generator(0)
        w = 0.5 * torch.randn(4, 5, 5, generator=gen, dtype=F64) / math.sqrt(5)
        x = torch.randn(4, 5, generator=gen, dtype=F64, requires_grad=True)
        z, info = implicit.fixed_point(
            lambda z, x: torch.tanh(torch.einsum("bij,bj->bi", w, z) + x),
            torch.zeros(4, 5, dtype=F64), x, batched=True, backward=backward,
            tol=1e-10, on_failure="raise", return_info=True,
        )  # fmt: skip
        z.sum().backward()
        condition = info.backward.condition
        assert info.backward.status == "converged" and condition.shape == (4,)
        assert bool(((condition >= 0.1) & (condition < 100)).all())

    @pytest.mark.parametrize("backward", ["one_step", "phantom"])
    def test_inexact_modes_make_no_estimate(self, backward):
        x = torch.ones(3, dtype=F64, requires_grad=True)
        z, info = implicit.fixed_point(
            lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros(3, dtype=F64), x,
            backward=backward, return_info=True,
        )  # fmt: skip
        z.sum().backward()
        assert math.isnan(float(info.backward.condition)) and info.backward.status == "converged"
