"""What a solve does with its inputs: no graph without gradients, no gradient to z0, and
every input (z0, arguments, captured tensors, parameters, a backward guess) neither
modified nor aliased by the forward and backward, in every backward mode."""

from __future__ import annotations

import pytest
import torch
from conftest import TIGHT, TanhProblem, loss_of

import implicit


def test_no_graph_without_grad():
    p = TanhProblem(n=3, batch=2)
    with torch.no_grad():
        z = implicit.fixed_point(p.f, p.z0, p.x, solver="fixed_point", batched=True)
    assert z.grad_fn is None and not z.requires_grad
    w = p.W.detach()
    z = implicit.fixed_point(
        lambda z, x: torch.tanh(z @ w.T + x), p.z0, p.x.detach(), solver="fixed_point", batched=True
    )
    assert z.grad_fn is None and not z.requires_grad


def test_z0_gets_no_gradient():
    p = TanhProblem(n=3, batch=2)
    z0 = torch.full_like(p.z0, 0.1, requires_grad=True)
    z = implicit.fixed_point(p.f, z0, p.x, solver="fixed_point", batched=True, **TIGHT)
    gz0, gx = torch.autograd.grad(z.sum(), [z0, p.x], allow_unused=True)
    assert gz0 is None and gx is not None


# -- inputs are never modified, nor aliased -----------------------------------------------


def test_inputs_are_not_modified():
    p = TanhProblem(n=4, batch=2)
    before = [t.detach().clone() for t in (p.z0, p.x, p.W)]
    z = implicit.fixed_point(p.f, p.z0, p.x, solver="fixed_point", batched=True, **TIGHT)
    z.sum().backward()
    for t, saved in zip((p.z0, p.x, p.W), before):
        assert torch.equal(t.detach(), saved)


ALL_MODES = ["dense", "cg", "gmres", "bicgstab", "neumann", "one_step", "unroll", "auto"]


@pytest.mark.parametrize("backward", ALL_MODES)
def test_inputs_unchanged_after_forward_and_backward(backward):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    captured = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    z0 = torch.full((2, 4), 0.1, dtype=torch.float64)
    guess = torch.ones(2, 4, dtype=torch.float64)
    mode = implicit.linear.GMRES(x0=guess) if backward == "gmres" else backward
    inputs = [z0, x, captured, lin.weight, lin.bias, guess]
    saved = [t.detach().clone() for t in inputs]
    versions = [t._version for t in inputs]
    z = implicit.fixed_point(
        lambda z, x: torch.tanh(lin(z) + x + captured),
        z0,
        x,
        solver="fixed_point",
        backward=mode,
        batched=True,
        on_failure="ignore",  # cg meets a Jacobian that is not SPD here: only inputs matter
        **TIGHT,
    )
    loss_of(z).backward()
    for tensor, before, version in zip(inputs, saved, versions):
        assert torch.equal(tensor.detach(), before) and tensor._version == version
    assert x.grad is not None and captured.grad is not None and lin.weight.grad is not None


@pytest.mark.parametrize("backward", ["dense", "unroll"])
@pytest.mark.parametrize("grad", [False, True])
def test_output_does_not_alias_z0(backward, grad):
    # z0 already solves the problem: no iteration happens.
    x = torch.ones(3, dtype=torch.float64, requires_grad=grad)
    z0 = torch.ones(3, dtype=torch.float64)
    z = implicit.fixed_point(
        lambda z, x: 0.5 * z + 0.5 * x, z0, x, solver="fixed_point", backward=backward
    )
    with torch.no_grad():
        z.add_(1)
    assert torch.equal(z0, torch.ones(3, dtype=torch.float64))


def test_unroll_gives_z0_no_gradient():
    p = TanhProblem(n=3, batch=2)
    z0 = torch.full_like(p.z0, 0.1, requires_grad=True)
    z = implicit.fixed_point(
        p.f,
        z0,
        p.x,
        solver="fixed_point",
        backward="unroll",
        batched=True,
        max_iter=5,
        on_failure="ignore",
    )
    gz0, gx = torch.autograd.grad(z.sum(), [z0, p.x], allow_unused=True)
    assert gz0 is None and gx is not None
