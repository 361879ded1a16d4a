"""Jacobian products (implicit/linear/operator.py): one recorded graph (plain autograd)
against torch.func."""

from __future__ import annotations

import pytest
import torch
from conftest import contractive_matrix, rel_err
from torch.overrides import TorchFunctionMode

from implicit.adjoint.problems import Recorded
from implicit.linear.operator import GraphJacobian, Jacobian
from implicit.solvers import Residual

F64 = torch.float64


def fixed_point_map(batch=3, n=5, seed=0):
    w = contractive_matrix(n, 0.7, seed=seed)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    z = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    return (lambda z: torch.tanh(z @ w.T + x)), z


def vectors(batch=3, n=5, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=gen, dtype=F64)


@pytest.mark.parametrize("shifted", [False, True])
def test_products_and_dense_match_torch_func(shifted):
    f, z = fixed_point_map()

    def g(z):
        return f(z) - z

    reference = Jacobian(g, z)
    recorded = GraphJacobian.record(f if shifted else g, z, shifted=shifted)
    v = vectors()
    assert rel_err(recorded.value, reference.value) <= 1e-15
    assert rel_err(recorded.rmatvec(v), reference.rmatvec(v)) <= 1e-14
    assert rel_err(recorded.matvec(v), reference.matvec(v)) <= 1e-14
    assert rel_err(recorded.dense(), reference.dense()) <= 1e-14
    assert rel_err(recorded.dense(chunk_size=2), reference.dense()) <= 1e-14
    # Each product counts once; a dense Jacobian counts its n products.
    assert recorded.vjps == 2 + 2 * 5


def test_residual_without_dependence_on_z_gives_zero_products():
    x = vectors()
    recorded = GraphJacobian.record(lambda z: x * 2.0, vectors(seed=1))
    assert torch.equal(recorded.rmatvec(x), torch.zeros_like(x))
    assert torch.equal(recorded.dense(), torch.zeros(3, 5, 5, dtype=F64))


class _DoublingWithHostRead(torch.autograd.Function):
    """``2x`` whose backward reads a value on the host, which ``vmap`` refuses."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * 0 if float(grad.abs().max()) == 0 else 2 * grad


def test_dense_falls_back_to_one_product_per_row_where_vmap_cannot_batch():
    z = torch.randn(3, 4, dtype=F64)
    recorded = GraphJacobian.record(lambda z: _DoublingWithHostRead.apply(z) - z.sin(), z)
    blocks = recorded.dense()
    assert torch._C._functorch.peek_interpreter_stack() is None  # vmap's level was left
    expected = torch.diag_embed(2 - z.cos())
    assert rel_err(blocks, expected) <= 1e-15


def test_the_pullback_of_a_recorded_graph_matches_autograd_and_is_zero_where_unused():
    w = contractive_matrix(5, 0.7).requires_grad_()
    x = vectors(seed=3).requires_grad_()
    unused = torch.ones(2, dtype=F64, requires_grad=True)
    recorded = GraphJacobian.record(
        lambda z: torch.tanh(z @ w.T + x), vectors(seed=1), shifted=True
    )
    v = vectors(seed=2)
    want = torch.autograd.grad(recorded.out, (w, x), v, retain_graph=True)
    got = Recorded(recorded, (w, x, unused)).pullback(v)
    assert rel_err(got[0], want[0]) <= 1e-15
    assert rel_err(got[1], want[1]) <= 1e-15
    assert torch.equal(got[2], torch.zeros(2, dtype=F64))


class _Calls(TorchFunctionMode):
    """Lists the functions that reach ``__torch_function__``."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_products_call_autograd_grad_itself_where_a_mode_may_override_it():
    # Products call autograd's engine directly (torch.autograd.grad's handling of its
    # arguments costs as much as a small product), except where torch.autograd.grad may be
    # overridden: a torch-function mode (as here) or a tensor subclass.
    f, z = fixed_point_map()
    recorded = GraphJacobian.record(f, z, shifted=True)
    v = vectors()
    with _Calls() as calls:
        products = [recorded.shifted_rmatvec(v), recorded.rmatvec(v), recorded.matvec(v)]
    assert calls.seen.count(torch.autograd.grad) == 4  # matvec: two, the first time
    for product, again in zip(
        products, [recorded.shifted_rmatvec(v), recorded.rmatvec(v), recorded.matvec(v)]
    ):
        assert torch.equal(product, again)


def test_linearize_records_plainly_only_where_nothing_differentiates_it():
    f, z = fixed_point_map()
    fn = Residual(lambda z: f(z) - z, lambda z, r: z.new_zeros(z.shape[0]))
    with torch.no_grad():
        value, operator = fn.linearize(z)
        assert isinstance(operator.jacobian, GraphJacobian)
        assert torch.equal(value, f(z) - z)
    # Grad mode on (autograd records the solver: backward="unroll"): torch.func, whose
    # products are differentiable.
    with torch.enable_grad():
        assert type(fn.linearize(z)[1].jacobian) is Jacobian
    assert fn.f_evals == 2
