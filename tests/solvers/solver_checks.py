"""Checks every forward solver must pass, shared by tests/solvers/test_*.py.

Each ``*_test`` factory returns a test function for one solver; a test module binds
it to a ``test_*`` name so that pytest collects it there.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import (
    TanhProblem,
    assert_fixed_point,
    contractive_matrix,
    loss_of,
    rel_err,
    time_limit,
    unrolled_fixed_point,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit
from implicit import solvers
from implicit.solvers import Residual


class MonotoneCubic:
    """``g(z) = z Mᵀ + z³ − (z* Mᵀ + z*³)``: a root problem with the known root ``z*``.

    ``M`` is positive semi-definite and ``z³`` strictly monotone, so the root is
    unique; ``∂g/∂z = M + 3 diag(z²)`` is positive definite away from ``z = 0``, far
    from the ``−I`` of a fixed-point problem.
    """

    def __init__(self, n: int = 4, batch: int = 3, seed: int = 0, singular: bool = False):
        generator = torch.Generator().manual_seed(seed)
        a = torch.randn(n, n - 1 if singular else n, generator=generator, dtype=torch.float64)
        self.M = a @ a.T / n
        self.root = torch.randn(batch, n, generator=generator, dtype=torch.float64)
        self.b = self.image(self.root)
        self.z0 = torch.zeros(batch, n, dtype=torch.float64)

    def image(self, z):
        return z @ self.M.T + z**3

    def g(self, z, b):
        return self.image(z) - b


def tanh_test(solver: str, **options):
    def test():
        p = TanhProblem(n=6, batch=3, norm=0.9)
        z, info = implicit.fixed_point(
            p.f, p.z0, p.x, solver=solver, batched=True, tol=1e-12, return_info=True, **options
        )
        assert info.status == "converged" and info.converged.shape == (3,)
        assert bool(info.converged.all())
        assert_fixed_point(p.f, z, p.x, z0=p.z0, tol=1e-12)
        reference = unrolled_fixed_point(p.f, p.z0, p.x.detach())
        assert rel_err(z, reference) <= 1e-10

    return test


def unroll_test(solver: str, **options):
    """``backward="unroll"`` differentiates through the solver's own iterations."""

    def test():
        p = TanhProblem(n=5, batch=3, norm=0.8)
        z = implicit.fixed_point(
            p.f,
            p.z0,
            p.x,
            solver=solver,
            backward="unroll",
            batched=True,
            tol=1e-13,
            max_iter=200,
            **options,
        )
        grads = torch.autograd.grad(loss_of(z), [p.x, p.W])
        reference = unrolled_fixed_point(p.f, p.z0, p.x)
        refs = torch.autograd.grad(loss_of(reference), [p.x, p.W])
        for got, want in zip(grads, refs):
            assert rel_err(got, want) <= 1e-7

    return test


def exact_root_unroll_test(solver: str, **options):
    """Under ``backward="unroll"``, a sample whose residual is exactly zero while the
    others still iterate must not turn the gradients NaN (0/0 in a discarded branch)."""

    def test():
        p = TanhProblem(n=4, batch=2, norm=0.8)
        constant = torch.tensor([True, False]).unsqueeze(1)

        def f(z, x):
            # Sample 0 is the constant map z ↦ x: solved exactly by the first step.
            return torch.where(constant, x, p.f(z, x))

        z = implicit.fixed_point(
            f, p.z0, p.x, solver=solver, backward="unroll", batched=True, tol=1e-13, **options
        )
        grads = torch.autograd.grad(loss_of(z), [p.x, p.W])
        reference = unrolled_fixed_point(f, p.z0, p.x)
        refs = torch.autograd.grad(loss_of(reference), [p.x, p.W])
        for got, want in zip(grads, refs):
            assert rel_err(got, want) <= 1e-7

    return test


