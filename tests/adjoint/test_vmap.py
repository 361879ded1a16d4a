"""``torch.func.vmap`` over solutions: one batched solve for all slices, unbatched
problems and initial guesses, inverses, compositions with ``grad`` and ``jacrev``,
captured batched tensors, the backward's per-block options and report."""

from __future__ import annotations

import pytest
import torch
from conftest import TIGHT, loss_of, unrolled_fixed_point
from higher_order import (
    Cubic,
    assert_close,
    batched_problem,
    batched_reference,
    batched_solve,
    generator,
    tanh_fixed_point,
    write_worst_errors,
)

import implicit

F64 = torch.float64


def teardown_module():
    write_worst_errors()


class CountingMap:
    """``z ↦ tanh(z Wᵀ + x)``, counting its calls (a batched call counts once)."""

    def __init__(self, w):
        self.w = w
        self.calls = 0

    def __call__(self, z, x):
        self.calls += 1
        return torch.tanh(z @ self.w.T + x)


class TestVmap:
    def test_batched_problem_is_one_solve(self):
        w, _ = batched_problem()
        xs = torch.randn(5, 2, 3, generator=generator(31), dtype=F64)
        f = CountingMap(w)
        infos = []

        def solve(x):
            z, info = implicit.fixed_point(
                f, torch.zeros_like(x), x, batched=True, return_info=True, **TIGHT
            )
            infos.append(info)
            return z

        got = torch.func.vmap(solve)(xs)
        vmapped_calls = f.calls
        (info,) = infos
        assert info.converged.shape == (5, 2) and bool(info.converged.all())
        singles, calls = [], []
        for x in xs:
            f.calls = 0
            singles.append(solve(x))
            calls.append(f.calls)
        # The slices are solved together (as long as the slowest), not one after another.
        assert vmapped_calls <= max(calls) + 1
        assert_close("vmap vs single solves", got, torch.stack(singles), 1e-12)
        assert_close(
            "vmap vs unrolled", got, unrolled_fixed_point(f, torch.zeros_like(xs), xs), 1e-12
        )

    def test_unbatched_problem_and_batched_initial_guess(self):
        solve_x, reference, x, w = tanh_fixed_point()
        xs = torch.stack([x, 2 * x, -x])
        assert_close(
            "vmap, unbatched", torch.func.vmap(solve_x)(xs), torch.func.vmap(reference)(xs), 1e-12
        )

        def from_guess(z0):
            return implicit.fixed_point(lambda z: torch.tanh(w @ z + x), z0, **TIGHT)

        guesses = torch.randn(4, 4, generator=generator(32), dtype=F64)
        assert_close(
            "vmap, initial guesses",
            torch.func.vmap(from_guess)(guesses),
            reference(x).expand(4, 4),
            1e-12,
        )

    def test_inverse_form(self):
        cubic = Cubic()
        ys = torch.stack([cubic.y, 2 * cubic.y, -cubic.y])
        got = torch.func.vmap(lambda y: implicit.invert(Cubic.f, y, cubic.a, **TIGHT))(ys)
        assert_close("vmap, inverse", Cubic.f(got, cubic.a), ys, 1e-12)
        batched = torch.func.vmap(
            lambda y: implicit.invert(Cubic.f, y, cubic.a, batched=True, **TIGHT)
        )(ys.unsqueeze(-1))
        assert_close("vmap, inverse", batched.squeeze(-1), got, 1e-12)

    @pytest.mark.parametrize("backward", ["dense", "gmres"])
    def test_compositions(self, backward):
        w, _ = batched_problem()
        xs = torch.randn(3, 2, 3, generator=generator(33), dtype=F64)
        solve, reference = batched_solve(backward=backward), batched_reference
        vmap, jacrev, grad = torch.func.vmap, torch.func.jacrev, torch.func.grad
        compositions = {
            "vmap(grad)": lambda s: vmap(
                grad(lambda x, w: loss_of(s(x, w)), argnums=1), in_dims=(0, None)
            ),
            "vmap(jacrev)": lambda s: vmap(jacrev(s, argnums=1), in_dims=(0, None)),
            "jacrev(vmap)": lambda s: jacrev(vmap(s, in_dims=(0, None)), argnums=1),
            "vmap(hessian)": lambda s: vmap(
                torch.func.hessian(lambda x, w: loss_of(s(x, w))), in_dims=(0, None)
            ),
            "vmap(vmap)": lambda s: vmap(vmap(s, in_dims=(0, None)), in_dims=(0, None)),
        }
        for name, compose in compositions.items():
            inputs = xs.expand(2, -1, -1, -1) if name == "vmap(vmap)" else xs
            assert_close(
                "vmap compositions", compose(solve)(inputs, w), compose(reference)(inputs, w), 1e-9
            )

    def test_captured_batched_tensor(self):
        # Per-sample gradients with respect to a tensor f captures.
        w, _ = batched_problem()
        xs = torch.randn(4, 2, 3, generator=generator(34), dtype=F64)

        def loss(x, w, solve):
            return loss_of(solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x)))

        def implicit_solve(f, z0):
            return implicit.fixed_point(f, z0, batched=True, **TIGHT)

        per_sample = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(0, None, None))
        assert_close(
            "vmap, captured",
            per_sample(xs, w, implicit_solve),
            per_sample(xs, w, unrolled_fixed_point),
            1e-9,
        )

    @pytest.mark.parametrize("method", [implicit.linear.GMRES, implicit.linear.BiCGStab])
    def test_preconditioner_and_warm_start_see_one_block(self, method):
        # Written for the user's (B, n) rows: under jacrev and vmap the systems stack
        # blocks of B rows, and each block is preconditioned and warm-started as one.
        w, x = batched_problem()
        seen = []

        def jacobi(r):
            seen.append(r.shape)
            return r * torch.full_like(x, 0.9)  # shaped like one block: (B, n)

        backward = method(preconditioner=jacobi, x0=torch.full_like(x, 0.1))

        def solve(x):
            return implicit.fixed_point(
                lambda z, x: torch.tanh(z @ w.T + x),
                torch.zeros_like(x),
                x,
                backward=backward,
                batched=True,
                **TIGHT,
            )

        def reference(x):
            return unrolled_fixed_point(
                lambda z, x: torch.tanh(z @ w.T + x), torch.zeros_like(x), x
            )

        assert_close(
            "blockwise options", torch.func.jacrev(solve)(x), torch.func.jacrev(reference)(x), 1e-9
        )
        xs = torch.stack([x, -x, 2 * x])
        grad = torch.func.vmap(torch.func.grad(lambda x: loss_of(solve(x))))
        want = torch.func.vmap(torch.func.grad(lambda x: loss_of(reference(x))))(xs)
        assert_close("blockwise options", grad(xs), want, 1e-9)
        assert seen and set(seen) == {x.shape}

    def test_info_backward_under_jacrev(self):
        w, x = batched_problem()
        infos = []

        def solve(x):
            z, info = implicit.fixed_point(
                lambda z, x: torch.tanh(z @ w.T + x),
                torch.zeros_like(x),
                x,
                batched=True,
                backward="gmres",
                return_info=True,
                **TIGHT,
            )
            infos.append(info)
            return z

        torch.func.jacrev(solve)(x)
        backward = infos[0].backward
        assert backward.method == "gmres" and backward.converged.shape == (6, 2)  # 6 rows of dz/dx
        assert bool(backward.converged.all())
