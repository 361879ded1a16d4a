"""DEQ diagnostics against exact Jacobians: the Jacobian regulariser (its estimate, its
gradient, jac_reg in training) and the spectral radius, for tensor and tuple states."""

from __future__ import annotations

import pytest
import torch
from conftest import TIGHT, rel_err
from deq_cells import Cell, TwoScaleCell, make_input

import implicit


def test_tuple_state_diagnostics_see_the_whole_jacobian():
    cell = TwoScaleCell()
    x = make_input(batch=2, n=8).detach().view(2, 2, 4)
    deq = implicit.DEQ(cell, solver="fixed_point", **TIGHT)
    z = deq(x, z0=(torch.zeros_like(x), x.new_zeros(2, 3)))
    blocks = exact_jacobian(cell, z, x)
    assert blocks.shape == (2, 11, 11)
    radius = torch.linalg.eigvals(blocks).abs().amax(dim=1)
    assert rel_err(deq.spectral_radius(x, z, iterations=1000), radius) <= 2e-3
    penalty = deq.jacobian_penalty(x, z, samples=1, generator=torch.Generator().manual_seed(0))
    probe = rademacher(2, 11, seed=0)
    exact = (torch.einsum("bi,bij->bj", probe, blocks) ** 2).sum(dim=1).mean()
    assert penalty.detach().item() == pytest.approx(exact.item(), rel=1e-12)


def rademacher(*shape: int, seed: int) -> torch.Tensor:
    """The ±1 probes ``jacobian_penalty`` draws from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.empty(*shape, dtype=torch.float64).bernoulli_(0.5, generator=generator) - 1


def exact_jacobian(f, z, x) -> torch.Tensor:
    """Per-sample ``∂f/∂z`` on the flat view (tensor or tuple states), by jacrev."""
    parts = z if isinstance(z, tuple) else (z,)
    sizes = [p[0].numel() for p in parts]

    def flat_f(flat, x_b):
        pieces = torch.split(flat, sizes)
        state = tuple(p.view(q.shape[1:]).unsqueeze(0) for p, q in zip(pieces, parts))
        out = f(state if isinstance(z, tuple) else state[0], x_b.unsqueeze(0))
        out = out if isinstance(out, tuple) else (out,)
        return torch.cat([o.reshape(-1) for o in out])

    flat = torch.cat([p.detach().flatten(1) for p in parts], dim=1)
    return torch.stack(
        [torch.func.jacrev(flat_f)(flat[b], x[b].detach()) for b in range(flat.shape[0])]
    )


class TestJacobianRegulariser:
    def setup_method(self):
        self.cell = Cell(n=4)
        self.x = make_input(batch=3, n=4)
        self.deq = implicit.DEQ(self.cell, solver="fixed_point", **TIGHT)
        self.z = self.deq(self.x)
        self.blocks = exact_jacobian(self.cell, self.z, self.x).detach()

    def exact_norm(self) -> torch.Tensor:
        """Mean over the batch of ‖∂f/∂z‖²_F, differentiable in the cell's parameters."""
        z, x = self.z.detach(), self.x

        def per_sample(z_b, x_b):
            return torch.func.jacrev(lambda s: self.cell(s.unsqueeze(0), x_b.unsqueeze(0))[0])(z_b)

        blocks = torch.stack([per_sample(z[b], x[b]) for b in range(z.shape[0])])
        return (blocks**2).sum(dim=(1, 2)).mean()

    def test_one_sample_is_the_squared_norm_of_a_rademacher_projection(self):
        penalty = self.deq.jacobian_penalty(
            self.x, self.z, generator=torch.Generator().manual_seed(5)
        )
        probe = rademacher(3, 4, seed=5)
        assert set(probe.unique().tolist()) == {-1.0, 1.0}
        exact = (torch.einsum("bi,bij->bj", probe, self.blocks) ** 2).sum(dim=1).mean()
        assert penalty.detach().item() == pytest.approx(exact.item(), rel=1e-12)

    def test_mean_matches_exact_frobenius_norm_within_statistical_tolerance(self):
        samples = 4000
        penalty = self.deq.jacobian_penalty(
            self.x, self.z, samples=samples, generator=torch.Generator().manual_seed(0)
        )
        exact = self.exact_norm().detach()
        # Var ‖Jᵀε‖² = 2 Σ_{i≠j} (J Jᵀ)_ij² for Rademacher ε; independent across the batch.
        gram = self.blocks @ self.blocks.transpose(1, 2)
        off_diagonal = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
        variance = (2 * (off_diagonal**2).sum(dim=(1, 2))).sum() / 3**2 / samples
        assert abs((penalty - exact).detach().item()) <= 5 * float(variance.sqrt())
        assert float(variance.sqrt()) < 0.05 * float(exact)  # the test has power

    def test_gradient_reaches_parameters_and_matches_exact_norms_gradient(self):
        penalty = self.deq.jacobian_penalty(
            self.x, self.z, samples=4000, generator=torch.Generator().manual_seed(1)
        )
        params = [self.x, *self.cell.parameters()]
        got = torch.autograd.grad(penalty, params)
        want = torch.autograd.grad(self.exact_norm(), params)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all() and g.abs().sum() > 0
            assert rel_err(g, w) <= 0.05

    def test_jac_reg_option_fills_last_jac_loss_in_training_only(self):
        deq = implicit.DEQ(self.cell, solver="fixed_point", jac_reg=2, **TIGHT)
        torch.manual_seed(7)
        z = deq(self.x)
        torch.manual_seed(7)
        direct = deq.jacobian_penalty(self.x, z, samples=2)
        assert deq.last_jac_loss.requires_grad
        assert deq.last_jac_loss.detach().item() == pytest.approx(direct.detach().item(), rel=1e-12)
        deq.eval()
        deq(self.x)
        assert deq.last_jac_loss is None
        deq.train()
        with torch.no_grad():
            deq(self.x)
        assert deq.last_jac_loss is None

    def test_training_on_the_penalty_shrinks_the_jacobian(self):
        cell = Cell(n=4)
        deq = implicit.DEQ(cell, solver="fixed_point", jac_reg=True, **TIGHT)
        optimizer = torch.optim.SGD(cell.parameters(), lr=0.05)
        x = self.x.detach()
        before = deq.jacobian_penalty(x, deq(x), samples=200).detach().item()
        for _ in range(30):
            optimizer.zero_grad()
            deq(x)
            deq.last_jac_loss.backward()
            optimizer.step()
        after = deq.jacobian_penalty(x, deq(x), samples=200).detach().item()
        assert after < 0.5 * before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_radius_matches_eigenvalues(seed):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    w = 0.9 * w / torch.linalg.eigvals(w).abs().max()  # spectral radius 0.9, ‖w‖₂ > 1

    def f(z, x):
        return torch.tanh(z @ w.T + x)

    deq = implicit.DEQ(f, solver="fixed_point", tol=1e-12, max_iter=2000)
    x = 0.3 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    z = deq(x)
    exact = torch.linalg.eigvals(exact_jacobian(f, z, x)).abs().amax(dim=1)
    estimate = deq.spectral_radius(x, z, iterations=1000)
    assert estimate.shape == (4,) and not estimate.requires_grad
    assert rel_err(estimate, exact) <= 2e-3
    unbatched = implicit.DEQ(f, solver="fixed_point", batched=False, tol=1e-12, max_iter=2000)
    z1 = unbatched(x[:1])
    assert unbatched.spectral_radius(x[:1], z1, iterations=1000).shape == ()
