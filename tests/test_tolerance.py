"""tol per problem (a tensor) and tol_mode ("absolute" or "relative") at every front door."""

from __future__ import annotations

import pytest
import torch

import implicit

D = torch.float64
TOLS = torch.tensor([1e-2, 1e-5, 1e-9], dtype=D)


def norms(tensor):
    return torch.linalg.vector_norm(tensor.reshape(tensor.shape[0], -1), dim=1)


def test_fixed_point_stops_each_problem_at_its_own_threshold():
    rates = torch.tensor([[0.9], [0.9], [0.9]], dtype=D)
    z, info = implicit.fixed_point(
        lambda z: rates * z + 1,
        torch.zeros(3, 1, dtype=D),
        solver="fixed_point",
        tol=TOLS,
        batched=True,
        max_iter=500,
        return_info=True,
    )
    residual = norms(rates * z + 1 - z)
    threshold = TOLS * (1 + 1)  # s = max(‖z0‖, ‖f(z0)‖) = 1
    assert (residual <= threshold).all() and torch.equal(residual, info.residual)
    # Each stopped at its own test, not at the strictest: linear convergence at rate 0.9
    # stops within one step of the threshold.
    assert (residual > 0.9 * threshold).all()
    steps = info.iterations_per_problem.tolist()
    assert steps[0] < steps[1] < steps[2] == info.iterations


def test_root_solve_stops_each_problem_at_its_own_absolute_threshold():
    a = torch.full((3,), 2.0, dtype=D)
    z, info = implicit.root_solve(
        lambda z, a: z**2 - a,
        torch.zeros(3, dtype=D),
        a,
        solver="bisection",
        lower=0.0,
        upper=2.0,
        tol=TOLS,
        batched=True,
        return_info=True,
    )
    residual = (z**2 - a).abs()
    assert (residual <= TOLS).all() and (residual[:2] > TOLS[2]).all()
    steps = info.iterations_per_problem.tolist()
    assert steps[0] < steps[1] < steps[2] == info.iterations


def test_minimize_and_least_squares_stop_each_problem_at_its_own_threshold():
    centres = torch.full((3, 2), 1.5, dtype=D)
    z, info = implicit.minimize(
        lambda z: ((z - centres) ** 4).sum(1),  # slow (degenerate) convergence
        torch.zeros(3, 2, dtype=D),
        tol=TOLS,
        batched=True,
        max_iter=400,
        return_info=True,
    )
    gradient = norms(4 * (z - centres) ** 3)
    fun0 = (centres**4).sum(1)
    assert (gradient <= TOLS * (1 + fun0)).all()
    assert info.iterations_per_problem[0] < info.iterations_per_problem[2]
    t = torch.linspace(0, 1, 5, dtype=D)
    data = torch.exp(0.5 * t).expand(3, 5)
    _ab, info = implicit.least_squares(
        lambda ab: ab[:, :1] * torch.exp(ab[:, 1:] * t) - data,
        torch.ones(3, 2, dtype=D),
        solver="gauss_newton",
        tol=TOLS,
        batched=True,
        return_info=True,
    )
    assert info.status == "converged"
    assert info.iterations_per_problem[0] < info.iterations_per_problem[2]


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_a_large_scale_stops_early_relative_and_late_absolute(solver):
    """z = 0.5 z + 10⁶ from 0: the relative test is scaled by ‖f(z0)‖ = 10⁶."""
    results = {}
    for mode in ("relative", "absolute"):
        z, info = implicit.fixed_point(
            lambda z: 0.5 * z + 1e6,
            torch.zeros(1, dtype=D),
            solver=solver,
            tol_mode=mode,
            tol=1e-8,
            return_info=True,
        )
        residual = float((0.5 * z + 1e6 - z).abs())
        results[mode] = (residual, info.iterations)
    assert 1e-8 < results["relative"][0] <= 1e-8 * (1 + 1e6)
    assert results["absolute"][0] <= 1e-8
    assert results["relative"][1] < results["absolute"][1]


