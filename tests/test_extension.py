"""The extension points are public: a forward solver and two linear solvers written here,
outside the package, with public names only, run through every front door, forward mode
and double backward, against independent references.

* ``Chord``: a forward solver in one small class (a frozen dataclass over
  ``implicit.solvers.Solver``, ``init``/``step``), Newton's method with the Jacobian of
  the first iterate (the chord method), from ``Residual.linearize`` and
  ``JacobianOperator.dense``;
* ``LU``: a direct backward (``LinearSolver``: ``init`` factorises, ``transpose``
  reuses the factors);
* ``Richardson``: an iterative backward (``IterativeSolver``: ``iterate`` only; warm
  start, freezing, the true-residual check and the status codes come from the base).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import contractive_matrix, rel_err

import implicit
from implicit.linear import IterativeSolver, JacobianOperator, LinearResult, LinearSolver
from implicit.linear.base import BREAKDOWN, CONVERGED, MAX_ITER
from implicit.linear.iterative import Progress, norm, row_mask, start
from implicit.solvers import Residual, Solver

F64 = torch.float64


@dataclasses.dataclass(frozen=True, kw_only=True)
class Chord(Solver):
    """``z ← z − J₀⁻¹ g(z)`` with ``J₀ = ∂g/∂z`` at the first iterate, refreshed every
    ``refresh`` steps."""

    name = "chord"

    refresh: int = 3

    def init(self, fn: Residual, z: torch.Tensor, r: torch.Tensor):
        return {"steps": 0, "jacobian": None}

    def step(self, fn: Residual, z: torch.Tensor, r: torch.Tensor, state):
        jacobian = state["jacobian"]
        if jacobian is None or state["steps"] % self.refresh == 0:
            _, operator = fn.linearize(z)
            assert isinstance(operator, JacobianOperator)
            jacobian = operator.dense()
        z = z - torch.linalg.solve(jacobian, r)  # differentiable: backward="unroll" works
        return z, fn(z), {"steps": state["steps"] + 1, "jacobian": jacobian}


@dataclasses.dataclass(frozen=True)
class _Factors:
    lu: torch.Tensor
    pivots: torch.Tensor
    adjoint: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class LU(LinearSolver):
    """``A x = rhs`` by one LU factorisation of the dense blocks."""

    name = "lu"

    def init(self, operator: JacobianOperator, hint=None) -> _Factors:
        lu, pivots = torch.linalg.lu_factor(operator.dense())
        return _Factors(lu, pivots, False)

    def transpose(self, state: _Factors) -> _Factors:
        return dataclasses.replace(state, adjoint=not state.adjoint)

    def solve(self, state, rhs, *, tol, max_iter, x0=None, preconditioner=None):
        if isinstance(state, JacobianOperator):
            state = self.init(state)
        x = torch.linalg.lu_solve(
            state.lu, state.pivots, rhs.unsqueeze(-1), adjoint=state.adjoint
        ).squeeze(-1)
        finite = torch.isfinite(x).all(dim=1)
        codes = torch.where(finite, CONVERGED, BREAKDOWN)
        return LinearResult(x, torch.zeros_like(rhs[:, 0]), codes, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Richardson(IterativeSolver):
    """``x ← x + ω (rhs − A x)``: for ``ω = −1`` on a contractive fixed point's adjoint
    the Neumann series; for ``0 < ω < 2/λ_max`` on a positive-definite Hessian."""

    name = "richardson"

    omega: float = -1.0

    def iterate(self, operator, rhs, x, *, target, max_iter, allowed, preconditioner):
        x, r = start(operator, rhs, x)
        running = allowed & (norm(r) > target)
        iterations = 0
        while iterations < max_iter and bool(running.any()):
            x = torch.where(row_mask(running), x + self.omega * r, x)
            r = rhs - operator.mv(x)
            iterations += 1
            running = running & (norm(r) > target)
        codes = torch.where(norm(r) <= target, CONVERGED, MAX_ITER)
        return Progress(x, codes, iterations, -r)


BACKWARDS = [LU(), Richardson()]


def tanh_problem(batch=3, n=5, seed=0):
    w = contractive_matrix(n, 0.6, seed=seed)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return w, x


def fixed_point_reference(w, z, x):
    """``∇x Σ z`` for ``z = tanh(W z + x)``, per row: ``D a`` with ``D = diag(1 − z²)``
    and ``(I − D W)ᵀ a = 1`` (the implicit function theorem, by a dense solve)."""
    d = 1 - z**2
    eye = torch.eye(z.shape[1], dtype=F64)
    jac = eye - d.unsqueeze(2) * w  # ∂(z − f)/∂z per row
    a = torch.linalg.solve(jac.mT, torch.ones_like(z))
    return d * a


@pytest.mark.parametrize("backward", BACKWARDS, ids=lambda b: b.name)
def test_fixed_point(backward):
    w, x = tanh_problem()
    x.requires_grad_()
    z, info = implicit.fixed_point(
        lambda z, x: torch.tanh(z @ w.T + x),
        torch.zeros_like(x),
        x,
        solver=Chord(),
        backward=backward,
        batched=True,
        tol=1e-12,
        return_info=True,
    )
    z.sum().backward()
    assert info.solver == "chord" and info.status == "converged"
    assert info.backward.method == backward.name and bool(info.backward.converged.all())
    assert rel_err(x.grad, fixed_point_reference(w, z.detach(), x.detach())) <= 1e-9


def test_root_solve_and_invert():
    a = torch.tensor([2.0, 3.0, 5.0], dtype=F64, requires_grad=True)
    z = implicit.root_solve(
        lambda z, a: z**3 + z - a, torch.ones(3, dtype=F64), a, solver=Chord(), backward=LU()
    )
    (grad,) = torch.autograd.grad(z.sum(), a)
    assert rel_err(grad, 1 / (3 * z.detach() ** 2 + 1)) <= 1e-9
    y = torch.tensor([0.1, 0.5, -0.3], dtype=F64, requires_grad=True)
    z = implicit.invert(torch.sin, y, solver=Chord(refresh=1), backward=LU(), tol=1e-12)
    (grad,) = torch.autograd.grad(z.sum(), y)
    assert rel_err(z.detach(), torch.asin(y.detach())) <= 1e-12
    assert rel_err(grad, 1 / torch.sqrt(1 - y.detach() ** 2)) <= 1e-9


def test_custom_root_backward():
    matrix = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=F64, requires_grad=True)
    b = torch.tensor([1.0, -1.0], dtype=F64, requires_grad=True)

    @implicit.custom_root(lambda z, matrix, b: matrix @ z - b, backward=LU())
    def solve(matrix, b):
        return torch.linalg.solve(matrix, b)

    z = solve(matrix, b)
    z.sum().backward()
    w = torch.linalg.solve(matrix.detach().T, torch.ones(2, dtype=F64))
    assert rel_err(b.grad, w) <= 1e-12
    assert rel_err(matrix.grad, -torch.outer(w, z.detach())) <= 1e-12
    assert solve.last_info.backward.method == "lu"


@pytest.mark.parametrize("backward", [LU(), Richardson(omega=0.2)], ids=lambda b: b.name)
def test_minimize_backward(backward):
    # E = ½ zᵀAz − bᵀz + ¼Σz⁴: dz*/db = (A + 3 diag z²)⁻¹ (eigenvalues within [1, 5]).
    a = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=F64))
    b = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    z, info = implicit.minimize(
        lambda z, b: 0.5 * z @ a @ z - b @ z + 0.25 * (z**4).sum(),
        torch.zeros(3, dtype=F64),
        b,
        backward=backward,
        tol=1e-12,
        return_info=True,
    )
    z.sum().backward()
    hessian = a + torch.diag(3 * z.detach() ** 2)
    assert info.backward.method == backward.name
    assert rel_err(b.grad, torch.linalg.solve(hessian, torch.ones(3, dtype=F64))) <= 1e-9


@pytest.mark.parametrize("backward", BACKWARDS, ids=lambda b: b.name)
def test_deq_layer(backward):
    torch.manual_seed(0)
    cell = torch.nn.Linear(5, 5, bias=False).double()
    with torch.no_grad():
        cell.weight.copy_(contractive_matrix(5, 0.6, seed=3))
    layer = implicit.DEQ(
        lambda z, x: torch.tanh(cell(z) + x), solver=Chord(), backward=backward, tol=1e-12
    )
    _, x = tanh_problem()
    z = layer(x)
    z.sum().backward()
    # f's partials in W are those in x times z: ∇W Σ z = Σ_b (∇x Σ z)_b z_bᵀ.
    a = fixed_point_reference(cell.weight.detach(), z.detach(), x)
    assert rel_err(cell.weight.grad, a.T @ z.detach()) <= 1e-9
    assert layer.last_info.solver == "chord"


def test_forward_mode_and_double_backward():
    w, x = tanh_problem(batch=1, n=4)
    x = x[0]

    def solution(x):
        return implicit.fixed_point(
            lambda z, x: torch.tanh(w @ z + x),
            torch.zeros_like(x),
            x,
            solver=Chord(),
            backward=LU(),
            tol=1e-13,
        )

    def explicit(x):  # unrolled, in float64, to a fixed point: the reference
        z = torch.zeros_like(x)
        for _ in range(300):
            z = torch.tanh(w @ z + x)
        return z

    tangent = torch.linspace(-1, 1, 4, dtype=F64)
    _, dz = torch.func.jvp(solution, (x,), (tangent,))
    _, reference = torch.func.jvp(explicit, (x,), (tangent,))
    assert rel_err(dz, reference) <= 1e-9

    def loss(x, f):
        return (f(x) ** 3).sum()

    hessian = torch.func.hessian(lambda x: loss(x, solution))(x)
    assert rel_err(hessian, torch.func.hessian(lambda x: loss(x, explicit))(x)) <= 1e-8
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss(x, solution), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    assert rel_err(second, hessian.sum(0)) <= 1e-8


def test_unrolled_through_the_new_solver():
    a = torch.tensor([2.0, 3.0], dtype=F64, requires_grad=True)
    z = implicit.root_solve(
        lambda z, a: z**3 + z - a,
        torch.ones(2, dtype=F64),
        a,
        solver=Chord(refresh=1),
        backward="unroll",
        tol=1e-13,
    )
    (grad,) = torch.autograd.grad(z.sum(), a)
    assert rel_err(grad, 1 / (3 * z.detach() ** 2 + 1)) <= 1e-9


def test_solvers_are_immutable_configuration():
    solver = Chord(refresh=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.refresh = 5
    assert implicit.solvers.resolve(solver, {}) is solver
    assert implicit.solvers.resolve("anderson", {}) is implicit.solvers.resolve("anderson", {})
    # One instance serves calls of any batch size.
    for batch in (1, 4):
        a = torch.full((batch,), 2.0, dtype=F64)
        z = implicit.root_solve(
            lambda z, a: z**3 + z - a, torch.ones(batch, dtype=F64), a, solver=solver, batched=True
        )
        assert rel_err(z, torch.ones(batch, dtype=F64)) <= 1e-6
