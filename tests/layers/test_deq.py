"""DEQ: gradients against unrolled float64 references, training, states, diagnostics."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import EXACT_MODES, rel_err, unrolled_fixed_point
from torch import nn

import implicit
from implicit.linear import Phantom

TIGHT = {"tol": 1e-13, "max_iter": 500}


class Cell(nn.Module):
    """``f(z, x) = tanh(s · W z + b + x)`` with ``‖W‖₂ = 0.6``; ``s`` depends on the mode.

    The mode dependence makes the fixed point differ between ``train()`` and
    ``eval()``, so a test can see that the layer calls ``f`` in the right mode.
    """

    def __init__(self, n: int = 5, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(n, n, generator=generator, dtype=torch.float64)
        self.linear = nn.Linear(n, n, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(0.6 * weight / torch.linalg.matrix_norm(weight, ord=2))
            self.linear.bias.copy_(0.1 * torch.randn(n, generator=generator, dtype=torch.float64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if self.training else 0.8
        return torch.tanh(scale * self.linear(z) + x)


def loss_of(z: torch.Tensor) -> torch.Tensor:
    return (z**3).sum() + z.sin().sum()


def make_input(batch: int = 3, n: int = 5, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=generator, dtype=torch.float64).requires_grad_()


def grads_of(z: torch.Tensor, x: torch.Tensor, cell: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_of(z), [x, *cell.parameters()]))


def reference(cell: Cell, x: torch.Tensor) -> list[torch.Tensor]:
    z = unrolled_fixed_point(cell, torch.zeros_like(x), x)
    return grads_of(z, x, cell)


@pytest.mark.parametrize("solver", sorted(implicit.solvers.NAMES))
@pytest.mark.parametrize("backward", EXACT_MODES)
def test_gradients_match_unrolled_reference_for_every_solver_and_mode(solver, backward):
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver=solver, backward=backward, **TIGHT)
    got = grads_of(deq(x), x, cell)
    for g, want in zip(got, reference(cell, x)):
        assert rel_err(g, want) <= 1e-7


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_flow_in_train_and_eval_mode(mode):
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver="fixed_point", backward="gmres", **TIGHT)
    deq.train(mode == "train")
    z = deq(x)
    assert z.requires_grad
    got = grads_of(z, x, cell)
    # The reference runs the cell in the same mode (its fixed point depends on it).
    for g, want in zip(got, reference(cell, x)):
        assert rel_err(g, want) <= 1e-8
    assert cell.training == (mode == "train")


def test_unroll_mode_matches_reference():
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver="fixed_point", backward="unroll", **TIGHT)
    for g, want in zip(grads_of(deq(x), x, cell), reference(cell, x)):
        assert rel_err(g, want) <= 1e-9
    assert deq.last_info.backward is None


@pytest.mark.parametrize(("steps", "damping"), [(1, 1.0), (3, 0.5), (8, 0.7)])
def test_phantom_gradient_equals_explicitly_unrolled_damped_steps(steps, damping):
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(
        cell, solver="fixed_point", backward=Phantom(steps=steps, damping=damping), **TIGHT
    )
    z_star = deq(x)
    got = grads_of(z_star, x, cell)
    assert deq.last_info.backward.method == "phantom"
    assert deq.last_info.backward.iterations == steps
    # Geng et al.: k damped steps unrolled by autograd from the (detached) fixed point.
    z = z_star.detach()
    for _ in range(steps):
        z = (1 - damping) * z + damping * cell(z, x)
    for g, want in zip(got, grads_of(z, x, cell)):
        assert rel_err(g, want) <= 1e-10


def test_phantom_approaches_exact_gradient_and_one_step_is_its_first_term():
    cell, x = Cell(), make_input()
    exact = reference(cell, x)

    def error(backward):
        deq = implicit.DEQ(cell, solver="fixed_point", backward=backward, **TIGHT)
        return rel_err(grads_of(deq(x), x, cell)[0], exact[0])

    errors = [error(Phantom(steps=k, damping=1.0)) for k in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2] and errors[2] <= 1e-3
    assert error("one_step") == pytest.approx(errors[0], rel=1e-12)


def test_phantom_options_are_checked():
    with pytest.raises(ValueError, match="steps"):
        Phantom(steps=0)
    with pytest.raises(ValueError, match="damping"):
        Phantom(damping=1.5)


def test_training_loop_reduces_the_loss():
    torch.manual_seed(0)
    n, batch = 6, 32
    cell = Cell(n).float()
    head = nn.Linear(n, 1)
    deq = implicit.DEQ(cell, solver="fixed_point", backward="gmres", tol=1e-4, max_iter=200)
    x = torch.randn(batch, n)
    target = torch.tanh(x @ torch.randn(n, 1))
    optimizer = torch.optim.Adam([*deq.parameters(), *head.parameters()], lr=0.01)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(head(deq(x)), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert deq.last_info.converged.all() and deq.last_info.backward.converged.all()
    assert losses[-1] < 0.3 * losses[0]


class TwoScaleCell(nn.Module):
    """A multi-resolution cell: a fine state (B, 2, 4) and a coarse one (B, 3)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(3)

        def weight(*shape, norm):
            w = torch.randn(*shape, generator=generator, dtype=torch.float64)
            return nn.Parameter(norm * w / torch.linalg.matrix_norm(w, ord=2))

        self.fine = weight(8, 8, norm=0.4)
        self.down = weight(3, 8, norm=0.3)
        self.up = weight(8, 3, norm=0.3)
        self.coarse = weight(3, 3, norm=0.4)

    def forward(self, state, x):
        fine, coarse = state
        flat = fine.flatten(1)
        new_fine = torch.tanh(flat @ self.fine.T + coarse @ self.up.T + x.flatten(1))
        new_coarse = torch.tanh(coarse @ self.coarse.T + flat @ self.down.T)
        return new_fine.view_as(fine), new_coarse


