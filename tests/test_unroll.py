"""``backward="unroll"``: finite, correct derivatives in every mode, for every solver.

Reverse mode, forward mode (``torch.func.jvp`` and ``forward_ad`` dual tensors) and
second order (``torch.func.hessian``, double backward) through the unrolled iterations,
against the implicit derivative (dense backward) and plain autograd through long
float64 Picard iterations; line-search trials that a sample rejects stay out of the
graph; a problem that meets its tolerance at ``z0`` (no iteration) still has its
derivative.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from conftest import contractive_matrix, loss_of, rel_err, unrolled_fixed_point

import implicit

F64 = torch.float64
SOLVERS = ["fixed_point", "anderson", "newton", "broyden"]


class TanhMap:
    """``z = tanh(W z + x)``, a batch of 2 problems of 4 unknowns, ``‖W‖₂ = 0.6``."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.W = contractive_matrix(4, 0.6, seed=3)
        self.x = torch.randn(2, 4, generator=generator, dtype=F64)
        self.tangent = torch.randn(2, 4, generator=generator, dtype=F64)

    def f(self, z, x):
        return torch.tanh(z @ self.W.T + x)

    def solution(self, solver, backward, z0=None):
        """``x ↦ z*`` through ``implicit.fixed_point``."""

        def solve(x):
            start = torch.zeros(2, 4, dtype=F64) if z0 is None else z0
            return implicit.fixed_point(
                self.f, start, x, solver=solver, backward=backward, batched=True, tol=1e-13,
                max_iter=300,
            )  # fmt: skip

        return solve

    def reference(self, x):
        return unrolled_fixed_point(self.f, torch.zeros(2, 4, dtype=F64), x, iterations=300)


def derivatives(solve, x: torch.Tensor, tangent: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every mode's derivative of ``x ↦ solve(x)`` (and of the loss of it)."""
    out = {}
    leaf = x.clone().requires_grad_()
    (out["reverse"],) = torch.autograd.grad(loss_of(solve(leaf)), leaf)
    out["jvp"] = torch.func.jvp(solve, (x,), (tangent,))[1]
    with forward_ad.dual_level():
        dual = solve(forward_ad.make_dual(x, tangent))
        out["dual"] = forward_ad.unpack_dual(dual).tangent
    out["hessian"] = torch.func.hessian(lambda x: loss_of(solve(x)))(x)
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_of(solve(leaf)), leaf, create_graph=True)
    (out["double backward"],) = torch.autograd.grad((grad * tangent).sum(), leaf)
    return out


def assert_all_close(got: dict, want: dict, tol: float) -> None:
    for mode, value in got.items():
        assert torch.isfinite(value).all(), f"{mode}: not finite"
        assert rel_err(value, want[mode]) <= tol, f"{mode}: {rel_err(value, want[mode]):.1e}"


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_mode_matches_the_implicit_derivative(solver):
    p = TanhMap()
    got = derivatives(p.solution(solver, "unroll"), p.x, p.tangent)
    assert_all_close(got, derivatives(p.solution(solver, "dense"), p.x, p.tangent), 1e-9)
    assert_all_close(got, derivatives(p.reference, p.x, p.tangent), 1e-9)


