"""DEQ: gradients against unrolled float64 references in every solver and backward mode,
in train and eval mode, by the phantom gradient, with tuple states and the defaults;
training, and its memory flat in max_iter."""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT_MODES, TIGHT, loss_of, rel_err, unrolled_fixed_point
from deq_cells import Cell, TwoScaleCell, grads_of, make_input, reference
from torch import nn

import implicit
from implicit.linear import Phantom


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
