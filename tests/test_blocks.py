"""Solves with per-problem blocks (implicit/_batch.py): torch.linalg's answers, with
1 × 1 blocks divided directly."""

from __future__ import annotations

import pytest
import torch

from implicit._batch import Factorization, lu_factor, lu_solve, solve

F64 = torch.float64


def blocks_and_rhs(n: int, batch: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randn(batch, n, n, generator=gen, dtype=F64) + 2 * torch.eye(n, dtype=F64)
    vectors = torch.randn(batch, n, generator=gen, dtype=F64)
    matrices = torch.randn(batch, n, 3, generator=gen, dtype=F64)
    return blocks, vectors, matrices


@pytest.mark.parametrize("n", [1, 3])
def test_factor_and_solves_match_torch_linalg(n):
    blocks, vectors, matrices = blocks_and_rhs(n)
    lu, pivots, info = lu_factor(blocks)
    ref_lu, ref_pivots, ref_info = torch.linalg.lu_factor_ex(blocks)
    assert torch.equal(info, ref_info)
    assert torch.equal(pivots, ref_pivots)
    assert torch.allclose(lu, ref_lu, rtol=1e-15, atol=0)
    want = torch.linalg.lu_solve(ref_lu, ref_pivots, matrices)
    assert torch.allclose(lu_solve(lu, pivots, matrices), want, rtol=1e-14, atol=0)
    for rhs in (vectors, matrices):
        x, info = solve(blocks, rhs)
        want, want_info = torch.linalg.solve_ex(blocks, rhs)
        assert x.shape == want.shape
        assert torch.allclose(x, want, rtol=1e-14, atol=0)
        assert torch.equal(info, want_info)


@pytest.mark.parametrize("n", [1, 3])
def test_factorization_solves_with_the_blocks_and_their_transposes(n):
    blocks, vectors, _ = blocks_and_rhs(n)
    factors = Factorization.of(blocks)
    smallest, largest = factors.diagonal().abs().aminmax(dim=1)
    assert bool((smallest > 0).all()) and bool((largest < torch.inf).all())
    for adjoint, matrix in ((False, blocks), (True, blocks.mT)):
        x = factors.solve(vectors, adjoint=adjoint)
        want = torch.linalg.solve(matrix, vectors)
        assert x.shape == vectors.shape
        assert torch.allclose(x, want, rtol=1e-13, atol=0)


def test_a_zero_scalar_block_is_singular_as_lapack_says():
    blocks = torch.tensor([[[2.0]], [[0.0]], [[-4.0]]], dtype=F64)
    assert torch.equal(lu_factor(blocks)[2], torch.linalg.lu_factor_ex(blocks).info)
    x, info = solve(blocks, torch.ones(3, 1, dtype=F64))
    assert info.tolist() == [0, 1, 0]
    assert x[0].item() == 0.5 and x[2].item() == -0.25
    assert torch.isinf(x[1]).all()


def test_scalar_solves_are_differentiable():
    blocks, vectors, _ = blocks_and_rhs(1)
    blocks.requires_grad_()
    vectors.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: solve(a, b)[0], (blocks, vectors))
    # d(b / a) = db / a − b da / a².
    (grad_a, grad_b) = torch.autograd.grad(solve(blocks, vectors)[0].sum(), (blocks, vectors))
    assert torch.allclose(grad_b, 1 / blocks[..., 0])
    assert torch.allclose(grad_a[..., 0], -vectors / blocks[..., 0] ** 2)
