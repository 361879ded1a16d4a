"""The classifier on hand-made cases: solvers and backward modes that lie, hang, crash
or fail honestly. It must call a correct non-convergence acceptable and a false
convergence a failure, whatever the library would do."""

from __future__ import annotations

import dataclasses
import math

import classify
import families
import numpy as np
import pytest
import stopping
import torch
from matrix import Case

import implicit
from implicit import linear
from implicit.solvers import FixedPoint, Minimizer, Solver


def _instance(family: str, **changes) -> families.Instance:
    """The first float64, batched problem of ``family`` with at least 3 unknowns."""
    for seed in range(200):
        inst = families.make(family, seed, small=True)
        n = families.flat(inst.z0, inst.batched).shape[1]
        if inst.dtype == torch.float64 and inst.batched and n >= 3:
            return dataclasses.replace(inst, **{"on_failure": "warn", **changes})
    raise AssertionError(f"no suitable problem in {family}")


class Returns(Solver):
    """Returns a given flat ``z`` and claims ``status``, whatever ``g(z)`` is."""

    name = "returns"

    def __init__(self, z: torch.Tensor, status: str = "converged"):
        super().__init__()
        self.z, self.status = z, status

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        z = self.z.to(z0.dtype)
        norms = torch.linalg.vector_norm(fn(z), dim=1)
        converged = torch.full(norms.shape, self.status == "converged")
        info = implicit.SolveInfo(
            converged, norms, 1, 1, [float(norms.max())], self.status, self.name
        )
        return z, info


class Stuck(Solver):
    name = "stuck"

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        while True:
            pass


class StuckInAMode(Solver):
    """Stuck where the alarm's exception turns into another one (as in a torch function
    mode's exit, which reports an empty mode stack instead)."""

    name = "stuck_in_a_mode"

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        try:
            while True:
                pass
        except BaseException:
            raise RuntimeError("trying to pop from empty mode stack") from None


class Explodes(Solver):
    name = "explodes"

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        raise RuntimeError("boom")


@dataclasses.dataclass(frozen=True)
class Skewed(linear.LinearSolver):
    """The dense adjoint solution times ``factor`` (or NaN), reported as converged."""

    name = "skewed"

    factor: float = 1.0

    def solve(self, op, rhs, *, tol, max_iter):
        result = linear.Dense().solve(op, rhs, tol=tol, max_iter=max_iter)
        return dataclasses.replace(result, x=result.x * self.factor)


