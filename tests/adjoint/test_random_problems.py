"""Properties on random problems: contractive maps in every exact backward mode against
unrolled autograd, and convex energies by a user-defined solver with CG against the
closed form."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EXACT_MODES, assert_fixed_point, rel_err, unrolled_fixed_point
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit
from implicit.solvers import Solver


class Descent(Solver):
    """``z ← z − step · g(z)``: Picard on ``−g``, for roots of gradients of convex energies."""

    name = "descent"

    def __init__(self, step: float):
        super().__init__()
        self.step_size = step

    def step(self, fn, z, r, state):
        z = z - self.step_size * r
        return z, fn(z), state


# -- property: random contractive maps, every exact backward mode --------------------------


def contractive_problem(batch, n, contraction, seed):
    """``f(z, x) = tanh(W_b z + x_b)`` per sample, with ``‖W_b‖₂ = contraction``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    w = w * (contraction / torch.linalg.matrix_norm(w, ord=2).reshape(batch, 1, 1))
    w.requires_grad_()
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(batch, n, generator=gen, dtype=torch.float64)

    def f(z, x):
        return torch.tanh(torch.einsum("bij,bj->bi", w, z) + x)

    return f, w, x, weights


@pytest.mark.parametrize("backward", EXACT_MODES)
@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 4),
    n=st.integers(1, 8),
    contraction=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**31),
)
def test_random_contractive_maps_match_unrolled(backward, batch, n, contraction, seed):
    f, w, x, weights = contractive_problem(batch, n, contraction, seed)
    z0 = torch.zeros(batch, n, dtype=torch.float64)
    tol = 1e-12
    z, info = implicit.fixed_point(
        f,
        z0,
        x,
        solver="fixed_point",
        backward=backward,
        batched=True,
        tol=tol,
        max_iter=1000,
        return_info=True,
    )
    # The equation, checked independently of the solver's report.
    assert_fixed_point(f, z, x, z0=z0, tol=tol)
    assert bool(info.converged.all())
    grads = torch.autograd.grad((weights * z.sin()).sum(), [x, w])
    z_ref = unrolled_fixed_point(f, z0, x, iterations=500)
    refs = torch.autograd.grad((weights * z_ref.sin()).sum(), [x, w])
    for got, want in zip(grads, refs):
        assert rel_err(got, want) <= 1e-7


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    n=st.integers(1, 8),
    condition=st.floats(1.0, 100.0),
    seed=st.integers(0, 2**31),
)
def test_random_convex_energies_with_cg_match_closed_form(batch, n, condition, seed):
    # g = ∇E with E(z) = ½ zᵀAz + Σ log cosh(z) − bᵀz: ∂g/∂z = A + diag(sech² z) is SPD.
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    a = (q * eigenvalues) @ q.mT
    b = torch.randn(batch, n, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(batch, n, generator=gen, dtype=torch.float64)

    def g(z, b):
        return torch.einsum("bij,bj->bi", a, z) + torch.tanh(z) - b

    # Gradient descent on E, a forward solver defined here: z ← z − g(z) / L.
    descent = Descent(step=1 / (condition + 1))
    z, info = implicit.root_solve(
        g,
        torch.zeros(batch, n, dtype=torch.float64),
        b,
        solver=descent,
        backward="cg",
        batched=True,
        tol=1e-12,
        max_iter=20000,
        return_info=True,
    )
    with torch.no_grad():
        assert bool((torch.linalg.vector_norm(g(z, b), dim=1) <= 1e-12).all())
    (grad,) = torch.autograd.grad((weights * z).sum(), [b])
    # dz/db = (A + diag sech² z)⁻¹, symmetric: the gradient is J⁻¹ weights.
    jac = a + torch.diag_embed(1 - torch.tanh(z.detach()) ** 2)
    reference = torch.linalg.solve(jac, weights)
    assert rel_err(grad, reference) <= 1e-7
    assert info.backward is None or bool(info.backward.converged.all())