@pytest.mark.parametrize("solver", ["newton", "broyden"])
def test_rejected_trials_stay_out_of_the_graph(solver):
    # √z = c (z = c²) from z0 = 80 for sample 0: the first full step lands at z < 0,
    # where √z and its derivative are NaN, and is rejected; sample 1 takes its steps.
    # A rejected trial evaluated with the batch used to make the gradient NaN.
    z0 = torch.tensor([[80.0], [1.0]], dtype=F64)

    def solve(c):
        return implicit.root_solve(
            lambda z, c: torch.sqrt(z) - c, z0, c, solver=solver, backward="unroll",
            batched=True, tol=1e-12,
        )  # fmt: skip

    c = torch.tensor([[0.7], [1.2]], dtype=F64)
    tangent = torch.tensor([[1.0], [-2.0]], dtype=F64)
    got = derivatives(solve, c, tangent)
    # z = c²: dz/dc = 2c, d²z/dc² = 2; the loss z³ + sin z by the chain rule.
    z = c**2
    first = (3 * z**2 + torch.cos(z)) * 2 * c
    second = 6 * z * (2 * c) ** 2 + (3 * z**2 + torch.cos(z)) * 2 - torch.sin(z) * (2 * c) ** 2
    want = {
        "reverse": first,
        "jvp": 2 * c * tangent,
        "dual": 2 * c * tangent,
        "hessian": torch.diag_embed(second.flatten()).reshape(2, 1, 2, 1),
        "double backward": second * tangent,
    }
    assert_all_close(got, want, 1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_no_iteration_still_has_the_derivative(solver):
    # z = f(z, o) = o: the initial guess o is already the fixed point, no iteration
    # runs. dz/do = 1, so (z + o) has the derivative 2 (it had 1: z had no graph).
    o = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    z, info = implicit.fixed_point(
        lambda z, o: o, o.detach().clone(), o, solver=solver, backward="unroll", return_info=True
    )
    assert info.iterations == 0 and z.requires_grad
    (z + o).sum().backward()
    assert torch.equal(o.grad, torch.full((2,), 2.0, dtype=F64))


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_sample_at_its_solution_among_others_that_iterate(solver):
    # Sample 0 starts at its fixed point (no iteration), sample 1 from zero: each has
    # the derivative of the solution, in every mode, also with respect to a captured W.
    p = TanhMap()
    start = torch.zeros(2, 4, dtype=F64)
    start[0] = p.reference(p.x)[0]
    got = derivatives(p.solution(solver, "unroll", z0=start), p.x, p.tangent)
    assert_all_close(got, derivatives(p.reference, p.x, p.tangent), 1e-9)
    w = p.W.clone().requires_grad_()

    def f(z, x):
        return torch.tanh(z @ w.T + x)

    z, info = implicit.fixed_point(
        f, start, p.x, solver=solver, backward="unroll", batched=True, tol=1e-13,
        max_iter=300, return_info=True,
    )  # fmt: skip
    assert info.status == "converged"
    (got_w,) = torch.autograd.grad(loss_of(z), w)
    reference = unrolled_fixed_point(f, torch.zeros(2, 4, dtype=F64), p.x, iterations=300)
    (want_w,) = torch.autograd.grad(loss_of(reference), w)
    assert rel_err(got_w, want_w) <= 1e-9


def test_anderson_rejecting_a_singular_history_keeps_the_graph_finite():
    # One unknown: the history's normalised columns are all ±1, the small system turns
    # singular in float32 and Anderson falls back to the mixing step. The fallback
    # must not leave the singular solve's NaN in the unrolled graph.
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        e = (0.9 * torch.rand(1, generator=generator)).requires_grad_()
        mean_anomaly = (6 * torch.rand(1, generator=generator) - 3).requires_grad_()
        z = implicit.invert(
            lambda E, e: E - e * torch.sin(E),
            mean_anomaly,
            e,
            z0=torch.full((1,), 3.14159),
            solver="anderson",
            backward="unroll",
            tol=1e-5,
        )
        grad_e, grad_m = torch.autograd.grad(z.sum(), (e, mean_anomaly))
        E = z.detach()
        slope = 1 - e.detach() * torch.cos(E)
        # Kepler's equation: dE/dM = 1 / (1 − e cos E), dE/de = sin E / (1 − e cos E).
        # (The unrolled derivative of a float32 solve to tol 1e-5 is near, not exact.)
        torch.testing.assert_close(grad_m, 1 / slope, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(grad_e, torch.sin(E) / slope, rtol=1e-2, atol=1e-3)
