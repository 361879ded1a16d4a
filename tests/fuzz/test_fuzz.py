"""The fast sample of the fuzz: every family × solver × backward mode that makes sense,
once, on small problems, each under an alarm so that a hang fails instead of hanging.

Cases that fail because of a known library bug are marked ``xfail(strict=True)``: when
the bug is fixed they pass, the strict mark fails the run, and the mark is removed.
The large run is ``benchmarks/fuzz.py``.
"""

from __future__ import annotations

import classify
import families
import matrix
import pytest

#: Seconds one case may take (the slowest legitimate case takes about 2 s on one core).
CASE_SECONDS = 5.0

#: case id → the bug it trips over (issue 18).
KNOWN_BUGS: dict[str, str] = {}

CASES = matrix.fast_sample()


def _param(case: matrix.Case):
    reason = KNOWN_BUGS.get(case.id)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
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


def test_known_bugs_are_cases_of_the_sample():
    assert set(KNOWN_BUGS) <= {case.id for case in CASES}
