"""The fast sample of the fuzz: every family × solver × backward mode that makes sense,
once, on small problems, each under an alarm so that a hang fails instead of hanging.

The large run is ``benchmarks/fuzz.py``.
"""

from __future__ import annotations

import classify
import families
import matrix
import pytest

#: Seconds one case may take: four times the slowest legitimate case on a busy core.
CASE_SECONDS = 10.0

CASES = matrix.fast_sample()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_fast_sample(case):
    result = classify.run_with_alarm(case, CASE_SECONDS)
    assert result.outcome in classify.OK_OUTCOMES, (
        f"{result.outcome}: {result.reason} [{result.note}]; reproduce with "
        f"python benchmarks/fuzz.py --case {case.id}"
    )


def test_the_sample_covers_every_combination():
    seen = {(c.family, c.solver, c.backward) for c in CASES}
    doors = {(c.family, c.door) for c in CASES}
    for family in families.FAMILIES:
        for solver, backward, door in matrix.combinations(family):
            assert (family, solver, backward) in seen
            assert (family, door) in doors
    assert {c.solver for c in CASES} == {*matrix.SOLVERS, matrix.BLACKBOX}
    assert {c.backward for c in CASES} == set(matrix.BACKWARDS)
    assert {c.door for c in CASES} == set(matrix.DOORS)
