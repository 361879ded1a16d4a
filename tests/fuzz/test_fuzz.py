"""The fast sample of the fuzz: every family × solver × backward mode that makes sense,
once, on small problems, and forward-mode and second-order cases of every family, each
under an alarm so that a hang fails instead of hanging. The large run is ``benchmarks/fuzz.py``.
"""

from __future__ import annotations

import classify
import families
import matrix
import pytest

#: Seconds one case may take: four times the slowest legitimate case on a busy core.
CASE_SECONDS = 10.0

CASES = matrix.fast_sample()


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_fast_sample(case):
    result = classify.run_with_alarm(case, CASE_SECONDS)
    assert result.outcome in classify.OK_OUTCOMES, (
        f"{result.outcome}: {result.reason} [{result.note}]; reproduce with "
        f"python benchmarks/fuzz.py --case {case.id}"
    )


def test_the_sample_covers_every_combination():
    # Each family's combinations, on the family or (SHARED) on one of its group.
    group = {family: matrix._group(family) for family in families.FAMILIES}
    seen = {(g, c.solver, c.backward) for c in CASES for g in group[c.family]}
    doors = {(c.family, c.door) for c in CASES}
    for family in families.FAMILIES:
        assert all(matrix.combinations(member) == matrix.combinations(family)
                   for member in group[family])  # fmt: skip
        own = {(c.solver, c.backward) for c in CASES if c.family == family}
        for solver, backward, door in matrix.combinations(family):
            assert (family, solver, backward) in seen
            assert (family, door) in doors
            # Every solver and every backward mode on every family itself.
            assert any(s == solver for s, _ in own) and any(b == backward for _, b in own)
    assert {c.solver for c in CASES} == {*matrix.SOLVERS, matrix.BLACKBOX}
    assert {c.backward for c in CASES} == set(matrix.BACKWARDS)
    assert {c.door for c in CASES} == set(matrix.DOORS)


def test_the_sample_checks_higher_derivatives_of_every_family():
    for family in families.FAMILIES:
        if not matrix.higher_order(family):
            continue  # half precision: no float64 oracle
        for derivative in ("jvp", "hvp"):
            chosen = [c for c in CASES if c.family == family and c.derivative == derivative]
            assert len(chosen) == min(matrix.FAST_HIGHER_ORDER, len(matrix.higher_order(family)))
            assert all(
                matrix.valid_higher_order(c.family, c.solver, c.backward, c.door) for c in chosen
            )
    modes = {c.backward for c in CASES if c.derivative != "grad"}
    assert modes == {*matrix.EXACT, "unroll"}


def test_unroll_through_minimisers_and_brackets_is_refused_in_the_sample():
    refused = [c for c in CASES if matrix.refused_by_design(c.solver, c.backward)]
    assert {c.family for c in refused} == set(matrix.NEW_FAMILIES)
    for case in refused[:: max(1, len(refused) // 8)]:
        result = classify.run_with_alarm(case, CASE_SECONDS)
        assert result.outcome == "OK-REFUSED" and "unroll" in result.reason, result
