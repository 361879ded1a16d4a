"""Captured tensors (implicit/_capture.py): found, substituted, also under torch.compile."""

from __future__ import annotations

import torch
from conftest import TanhProblem, rel_err

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