def test_tuple_states_match_unrolled_reference():
    cell = TwoScaleCell()
    x = make_input(batch=3, n=8).view(3, 2, 4)
    z0 = (torch.zeros_like(x), x.new_zeros(3, 3))
    deq = implicit.DEQ(cell, solver="fixed_point", backward="gmres", **TIGHT)
    fine, coarse = deq(x, z0=z0)
    assert fine.shape == (3, 2, 4) and coarse.shape == (3, 3)
    got = torch.autograd.grad(loss_of(fine) + loss_of(coarse), [x, *cell.parameters()])
    ref_fine, ref_coarse = unrolled_fixed_point(cell, z0, x)
    refs = torch.autograd.grad(loss_of(ref_fine) + loss_of(ref_coarse), [x, *cell.parameters()])
    for g, want in zip(got, refs):
        assert rel_err(g, want) <= 1e-8


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


def test_warm_start_takes_fewer_iterations_and_keeps_gradients():
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver="fixed_point", backward="dense", tol=1e-10, max_iter=500)
    z = deq(x)
    cold = deq.last_info.iterations
    deq(x, z0=z)
    assert deq.last_info.iterations == 0
    x_next = (x.detach() + 1e-6).requires_grad_()
    z_warm = deq(x_next, z0=z)  # z carries a graph: z0 must get no gradient through it
    warm = deq.last_info.iterations
    assert 0 < warm < cold / 2
    got = grads_of(z_warm, x_next, cell)
    for g, want in zip(got, reference(cell, x_next)):
        assert rel_err(g, want) <= 1e-7


@pytest.mark.parametrize(
    "backward", ["gmres", "neumann", implicit.linear.Auto(max_dense=0)], ids=str
)
def test_backward_warm_start_across_steps(backward):
    # Each backward starts from the last one's adjoint solution: steps with nearby
    # inputs (a training loop) need fewer iterations, for the same gradients.
    cell = Cell(n=16)
    options = {"solver": "fixed_point", "backward": backward, "tol": 1e-11, "max_iter": 500}
    warm = implicit.DEQ(cell, warm_start_backward=True, **options)
    cold = implicit.DEQ(cell, **options)
    counts = {"warm": [], "cold": []}
    for step in range(3):
        x = (make_input(n=16).detach() + 1e-6 * step).requires_grad_()
        want = reference(cell, x)
        for name, deq in (("warm", warm), ("cold", cold)):
            got = grads_of(deq(x), x, cell)
            counts[name].append(deq.last_info.backward.iterations)
            for g, w in zip(got, want):
                assert rel_err(g, w) <= 1e-8
    assert counts["warm"][0] == counts["cold"][0]
    assert all(w <= 0.6 * c for w, c in zip(counts["warm"][1:], counts["cold"][1:]))
    assert "warm_start_backward=True" in repr(warm)


