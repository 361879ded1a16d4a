"""Per-problem reports of every driver: iterations and statuses beside the batch's."""

from __future__ import annotations

import pytest
import torch

import implicit

D = torch.float64
RATES = torch.tensor([0.1, 0.5, 0.8, 0.95], dtype=D)
TARGETS = torch.tensor([2.0, 0.5, 30.0, 7.0], dtype=D)
CENTRES = torch.tensor([[1.0, -1.0], [3.0, 2.0], [-4.0, 0.5], [0.1, 0.2]], dtype=D)


def fixed_point(solver, **options):
    def run(rows):
        rates = RATES[rows].unsqueeze(1)
        return implicit.fixed_point(
            lambda z: rates * torch.tanh(z) + 1,
            torch.zeros(len(rows), 2, dtype=D),
            solver=solver,
            batched=True,
            return_info=True,
            tol=1e-10,
            max_iter=500,
            **options,
        )

    return run


def root(solver, **options):
    def run(rows):
        return implicit.root_solve(
            lambda z, a: z + z**3 - a,
            torch.zeros(len(rows), dtype=D),
            TARGETS[rows],
            solver=solver,
            batched=True,
            return_info=True,
            tol=1e-10,
            max_iter=200,
            **options,
        )

    return run


def minimum(solver, least_squares=False):
    def run(rows):
        centres = CENTRES[rows]
        if least_squares:
            return implicit.least_squares(
                lambda z: torch.cat([(z - centres) ** 2, z - centres], dim=1),
                torch.zeros(len(rows), 2, dtype=D),
                solver=solver,
                batched=True,
                return_info=True,
                tol=1e-10,
            )
        return implicit.minimize(
            lambda z: ((z - centres) ** 4).sum(1) + ((z - centres) ** 2).sum(1),
            torch.zeros(len(rows), 2, dtype=D),
            solver=solver,
            batched=True,
            return_info=True,
            tol=1e-10,
        )

    return run


CASES = {
    "picard": fixed_point("fixed_point"),
    # Extrapolating from the start: the default's choice of when to start is made for
    # the whole batch (see Anderson's start_ratio).
    "anderson": fixed_point("anderson", start_ratio=0.0),
    "broyden": fixed_point("broyden"),
    "newton": root("newton"),
    "bisection": root("bisection", lower=-1.0, upper=40.0),
    "chandrupatla": root("chandrupatla", lower=-1.0, upper=40.0),
    "scipy-per-sample": root(implicit.solvers.Scipy("df-sane", strategy="per_sample")),
    "lbfgs": minimum("lbfgs"),
    "modified-newton": minimum("newton"),
    "levenberg-marquardt": minimum("levenberg_marquardt", least_squares=True),
    "gauss-newton": minimum("gauss_newton", least_squares=True),
}


@pytest.mark.parametrize("case", CASES)
def test_each_problem_reports_the_iterations_it_takes_when_solved_alone(case):
    run = CASES[case]
    everything = list(range(len(RATES)))
    _, info = run(everything)
    alone = [run([b])[1].iterations for b in everything]
    assert info.iterations_per_problem.tolist() == alone
    assert info.iterations_per_problem.dtype == torch.long
    assert info.iterations == max(alone) and len(set(alone)) > 1  # they do differ
    assert info.statuses == ["converged"] * len(RATES)
    assert info.status_codes.tolist() == [0] * len(RATES)


def test_each_problem_reports_its_own_status_and_the_batch_its_worst():
    rates = torch.tensor([[0.1], [0.99], [1e100]], dtype=D)  # converges, too slow, overflows
    _, info = implicit.fixed_point(
        lambda z: rates * z + 1,
        torch.zeros(3, 1, dtype=D),
        solver="fixed_point",
        batched=True,
        max_iter=40,
        on_failure="ignore",
        return_info=True,
    )
    assert info.statuses == ["converged", "max_iter", "nonfinite"]
    assert info.status_codes.tolist() == [0, 1, 4] and info.status == "nonfinite"
    steps = info.iterations_per_problem.tolist()
    assert steps[1] == 40 == info.iterations and steps[0] < 40 and steps[2] < 5


def test_bracketing_and_minimisation_statuses_per_problem():
    _, info = implicit.root_solve(
        lambda z: z**2 - torch.tensor([2.0, -1.0], dtype=D),  # the second has no root
        torch.zeros(2, dtype=D),
        solver="bisection",
        lower=0.0,
        upper=3.0,
        batched=True,
        on_failure="ignore",
        return_info=True,
    )
    assert info.statuses == ["converged", "failed"]
    assert info.iterations_per_problem.tolist() == [info.iterations, 0]
    _, info = implicit.minimize(
        lambda z: (z - torch.tensor([[1.0], [2.0]], dtype=D)).pow(2).sum(1),
        torch.tensor([[0.0], [float("inf")]], dtype=D),
        batched=True,
        on_failure="ignore",
        return_info=True,
    )
    assert info.statuses == ["converged", "nonfinite"]
    assert info.iterations_per_problem[1] == 0
