"""The fuzz's oracle checked against torch: its numpy residuals, Jacobians and
parameter derivatives are the user's function's, and its roots are roots."""

from __future__ import annotations

import families
import numpy as np
import pytest
import torch

FLOAT64_SEEDS = 3
OPT_KINDS = ("minimize", "least_squares")


def _float64_draws(family: str, small: bool) -> list[families.Instance]:
    draws = []
    for seed in range(100):
        inst = families.make(family, seed, small)
        if inst.dtype == torch.float64:
            draws.append(inst)
        if len(draws) == FLOAT64_SEEDS:
            return draws
    raise AssertionError(f"{family} drew too few float64 problems")


def _state(inst: families.Instance, flat: np.ndarray, grad: bool = False):
    """A flat float64 ``(B, n)`` point in the layout of ``z0`` (a tensor or a tuple)."""
    parts = inst.z0 if isinstance(inst.z0, tuple) else (inst.z0,)
    out, start = [], 0
    for part in parts:
        size = part[0].numel() if inst.batched else part.numel()
        piece = torch.from_numpy(flat[:, start : start + size].copy()).reshape(part.shape)
        out.append(piece.requires_grad_(grad))
        start += size
    return tuple(out) if isinstance(inst.z0, tuple) else out[0]


FAMILIES = [
    name
    for name in families.FAMILIES
    if name != "tanh_half" and families.KIND[name] in ("root", "bracket")
]
OPTIMISATION = [name for name in families.FAMILIES if families.KIND[name] in OPT_KINDS]


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_matches_the_users_function(family, small):
    for inst in _float64_draws(family, small):
        rng = np.random.default_rng(inst.seed)
        center = inst.root64 if inst.root64 is not None else families.flat(inst.z0, inst.batched)
        center = np.clip(np.where(np.isfinite(center), center, 0.0), -3, 3)
        point = center + 0.1 * rng.standard_normal(center.shape)
        if family == "nan_root":
            point = np.abs(point) + 0.1  # inside the domain of sqrt and log
        state = _state(inst, point, grad=True)
        residual = inst.residual_fn()(state, *inst.root_args())
        flat_residual = families.flat(residual, inst.batched)
        np.testing.assert_allclose(flat_residual, inst.residual64(point), rtol=1e-12, atol=1e-12)

        w = rng.standard_normal(point.shape)
        parts = residual if isinstance(residual, tuple) else (residual,)
        cotangents = _state(inst, w)
        cotangents = cotangents if isinstance(cotangents, tuple) else (cotangents,)
        states = state if isinstance(state, tuple) else (state,)
        params = list(inst.params.values())
        grads = torch.autograd.grad(parts, [*states, *params], cotangents, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, [*states, *params])]
        dz = families.flat(grads[: len(states)], inst.batched)
        jac = inst.jacobian64(point)
        np.testing.assert_allclose(dz, np.einsum("bij,bi->bj", jac, w), rtol=1e-10, atol=1e-12)
        expected = inst.vjp64(point, w)
        for (name, param), grad in zip(inst.params.items(), grads[len(states) :]):
            np.testing.assert_allclose(
                grad.numpy(), np.broadcast_to(expected[name], param.shape), rtol=1e-10, atol=1e-12
            )


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_roots_are_roots(family):
    for small in (True, False):
        for seed in range(4):
            inst = families.make(family, seed, small)
            if inst.root64 is None:
                continue
            scale = 1 + np.abs(inst.root64).max()
            assert np.abs(inst.residual64(inst.root64)).max() <= 1e-12 * scale * max(
                1.0, np.abs(inst.jacobian64(inst.root64)).max()
            )


def test_draws_are_reproducible():
    for family in families.FAMILIES:
        a, b = families.make(family, 7), families.make(family, 7)
        assert a.note == b.note and np.array_equal(a.tol, b.tol) and a.on_failure == b.on_failure
        assert a.tol_mode == b.tol_mode
        for (name, p), q in zip(a.params.items(), b.params.values()):
            assert torch.equal(p, q), (family, name)
        z0a, z0b = families.flat(a.z0, a.batched), families.flat(b.z0, b.batched)
        assert np.array_equal(z0a, z0b, equal_nan=True), family


def test_refine_finds_the_root_near_an_answer():
    found = 0
    for seed in range(20):
        inst = families.make("tanh_divergent", seed)
        answer = families.flat(inst.blackbox(inst.args[0].detach()), inst.batched)
        if np.abs(inst.residual64(answer)).max() > 1e-10:
            continue  # scipy from zero did not find a root: nothing to refine
        nudged = answer + 1e-5 * np.random.default_rng(seed).standard_normal(answer.shape)
        root = families.refine(inst, nudged)
        assert root is not None
        assert np.abs(inst.residual64(root)).max() <= 1e-13
        assert np.abs(root - answer).max() <= 1e-8
        found += 1
    assert found >= 5


def _objective(inst: families.Instance, state: torch.Tensor) -> torch.Tensor:
    """The per-problem objective of an optimisation instance, as the library sees it."""
    rows = families.flat(inst.z0, inst.batched).shape[0]
    out = inst.fn(state, *inst.args)
    if inst.form == "least_squares":
        return 0.5 * out.reshape(rows, -1).pow(2).sum(1)
    return out.reshape(rows)