def test_backward_warm_start_fits_its_rows():
    # A batch of another size starts cold; under jacrev (the adjoint's rows stacked,
    # one block per cotangent) the warm start is used too.
    cell = Cell()
    deq = implicit.DEQ(
        cell, solver="fixed_point", backward="gmres", warm_start_backward=True, **TIGHT
    )
    x, small = make_input(), make_input(batch=2)
    grads_of(deq(x), x, cell)
    got = grads_of(deq(small), small, cell)
    fresh = implicit.DEQ(cell, solver="fixed_point", backward="gmres", **TIGHT)
    grads_of(fresh(small), small, cell)
    assert deq.last_info.backward.iterations == fresh.last_info.backward.iterations > 0
    for g, want in zip(got, reference(cell, small)):
        assert rel_err(g, want) <= 1e-8
    counts = []
    for _ in range(2):
        jacobian = torch.func.jacrev(lambda x: deq(x))(x.detach())
        counts.append(deq.last_info.backward.iterations)
    want = torch.func.jacrev(lambda x: unrolled_fixed_point(cell, torch.zeros_like(x), x))(x)
    assert rel_err(jacobian, want) <= 1e-9
    assert counts[0] > 0 and counts[1] == 0  # the same cotangents: solved at the start


def test_backward_warm_start_and_preconditioner_under_vmap_and_jacrev():
    # The per-call initial guess (the layer's warm start) and the solver's
    # preconditioner are both used, written for one block of rows, under vmap (one
    # system per slice, stacked) and jacrev (one per cotangent).
    cell = Cell()
    seen = []

    def jacobi(r):  # ≈ ((∂f/∂z)ᵀ − I)⁻¹ ≈ −I for a weak contraction
        seen.append(r.shape)
        return -r

    backward = implicit.linear.GMRES(preconditioner=jacobi)
    options = {"solver": "fixed_point", "backward": backward, **TIGHT}
    deq = implicit.DEQ(cell, warm_start_backward=True, **options)
    x = make_input()
    xs = torch.stack([x, -x, 0.5 * x]).detach()

    def loss(x):
        return deq(x).square().sum()

    def unrolled_loss(x):
        return unrolled_fixed_point(cell, torch.zeros_like(x), x).square().sum()

    def unrolled(x):
        return unrolled_fixed_point(cell, torch.zeros_like(x), x)

    cases = (
        (
            torch.func.vmap(torch.func.grad(loss)),
            torch.func.vmap(torch.func.grad(unrolled_loss)),
            xs,
        ),
        (torch.func.jacrev(deq), torch.func.jacrev(unrolled), x.detach()),
    )
    for transform, reference, arg in cases:
        counts = []
        for _ in range(2):
            got = transform(arg)
            counts.append(deq.last_info.backward.iterations)
        assert rel_err(got, reference(arg)) <= 1e-9
        # The same systems again: solved at the start, from the last solution.
        assert counts[0] > 0 and counts[1] == 0
    assert seen and set(seen) == {x.shape}


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


def test_last_info_reports_forward_and_backward():
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver="fixed_point", backward="gmres", **TIGHT)
    assert deq.last_info is None
    z = deq(x)
    info = deq.last_info
    assert info.converged.shape == (3,) and info.status == "converged"
    assert info.history[-1] <= 1e-12
    loss_of(z).backward()
    assert info.backward.method == "gmres" and bool(info.backward.converged.all())


def test_no_graph_without_grad_and_module_bookkeeping():
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver="fixed_point", **TIGHT)
    with torch.no_grad():
        z = deq(x)
    assert z.grad_fn is None
    assert [p for p in deq.parameters()] == [p for p in cell.parameters()]
    assert set(deq.state_dict()) == {"f.linear.weight", "f.linear.bias"}
    assert "solver=FixedPoint" in repr(deq)


def test_bad_options_raise_and_name_the_argument():
    cell = Cell()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_iters'\]"):
        implicit.DEQ(cell, solver="fixed_point", max_iters=10)
    with pytest.raises(TypeError, match="damping"):  # lists the solver's valid options
        implicit.DEQ(cell, solver="fixed_point", dampnig=0.5)
    implicit.DEQ(cell, solver="fixed_point", damping=0.5)  # a real solver option is fine
    with pytest.raises(ValueError, match="unknown solver"):
        implicit.DEQ(cell, solver="picard")
    with pytest.raises(ValueError, match="unknown backward"):
        implicit.DEQ(cell, solver="fixed_point", backward="phantom_gradient")
    with pytest.raises(ValueError, match="tol"):
        implicit.DEQ(cell, solver="fixed_point", tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        implicit.DEQ(cell, solver="fixed_point", max_iter=0)
    with pytest.raises(ValueError, match="on_failure"):
        implicit.DEQ(cell, solver="fixed_point", on_failure="shout")
    with pytest.raises(ValueError, match="jac_reg"):
        implicit.DEQ(cell, solver="fixed_point", jac_reg=-1)
    with pytest.raises(TypeError, match="f must be callable"):
        implicit.DEQ("cell", solver="fixed_point")
    deq = implicit.DEQ(cell, solver="fixed_point")
    with pytest.raises(TypeError, match="pass z0"):  # zeros_like needs tensors
        deq({"x": 1.0})
    with pytest.raises(ValueError, match="samples"):
        deq.jacobian_penalty(make_input(), deq(make_input()), samples=0)


def test_non_convergence_follows_on_failure():
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver="fixed_point", tol=1e-14, max_iter=3, on_failure="raise")
    with pytest.raises(implicit.ConvergenceError):
        deq(x)
    deq = implicit.DEQ(cell, solver="fixed_point", tol=1e-14, max_iter=3)
    with pytest.warns(implicit.ConvergenceWarning):
        deq(x)
    assert deq.last_info.status == "max_iter"