def counting_test(solver: str, **options):
    """``SolveInfo.f_evals`` is the number of calls of the user's function in the
    forward: with grad mode on, the capture discovery's call included."""

    @pytest.mark.parametrize("grad", [False, True])
    def test(grad):
        p = TanhProblem(n=5, batch=2, norm=0.9)
        calls = []

        def f(z, x):
            calls.append(1)
            return p.f(z, x)

        with torch.set_grad_enabled(grad):
            _, info = implicit.fixed_point(
                f,
                p.z0,
                p.x,
                solver=solver,
                batched=True,
                tol=1e-10,
                return_info=True,
                **options,
            )
        assert info.status == "converged"
        assert info.f_evals == len(calls)

    return test


def nonfinite_test(solver: str, within: int = 20, **options):
    """A sample whose residual turns NaN stops as "nonfinite" (within ``within``
    iterations, rather than at ``max_iter``); the others converge."""

    def test():
        p = TanhProblem(n=4, batch=3)
        bad = torch.tensor([False, True, False]).unsqueeze(1)

        def f(z, x):
            # Sample 1 is NaN everywhere but at its starting point.
            moved = z.abs().sum(dim=1, keepdim=True) > 0
            return torch.where(bad & moved, torch.full_like(z, float("nan")), p.f(z, x))

        with pytest.warns(implicit.ConvergenceWarning, match="nonfinite"):
            z, info = implicit.fixed_point(
                f,
                p.z0,
                p.x,
                solver=solver,
                batched=True,
                tol=1e-12,
                return_info=True,
                **options,
            )
        assert info.converged.tolist() == [True, False, True]
        assert info.status == "nonfinite" and info.iterations < within
        assert torch.isfinite(z).all()
        assert_fixed_point(p.f, z[[0, 2]], p.x[[0, 2]], z0=p.z0[[0, 2]], tol=1e-12)

    return test


def contractive_maps_test(solver: str, **options):
    """Random contractive maps: the answer solves its equation and has exact gradients."""

    @settings(max_examples=20, deadline=None)
    @given(
        batch=st.integers(1, 5),
        n=st.integers(1, 8),
        contraction=st.floats(0.1, 0.9),
        seed=st.integers(0, 2**16),
    )
    def test(batch, n, contraction, seed):
        tol = 1e-11
        w = contractive_matrix(n, contraction, seed=seed).requires_grad_()
        generator = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(batch, n, generator=generator, dtype=torch.float64)
        x.requires_grad_()

        def f(z, x):
            return torch.tanh(z @ w.T + x)

        z0 = torch.zeros(batch, n, dtype=torch.float64)
        z = implicit.fixed_point(
            f, z0, x, solver=solver, batched=True, tol=tol, max_iter=300, **options
        )
        assert_fixed_point(f, z, x, z0=z0, tol=tol)
        grads = torch.autograd.grad(loss_of(z), [x, w])
        reference = unrolled_fixed_point(f, z0, x, iterations=500)
        refs = torch.autograd.grad(loss_of(reference), [x, w])
        for got, want in zip(grads, refs):
            assert rel_err(got, want) <= 1e-7

    return test


def unwritten_slots_test(solver: str, buffers: tuple[str, ...], before_step=None, **options):
    """A history's slots that no step has written yet are never read: NaN there changes
    nothing, over more steps than the history holds (until the ring wraps, the slots
    from ``state.slot`` on are unwritten). ``before_step``: ``(step, state) -> state``,
    a change to the state before a step (e.g. a forced restart)."""

    def test():
        p = TanhProblem(n=6, batch=3)
        fn = Residual(lambda z: p.g(z, p.x.detach()), lambda z, r: z.new_zeros(z.shape[0]))
        method = solvers.resolve(solver, options)
        runs = []
        for poison in (0.0, math.nan):
            z = p.z0.clone()
            r = fn(z)
            state = method.init(fn, z, r)
            wrapped, iterates = False, []
            for step in range(9):
                if not wrapped:
                    for name in buffers:
                        getattr(state, name)[:, state.slot :] = poison
                if before_step is not None:
                    state = before_step(step, state)
                slot = state.slot
                z, r, state = method.step(fn, z, r, state)
                wrapped = wrapped or state.slot < slot
                iterates.append(z)
            runs.append(torch.stack(iterates))
        assert torch.isfinite(runs[1]).all()
        assert torch.equal(runs[0], runs[1])

    return test