def _bound_tensors(inst: families.Instance, rows: int, n: int):
    """``(lower, upper)`` as ``(B, n)`` tensors that keep the graph of bound parameters."""
    out = []
    for bound, default in zip(inst.bounds, (-np.inf, np.inf)):
        if torch.is_tensor(bound):
            out.append(
                bound.reshape(rows, n) if bound.numel() == rows * n else bound.expand(rows, n)
            )
        else:
            value = default if bound is None else bound
            out.append(torch.full((rows, n), float(value), dtype=torch.float64))
    return out


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("family", OPTIMISATION)
def test_optimisation_oracle_matches_the_users_function(family, small):
    """Gradient, Hessian and the optimality condition's parameter derivatives (bounds
    included) of the numpy oracle against autograd through the user's function."""
    for inst in _float64_draws(family, small):
        rng = np.random.default_rng(inst.seed)
        start = families.flat(inst.z0, inst.batched)
        rows, n = start.shape
        if inst.bounds64 is not None:
            lower, upper = inst.bounds64
            start = np.clip(start, lower, upper)
        point = np.clip(start, -3, 3) + 0.1 * rng.standard_normal(start.shape)
        if family == "opt_nonfinite":
            point = np.abs(point) + 0.5  # inside the domain of log and sqrt
        if inst.bounds64 is not None:  # the projected condition, at a point in the box
            point = np.clip(point, *inst.bounds64)
        state = _state(inst, point, grad=True)
        values = _objective(inst, state)
        (grad,) = torch.autograd.grad(values.sum(), state, create_graph=True)
        grad = grad.reshape(rows, n)
        np.testing.assert_allclose(
            grad.detach().numpy(), inst.gradient64(point), rtol=1e-10, atol=1e-10
        )
        hessian = np.stack(
            [
                torch.autograd.grad(grad[:, j].sum(), state, retain_graph=True)[0]
                .reshape(rows, n)
                .numpy()
                for j in range(n)
            ],
            axis=1,
        )
        np.testing.assert_allclose(hessian, inst.hessian64(point), rtol=1e-9, atol=1e-9)

        flat_state = state.reshape(rows, n)
        condition = grad
        if inst.bounds is not None:
            lower, upper = _bound_tensors(inst, rows, n)
            condition = flat_state - torch.maximum(torch.minimum(flat_state - grad, upper), lower)
        np.testing.assert_allclose(
            condition.detach().numpy(), inst.residual64(point), rtol=1e-10, atol=1e-10
        )
        w = rng.standard_normal((rows, n))
        params = list(inst.params.values())
        grads = torch.autograd.grad(
            condition, [state, *params], torch.from_numpy(w), allow_unused=True
        )
        dz = grads[0].reshape(rows, n).numpy()
        np.testing.assert_allclose(
            dz, np.einsum("bij,bi->bj", inst.jacobian64(point), w), rtol=1e-9, atol=1e-9
        )
        expected = inst.vjp64(point, w)
        for (name, param), got in zip(inst.params.items(), grads[1:]):
            got = torch.zeros_like(param) if got is None else got
            np.testing.assert_allclose(
                got.numpy(),
                np.broadcast_to(expected[name], param.shape),
                rtol=1e-9,
                atol=1e-9,
                err_msg=f"{family}: {name}",
            )


@pytest.mark.parametrize("family", OPTIMISATION)
def test_the_oracle_minimum_is_a_strict_local_minimum(family):
    for inst in _float64_draws(family, small=False):
        start = families.flat(inst.z0, inst.batched)
        try:
            root = families.reference_root(inst, start)
        except families.Unchecked:
            continue
        if root is None:  # several minima: polishing a far start finds none
            continue
        assert np.linalg.norm(inst.residual64(root)) <= 1e-9 * (1 + np.abs(root).max())
        hessian = inst.hessian64(root)
        assert np.all(np.linalg.eigvalsh(0.5 * (hessian + np.swapaxes(hessian, 1, 2)))[:, 0] > 0)


def test_a_shifted_draw_moves_only_the_parameters():
    inst = _float64_draws("lsq_curve", small=False)[0]
    shift = {name: np.full(p.shape, 1e-3) for name, p in inst.params.items()}
    with families.shifted(shift):
        moved = families.make("lsq_curve", inst.seed)
    for name, p in inst.params.items():
        np.testing.assert_allclose(
            moved.params[name].detach().numpy() - p.detach().numpy(), 1e-3, rtol=1e-9
        )
    assert np.array_equal(
        families.flat(inst.z0, inst.batched), families.flat(moved.z0, inst.batched)
    )


@pytest.mark.parametrize("family", ["opt_quadratic", "opt_illcond"])
def test_the_oracle_minimiser_of_a_convex_draw_is_found_to_rounding(family):
    # The second order's central differences divide the roots' errors by a step of about
    # 1e-5: a root off by 3e-10 (the damped Newton's backtracking stalled by f's rounding)
    # made the oracle's Hessian-vector product of opt_quadratic:158 wrong by 1e-5.
    for seed in range(100):
        inst = families.make(family, seed)
        if inst.dtype != torch.float64:
            continue
        root = families.reference_root(inst, families.flat(inst.z0, inst.batched))
        jacobian = inst.jacobian64(root)
        step = np.linalg.solve(jacobian, inst.residual64(root)[..., None])[..., 0]
        rounding = np.max(np.linalg.cond(jacobian)) * np.finfo(float).eps
        assert np.max(np.abs(step) / (1 + np.abs(root))) <= 4 * rounding, (family, seed)
