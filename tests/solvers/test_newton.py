"""Newton's method (implicit/solvers/newton.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import TanhProblem, rel_err
from solver_checks import (
    MonotoneCubic,
    bounded_test,
    contractive_maps_test,
    counting_test,
    exact_root_unroll_test,
    nonfinite_test,
    tanh_test,
    unroll_test,
)

import implicit
from implicit.linear import CG, GMRES
from implicit.linear.dense import REFINEMENTS
from implicit.solvers import Newton
from implicit.solvers._line_search import Search
from implicit.solvers.newton import HALVINGS

test_converges_on_tanh_problem = tanh_test("newton")
test_krylov_converges_on_tanh_problem = tanh_test("newton", linear="krylov")
test_converges_without_line_search = tanh_test("newton", line_search=False)
test_unroll_matches_unrolled_reference = unroll_test("newton")
test_unroll_past_an_exact_root = exact_root_unroll_test("newton")
test_counts_every_evaluation = counting_test("newton")
# A non-finite trial is halved like any failed one: the sample gives up after HALVINGS.
test_stops_nonfinite_samples = nonfinite_test("newton", within=HALVINGS + 2)
test_krylov_stops_nonfinite_samples = nonfinite_test("newton", within=HALVINGS + 2, linear="krylov")
test_krylov_counts_every_evaluation = counting_test("newton", linear="krylov")
test_random_contractive_maps = contractive_maps_test("newton")
test_krylov_random_contractive_maps = contractive_maps_test("newton", linear="krylov")
test_reuse_random_contractive_maps = contractive_maps_test("newton", jacobian_reuse=0.5)
# Reuses: 2 Jacobians in 10 iterations (autograd through the reused steps).
test_reuse_unroll_matches_unrolled_reference = unroll_test("newton", jacobian_reuse=0.5)
test_reuse_counts_every_evaluation = counting_test("newton", jacobian_reuse=0.5)
test_reuse_stops_nonfinite_samples = nonfinite_test(
    "newton", within=HALVINGS + 2, jacobian_reuse=0.5
)
test_line_search_trials_count_against_max_iter = bounded_test("newton")
test_krylov_line_search_trials_count_against_max_iter = bounded_test(
    "newton", seeds=3, linear="krylov"
)
test_reuse_line_search_trials_count_against_max_iter = bounded_test("newton", jacobian_reuse=0.5)


def test_is_the_default_of_root_solve():
    p = MonotoneCubic()
    _, info = implicit.root_solve(p.g, p.z0, p.b, batched=True, return_info=True)
    assert info.solver == "newton" and info.status == "converged"


@pytest.mark.parametrize("linear", ["dense", "krylov"])
def test_root_of_monotone_cubic(linear):
    p = MonotoneCubic(n=5, batch=3)
    z, info = implicit.root_solve(
        p.g,
        p.z0,
        p.b,
        solver="newton",
        linear=linear,
        batched=True,
        tol=1e-12,
        return_info=True,
    )
    assert info.status == "converged" and bool(info.converged.all())
    assert rel_err(z, p.root) <= 1e-10
    # Every line-search trial is an iteration: one evaluation each, plus the residual
    # at z0 (capture discovery's) and the linearisation there (g hands no value to
    # Python, so no discovery at z*).
    assert info.iterations <= 18 and info.f_evals == info.iterations + 2
    if linear == "dense":  # one Jacobian per iteration in which some sample needs one
        assert 0 < info.jac_evals <= info.iterations
    else:
        assert info.jac_evals == 0
    # The implicit gradient against the closed form dz/db = (M + 3 diag(z²))⁻¹.
    b = p.b.clone().requires_grad_()
    z = implicit.root_solve(p.g, p.z0, b, solver="newton", linear=linear, batched=True, tol=1e-12)
    v = torch.randn_like(z)
    (grad,) = torch.autograd.grad(z, b, v)
    jacobian = p.M + torch.diag_embed(3 * z.detach() ** 2)
    expected = torch.linalg.solve(jacobian.transpose(1, 2), v.unsqueeze(2)).squeeze(2)
    assert rel_err(grad, expected) <= 1e-10


def test_auto_uses_dense_up_to_max_dense_unknowns():
    p = MonotoneCubic(n=4)
    kwargs = {"batched": True, "tol": 1e-12, "return_info": True}
    _, small = implicit.root_solve(p.g, p.z0, p.b, solver=Newton(max_dense=4), **kwargs)
    z, large = implicit.root_solve(p.g, p.z0, p.b, solver=Newton(max_dense=3), **kwargs)
    assert 0 < small.jac_evals <= small.iterations and large.jac_evals == 0
    assert rel_err(z, p.root) <= 1e-10


def test_krylov_instance_sets_the_inner_solve():
    # GMRES limited to 12 products at tol 1e-4: inexact directions, linear convergence
    # (about 50 iterations).
    p = MonotoneCubic(n=6)
    solver = Newton(linear="krylov", krylov=GMRES(restart=3, tol=1e-4, max_iter=12))
    z, info = implicit.root_solve(
        p.g, p.z0, p.b, solver=solver, batched=True, tol=1e-12, max_iter=80, return_info=True
    )
    assert info.status == "converged" and rel_err(z, p.root) <= 1e-10


def test_line_search_rescues_divergent_newton():
    # Newton's iteration on arctan(z) = 0 diverges from |z₀| > 1.39.
    z0 = torch.full((2, 1), 3.0, dtype=torch.float64)
    z, info = implicit.root_solve(
        torch.arctan, z0, solver="newton", batched=True, tol=1e-12, return_info=True
    )
    assert info.status == "converged" and float(z.abs().max()) <= 1e-12
    with pytest.warns(implicit.ConvergenceWarning):
        _, plain = implicit.root_solve(
            torch.arctan,
            z0,
            solver="newton",
            line_search=False,
            batched=True,
            tol=1e-12,
            return_info=True,
        )
    assert plain.status != "converged"


def test_each_sample_searches_on_its_own():
    # arctan(z) = 0 from several starts: the far ones backtrack over several
    # iterations while the near ones converge. Each sample ends exactly where it ends
    # when solved alone, and the batch evaluates g no more often than its most
    # expensive sample alone (not once per trial of any sample at every step).
    z0 = torch.tensor([[3.0], [0.1], [-2.0], [0.5], [1.45]], dtype=torch.float64)
    kwargs = {"solver": "newton", "batched": True, "tol": 1e-12, "return_info": True}
    z, info = implicit.root_solve(torch.arctan, z0, **kwargs)
    assert info.status == "converged"
    alone = [implicit.root_solve(torch.arctan, z0[i : i + 1], **kwargs) for i in range(5)]
    for i, (z_alone, _) in enumerate(alone):
        assert torch.equal(z[i : i + 1], z_alone)
    assert info.f_evals <= max(info_alone.f_evals for _, info_alone in alone)


def test_jacobian_singular_at_the_start():
    # ∂g/∂z(0) = M has rank n − 1: the first step is the damped least-squares one.
    p = MonotoneCubic(n=4, singular=True)
    assert torch.linalg.matrix_rank(p.M) == 3
    z, info = implicit.root_solve(
        p.g, p.z0, p.b, solver="newton", batched=True, tol=1e-12, return_info=True
    )
    assert info.status == "converged" and rel_err(z, p.root) <= 1e-10


def test_unroll_through_a_singular_first_step_has_the_implicit_gradient():
    # g(z) = (z₁ + z₂, z₁ + z₂ + z₂³) − y: at z = 0 the Jacobian [[1, 1], [1, 1]] is
    # exactly singular (a zero pivot), so the first step is the damped one. Autograd
    # must record that step, never the solve with the singular factorisation (not
    # finite), or the gradient turns NaN.
    y = torch.tensor([[1.0, 3.0], [0.5, -2.0], [2.0, 2.5]], dtype=torch.float64)
    y.requires_grad_()

    def g(z, y):
        s = z[:, :1] + z[:, 1:]
        return torch.cat([s, s + z[:, 1:] ** 3], dim=1) - y

    z = implicit.root_solve(
        g, torch.zeros(3, 2, dtype=torch.float64), y, backward="unroll", batched=True, tol=1e-13
    )
    c = torch.tensor([[1.0, -2.0], [0.3, 0.7], [-1.0, 0.5]], dtype=torch.float64)
    (grad,) = torch.autograd.grad((c * z).sum(), y)
    # ∂z*/∂y = (∂g/∂z)⁻¹ at the root z₂ = ∛(y₂ − y₁), z₁ = y₁ − z₂.
    z2 = torch.sign(y[:, 1] - y[:, 0]) * (y[:, 1] - y[:, 0]).abs() ** (1 / 3)
    ones = torch.ones_like(z2)
    jacobian = torch.stack(
        [torch.stack([ones, ones], 1), torch.stack([ones, 1 + 3 * z2**2], 1)], 1
    ).detach()
    expected = torch.linalg.solve(jacobian.transpose(1, 2), c)
    assert torch.isfinite(grad).all() and rel_err(grad, expected) <= 1e-9


def test_stationary_point_and_rootless_sample_do_not_stop_the_others():
    # g(z) = z² − c. Sample 0 has the root (2, 3); sample 1 starts at z = 0 where the
    # Jacobian is zero and so is the gradient of ‖g‖² (no step can help); sample 2
    # has no real root (c < 0).
    c = torch.tensor([[4.0, 9.0], [4.0, 4.0], [-1.0, -1.0]], dtype=torch.float64)
    z0 = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)

    def g(z, c):
        return z**2 - c

    with pytest.warns(implicit.ConvergenceWarning, match="2 of 3"):
        z, info = implicit.root_solve(
            g,
            z0,
            c,
            solver="newton",
            batched=True,
            tol=1e-12,
            max_iter=30,
            return_info=True,
        )
    assert info.converged.tolist() == [True, False, False]
    assert info.status == "max_iter"
    assert torch.isfinite(z).all() and torch.isfinite(torch.tensor(info.history)).all()
    assert rel_err(z[0], torch.tensor([2.0, 3.0], dtype=torch.float64)) <= 1e-12
    assert torch.equal(z[1], z0[1])  # stays at the stationary point
    assert float(info.residual[2]) >= 1.0  # ‖z² + 1‖ ≥ √2 > 1 for every z


def test_krylov_refuses_unroll():
    p = TanhProblem(n=4, batch=2)
    with pytest.raises(NotImplementedError, match="unroll"):
        implicit.fixed_point(
            p.f, p.z0, p.x, solver="newton", linear="krylov", backward="unroll", batched=True
        )


def test_misspelt_and_invalid_options():
    p = MonotoneCubic()
    with pytest.raises(TypeError, match="'line_serach'"):
        implicit.root_solve(p.g, p.z0, p.b, solver="newton", line_serach=False)
    with pytest.raises(ValueError, match="linear"):
        Newton(linear="lu")
    with pytest.raises(TypeError, match="krylov"):
        Newton(krylov=CG())
    with pytest.raises(ValueError, match="max_dense"):
        Newton(max_dense=-1)
    for theta in (0, 1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="jacobian_reuse"):
            Newton(jacobian_reuse=theta)


@pytest.mark.parametrize("backward", ["auto", "unroll"])
def test_a_batch_of_scalar_equations(backward):
    # Kepler's equation E − e sin E = M, one orbit per problem: 1 × 1 Jacobian blocks,
    # which are divided rather than factorised.
    gen = torch.Generator().manual_seed(0)
    e = (0.99 * torch.rand(64, generator=gen, dtype=torch.float64)).requires_grad_()
    m = (6 * torch.rand(64, generator=gen, dtype=torch.float64)).requires_grad_()
    z0 = m.detach().unsqueeze(1)
    z, info = implicit.root_solve(
        lambda z, e, m: z - e * torch.sin(z) - m,
        z0,
        e.unsqueeze(1),
        m.unsqueeze(1),
        solver="newton",
        backward=backward,
        batched=True,
        tol=1e-13,
        return_info=True,
    )
    assert info.status == "converged"
    E = z.squeeze(1)
    residual = E - e * torch.sin(E) - m
    assert float(residual.detach().abs().max()) <= 1e-12
    # ∂E/∂M = 1 / (1 − e cos E), ∂E/∂e = sin E / (1 − e cos E).
    grad_e, grad_m = torch.autograd.grad(E.sum(), (e, m))
    slope = 1 - e.detach() * torch.cos(E.detach())
    assert rel_err(grad_m, 1 / slope) <= 1e-10
    assert rel_err(grad_e, torch.sin(E.detach()) / slope) <= 1e-10


@pytest.mark.parametrize("backward", ["dense", "auto"])
@pytest.mark.parametrize("form", ["root_solve", "fixed_point"])
def test_dense_backward_refines_with_the_last_factorisation(form, backward):
    # 16 problems of 24 unknowns (B·n³ > 2¹⁶): the backward at the root refines with
    # Newton's last factorisation, a step away, in a few products instead of the 24
    # that build the Jacobian, and gets the closed-form gradient to rounding level;
    # also the default backward, which picks dense at this size.
    p = TanhProblem(n=24, batch=16, norm=0.9)
    fn, door = (p.g, implicit.root_solve) if form == "root_solve" else (p.f, implicit.fixed_point)
    z, info = door(
        fn, p.z0, p.x, solver="newton", backward=backward, batched=True, tol=1e-11, return_info=True
    )
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=z.dtype)
    (grad,) = torch.autograd.grad(z, p.x, v)
    expected = (p.closed_form_dzdx(z).transpose(1, 2) @ v.unsqueeze(2)).squeeze(2)
    assert info.backward.method == "dense+refine"
    assert info.backward.matvecs == info.backward.iterations <= REFINEMENTS
    assert rel_err(grad, expected) <= 1e-13


def test_jacobian_reuse_builds_fewer_jacobians_for_the_same_root():
    p = TanhProblem(n=40, batch=16, norm=0.9)
    kwargs = {"batched": True, "tol": 1e-12, "return_info": True}
    z_plain, plain = implicit.root_solve(p.g, p.z0, p.x.detach(), solver="newton", **kwargs)
    z, info = implicit.root_solve(p.g, p.z0, p.x, solver=Newton(jacobian_reuse=0.5), **kwargs)
    assert info.status == "converged" and bool(info.converged.all())
    assert info.jac_evals < plain.jac_evals and info.jac_evals < info.iterations
    # Every step one evaluation (no backtracking), plus the residual and linearisation at
    # z0 (g hands no value to Python, so no discovery at z*).
    assert info.f_evals == info.iterations + 2
    assert rel_err(z, z_plain) <= 1e-10
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=z.dtype)
    (grad,) = torch.autograd.grad(z, p.x, v)
    expected = (p.closed_form_dzdx(z).transpose(1, 2) @ v.unsqueeze(2)).squeeze(2)
    assert rel_err(grad, expected) <= 1e-10


def test_a_failed_reused_direction_starts_again_from_a_fresh_jacobian(monkeypatch):
    # Far from the root a reused factorisation may point uphill: the samples whose
    # trial failed are not halved along it but get a fresh Newton direction, so the
    # step after a failed reused one tries the full step everywhere (t is None).
    p = MonotoneCubic(n=6, batch=8, seed=0)
    after_failed_reuse, full_steps = [], []
    step, trial = Newton.step, Search.trial

    def spy_step(self, fn, z, r, state):
        after_failed_reuse.append(state.reused and state.pending is not None)
        return step(self, fn, z, r, state)

    def spy_trial(self, z):
        if after_failed_reuse[-1]:
            full_steps.append(self.t is None)
        return trial(self, z)

    monkeypatch.setattr(Newton, "step", spy_step)
    monkeypatch.setattr(Search, "trial", spy_trial)
    z, info = implicit.root_solve(
        p.g,
        p.z0 + 3,
        5 * p.b,
        solver=Newton(jacobian_reuse=0.5),
        batched=True,
        tol=1e-12,
        return_info=True,
    )
    monkeypatch.undo()
    assert full_steps and all(full_steps)
    assert info.status == "converged"
    z_plain = implicit.root_solve(p.g, p.z0 + 3, 5 * p.b, solver="newton", batched=True, tol=1e-12)
    assert rel_err(z, z_plain) <= 1e-10
