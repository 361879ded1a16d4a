"""DEQ warm starts: the forward from a previous solution, the backward from the last
adjoint solution (across steps, batch sizes, under vmap and jacrev), gradients kept."""

from __future__ import annotations

import pytest
import torch
from conftest import TIGHT, rel_err, unrolled_fixed_point
from deq_cells import Cell, grads_of, make_input, reference

import implicit


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
    for transform, expected, arg in cases:
        counts = []
        for _ in range(2):
            got = transform(arg)
            counts.append(deq.last_info.backward.iterations)
        assert rel_err(got, expected(arg)) <= 1e-9
        # The same systems again: solved at the start, from the last solution.
        assert counts[0] > 0 and counts[1] == 0
    assert seen and set(seen) == {x.shape}