def test_relative_root_solve_is_scaled_by_the_residual_at_the_start():
    g = lambda z: z**3 - 2e6  # noqa: E731
    for mode, bound in (("absolute", 1e-6), ("relative", 1e-6 * (1 + 2e6))):
        z, _info = implicit.root_solve(
            g,
            torch.tensor(0.0, dtype=D),
            solver="bisection",
            lower=0.0,
            upper=200.0,
            tol=1e-6,
            tol_mode=mode,
            return_info=True,
        )
        assert float(g(z).abs()) <= bound
        if mode == "relative":
            assert float(g(z).abs()) > 1e-6  # it did not go on to the absolute test


def test_absolute_minimize_and_invert_go_on_where_relative_stops():
    iterations = {}
    for mode in ("relative", "absolute"):
        z, info = implicit.minimize(
            # The relative test's scale is the smaller of |fun| at z0 (3e6) and at the point
            # tested (at least 1e6): the floor keeps it large near the minimum.
            lambda z: 1e6 * ((z - 1) ** 4).sum() + 1e6,
            torch.zeros(2, dtype=D),
            tol=1e-6,
            tol_mode=mode,
            max_iter=500,
            return_info=True,
        )
        gradient = float(torch.linalg.vector_norm(4e6 * (z - 1) ** 3))
        assert info.status == "converged"
        assert gradient <= (1e-6 if mode == "absolute" else 1e-6 * (1 + 3e6))
        if mode == "relative":
            assert gradient > 1e-6  # it stopped at the relative test, before the absolute one
        iterations[mode] = info.iterations
    assert iterations["relative"] < iterations["absolute"]
    y = torch.tensor([1e6, 2e6], dtype=D)
    z, info = implicit.invert(lambda z: z + z**3, y, tol_mode="absolute", return_info=True)
    assert info.status == "converged"
    assert float(torch.linalg.vector_norm(z + z**3 - y)) <= 1e-6


@pytest.mark.parametrize(
    ("call", "default"),
    [
        (lambda **kw: implicit.fixed_point(torch.cos, torch.zeros(3, dtype=D), **kw), "relative"),
        (lambda **kw: implicit.root_solve(torch.sin, torch.ones(3, dtype=D), **kw), "absolute"),
        (
            lambda **kw: implicit.invert(torch.sinh, torch.ones(3, dtype=D), **kw),
            "relative",
        ),
        (
            lambda **kw: implicit.minimize(lambda z: (z**4).sum(), torch.ones(3, dtype=D), **kw),
            "relative",
        ),
    ],
    ids=["fixed_point", "root_solve", "invert", "minimize"],
)
def test_the_defaults_are_the_documented_modes_and_a_one_entry_tensor_is_a_number(call, default):
    z, info = call(return_info=True)
    for options in (
        {"tol_mode": default},
        {"tol": torch.tensor(1e-6)},
        {"tol": torch.ones(1) / 1e6},
    ):
        z_again, info_again = call(return_info=True, **options)
        assert torch.equal(z, z_again) and info.history == info_again.history


@pytest.mark.parametrize(
    ("tol", "error", "match"),
    [
        (torch.tensor([1e-3, -1e-3, 1e-3]), ValueError, "tol must be positive"),
        (torch.tensor([1e-3, float("nan"), 1e-3]), ValueError, "tol must be positive"),
        (torch.tensor([1e-3, float("inf"), 1e-3]), ValueError, "tol must be positive"),
        (torch.tensor([0.0, 1e-3, 1e-3]), ValueError, "tol must be positive"),
        (torch.full((4,), 1e-3), ValueError, "tol has shape"),
        (torch.full((3, 1), 1e-3), ValueError, "tol has shape"),
        (torch.zeros(0), ValueError, "tol is an empty tensor"),
        (torch.ones(3, dtype=torch.bool), TypeError, "tol must be a number or a real"),
        (torch.ones(3, dtype=torch.complex64), TypeError, "tol must be a number or a real"),
        (-1.0, ValueError, "tol must be a positive finite number"),
    ],
)
@pytest.mark.parametrize("front_door", ["fixed_point", "minimize"])
def test_bad_tolerances_are_refused_by_name(tol, error, match, front_door):
    if front_door == "minimize":

        def solve(**kw):
            return implicit.minimize(lambda z: (z**2).sum(1), torch.ones(3, 2), batched=True, **kw)
    else:

        def solve(**kw):
            return implicit.fixed_point(torch.cos, torch.zeros(3, 2), batched=True, **kw)

    with pytest.raises(error, match=match):
        solve(tol=tol)
    with pytest.raises(ValueError, match="tol_mode must be one of"):
        solve(tol_mode="relativ")


