"""The first-order backward's linearisation (one recorded graph of g) against the general
one that double backward takes (implicit/adjoint/linearize.py), and what it costs."""

from __future__ import annotations

import pytest
import torch
from conftest import TIGHT, TanhProblem, loss_of, rel_err

import implicit


class TestFirstOrderPath:
    """A first-order backward records g once and takes every product from that graph.

    ``torch.autograd.grad(..., create_graph=True)`` takes the general path
    (``torch.func`` partials, a fresh linearisation for the adjoint), so comparing the
    two checks the fast path against the one that double backward relies on.
    """

    @staticmethod
    def problem(form):
        """``solve(backward) -> z`` and the leaves: explicit ``x``, captured leaf ``W``,
        and ``a``, reached through a captured non-leaf (and ``y`` for the inverse)."""
        p = TanhProblem(n=5, batch=3, norm=0.6)
        a = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        a.requires_grad_()
        y = (0.05 * p.x).detach().requires_grad_()

        def solve(backward):
            h = 0.1 * a.sin()  # rebuilt per call: each backward frees its graph
            options = dict(backward=backward, batched=True, **TIGHT)

            def f(z, x):
                return p.f(z, x) + h

            if form == "fixed_point":
                return implicit.fixed_point(f, p.z0, p.x, solver="fixed_point", **options)
            if form == "root":
                return implicit.root_solve(lambda z, x: f(z, x) - z, p.z0, p.x, **options)
            return implicit.invert(lambda z, x: z - f(z, x), y, p.x, z0=p.z0, **options)

        return solve, [p.x, p.W, a] + ([y] if form == "inverse" else [])

    @pytest.mark.parametrize(
        ("form", "backward"),
        [
            (form, backward)
            for form in ("fixed_point", "root", "inverse")
            for backward in ("dense", "gmres", "bicgstab", "neumann")
            # Neumann needs ∂g/∂z ≈ −I; the inverse z − f(z) = y has ∂g/∂z ≈ +I.
            if (form, backward) != ("inverse", "neumann")
        ],
    )
    def test_equals_the_general_path(self, form, backward):
        solve, leaves = self.problem(form)
        plain = torch.autograd.grad(loss_of(solve(backward)), leaves)
        general = torch.autograd.grad(loss_of(solve(backward)), leaves, create_graph=True)
        for got, want in zip(plain, general):
            assert rel_err(got, want) <= 1e-12

    def test_records_g_once_and_counts_its_products(self):
        # Counting evaluations of f and VJPs through it (one per backward of tanh).
        counts = {"f": 0, "vjp": 0}

        class CountedTanh(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(x):
                return torch.tanh(x)

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.save_for_backward(output)

            @staticmethod
            def backward(ctx, grad):
                counts["vjp"] += 1
                (y,) = ctx.saved_tensors
                return grad * (1 - y * y)

        p = TanhProblem(n=6, batch=4, norm=0.6)

        def f(z, x):
            counts["f"] += 1
            return CountedTanh.apply(z @ p.W.T + x)

        for backward, extra in (("neumann", 0), ("gmres", 1)):
            counts.update(f=0, vjp=0)
            z, info = implicit.fixed_point(
                f, p.z0, p.x, backward=backward, batched=True, return_info=True, **TIGHT
            )
            # The forward: the solver's evaluations and the capture discovery's one, which
            # f_evals counts (its residual is the solver's first).
            assert counts["f"] == info.f_evals
            counts.update(f=0, vjp=0)
            torch.autograd.grad(loss_of(z), [p.x, p.W])
            assert counts["f"] == 1  # one recorded graph for the adjoint and the partials
            # The adjoint's products, with no true-residual product computed twice
            # (Neumann's residual is exact at every iterate; GMRES adds the check of its
            # last iterate), and one pass for the partials.
            assert info.backward.matvecs == info.backward.iterations + extra
            assert counts["vjp"] == info.backward.matvecs + 1