def _near_root(inst: families.Instance, ratio: float, test_scale: torch.Tensor) -> torch.Tensor:
    """A flat ``z`` whose residual has norm ``ratio · tol · test_scale`` in every problem
    (one Newton step backwards from the root, exact to second order)."""
    root = torch.from_numpy(inst.root64)
    jac = torch.from_numpy(inst.jacobian64(inst.root64))
    direction = torch.randn(
        root.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    direction = direction / torch.linalg.vector_norm(direction, dim=1, keepdim=True)
    target = ratio * inst.tol * test_scale[:, None] * direction
    return root + torch.linalg.solve(jac, target.unsqueeze(2)).squeeze(2)


def _fixed_point_scale(inst: families.Instance) -> torch.Tensor:
    """``1 + max(‖z0‖, ‖f(z0)‖)`` per problem (the documented scale of ``fixed_point``)."""
    f0 = inst.fn(inst.z0, *inst.args).detach()

    def norm(state):
        return torch.linalg.vector_norm(torch.from_numpy(families.flat(state, inst.batched)), dim=1)

    return 1 + torch.maximum(norm(inst.z0), norm(f0))


CASE = Case("linear_spd", 0, "newton_dense", "dense", "root_solve", small=True)


def _run(inst, case=CASE, **overrides) -> classify.Result:
    # (Generous: the machine may be busy; a hang is tested on its own, with 0.5 s.)
    return classify.run_with_alarm(case, 60, instance=inst, **overrides)


def test_an_honest_solve_is_ok():
    inst = _instance("linear_spd", tol=1e-10)
    result = _run(inst)
    assert result.outcome == "OK", result
    assert result.grad_error < 1e-10 and result.residual_ratio <= 1


@pytest.mark.parametrize(("ratio", "outcome"), [(0.5, "OK"), (3.0, "FALSE-CONVERGENCE")])
def test_the_residual_is_recomputed_against_the_absolute_test_of_root_solve(ratio, outcome):
    inst = _instance("linear_spd", tol=1e-9)
    z = _near_root(inst, ratio, torch.ones(inst.root64.shape[0], dtype=torch.float64))
    result = _run(inst, solver=Returns(z))
    assert result.outcome == outcome, result
    assert result.residual_ratio == pytest.approx(ratio, rel=1e-3)


def test_a_non_finite_answer_claimed_converged_is_a_silent_nan():
    inst = _instance("linear_spd", tol=1e-9)
    z = torch.full(inst.root64.shape, math.nan, dtype=torch.float64)
    assert _run(inst, solver=Returns(z)).outcome == "SILENT-NAN"


@pytest.mark.parametrize(
    ("ratio", "door", "outcome"),
    [
        (0.5, "fixed_point", "OK"),
        (2.0, "fixed_point", "FALSE-CONVERGENCE"),
        (0.5, "root_solve", "FALSE-CONVERGENCE"),
    ],
)
def test_a_fixed_point_is_tested_with_its_scale(ratio, door, outcome):
    # tol·(1 + max(‖z0‖, ‖f(z0)‖)) for fixed_point; the absolute tol for root_solve.
    inst = _instance("tanh_contractive", tol=1e-9)
    scale = _fixed_point_scale(inst)
    assert bool((scale > 1.5).all())  # else root_solve's absolute test would pass too
    case = Case("tanh_contractive", 0, "anderson", "dense", door, small=True)
    result = _run(inst, case, solver=Returns(_near_root(inst, ratio, scale)))
    assert result.outcome == outcome, result


def test_an_infinite_scale_never_passes():
    inst = _instance("tanh_contractive", tol=1e-9)
    z0 = inst.z0.clone()
    z0[0, 0] = math.inf
    inst = dataclasses.replace(inst, z0=z0)
    root = torch.from_numpy(inst.root64)
    case = Case("tanh_contractive", 0, "anderson", "dense", "fixed_point", small=True)
    result = _run(inst, case, solver=Returns(root))
    assert result.outcome == "FALSE-CONVERGENCE" and "scale" in result.reason, result
    # The absolute test of root_solve has no scale: the exact root passes it.
    case = dataclasses.replace(case, door="root_solve")
    assert _run(inst, case, solver=Returns(root)).outcome == "OK"


@pytest.mark.parametrize("policy", ["warn", "raise"])
def test_an_honest_failure_is_acceptable(policy):
    inst = _instance("linear_spd", max_iter=1, on_failure=policy, tol=1e-12)
    result = _run(inst, solver=FixedPoint(damping=1e-3))
    assert result.outcome == "OK-NONCONVERGED" and "forward max_iter" in result.reason, result


def test_a_failure_nobody_hears_of_is_unreported():
    inst = _instance("linear_spd", max_iter=1, on_failure="ignore", tol=1e-12)
    result = _run(inst, solver=FixedPoint(damping=1e-3))
    assert result.outcome == "UNREPORTED", result


@pytest.mark.parametrize(
    ("factor", "outcome"),
    [(1 + 1e-9, "OK"), (1 + 1e-4, "FALSE-CONVERGENCE"), (math.nan, "SILENT-NAN")],
)
def test_the_gradient_is_checked_against_the_oracle(factor, outcome):
    inst = _instance("linear_spd", tol=1e-10)
    result = _run(inst, backward=Skewed(factor))
    assert result.outcome == outcome, result


def test_the_gradient_is_not_checked_for_inexact_modes():
    inst = _instance("tanh_contractive", tol=1e-10)
    case = Case("tanh_contractive", 0, "anderson", "one_step", "fixed_point", small=True)
    result = _run(inst, case)
    assert result.outcome == "OK" and result.grad_error is None, result


@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
def test_a_failing_backward_needs_a_report(policy):
    inst = _instance("linear_nonsymmetric", tol=1e-12, on_failure=policy)
    case = Case("linear_nonsymmetric", 0, "newton_dense", "gmres", "root_solve", small=True)
    result = _run(inst, case, backward=linear.GMRES(max_iter=1, restart=1))
    assert result.backward_status == "max_iter", result
    assert result.outcome == ("UNREPORTED" if policy == "ignore" else "OK-NONCONVERGED"), result


def test_a_missing_graph_is_false_convergence():
    inst = _instance("tanh_contractive", tol=1e-8)
    case = Case("tanh_contractive", 0, "fixed_point", "unroll", "fixed_point", small=True)
    # Returns hands back a tensor with no graph, as if the solve had dropped it (from a
    # start that does not meet tol, where unroll has no implicit derivative to fall to).
    result = _run(inst, case, solver=Returns(torch.from_numpy(inst.root64)))
    assert result.outcome == "FALSE-CONVERGENCE" and "graph" in result.reason, result


def test_a_hang_is_counted():
    result = classify.run_with_alarm(CASE, 0.5, instance=_instance("linear_spd"), solver=Stuck())
    assert result.outcome == "HANG" and "no answer" in result.reason


def test_a_hang_whose_interruption_surfaces_as_another_error_is_a_hang():
    inst = _instance("linear_spd")
    result = classify.run_with_alarm(CASE, 0.5, instance=inst, solver=StuckInAMode())
    assert result.outcome == "HANG", result


def test_exceptions_are_crashes_unless_a_clear_refusal_is_allowed():
    assert _run(_instance("linear_spd"), solver=Explodes()).outcome == "CRASH"
    # A deliberate error of the library (a dtype mismatch, raised by its own checks):
    inst = _instance("linear_spd")
    mismatched = dataclasses.replace(inst, z0=inst.z0.float())
    assert _run(mismatched).outcome == "CRASH"
    refused = _run(dataclasses.replace(mismatched, may_refuse=True))
    assert refused.outcome == "OK-REFUSED" and "TypeError" in refused.reason, refused


@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
def test_a_diverging_backward_needs_a_report(policy):
    # Neumann on the adjoint of a root problem whose Jacobian is far from −I: the
    # series diverges and stops early with status "diverged".
    inst = families.make("linear_nonsymmetric", 12, small=True)
    inst = dataclasses.replace(inst, tol=1e-12, on_failure=policy)
    case = Case("linear_nonsymmetric", 12, "newton_dense", "neumann", "root_solve", small=True)
    result = _run(inst, case)
    assert result.backward_status == "diverged", result
    assert result.outcome == ("UNREPORTED" if policy == "ignore" else "OK-NONCONVERGED"), result


@pytest.mark.parametrize("policy", ["warn", "raise", "ignore"])
def test_an_ill_conditioned_backward_needs_a_report(policy):
    # κ₂ = 5.2e7 (κ₁ above the float64 limit 6.7e7): solved, but reported.
    inst = dataclasses.replace(families.make("linear_spd", 176, small=True), on_failure=policy)
    assert "cond=5.2e+07" in inst.note and inst.dtype == torch.float64
    case = Case("linear_spd", 176, "newton_dense", "dense", "root_solve", small=True)
    result = _run(dataclasses.replace(inst, tol=1e-6), case)
    assert result.backward_status == "ill_conditioned", result
    assert result.outcome == ("UNREPORTED" if policy == "ignore" else "OK-NONCONVERGED"), result


# -- optimisation, bracketing, forward mode and second order ---------------------------
class ReturnsMinimum(Minimizer):
    """Returns a given flat ``z`` and claims convergence (a minimiser that lies)."""

    name = "returns_minimum"

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = z

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        z = self.z.to(z0.dtype)
        norms = torch.linalg.vector_norm(fn(z), dim=1)
        converged = torch.ones(norms.shape, dtype=torch.bool)
        info = implicit.SolveInfo(
            converged, norms, 1, 1, [float(norms.max())], "converged", self.name
        )
        return z, info


def _optimisation(family: str, **changes) -> families.Instance:
    """The first float64 problem of ``family`` with at least 2 unknowns and a minimum."""
    for seed in range(200):
        inst = families.make(family, seed, small=True)
        start = families.flat(inst.z0, inst.batched)
        if inst.dtype != torch.float64 or start.shape[1] < 2:
            continue
        inst = dataclasses.replace(inst, **{"on_failure": "warn", **changes})
        if families.reference_root(inst, start) is not None:
            return inst
    raise AssertionError(f"no suitable problem in {family}")


def test_a_saddle_claimed_converged_is_a_false_convergence():
    inst = _optimisation("opt_nonconvex")
    case = Case("opt_nonconvex", 0, "lbfgs", "dense", "minimize", small=True)
    saddle = torch.zeros(families.flat(inst.z0, inst.batched).shape, dtype=torch.float64)
    result = _run(inst, case, solver=ReturnsMinimum(saddle))  # ∇f(0) = 0 exactly
    assert result.outcome == "FALSE-CONVERGENCE" and "saddle" in result.reason, result
    minimum = families.reference_root(inst, families.flat(inst.z0, inst.batched) + 1.0)
    result = _run(inst, case, solver=ReturnsMinimum(torch.from_numpy(minimum)))
    assert result.outcome == "OK" and result.grad_error < 1e-9, result


@pytest.mark.parametrize(("ratio", "outcome"), [(0.5, "OK"), (3.0, "FALSE-CONVERGENCE")])
def test_a_minimiser_is_held_to_its_scaled_gradient_test(ratio, outcome):
    inst = _optimisation("opt_quadratic", tol=1e-11)
    inst = dataclasses.replace(inst, z0=torch.zeros_like(inst.z0))  # |f(z0)| = 0: tol itself
    start = families.flat(inst.z0, inst.batched)
    minimum = families.reference_root(inst, start)
    with torch.no_grad():
        f0 = inst.fn(inst.z0, *inst.args).reshape(-1).abs().double()
    # One Newton step back from the minimum: a gradient of norm ratio·tol·(1 + |f(z0)|).
    direction = np.random.default_rng(0).standard_normal(minimum.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    target = ratio * inst.tol * (1 + f0.numpy())[:, None] * direction
    z = minimum + np.linalg.solve(inst.hessian64(minimum), target[..., None])[..., 0]
    case = Case("opt_quadratic", 0, "lbfgs", "dense", "minimize", small=True)
    result = _run(inst, case, solver=ReturnsMinimum(torch.from_numpy(z)))
    assert result.outcome == outcome, result
    # (To rounding of the gradient at this tol, and the step's second order.)
    assert result.residual_ratio == pytest.approx(ratio, rel=0.05)


def test_unroll_through_a_minimiser_is_a_clear_refusal():
    inst = _optimisation("lsq_random")
    case = Case("lsq_random", 0, "levenberg_marquardt", "unroll", "least_squares", small=True)
    result = _run(inst, case)
    assert result.outcome == "OK-REFUSED" and "unroll" in result.reason, result


def test_brackets_that_cross_are_refused_and_those_that_miss_reported():
    for seed in range(300):
        inst = families.make("bracket_monotone", seed, small=True)
        if inst.may_refuse and not isinstance(inst.solver_options["lower"], float):
            break
    case = Case("bracket_monotone", seed, "bisection", "dense", "root_solve", small=True)
    result = _run(inst, case)
    assert result.outcome == "OK-REFUSED" and "lower > upper" in result.reason, result
    refused = dataclasses.replace(inst, may_refuse=False)
    assert _run(refused, case).outcome == "CRASH"  # unless the draw says it may refuse
    right = torch.maximum(inst.solver_options["lower"], inst.solver_options["upper"])
    bracket = {"lower": right + 1.0, "upper": right + 2.0}  # right of every root
    missing = dataclasses.replace(inst, may_refuse=False, solver_options=bracket)
    result = _run(missing, case)
    assert result.outcome == "OK-NONCONVERGED" and result.status == "failed", result


@pytest.mark.parametrize("derivative", ["jvp", "hvp"])
@pytest.mark.parametrize(
    ("factor", "outcome"), [(1.0, "OK"), (1 + 1e-4, "FALSE-CONVERGENCE"), (math.nan, "SILENT-NAN")]
)
def test_forward_mode_and_second_order_are_checked(derivative, factor, outcome):
    inst = _instance("linear_spd", tol=1e-12)
    # (The second order's oracle draws the problem again, moved: from the case's seed.)
    case = dataclasses.replace(CASE, seed=inst.seed, derivative=derivative)
    result = _run(inst, case, backward=Skewed(factor))
    if derivative == "hvp" and outcome == "SILENT-NAN":
        # The second adjoint solve is handed the first one's NaN and reports it.
        outcome = "OK-NONCONVERGED"
    assert result.outcome == outcome, result
    if outcome == "OK":
        assert result.grad_error < 1e-8, result


@pytest.mark.parametrize("derivative", ["grad", "jvp", "hvp"])
def test_every_derivative_of_a_bounded_minimum(derivative):
    inst = _optimisation("opt_bounded", tol=1e-12)
    case = Case("opt_bounded", inst.seed, "newton_min", "dense", "minimize", True, derivative)
    result = _run(inst, case)
    assert result.outcome == "OK" and result.grad_error < 1e-8, result


def test_the_recomputed_norms_do_not_overflow_where_the_library_s_do_not():
    rows = np.array([[3e300, 4e300], [3.0, 4.0], [0.0, 0.0], [np.inf, 1.0], [np.nan, 1.0]])
    norms = stopping.row_norms(rows)
    assert norms[:3] == pytest.approx([5e300, 5.0, 0.0], rel=1e-15)
    assert norms[3] == np.inf and np.isnan(norms[4])
    # f(z0) = 2.6e300 (one unknown): a scale the library's test computes as finite, so a
    # huge residual far below tol·(1 + scale) honestly passes it.
    case = Case.parse("exp_overflow:42:scipy_hybr:neumann:fixed_point")
    assert classify.run_with_alarm(case, 20).outcome != "FALSE-CONVERGENCE"


def test_the_second_order_oracle_of_a_quartic_minimum_is_exact():
    # The library's Hessian-vector product here agrees to 1e-16 with an 80-digit
    # reference; the oracle's was off by 1.1e-5 (one moved problem's root off by 3e-10).
    case = Case.parse("opt_quadratic:158:newton_min_cg:gmres:minimize:hvp")
    result = classify.run_with_alarm(case, 60)
    assert result.outcome == "OK" and result.grad_error < 1e-10, result
