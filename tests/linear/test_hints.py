"""What the quasi-Newton forward solvers hand the backward: their estimates of the
inverse Jacobian (implicit/linear/base.py's LowRankInverse), as preconditioners."""

from __future__ import annotations

import pytest
import torch
from conftest import contractive_matrix, rel_err

import implicit
from implicit import linear
from implicit.adjoint.problems import RootProblem
from implicit.solvers import Anderson, Broyden

F64 = torch.float64


@pytest.fixture
def kept_hints(monkeypatch):
    """The hints each root problem keeps for its backward, in order."""
    hints = []
    solve = RootProblem.solve

    def spy(self, z0, inputs):
        z = solve(self, z0, inputs)
        hints.append(self.hint)
        return z

    monkeypatch.setattr(RootProblem, "solve", spy)
    return hints


@pytest.fixture
def final_states(monkeypatch):
    """The hint and final state of every Anderson and Broyden solve."""
    seen = []
    for cls in (Anderson, Broyden):
        hint = cls.hint

        def spy(self, state, hint=hint):
            made = hint(self, state)
            seen.append((made, state))
            return made

        monkeypatch.setattr(cls, "hint", spy)
    return seen


def tanh_map(batch=3, n=16, seed=0):
    w = contractive_matrix(n, 0.8, seed=seed)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (lambda z, x: torch.tanh(z @ w.to(z.dtype).T + x)), x


def test_andersons_estimate_maps_each_residual_difference_to_its_step(final_states):
    f, x = tanh_map()
    # start_ratio=0: a history from the start (this map contracts fast enough for the
    # default to take plain mixing steps, and keep none).
    implicit.fixed_point(f, torch.zeros_like(x), x, batched=True, tol=1e-8, start_ratio=0.0)
    hint, history = final_states[-1]
    assert isinstance(hint, linear.LowRankInverse) and hint.rows == 3
    steps = history.dz_mixed - history.dr  # Δz = (Δz + βΔr) − βΔr, β = 1
    for j in range(history.dr.shape[1]):
        mapped = hint.solve(history.dr[:, j], transposed=False)
        assert rel_err(mapped, steps[:, j]) <= 1e-6  # the secant equation, up to the ridge
    # Its transpose is the transposed matrix: columns [i, b, :] of M_b and of M_bᵀ.
    basis = torch.eye(16, dtype=F64)
    columns = torch.stack([hint.solve(e.expand(3, 16), transposed=False) for e in basis])
    rows = torch.stack([hint.solve(e.expand(3, 16), transposed=True) for e in basis])
    assert rel_err(rows, columns.permute(2, 1, 0)) <= 1e-14


def test_broydens_estimate_is_its_inverse_jacobian(final_states):
    f, x = tanh_map()
    implicit.fixed_point(f, torch.zeros_like(x), x, solver="broyden", batched=True)
    hint, state = final_states[-1]
    v = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert torch.allclose(hint.solve(v, transposed=False), state.apply(v), atol=0, rtol=1e-13)
    assert torch.allclose(hint.solve(v, transposed=True), state.apply_transpose(v), rtol=1e-13)


def nonsymmetric_root(batch=4, n=120, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = 2 * torch.eye(n, dtype=F64) + 1.5 * torch.randn(n, n, generator=gen, dtype=F64) / n**0.5
    b = torch.randn(batch, n, generator=gen, dtype=F64, requires_grad=True)
    return (lambda z, b: z @ a.T + 0.1 * torch.tanh(z) - b), b, a


def gradient(backward, solver="broyden", **options):
    g, b, a = nonsymmetric_root()
    z, info = implicit.root_solve(
        g,
        torch.zeros_like(b),
        b,
        solver=solver,
        backward=backward,
        batched=True,
        tol=1e-10,
        max_iter=500,
        return_info=True,
        **options,
    )
    (grad,) = torch.autograd.grad(z.sum(), b)
    # ∂g/∂z = A + 0.1 diag(1 − tanh²), ∂g/∂b = −I: ∇b Σ z = (∂g/∂z)⁻ᵀ 1 per row.
    jac = a + 0.1 * torch.diag_embed(1 - torch.tanh(z.detach()) ** 2)
    reference = torch.linalg.solve(jac.mT, torch.ones_like(z))
    return grad, reference, info.backward


def test_gmres_preconditioned_by_broydens_estimate_is_exact_in_fewer_products(kept_hints):
    hinted, reference, report = gradient(linear.GMRES(use_hints=True), memory=50)
    assert isinstance(kept_hints[-1], linear.LowRankInverse)
    assert rel_err(hinted, reference) <= 1e-8
    plain, _, plain_report = gradient(linear.GMRES(), memory=50)
    assert kept_hints[-1] is None  # not kept where not used
    assert rel_err(plain, reference) <= 1e-8
    assert report.matvecs < plain_report.matvecs


@pytest.mark.parametrize("dtype", [F64, torch.float16])
def test_gmres_preconditioned_by_andersons_estimate_is_exact(kept_hints, dtype):
    f, x = tanh_map(n=80)
    x = x.to(dtype).requires_grad_()
    z = implicit.fixed_point(
        f,
        torch.zeros_like(x),
        x,
        batched=True,
        tol=1e-10,
        backward=linear.GMRES(use_hints=True),
        start_ratio=0.0,  # extrapolate (and keep a history) from the start
    )
    assert isinstance(kept_hints[-1], linear.LowRankInverse)
    (grad,) = torch.autograd.grad(z.sum(), x)
    # Reference: dense, in float64 at the solution.
    z64, x64 = z.detach().double(), x.detach().double()
    jac = torch.func.vmap(torch.func.jacrev(lambda z, x: f(z, x) - z))(z64, x64)
    w = torch.linalg.solve(jac.mT, torch.ones_like(z64))
    # ∂g/∂x = diag(1 − f²): ∇x Σ z = −(∂g/∂x)ᵀ w.
    reference = -(1 - f(z64, x64) ** 2) * w
    assert rel_err(grad.double(), reference) <= (1e-8 if dtype == F64 else 3e-2)


def test_the_default_backward_keeps_no_secant_hint(kept_hints):
    f, x = tanh_map(n=80)
    implicit.fixed_point(f, torch.zeros_like(x), x.requires_grad_(), batched=True)
    assert kept_hints == [None]


def test_only_methods_that_take_any_preconditioner_use_hints():
    for cls in (linear.CG, linear.Neumann):
        with pytest.raises(TypeError, match="use_hints"):
            cls(use_hints=True)
    hint = linear.LowRankInverse(torch.ones(3), torch.zeros(3, 1, 4), torch.zeros(3, 1, 4))
    assert linear.GMRES(use_hints=True).uses(hint, (3, 4))
    assert not linear.GMRES(use_hints=True).uses(hint, (6, 4))  # other rows (vmap's copies)
    assert not linear.GMRES().uses(hint, (3, 4))
    assert not linear.Auto().uses(hint, (3, 4))
