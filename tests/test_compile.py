"""How the solves meet torch.compile (implicit/_torch.py): the compiler and scipy are
loaded only by programs that use them; a compiled caller breaks its graph at a solve once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import TanhProblem, rel_err

import implicit
from implicit._torch import eager

ROOT = Path(__file__).resolve().parents[1]

# Every front door with gradients, the DEQ layer and a backward: none of them needs the
# compiler (about a second to import) or scipy (a third of one).
_PROGRAM = """
import sys, torch, implicit
w = (0.3 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
f = lambda z, x: torch.tanh(z @ w.T + x)
z = implicit.fixed_point(f, torch.zeros_like(x), x, batched=True)
z = z + implicit.root_solve(lambda z, x: f(z, x) - z, torch.zeros_like(x), x, batched=True)
z = z + implicit.invert(torch.sinh, x, batched=True)
z = z + implicit.DEQ(f)(x)
z.sum().backward()
print(sorted(m for m in ("torch._dynamo", "scipy") if m in sys.modules))
"""


def test_solving_and_differentiating_loads_neither_the_compiler_nor_scipy():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _PROGRAM], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_eager_calls_the_function_and_keeps_its_name():
    def add(a, b=1):
        """Adds."""
        return a + b

    wrapped = eager(add)
    assert wrapped(2, b=3) == 5 and wrapped(2) == 3
    assert wrapped.__name__ == "add" and wrapped.__doc__ == "Adds."


def test_a_compiled_caller_breaks_its_graph_once_and_never_recompiles():
    # The front doors' mark makes dynamo break the graph at the solve instead of
    # tracing it; the wrapper itself must not make every call retrace.
    p = TanhProblem(n=5, batch=3)

    def loss(x):
        z = implicit.fixed_point(p.f, p.z0, 2 * x, batched=True, tol=1e-12)
        return 3 * z.square().sum()

    compiled = torch.compile(loss, backend="aot_eager")
    want = torch.autograd.grad(loss(p.x), [p.x, p.W])
    for _ in range(2):  # compiles
        torch.autograd.grad(compiled(p.x), [p.x, p.W])
    with torch.compiler.set_stance("fail_on_recompile"):
        got = torch.autograd.grad(compiled(p.x), [p.x, p.W])
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-12
