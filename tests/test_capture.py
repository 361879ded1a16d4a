"""Captured tensors (implicit/_capture.py): found, substituted, also under torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import TanhProblem, rel_err
from torch._dynamo.testing import CompileCounter

import implicit


def test_compiled_function_gets_the_same_gradients():
    # Discovery and substitution run a TorchFunctionMode around f; a compiled f must
    # still give the eager gradients (the mode's bookkeeping is not traced).
    p = TanhProblem(n=5, batch=3)
    compiled = torch.compile(p.f)
    grads = {}
    for name, f in (("eager", p.f), ("compiled", compiled)):
        z = implicit.fixed_point(f, p.z0, p.x, batched=True, tol=1e-12)
        grads[name] = torch.autograd.grad(z.square().sum(), [p.x, p.W])
    for got, want in zip(grads["compiled"], grads["eager"]):
        assert rel_err(got, want) <= 1e-12


def test_compiled_module_parameters_receive_gradients():
    torch.manual_seed(0)
    cell = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        cell.weight.mul_(0.3)
    compiled = torch.compile(cell)
    x = torch.randn(2, 4, dtype=torch.float64)
    grads = {}
    for name, module in (("eager", cell), ("compiled", compiled)):
        z = implicit.fixed_point(
            lambda z, x, m=module: torch.tanh(m(z) + x),
            torch.zeros_like(x),
            x,
            batched=True,
            tol=1e-12,
        )
        grads[name] = torch.autograd.grad(z.square().sum(), [cell.weight, cell.bias])
    for got, want in zip(grads["compiled"], grads["eager"]):
        assert rel_err(got, want) <= 1e-12


def test_compiled_function_met_first_in_a_solve_is_still_compiled():
    # Discovery evaluates f under a TorchFunctionMode. Dynamo cannot trace through the
    # mode and, meeting it, would give up on f for good: every later evaluation eager.
    torch._dynamo.reset()
    counter = CompileCounter()
    p = TanhProblem(n=5, batch=3)
    compiled = torch.compile(p.f, backend=counter)
    z = implicit.fixed_point(compiled, p.z0, p.x, batched=True, tol=1e-12)
    assert counter.frame_count >= 1
    grads = torch.autograd.grad(z.square().sum(), [p.x, p.W])
    z_eager = implicit.fixed_point(p.f, p.z0, p.x, batched=True, tol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(z_eager.square().sum(), [p.x, p.W])):
        assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("front_door", ["root_solve", "fixed_point"])
def test_a_solve_inside_a_compiled_function_runs_eagerly(front_door):
    # The front doors break the graph: the solve's data-dependent loop is not traced
    # (aot_eager failed on tracing Newton's before), the code around it still is.
    p = TanhProblem(n=5, batch=3)

    def loss(x):
        if front_door == "root_solve":
            z = implicit.root_solve(lambda z, x: p.f(z, x) - z, p.z0, 2 * x, batched=True)
        else:
            z = implicit.fixed_point(p.f, p.z0, 2 * x, batched=True)
        return z.square().sum()

    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(p.x), [p.x, p.W])
    eager = torch.autograd.grad(loss(p.x), [p.x, p.W])
    for got, want in zip(compiled, eager):
        assert rel_err(got, want) <= 1e-12


def test_a_solve_inside_f_of_another_solve():
    # Discovery of the outer f runs the inner solve, with its own discovery, inside
    # the outer one's mode (and the compiler stance it sets); gradients against
    # autograd through both fixed-point iterations unrolled.
    gen = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(4, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_()

    def inner_map(u, s):
        return torch.tanh(0.5 * u @ w.T + s)

    def outer_map(z, x):
        u = implicit.fixed_point(inner_map, torch.zeros_like(x), z + x, batched=True, tol=1e-13)
        return 0.5 * torch.tanh(u)

    z = implicit.fixed_point(outer_map, torch.zeros_like(x), x, batched=True, tol=1e-13)
    grads = torch.autograd.grad(z.square().sum(), (w, x))
    unrolled = torch.zeros_like(x)
    for _ in range(60):
        u = torch.zeros_like(x)
        for _ in range(60):
            u = inner_map(u, unrolled + x)
        unrolled = 0.5 * torch.tanh(u)
    assert rel_err(z, unrolled) <= 1e-11
    for got, want in zip(grads, torch.autograd.grad(unrolled.square().sum(), (w, x))):
        assert rel_err(got, want) <= 1e-10
