"""States that are trees (dicts, nested tuples and lists) and auxiliary outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

import implicit

D = torch.float64


def weights(seed: int, n: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.2 * torch.randn(n, n, generator=generator, dtype=D)


W1, W2 = weights(0), weights(1)


def tree_map(z, x):
    """A coupled fixed point on a dict state with a nested list."""
    return {
        "h": torch.tanh(W1 @ z["h"] + 0.5 * z["c"][0] + x),
        "c": [torch.tanh(W2 @ z["c"][0] + 0.5 * z["h"])],
    }


def flat_map(z, x):
    """The same map on one flat vector, as the reference."""
    h, c = z[:3], z[3:]
    return torch.cat([torch.tanh(W1 @ h + 0.5 * c + x), torch.tanh(W2 @ c + 0.5 * h)])


def test_fixed_point_on_a_dict_state_matches_the_flat_problem():
    x = torch.tensor([0.1, -0.2, 0.3], dtype=D, requires_grad=True)
    start = {"h": torch.zeros(3, dtype=D), "c": [torch.zeros(3, dtype=D)]}
    z = implicit.fixed_point(tree_map, start, x, tol=1e-12)
    assert set(z) == {"h", "c"} and isinstance(z["c"], list)
    flat = implicit.fixed_point(flat_map, torch.zeros(6, dtype=D), x, tol=1e-12)
    assert rel_err(torch.cat([z["h"], z["c"][0]]), flat) <= 1e-11
    (grad,) = torch.autograd.grad(z["h"].sum() + 2 * z["c"][0].sum(), x)
    (want,) = torch.autograd.grad(flat[:3].sum() + 2 * flat[3:].sum(), x)
    assert rel_err(grad, want) <= 1e-10


def test_root_solve_on_a_nested_tuple_state_with_forward_mode():
    a = torch.tensor([2.0, 3.0], dtype=D)

    def g(z, a):
        (u, (v,)) = z
        return (u**2 - a[0], (v**3 - a[1],))

    def solve(a):
        start = (torch.ones((), dtype=D), (torch.ones((), dtype=D),))
        u, (v,) = implicit.root_solve(g, start, a, tol=1e-12)
        return torch.stack([u, v])

    z = solve(a)
    assert torch.allclose(z, torch.stack([a[0].sqrt(), a[1] ** (1 / 3)]))
    _, tangent = torch.func.jvp(solve, (a,), (torch.ones(2, dtype=D),))
    want = torch.stack([0.5 / a[0].sqrt(), a[1] ** (-2 / 3) / 3])
    assert rel_err(tangent, want) <= 1e-9


def test_deq_on_a_dict_state():
    x = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, -0.5]], dtype=D, requires_grad=True)

    def cell(z, x):  # batched: rows are samples
        return {
            "h": torch.tanh(z["h"] @ W1.T + 0.5 * z["c"] + x),
            "c": torch.tanh(z["c"] @ W2.T + 0.5 * z["h"]),
        }

    deq = implicit.DEQ(cell, tol=1e-12, max_iter=200)
    z = deq(x, z0={"h": torch.zeros_like(x), "c": torch.zeros_like(x)})
    assert deq.last_info.status == "converged"
    (grad,) = torch.autograd.grad(z["h"].sum(), x)
    flat = torch.stack(
        [implicit.fixed_point(flat_map, torch.zeros(6, dtype=D), row, tol=1e-12) for row in x]
    )
    (want,) = torch.autograd.grad(flat[:, :3].sum(), x)
    assert rel_err(grad, want) <= 1e-9
    assert deq.jacobian_penalty(x, z).shape == ()


def test_minimize_on_a_dict_state():
    lam = torch.tensor(0.5, dtype=D, requires_grad=True)

    def fun(z, lam):
        fit = ((z["w"] - 1) ** 2).sum() + (z["b"] - 2) ** 2
        return fit + lam * ((z["w"] ** 2).sum() + z["b"] ** 2)

    start = {"w": torch.zeros(2, dtype=D), "b": torch.zeros((), dtype=D)}
    z = implicit.minimize(fun, start, lam, tol=1e-12)
    assert torch.allclose(z["w"], torch.full((2,), 1 / 1.5, dtype=D))
    (grad,) = torch.autograd.grad(z["w"].sum() + z["b"], lam)
    # w = 1/(1 + λ), b = 2/(1 + λ): d/dλ of 2w + b = −4/(1 + λ)².
    assert abs(float(grad) + 4 / 1.5**2) <= 1e-8


def test_a_structure_mismatch_names_the_structure():
    start = {"h": torch.zeros(2), "c": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"expected a dict with keys \['h', 'c'\]"):
        implicit.fixed_point(lambda z: {"h": z["h"]}, start)
    with pytest.raises(TypeError, match=r"z0\['c'\] must be a torch\.Tensor"):
        implicit.fixed_point(lambda z: z, {"h": torch.zeros(2), "c": 1.0})


# -- auxiliary outputs --------------------------------------------------------------------


def test_minimize_with_aux_returns_aux_at_the_solution_differentiably():
    """aux = the fit's predictions; its gradient is that of θ ↦ X w*(θ)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, generator=generator, dtype=D)
    y = torch.randn(10, generator=generator, dtype=D)
    lam = torch.tensor(0.4, dtype=D, requires_grad=True)

    def fun(w, lam):
        predictions = x @ w
        return 0.5 * ((predictions - y) ** 2).sum() + 0.5 * lam * (w**2).sum(), predictions

    _w, predictions, info = implicit.minimize(
        fun, torch.zeros(3, dtype=D), lam, has_aux=True, return_info=True, tol=1e-12
    )
    assert info.status == "converged"
    closed = torch.linalg.solve(x.T @ x + lam * torch.eye(3, dtype=D), x.T @ y)
    assert rel_err(predictions, x @ closed) <= 1e-10
    (grad,) = torch.autograd.grad(predictions.sum(), lam)
    (want,) = torch.autograd.grad((x @ closed).sum(), lam)
    assert rel_err(grad, want) <= 1e-9