def test_defaults_anderson_and_auto():
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell)
    assert deq.solver.name == "anderson" and deq.backward_mode.name == "auto"
    z = deq(x)
    assert deq.last_info.solver == "anderson"
    # Default tol 1e-4: the gradient is as accurate as the fixed point.
    for g, want in zip(grads_of(z, x, cell), reference(cell, x)):
        assert rel_err(g, want) <= 1e-3


def test_training_memory_is_flat_in_max_iter_unlike_unroll():
    from implicit._memory import peak_memory

    torch.manual_seed(0)
    cell = nn.Linear(64, 64)
    with torch.no_grad():
        cell.weight.mul_(0.5 / torch.linalg.matrix_norm(cell.weight, ord=2))
    x = torch.randn(32, 64, requires_grad=True)

    def step_peak(backward, max_iter):
        deq = implicit.DEQ(
            lambda z, x: torch.tanh(cell(z) + x),
            solver="fixed_point",
            backward=backward,
            tol=1e-30,  # unreachable: exactly max_iter iterations
            max_iter=max_iter,
            on_failure="ignore",
        )
        return peak_memory(lambda: deq(x).pow(2).sum().backward())[1]

    state = 32 * 64 * 4  # bytes of one batch × width float32 tensor
    per_problem = 32 * 8  # bytes of one (batch,) int64 tensor: codes, masks, norms
    # Flat: no growth with iterations. (Iterations in which some samples stop select
    # rows with temporaries that the others skip, a copy of each state and the rows
    # copied into it: at most three states apart, and a few per-problem vectors of
    # bookkeeping that a loop in which every sample runs does not make.)
    peaks = step_peak("neumann", 40), step_peak("neumann", 10)
    assert abs(peaks[0] - peaks[1]) <= 3 * state + 8 * per_problem
    assert step_peak("unroll", 40) - step_peak("unroll", 10) >= 30 * 2 * state
    assert step_peak("unroll", 40) > 4 * step_peak("neumann", 40)


def test_a_sample_without_batch_dimension_is_refused():
    # batched=True: a 1-D x would be n problems of one unknown each, although the cell
    # couples its features; the layer refuses it, naming the shape and the way out.
    cell = Cell(6)
    deq = implicit.DEQ(cell, solver="fixed_point", tol=1e-12, max_iter=200)
    with pytest.raises(ValueError, match=r"batched=True.*shape \(6,\).*x\[None\]"):
        deq(torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z0 of shape \(6,\)"):
        deq(torch.randn(1, 6, dtype=torch.float64), z0=torch.zeros(6, dtype=torch.float64))
    x = torch.randn(6, dtype=torch.float64)
    one = deq(x[None])[0]
    unbatched = implicit.DEQ(cell, solver="fixed_point", batched=False, tol=1e-12, max_iter=200)(x)
    assert torch.allclose(one, unbatched, rtol=0, atol=1e-10)


def test_copies_and_pickles_after_a_forward_with_jac_reg():
    # last_jac_loss is part of the forward's graph: the copy keeps its value, detached.
    deq = implicit.DEQ(Cell(), solver="fixed_point", jac_reg=1, **TIGHT)
    x = make_input()
    z = deq(x)
    for copy_of in (copy.deepcopy, lambda layer: pickle.loads(pickle.dumps(layer))):
        twin = copy_of(deq)
        assert not twin.last_jac_loss.requires_grad
        assert torch.equal(twin.last_jac_loss, deq.last_jac_loss.detach())
        assert torch.equal(twin(x), z)
    assert deq.last_jac_loss.requires_grad  # the original keeps its graph
