"""The operator a linear solver sees (implicit/linear/base.py): its products, its
structure, its transpose."""

from __future__ import annotations

import pytest
import torch
from conftest import contractive_matrix, rel_err

from implicit.linear import JacobianOperator
from implicit.linear.operator import GraphJacobian

F64 = torch.float64


def fixed_point_map(batch=3, n=5, seed=0):
    w = contractive_matrix(n, 0.7, seed=seed)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    z = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 2), dtype=F64)
    return (lambda z: torch.tanh(z @ w.T + x)), z, w


def vectors(batch=3, n=5, seed=7):
    return torch.randn(batch, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_products_and_blocks_are_the_jacobian_and_its_transpose():
    f, z, w = fixed_point_map()
    # ∂f/∂z per row: diag(1 − f²) W.
    blocks = (1 - f(z) ** 2).unsqueeze(2) * w
    op = JacobianOperator.of(f, z)
    v = vectors()
    assert not (op.transposed or op.shifted or op.symmetric or op.positive_definite)
    assert rel_err(op.mv(v), (blocks @ v.unsqueeze(2)).squeeze(2)) <= 1e-14
    assert rel_err(op.dense(), blocks) <= 1e-14
    adjoint = op.transpose()
    assert adjoint.transposed and adjoint.jacobian is op.jacobian
    assert rel_err(adjoint.mv(v), (blocks.mT @ v.unsqueeze(2)).squeeze(2)) <= 1e-14
    assert rel_err(adjoint.dense(chunk_size=2), blocks.mT) <= 1e-14
    assert op.products == adjoint.products == 2 + 2 * 5  # counted on the shared Jacobian
    assert tuple(op.shape) == (3, 5)


def test_shifted_products_skip_the_identity():
    f, z, _ = fixed_point_map()
    v = vectors()
    op = JacobianOperator.of_fixed_point(f, z)
    assert op.shifted and op.transposed
    assert torch.allclose(op.shifted_mv(v), op.mv(v) + v, rtol=0, atol=1e-15)
    plain = JacobianOperator(GraphJacobian.record(lambda z: f(z) - z, z), transposed=True)
    assert not plain.shifted
    assert rel_err(plain.mv(v), op.mv(v)) <= 1e-15
    # Only the transposed products of ∂f/∂z are recorded.
    assert not op.transpose().shifted
    with pytest.raises(TypeError, match="shifted"):
        plain.shifted_mv(v)


def test_structure_is_declared():
    _, z, _ = fixed_point_map()
    spd = JacobianOperator.of(lambda z: 2 * z, z, positive_definite=True)
    assert spd.symmetric and spd.positive_definite  # positive definite implies symmetric
    assert spd.transpose().positive_definite
    assert "positive_definite" in repr(spd) and "general" in repr(JacobianOperator.of(torch.sin, z))