def test_layers_check_tol_and_tol_mode_when_built():
    with pytest.raises(ValueError, match="tol must be positive"):
        implicit.DEQ(torch.nn.Tanh(), tol=torch.tensor([1e-3, float("nan")]))
    with pytest.raises(ValueError, match="tol_mode must be one of"):
        implicit.ImplicitLayer(torch.sin, tol_mode="absolutely")
    layer = implicit.DEQ(lambda z, x: torch.tanh(0.5 * z + x), tol=torch.tensor([1e-2, 1e-8]))
    layer(torch.ones(2, 3, dtype=D))
    steps = layer.last_info.iterations_per_problem
    assert steps[0] < steps[1]
    with pytest.raises(ValueError, match="tol has shape"):
        layer(torch.ones(3, 3, dtype=D))


def test_the_tolerance_tensor_is_not_modified_and_may_require_grad():
    tol = torch.tensor([1e-2, 1e-8], requires_grad=True)  # float32, for a float64 problem
    before = tol.detach().clone()
    _z, info = implicit.fixed_point(
        lambda z: 0.5 * z + 1, torch.zeros(2, 1, dtype=D), tol=tol, batched=True, return_info=True
    )
    assert torch.equal(tol.detach(), before) and info.status == "converged"


def test_the_backward_solve_uses_the_smallest_tolerance():
    """Neumann stops just under its tolerance: with the largest (1e-2) it would stop far
    above the smallest."""
    x = torch.ones(2, 3, dtype=D, requires_grad=True)
    z, info = implicit.fixed_point(
        lambda z, x: torch.tanh(0.9 * z + x),
        torch.zeros(2, 3, dtype=D),
        x,
        tol=torch.tensor([1e-2, 1e-10], dtype=D),
        batched=True,
        backward="neumann",
        max_iter=500,
        return_info=True,
    )
    z.sum().backward()
    assert info.backward.status == "converged" and (info.backward.residual <= 1e-10).all()


def test_per_problem_tolerances_under_vmap_repeat_for_every_slice():
    tol = torch.tensor([1e-2, 1e-9], dtype=D)
    xs = torch.linspace(0.1, 1.0, 6, dtype=D).reshape(3, 2, 1)

    def solve(x):
        return implicit.fixed_point(
            lambda z, x: 0.9 * z + x,
            torch.zeros(2, 1, dtype=D),
            x,
            solver="fixed_point",
            tol=tol,
            batched=True,
            max_iter=500,
        )

    z = torch.func.vmap(solve)(xs)
    residual = (0.9 * z + xs - z).abs().squeeze(2)  # (3 slices, 2 problems)
    scale = 1 + xs.abs().squeeze(2)  # max(‖z0‖, ‖f(z0)‖) = |x|
    assert (residual <= tol * scale).all() and (residual[:, 0] > 1e-9 * scale[:, 0]).all()


def test_half_precision_floors_every_entry_at_what_the_dtype_can_reach():
    _z, info = implicit.fixed_point(
        lambda z: 0.5 * torch.tanh(z) + 0.25,
        torch.zeros(2, 8, dtype=torch.float16),
        tol=torch.tensor([1e-9, 1e-2]),
        batched=True,
        return_info=True,
    )
    assert info.status == "converged"


def test_custom_root_checks_each_answer_against_its_own_tolerance():
    @implicit.custom_root(
        lambda z, a: z**2 - a, batched=True, tol=torch.tensor([1e-2, 1e-9]), on_failure="ignore"
    )
    def rough_sqrt(a):
        return torch.sqrt(a) + 1e-4  # a root to about 1e-4

    rough_sqrt(torch.tensor([2.0, 3.0], dtype=D))
    assert rough_sqrt.last_info.statuses == ["converged", "failed"]
