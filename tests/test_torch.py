"""The private torch API in one module (implicit/_torch.py), each name with a public
fallback: the fallbacks are selected when forced or when a name is missing, and give
the private names' answers. (CI also runs the whole suite with the fallbacks forced.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from conftest import contractive_matrix

import implicit
from implicit import _torch

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64

#: Every private name of the module, as FALLBACKS names it.
PRIVATE = {
    "functorch.is_functorch_wrapped_tensor",
    "functorch interpreter stack",
    "Function.apply without argument binding",
    "autograd.graph._engine_run_backward",
    "functorch vmap levels",
    "forward_ad._set_fwd_grad_enabled",
    "dynamo's disable mark",
}

# A fixed point with an explicit and a captured input, and its gradient.
_SOLVE = """
import torch, implicit
from implicit import _torch
torch.manual_seed(0)
w = (0.4 * torch.randn(6, 6, dtype=torch.float64) / 6**0.5).requires_grad_()
x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
z = implicit.fixed_point(lambda z, x: torch.tanh(z @ w.T + x), torch.zeros_like(x), x,
                         batched=True, tol=1e-12)
gx, gw = torch.autograd.grad(z.square().sum(), (x, w))
print(sorted(_torch.FALLBACKS), _torch.KNOWS_TRANSFORMS, _torch.FORWARD_GRAD_IN_FUNCTIONS)
print(repr(gx.sum().item()), repr(gw.sum().item()))
"""


def _run(program: str, **env: str) -> list[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    environment.pop("IMPLICIT_TORCH_FALLBACKS", None)
    environment.update(env)
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_forcing_the_fallbacks_selects_every_one_and_gives_the_same_gradients():
    private_run = _run(_SOLVE)
    forced = _run(_SOLVE, IMPLICIT_TORCH_FALLBACKS="1")
    assert forced[0] == f"{sorted(PRIVATE)} False False"
    assert private_run[0] == "[] True True"  # the torch releases CI tests have every name
    assert forced[1] == private_run[1]


def test_a_missing_private_name_selects_its_fallback_alone():
    program = "import torch.autograd.graph as g\ndel g._engine_run_backward\n" + _SOLVE
    lines = _run(program)
    assert lines[0] == "['autograd.graph._engine_run_backward'] True True"
    assert lines[1] == _run(_SOLVE)[1]


_PRIVATE_GLOBALS = ("_is_wrapped", "_stack", "_apply", "_engine", "_vmap", "_forward_grad")


def _use_fallbacks(patch) -> None:
    for name in _PRIVATE_GLOBALS:
        patch.setattr(_torch, name, None)
    patch.setattr(_torch, "KNOWS_TRANSFORMS", False)
    patch.setattr(_torch, "FORWARD_GRAD_IN_FUNCTIONS", False)


@pytest.fixture
def fallbacks(monkeypatch):
    """Every fallback of implicit._torch, in this process."""
    _use_fallbacks(monkeypatch)


def _answers(fn, x: torch.Tensor) -> list:
    """``fn(t)`` for a tensor ``t`` as plain code and five transforms see it."""
    seen = []

    def record(t):
        seen.append(fn(t))
        return t.sin()

    record(x)
    torch.func.vmap(record)(x)
    torch.func.grad(lambda t: record(t).sum())(x)
    torch.func.jvp(record, (x,), (x,))
    torch.func.jacrev(torch.func.jacfwd(record))(x)
    with forward_ad.dual_level():
        record(forward_ad.make_dual(x, x))
    return seen


def test_the_fallback_predicates_answer_as_the_private_ones(monkeypatch):
    x = torch.randn(3, dtype=F64)

    def predicates(t):
        return (_torch.is_transformed(t), _torch.transforms_active(t), _torch.dual_level_open())

    private = _answers(predicates, x)
    with monkeypatch.context() as patch:
        for name in ("_is_wrapped", "_stack", "_forward_grad"):
            patch.setattr(_torch, name, None)
        assert _answers(predicates, x) == private
    assert [answer[1] for answer in private] == [False, True, True, True, True, False]


@pytest.mark.parametrize("create_graph", [False, True])
def test_the_fallback_products_are_the_private_ones(monkeypatch, create_graph):
    w = torch.randn(4, 4, dtype=F64, requires_grad=True)
    z = torch.randn(2, 4, dtype=F64, requires_grad=True)
    out, cotangent = torch.tanh(z @ w.T), torch.randn(2, 4, dtype=F64)
    args = (out, cotangent, (z, w))
    private = _torch.autograd_grad(*args, retain_graph=True, create_graph=create_graph)
    rows, shared = torch.randn(5, 2, 4, dtype=F64), torch.randn(4, dtype=F64)
    batched = _torch.vmap_call(lambda r, s: r * s + s, 5, (rows, shared), (0, None))
    monkeypatch.setattr(_torch, "_engine", None)
    monkeypatch.setattr(_torch, "_vmap", None)
    public = _torch.autograd_grad(*args, retain_graph=True, create_graph=create_graph)
    for p, q in zip(private, public):
        assert torch.equal(p, q)
    assert torch.equal(
        batched, _torch.vmap_call(lambda r, s: r * s + s, 5, (rows, shared), (0, None))
    )


W = contractive_matrix(3, 0.5)


def _solve(x: torch.Tensor) -> torch.Tensor:
    w = W
    z0 = torch.zeros(3, dtype=F64)
    return implicit.fixed_point(lambda z, x: torch.tanh(w @ z + x), z0, x, tol=1e-13)


def _jvp(fn):
    return lambda x: torch.func.jvp(fn, (x,), (torch.ones_like(x),))[1]


REFUSED = {
    "jacfwd(jacfwd)": torch.func.jacfwd(torch.func.jacfwd(_solve)),
    "jvp(jvp)": _jvp(_jvp(_solve)),
    "jvp(vmap(jvp))": _jvp(torch.func.vmap(_jvp(_solve))),
}
ACCEPTED = {
    "hessian": torch.func.hessian(lambda x: _solve(x).square().sum()),
    "jacrev(jacfwd)": torch.func.jacrev(torch.func.jacfwd(_solve)),
    "jvp(vmap)": _jvp(torch.func.vmap(_solve)),
    "vmap(jvp)": torch.func.vmap(_jvp(_solve)),
}


@pytest.mark.parametrize("name", REFUSED)
def test_the_fallback_refuses_forward_over_forward_mode(fallbacks, name):
    x = torch.randn(2, 3, dtype=F64) if "vmap" in name else torch.randn(3, dtype=F64)
    with pytest.raises(RuntimeError, match="forward-mode AD over forward-mode AD"):
        REFUSED[name](x)


@pytest.mark.parametrize("name", ACCEPTED)
def test_the_fallback_accepts_forward_mode_once(monkeypatch, name):
    x = torch.randn(2, 3, dtype=F64) if "vmap" in name else torch.randn(3, dtype=F64)
    private = ACCEPTED[name](x)
    with monkeypatch.context() as patch:
        _use_fallbacks(patch)
        public = ACCEPTED[name](x)
    assert torch.allclose(public, private, rtol=1e-12, atol=1e-14)


def test_vmap_call_matches_torch_func_vmap():
    gen = torch.Generator().manual_seed(0)
    rows, shared = torch.randn(4, 3, 5, generator=gen, dtype=F64), torch.randn(5, dtype=F64)

    def fn(x, y):
        return torch.tanh(x * y).sum(dim=-1)

    expected = torch.func.vmap(fn, in_dims=(0, None))(rows, shared)
    assert torch.equal(_torch.vmap_call(fn, 4, (rows, shared), (0, None)), expected)
    # An output that does not depend on the batched argument is expanded, as vmap does.
    constant = _torch.vmap_call(lambda x, y: y * 2, 4, (rows, shared), (0, None))
    assert torch.equal(
        constant, torch.func.vmap(lambda x, y: y * 2, in_dims=(0, None))(rows, shared)
    )
    assert torch._C._functorch.peek_interpreter_stack() is None
