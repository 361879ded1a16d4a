"""What a problem says about its Jacobian reaches the backward's operator
(implicit/adjoint/problems.py): a minimiser's Hessian is symmetric, and positive
definite where the forward verified a strict minimum; Auto then solves with CG."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import implicit
from implicit.adjoint.problems import Given, RootProblem

F64 = torch.float64


def quartic(n: int, seed: int = 0):
    """``E(z) = ½ zᵀAz − bᵀz + ¼ Σ z⁴`` with ``A`` SPD: a strict minimum, Hessian
    ``A + 3 diag(z²)``, and ``dz*/db = H⁻¹``."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=F64)
    a = m @ m.T / n + torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=gen, dtype=F64, requires_grad=True)
    return (lambda z, b: 0.5 * z @ a @ z - b @ z + 0.25 * (z**4).sum()), a, b


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
def test_a_large_minimisation_is_differentiated_with_cg(solver):
    n = 100  # above Auto's dense size (64)
    energy, a, b = quartic(n)
    z, info = implicit.minimize(
        energy, torch.zeros(n, dtype=F64), b, solver=solver, tol=1e-10, return_info=True
    )
    z.sum().backward()
    assert info.status == "converged"
    assert info.backward.method == "cg" and bool(info.backward.converged)
    hessian = a + torch.diag(3 * z.detach() ** 2)
    assert rel_err(b.grad, torch.linalg.solve(hessian, torch.ones(n, dtype=F64))) <= 1e-8


def test_least_squares_is_differentiated_with_cg():
    # r(z) = A z − y with A of full column rank: z* = (AᵀA)⁻¹Aᵀy, ∇_y Σ z* = A (AᵀA)⁻¹ 1.
    m, n = 90, 70
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(m, n, generator=gen, dtype=F64)
    y = torch.randn(m, generator=gen, dtype=F64, requires_grad=True)
    z, info = implicit.least_squares(
        lambda z, y: a @ z - y, torch.zeros(n, dtype=F64), y, tol=1e-10, return_info=True
    )
    z.sum().backward()
    assert info.backward.method == "cg"
    expected = a @ torch.linalg.solve(a.T @ a, torch.ones(n, dtype=F64))
    assert rel_err(y.grad, expected) <= 1e-8


def test_without_a_verified_minimum_gmres_solves_it():
    n = 80
    energy, a, b = quartic(n)
    grads = {}
    for label, options in (
        ("unverified", {"curvature_check": False}),  # nothing tested: no claim
        ("bounded", {"bounds": (-10.0, 10.0)}),  # the projected gradient: not symmetric
    ):
        b.grad = None
        z, info = implicit.minimize(
            energy, torch.zeros(n, dtype=F64), b, tol=1e-10, return_info=True, **options
        )
        z.sum().backward()
        assert info.backward.method == "gmres", label
        grads[label] = b.grad.clone()
    hessian = a + torch.diag(3 * z.detach() ** 2)
    expected = torch.linalg.solve(hessian, torch.ones(n, dtype=F64))
    for grad in grads.values():
        assert rel_err(grad, expected) <= 1e-8


def test_the_operator_carries_the_structure(monkeypatch):
    seen = []
    solve = RootProblem.solve

    def spy(self, z0, inputs):
        z = solve(self, z0, inputs)
        if not isinstance(self.solver, Given):  # (not the re-wiring at the solution)
            seen.append((self.symmetric, self.positive_definite))
        return z

    monkeypatch.setattr(RootProblem, "solve", spy)
    energy, _, b = quartic(5)
    implicit.minimize(energy, torch.zeros(5, dtype=F64), b)
    implicit.root_solve(lambda z, b: z**3 + z - b, torch.zeros(5, dtype=F64), b)
    implicit.minimize(energy, torch.zeros(5, dtype=F64), b, bounds=(-1.0, 1.0))
    assert seen == [(True, True), (False, False), (False, False)]


def test_a_small_minimisation_stays_dense():
    energy, _, b = quartic(10)
    z, info = implicit.minimize(energy, torch.zeros(10, dtype=F64), b, return_info=True)
    z.sum().backward()
    assert info.backward.method == "dense"
