"""batch_jacobian (implicit/_batch_jacobian.py): the per-sample blocks against jacrev and
vmap(jacrev), differentiable, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit

F64 = torch.float64


class TestBatchJacobian:
    def test_against_jacrev_blocks(self):
        generator = torch.Generator().manual_seed(0)
        m = torch.randn(4, 6, dtype=F64, generator=generator)
        x = torch.randn(3, 2, 3, dtype=F64, generator=generator)

        def func(x):  # (B, 2, 3) -> (B, 4), or (2, 3) -> (4,) for the vmap reference
            flat = x.flatten(-2)
            return torch.sin(flat @ m.T) * flat[..., :4].exp()

        jac = implicit.batch_jacobian(func, x)
        assert jac.shape == (3, 4, 6)
        full = torch.func.jacrev(func)(x).reshape(3, 4, 3, 6)
        blocks = torch.stack([full[b, :, b, :] for b in range(3)])
        assert rel_err(jac, blocks) <= 1e-14
        assert rel_err(jac, torch.func.vmap(torch.func.jacrev(func))(x).reshape(3, 4, 6)) <= 1e-14

    @settings(max_examples=25, deadline=None)
    @given(
        batch=st.integers(1, 4),
        shape_in=st.lists(st.integers(1, 3), min_size=0, max_size=2),
        n_out=st.integers(1, 5),
        seed=st.integers(0, 2**16),
    )
    def test_random_shapes_against_vmapped_jacrev(self, batch, shape_in, n_out, seed):
        generator = torch.Generator().manual_seed(seed)
        n_in = int(np.prod(shape_in))
        m = torch.randn(n_out, n_in, dtype=F64, generator=generator)
        x = torch.randn(batch, *shape_in, dtype=F64, generator=generator)

        def func(x):  # batch-first, or one sample under vmap
            flat = x.reshape(*x.shape[: x.dim() - len(shape_in)], n_in)
            return torch.tanh(flat @ m.T) * (1 + flat.pow(2).sum(-1, keepdim=True))

        jac = implicit.batch_jacobian(func, x)
        ref = torch.func.vmap(torch.func.jacrev(func))(x).reshape(batch, n_out, n_in)
        assert jac.shape == (batch, n_out, n_in) and rel_err(jac, ref) <= 1e-13

    def test_differentiable(self):
        theta = torch.tensor([0.3, -1.2], dtype=F64, requires_grad=True)
        x = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(1))

        def func(x):
            return torch.tanh(theta * x) * x.sum(-1, keepdim=True)

        x.requires_grad_()
        grads = torch.autograd.grad(implicit.batch_jacobian(func, x).pow(2).sum(), [theta, x])
        ref_jac = torch.func.vmap(torch.func.jacrev(func))(x)
        refs = torch.autograd.grad(ref_jac.pow(2).sum(), [theta, x])
        for got, want in zip(grads, refs):
            assert rel_err(got, want) <= 1e-13

    def test_errors(self):
        x = torch.zeros(3, 2)
        with pytest.raises(ValueError, match="batch size 3"):
            implicit.batch_jacobian(lambda x: x.sum(0), x)
        with pytest.raises(ValueError, match="batch size 3"):
            implicit.batch_jacobian(lambda x: x[:2], x)
        with pytest.raises(TypeError, match="must return a tensor"):
            implicit.batch_jacobian(lambda x: x.tolist(), x)
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            implicit.batch_jacobian(torch.sin, [1.0, 2.0])
        with pytest.raises(ValueError, match="batch dimension"):
            implicit.batch_jacobian(torch.sin, torch.tensor(1.0))
