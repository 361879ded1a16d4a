"""``torch.func.jacrev``, ``jacfwd`` and ``hessian`` through solutions: every forward
solver, tuple states in every backward mode, every front door."""

from __future__ import annotations

import pytest
import torch
from conftest import TIGHT, loss_of, unrolled_fixed_point
from higher_order import (
    CASES,
    assert_close,
    batched_problem,
    batched_reference,
    batched_solve,
    write_worst_errors,
)

import implicit


def teardown_module():
    write_worst_errors()


@pytest.mark.parametrize("solver", sorted(implicit.solvers.NAMES))
def test_jacrev_jacfwd_hessian_every_solver_batched(solver):
    w, x = batched_problem()
    solve, reference = batched_solve(solver=solver), batched_reference
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        for got, want in zip(
            transform(solve, argnums=(0, 1))(x, w),
            torch.func.jacrev(reference, argnums=(0, 1))(x, w),
        ):
            assert_close("jacrev/jacfwd, every solver", got, want, 1e-9)
    hessian = torch.func.hessian(lambda x, w: loss_of(solve(x, w)), argnums=(0, 1))(x, w)
    want = torch.func.hessian(lambda x, w: loss_of(reference(x, w)), argnums=(0, 1))(x, w)
    for got_row, want_row in zip(hessian, want):
        for got, ref in zip(got_row, want_row):
            assert_close("hessian vs unrolled, every solver", got, ref, 1e-8)


@pytest.mark.parametrize("backward", ["dense", "gmres", "bicgstab", "neumann"])
def test_hessian_tuple_state_every_mode(backward):
    w, x = batched_problem()

    def f(state, x, w):
        a, b = state
        return torch.tanh(b @ w.T + x), 0.5 * torch.tanh(a)

    def loss(state):
        return loss_of(state[0]) + loss_of(state[1])

    z0 = (torch.zeros_like(x), torch.zeros_like(x))

    def solve(x, w):
        return implicit.fixed_point(f, z0, x, w, backward=backward, batched=True, **TIGHT)

    got = torch.func.hessian(lambda x, w: loss(solve(x, w)), argnums=(0, 1))(x, w)
    want = torch.func.hessian(lambda x, w: loss(unrolled_fixed_point(f, z0, x, w)), argnums=(0, 1))(
        x, w
    )
    for got_row, want_row in zip(got, want):
        for g, r in zip(got_row, want_row):
            assert_close("hessian, tuple state", g, r, 1e-8)
    jac = torch.func.jacfwd(solve, argnums=1)(x, w)
    ref = torch.func.jacrev(lambda x, w: unrolled_fixed_point(f, z0, x, w), argnums=1)(x, w)
    for g, r in zip(jac, ref):
        assert_close("jacfwd, tuple state", g, r, 1e-9)


@pytest.mark.parametrize("door", sorted(CASES))
def test_transforms_over_front_doors(door):
    _, solve, reference, params = CASES[door]
    for got, want in zip(
        torch.func.jacfwd(solve, argnums=(0, 1))(*params),
        torch.func.jacrev(reference, argnums=(0, 1))(*params),
    ):
        assert_close("jacfwd, front doors", got, want, 1e-9)
    hess = torch.func.hessian(lambda *p: loss_of(solve(*p)), argnums=(0, 1))(*params)
    ref = torch.func.hessian(lambda *p: loss_of(reference(*p)), argnums=(0, 1))(*params)
    for got_row, want_row in zip(hess, ref):
        for got, want in zip(got_row, want_row):
            assert_close("hessian, front doors", got, want, 1e-8)
