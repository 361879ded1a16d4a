"""Result codes, the reports and the on_failure policy."""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch

import implicit
from implicit._results import (
    BREAKDOWN,
    CONVERGED,
    DIVERGED,
    ILL_CONDITIONED,
    MAX_ITER,
    NONFINITE,
    SEVERITY,
    STATUS_CODES,
    STATUS_NAMES,
    report_failure,
    status_name,
)


def solve_info(converged, residual, status="max_iter", message=""):
    return implicit.SolveInfo(
        converged=torch.tensor(converged),
        residual=torch.tensor(residual),
        iterations=7,
        f_evals=8,
        history=[1.0, 0.5],
        status=status,
        solver="fixed_point",
        message=message,
    )


def backward_info(converged, residual, status="max_iter"):
    return implicit.BackwardInfo(
        converged=torch.tensor(converged),
        residual=torch.tensor(residual),
        iterations=3,
        matvecs=4,
        status=status,
        method="gmres",
    )


def test_status_is_the_worst_over_the_batch():
    assert status_name(torch.tensor([CONVERGED, MAX_ITER, CONVERGED])) == "max_iter"
    assert status_name(torch.tensor([BREAKDOWN, NONFINITE, MAX_ITER])) == "nonfinite"
    assert status_name(torch.tensor([CONVERGED])) == "converged"
    assert status_name(torch.tensor([], dtype=torch.long)) == "converged"
    # A forward's codes are ordered by severity (SolveInfo.status_codes documents them).
    forward = [name for name in SEVERITY if STATUS_CODES[name] < ILL_CONDITIONED]
    assert forward == [STATUS_NAMES[code] for code in range(ILL_CONDITIONED)]
    assert list(STATUS_NAMES.values())[:2] == ["converged", "max_iter"]
    # The linear solves' own statuses rank among the others.
    assert status_name(torch.tensor([ILL_CONDITIONED, CONVERGED])) == "ill_conditioned"
    assert status_name(torch.tensor([ILL_CONDITIONED, MAX_ITER])) == "max_iter"
    assert status_name(torch.tensor([DIVERGED, BREAKDOWN, MAX_ITER])) == "diverged"
    assert status_name(torch.tensor([DIVERGED, NONFINITE])) == "nonfinite"
    assert SEVERITY[0] == "converged" and set(SEVERITY) == set(STATUS_NAMES.values())


class TestOnFailure:
    @pytest.mark.parametrize(
        "info",
        [solve_info([True, False], [0.0, 2.0]), backward_info([False, True], [0.5, 0.0])],
        ids=["forward", "backward"],
    )
    def test_warn_raise_ignore(self, info):
        with pytest.warns(implicit.ConvergenceWarning, match="did not converge") as record:
            report_failure(info, "warn", "some solve")
        assert record[0].filename == __file__
        with pytest.raises(implicit.ConvergenceError, match="some solve") as caught:
            report_failure(info, "raise", "some solve")
        assert caught.value.info is info
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report_failure(info, "ignore", "some solve")

    @pytest.mark.parametrize("on_failure", ["warn", "raise", "ignore"])
    def test_silent_when_converged(self, on_failure):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report_failure(solve_info([True, True], [0.0, 0.0], "converged"), on_failure, "x")
            report_failure(backward_info(True, 0.0, "converged"), on_failure, "x")

    def test_forward_message(self):
        info = solve_info([True, False, False], [0.0, 2.0, 3.5], message="scipy said hi")
        with pytest.raises(implicit.ConvergenceError) as caught:
            report_failure(info, "raise", "forward solve")
        message = str(caught.value)
        assert "forward solve did not converge: status 'max_iter' for 2 of 3 problem(s)" in message
        assert "worst residual 3.500e+00 after 7 iteration(s)" in message
        # A solver's own message replaces the generic advice.
        assert message.endswith("scipy said hi") and "Raise max_iter" not in message

    def test_backward_message_advises_on_the_linear_solve(self):
        with pytest.raises(implicit.ConvergenceError, match="preconditioner") as caught:
            report_failure(backward_info(False, math.nan, "breakdown"), "raise", "backward")
        # NaN is the worst residual, and reads as such.
        assert "status 'breakdown' for 1 of 1" in str(caught.value)
        assert "worst residual nan" in str(caught.value)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_non_finite_residuals_read_as_nan_and_inf(self, dtype):
        # Not inf for NaN, nor the dtype's largest number (3.403e+38) for inf.
        for value, text in ((math.nan, "nan"), (math.inf, "inf")):
            with pytest.warns(implicit.ConvergenceWarning, match=f"worst residual {text} after"):
                implicit.root_solve(
                    lambda z, value=value: torch.full_like(z, value),
                    torch.ones(2, dtype=dtype),
                    max_iter=3,
                )
        info = solve_info([False, False], [math.inf, math.nan])
        with pytest.raises(implicit.ConvergenceError, match="worst residual nan after"):
            report_failure(info, "raise", "forward solve")

    def test_the_error_pickles_with_its_report(self):
        with pytest.raises(implicit.ConvergenceError) as caught:
            implicit.fixed_point(lambda z: z + 1, torch.zeros(2), on_failure="raise", max_iter=2)
        error = pickle.loads(pickle.dumps(caught.value))
        assert type(error) is implicit.ConvergenceError and str(error) == str(caught.value)
        assert error.info.status == "max_iter" and error.info.iterations == 2
        assert torch.equal(error.info.residual, caught.value.info.residual)

    def test_the_error_is_a_runtime_error_and_the_warning_a_runtime_warning(self):
        assert issubclass(implicit.ConvergenceError, RuntimeError)
        assert issubclass(implicit.ConvergenceWarning, RuntimeWarning)


def test_solve_info_repr():
    info = solve_info([True, False], [1e-9, 2.0])
    info.backward = backward_info([True, True], [0.0, 0.0], "converged")
    text = repr(info)
    assert "status='max_iter'" in text and "converged=1/2" in text
    assert "worst_residual=2.000e+00" in text and "iterations=7" in text
    assert "BackwardInfo(" in text and "method='gmres'" in text
    scalar = solve_info(True, 1e-9, "converged")
    assert "converged=1/1" in repr(scalar)


def test_statuses_name_each_problem_nested_like_converged():
    info = solve_info([True, False], [0.0, 1.0])
    assert info.statuses == "max_iter"  # a report without codes: its batch status
    info.status_codes = torch.tensor([CONVERGED, NONFINITE])
    assert info.statuses == ["converged", "nonfinite"]
    info.status_codes = torch.tensor(MAX_ITER)
    assert info.statuses == "max_iter"
    info.status_codes = torch.tensor([[CONVERGED, BREAKDOWN], [MAX_ITER, CONVERGED]])
    assert info.statuses == [["converged", "breakdown"], ["max_iter", "converged"]]


def test_a_solver_that_reports_no_per_problem_fields_gets_them_from_its_summary():
    class Summary(implicit.solvers.Solver):
        """Reports only the batch's summary (as a solver written before the per-problem
        fields would)."""

        name = "summary"

        def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
            converged = torch.tensor([True, False, True])
            residual = torch.linalg.vector_norm(fn(z0), dim=1)
            return z0, implicit.SolveInfo(converged, residual, 5, 6, [1.0], "max_iter", "x")

    _, info = implicit.fixed_point(
        torch.sin,
        torch.zeros(3, 2),
        solver=Summary(),
        batched=True,
        on_failure="ignore",
        return_info=True,
    )
    assert info.iterations_per_problem.tolist() == [5, 5, 5]
    assert info.statuses == ["converged", "max_iter", "converged"]