def test_root_fixed_point_least_squares_and_invert_with_aux():
    a = torch.tensor(4.0, dtype=D, requires_grad=True)
    one = torch.tensor(1.0, dtype=D)
    z, aux = implicit.root_solve(lambda z, a: (z**2 - a, z * a), one, a, has_aux=True, tol=1e-12)
    (grad,) = torch.autograd.grad(aux, a)  # d(a √a)/da = 1.5 √a
    assert abs(float(grad) - 3.0) <= 1e-8
    z, aux = implicit.fixed_point(
        lambda z: (0.5 * z + 1, {"double": 2 * z}), torch.zeros((), dtype=D), has_aux=True
    )
    assert abs(float(aux["double"]) - 4.0) <= 1e-5
    z, aux = implicit.least_squares(
        lambda z, a: (z - a, (z - a).abs()), torch.zeros((), dtype=D), a, has_aux=True
    )
    assert torch.equal(aux, (z - a).abs()) and float(aux.detach()) <= 1e-5
    y = torch.tensor([0.5], dtype=D, requires_grad=True)
    _z, aux = implicit.invert(lambda z: (torch.sin(z), torch.cos(z)), y, has_aux=True, tol=1e-12)
    (grad,) = torch.autograd.grad(aux.sum(), y)  # d cos(asin y)/dy = −y / √(1 − y²)
    assert abs(float(grad) + 0.5 / 0.75**0.5) <= 1e-8


def test_aux_requires_a_pair():
    with pytest.raises(TypeError, match=r"fun must return a pair \(output, aux\)"):
        implicit.minimize(lambda z: (z**2).sum(), torch.zeros(2), has_aux=True)