def replace_at(step: int, **changes):
    """A ``before_step`` for :func:`unwritten_slots_test`: ``changes`` to the state before
    step ``step``."""
    return lambda k, state: dataclasses.replace(state, **changes) if k == step else state


def ill_conditioned_spd_root(seed: int = 0, n: int = 5, batch: int = 2):
    """``g(z, b) = A z − b`` in float32 with ``A`` symmetric positive definite of
    condition ``10^2.85``: near rounding level no trial step decreases ``‖g‖``, and the
    samples give up their line searches on different trials."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    a = ((q * torch.logspace(0, 2.85, n, dtype=torch.float64)) @ q.T).float()
    b = torch.randn(batch, n, generator=generator)
    return (lambda z, b: z @ a.T - b), torch.zeros(batch, n), b


def expansive_tanh_map(seed: int, n: int = 32, batch: int = 16):
    """``f(z, x) = tanh(W z + x)`` in float32 with ``‖W‖₂ = 4``: not a contraction; many
    samples have several fixed points or stall in the line search."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=generator)
    w = w * (4 / torch.linalg.matrix_norm(w, ord=2))
    x = torch.randn(batch, n, generator=generator)
    return (lambda z, x: torch.tanh(z @ w.T + x)), torch.zeros(batch, n), x


def assert_truthful(info, residuals: torch.Tensor, max_iter: int, evaluations_per_iteration: int):
    """The loop ended within ``max_iter`` iterations (trials included), and every sample
    reported converged has a true residual that passes its test."""
    assert info.iterations <= max_iter
    # (+ 3: beyond the iterations, capture discovery at z0 and at the end, and a start.)
    assert info.f_evals <= evaluations_per_iteration * max_iter + 3
    assert info.status in ("converged", "max_iter", "nonfinite")
    assert torch.equal(info.residual, residuals)
    assert bool(torch.isfinite(info.residual[info.converged]).all())


def bounded_test(solver: str, evaluations_per_iteration: int = 1, seeds: int = 12, **options):
    """Problems on which line searches used to try step after step forever: every
    solve ends within ``max_iter`` iterations, each line-search trial counted, and
    reports the truth (each case under a time limit, so that a hang fails the test).
    ``seeds``: how many random expansive maps to solve."""

    def test():
        g, z0, b = ill_conditioned_spd_root()
        with time_limit(60):
            z, info = implicit.root_solve(
                g,
                z0,
                b,
                solver=solver,
                batched=True,
                max_iter=50,
                on_failure="ignore",
                return_info=True,
                **options,
            )
        residuals = torch.linalg.vector_norm(g(z, b), dim=1)
        assert_truthful(info, residuals, 50, evaluations_per_iteration)
        assert bool((info.residual[info.converged] <= 1e-6).all())
        for seed in range(seeds):
            f, z0, x = expansive_tanh_map(seed)
            with time_limit(60):
                z, info = implicit.fixed_point(
                    f,
                    z0,
                    x,
                    solver=solver,
                    batched=True,
                    max_iter=100,
                    on_failure="ignore",
                    return_info=True,
                    **options,
                )
            residuals = torch.linalg.vector_norm(f(z, x) - z, dim=1)
            assert_truthful(info, residuals, 100, evaluations_per_iteration)
            scale = torch.maximum(
                torch.linalg.vector_norm(z0, dim=1), torch.linalg.vector_norm(f(z0, x), dim=1)
            )
            assert bool((residuals <= 1e-6 * (1 + scale))[info.converged].all())

    return test
