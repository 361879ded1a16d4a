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

#: Seconds one case may take: four times the slowest legitimate case on a busy core.
CASE_SECONDS = 10.0

# The known bugs (issue 18) that cases of the sample trip over.
DEQ_UNBATCHED = (
    "a DEQ (batched=True by default) given one unbatched sample solves each feature as its "
    "own problem"
)
NEWTON_HANG = "Newton's line search can loop forever: max_iter does not bound its trials"
UNROLL_NO_GRAPH = "backward='unroll' leaves z without a graph when z0 already meets tol"
UNROLL_NAN = "backward='unroll' gives NaN gradients while every status says converged"
HALF_PRECISION = "float16/bfloat16 are accepted, then torch's linear algebra (or numpy) fails"
BLACKBOX_NAN = "custom_root raises on a non-finite answer whatever on_failure says"
INFINITE_SCALE = "fixed_point converges on an infinite scale when f(z0) overflows"

#: case id → the bug it trips over.
KNOWN_BUGS: dict[str, str] = {
    "tanh_contractive:32:broyden:dense:deq:small": DEQ_UNBATCHED,
    "tanh_divergent:27:newton_krylov:bicgstab:fixed_point:small": NEWTON_HANG,
    "tanh_at_root:7:fixed_point:unroll:root_solve:small": UNROLL_NO_GRAPH,
    "tanh_at_root:8:anderson:auto:deq:small": DEQ_UNBATCHED,
    "tanh_at_root:15:anderson:unroll:fixed_point:small": UNROLL_NO_GRAPH,
    "tanh_at_root:23:newton_dense:unroll:deq:small": UNROLL_NO_GRAPH,
    "tanh_at_root:38:broyden:unroll:deq:small": UNROLL_NO_GRAPH,
    "tanh_half:0:fixed_point:auto:fixed_point:small": HALF_PRECISION,
    "tanh_half:1:fixed_point:dense:deq:small": HALF_PRECISION,
    "tanh_half:2:fixed_point:gmres:fixed_point:small": HALF_PRECISION,
    "tanh_half:8:anderson:auto:fixed_point:small": HALF_PRECISION,
    "tanh_half:9:anderson:dense:deq:small": HALF_PRECISION,
    "tanh_half:10:anderson:gmres:fixed_point:small": HALF_PRECISION,
    "tanh_half:11:anderson:bicgstab:deq:small": HALF_PRECISION,
    "tanh_half:12:anderson:neumann:fixed_point:small": HALF_PRECISION,
    "tanh_half:13:anderson:one_step:deq:small": HALF_PRECISION,
    "tanh_half:16:newton_dense:auto:fixed_point:small": HALF_PRECISION,
    "tanh_half:18:newton_dense:gmres:fixed_point:small": HALF_PRECISION,
    "tanh_half:20:newton_dense:neumann:fixed_point:small": HALF_PRECISION,
    "tanh_half:22:newton_dense:phantom:fixed_point:small": HALF_PRECISION,
    "tanh_half:23:newton_dense:unroll:deq:small": HALF_PRECISION,
    "tanh_half:24:newton_krylov:auto:fixed_point:small": HALF_PRECISION,
    "tanh_half:25:newton_krylov:dense:deq:small": HALF_PRECISION,
    "tanh_half:26:newton_krylov:gmres:fixed_point:small": HALF_PRECISION,
    "tanh_half:27:newton_krylov:bicgstab:deq:small": HALF_PRECISION,
    "tanh_half:28:newton_krylov:neumann:fixed_point:small": HALF_PRECISION,
    "tanh_half:29:newton_krylov:one_step:deq:small": HALF_PRECISION,
    "tanh_half:30:newton_krylov:phantom:fixed_point:small": HALF_PRECISION,
    "tanh_half:33:broyden:gmres:deq:small": HALF_PRECISION,
    "tanh_half:39:scipy_hybr:auto:deq:small": HALF_PRECISION,
    "tanh_half:40:scipy_hybr:dense:fixed_point:small": HALF_PRECISION,
    "tanh_half:41:scipy_hybr:gmres:deq:small": HALF_PRECISION,
    "tanh_half:43:scipy_hybr:neumann:deq:small": HALF_PRECISION,
    "tanh_half:45:scipy_hybr:phantom:deq:small": HALF_PRECISION,
    "tanh_half:46:scipy_lm:auto:fixed_point:small": HALF_PRECISION,
    "tanh_half:48:scipy_lm:gmres:fixed_point:small": HALF_PRECISION,
    "tanh_half:49:scipy_lm:bicgstab:deq:small": HALF_PRECISION,
    "tanh_half:51:scipy_lm:one_step:deq:small": HALF_PRECISION,
    "tanh_half:53:scipy_krylov:auto:deq:small": HALF_PRECISION,
    "tanh_half:55:scipy_krylov:gmres:deq:small": HALF_PRECISION,
    "tanh_half:57:scipy_krylov:neumann:deq:small": HALF_PRECISION,
    "linear_spd:15:newton_dense:dense:root_solve:small": NEWTON_HANG,
    "kepler:13:anderson:unroll:invert:small": UNROLL_NAN,
    "nan_root:33:broyden:unroll:root_solve:small": UNROLL_NAN,
    "nan_root:52:blackbox:auto:custom_root:small": BLACKBOX_NAN,
    "nan_root:53:blackbox:dense:custom_root:small": BLACKBOX_NAN,
    "nan_root:55:blackbox:gmres:custom_root:small": BLACKBOX_NAN,
    "exp_overflow:7:fixed_point:phantom:fixed_point:small": INFINITE_SCALE,
    "exp_overflow:20:newton_dense:cg:fixed_point:small": INFINITE_SCALE,
    "exp_overflow:26:newton_dense:unroll:fixed_point:small": INFINITE_SCALE,
    "exp_overflow:30:newton_krylov:gmres:fixed_point:small": INFINITE_SCALE,
    "exp_overflow:32:newton_krylov:neumann:fixed_point:small": INFINITE_SCALE,
    "exp_overflow:36:broyden:dense:fixed_point:small": INFINITE_SCALE,
    "exp_overflow:38:broyden:gmres:fixed_point:small": INFINITE_SCALE,
    "exp_overflow:42:broyden:phantom:fixed_point:small": INFINITE_SCALE,
}

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
