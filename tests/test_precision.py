"""Half precision (implicit/_batch.py): float16 and bfloat16 states are solved, with
the small linear algebra in float32, to the accuracy of their dtype.

References: the same problems in float64, from the inputs rounded to the half dtype.
Errors are measured in units of the dtype's machine epsilon; float32 solves of the same
problems at their default tolerance land at 2–10 units.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import contractive_matrix

import implicit
from implicit import linear
from implicit._batch import RESOLUTION, Factorization, solve

F64 = torch.float64
HALF = [torch.float16, torch.bfloat16]
#: Accepted error, in units of the dtype's epsilon.
UNITS = 10


def units(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` in units of ``got``'s machine epsilon."""
    error = float((got.detach().double() - want.detach()).norm() / want.detach().norm())
    return error / torch.finfo(got.dtype).eps


def tanh_map(dtype, n=32, batch=8, norm=0.9):
    """``f(z, x) = tanh(W z + x)`` in ``dtype`` and in float64 with the rounded inputs."""
    w = contractive_matrix(n, norm, seed=1).to(dtype).requires_grad_()
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(2)).to(dtype)
    x.requires_grad_()
    w64 = w.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    return (w, x), (w64, x64)


def solve_tanh(w, x, **options):
    return implicit.fixed_point(
        lambda z, x: torch.tanh(z @ w.T + x), torch.zeros_like(x), x, batched=True, **options
    )


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("solver", ["anderson", "fixed_point", "newton", "broyden", "scipy"])
@pytest.mark.parametrize(
    "backward", ["auto", "dense", "gmres", "neumann", pytest.param(linear.Auto(max_dense=0))]
)
def test_fixed_points_and_gradients_to_the_dtype(dtype, solver, backward):
    (w, x), (w64, x64) = tanh_map(dtype)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", implicit.ConvergenceWarning)
        z, info = solve_tanh(w, x, solver=solver, backward=backward, return_info=True)
        grads = torch.autograd.grad(z, (x, w), v.to(dtype))
    assert z.dtype == dtype and info.status == "converged"
    assert all(g.dtype == dtype for g in grads)
    reference = solve_tanh(w64, x64, tol=1e-13, max_iter=500)
    references = torch.autograd.grad(reference, (x64, w64), v.double())
    assert units(z, reference) <= UNITS
    for got, want in zip(grads, references):
        assert units(got, want) <= UNITS


@pytest.mark.parametrize("dtype", HALF)
def test_a_deq_trains_in_half_precision(dtype):
    torch.manual_seed(0)
    cell = torch.nn.Linear(16, 16)
    with torch.no_grad():
        cell.weight.mul_(0.5 / torch.linalg.matrix_norm(cell.weight, ord=2))
    half, double = cell.to(dtype), torch.nn.Linear(16, 16).double()
    double.load_state_dict({k: v.double() for k, v in half.state_dict().items()})
    x = torch.randn(8, 16).to(dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    got, want = [], []
    for layer, inputs, out in ((half, x, got), (double, x64, want)):
        deq = implicit.DEQ(lambda z, x, layer=layer: torch.tanh(layer(z) + x), tol=1e-12)
        z = deq(inputs)
        z.float().square().sum().backward()
        out.extend([z, inputs.grad, layer.weight.grad])
        assert deq.last_info.status == "converged"
    for value, reference in zip(got, want):
        assert value.dtype == dtype and units(value, reference) <= UNITS


@pytest.mark.parametrize("dtype", HALF)
def test_forward_mode_and_hessians_in_half_precision(dtype):
    (w, x), (w64, x64) = tanh_map(dtype, n=4, batch=1)

    def solution(w):
        return lambda x: solve_tanh(w, x).sum()

    tangent = torch.ones_like(x)
    jvp = torch.func.jvp(solution(w), (x.detach(),), (tangent,))[1]
    jvp64 = torch.func.jvp(solution(w64), (x64.detach(),), (tangent.double(),))[1]
    assert units(jvp, jvp64) <= UNITS
    hessian = torch.func.hessian(solution(w))(x.detach())
    hessian64 = torch.func.hessian(solution(w64))(x64.detach())
    assert units(hessian, hessian64) <= UNITS


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("linear_solve", ["dense", "krylov"])
def test_newton_in_half_precision(dtype, linear_solve):
    generator = torch.Generator().manual_seed(0)
    a = 2 * torch.eye(8) + 0.1 * torch.randn(8, 8, generator=generator)
    b = torch.randn(4, 8, generator=generator)
    answers = []
    for precision in (dtype, F64):
        matrix, target = a.to(precision), b.to(precision).requires_grad_()
        z, info = implicit.root_solve(
            lambda z, b, m=matrix: z @ m.T + z**3 - b,
            torch.zeros(4, 8, dtype=precision),
            target,
            batched=True,
            linear=linear_solve,
            tol=1e-12,
            return_info=True,
        )
        assert info.status == "converged"
        answers.append((z, *torch.autograd.grad(z.sum(), target)))
    for got, want in zip(*answers):
        assert got.dtype == dtype and units(got, want) <= UNITS


@pytest.mark.parametrize("dtype", HALF)
def test_tolerances_are_floored_at_the_dtype_resolution(dtype):
    # tol = 1e-9 cannot be met by a residual evaluated in half precision: the test
    # holds the solve to RESOLUTION units of rounding instead, and says converged.
    (w, x), _ = tanh_map(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", implicit.ConvergenceWarning)
        z, info = solve_tanh(w, x, tol=1e-9, return_info=True)
    assert info.status == "converged"
    floor = RESOLUTION * torch.finfo(dtype).eps
    f0 = torch.tanh(x.detach().float())
    residual = torch.tanh(z.float() @ w.detach().float().T + x.detach().float()) - z.float()
    assert bool((residual.norm(dim=1) <= 2 * floor * (1 + f0.norm(dim=1))).all())


def test_norms_beyond_the_float16_range():
    # z = z / 2 + 1e4 over 100 unknowns: z* = 2e4 fits float16 (up to 65504), but
    # ‖z*‖ = 2e5 does not: the norms of the stopping test run in float32.
    z, info = implicit.fixed_point(
        lambda z: 0.5 * z + 1e4, torch.zeros(100, dtype=torch.float16), return_info=True
    )
    assert info.status == "converged" and bool(torch.isfinite(info.residual))
    # Within one float16 spacing of 2e4 (16 there): Picard's steps end at rounding level.
    assert float((z.float() - 2e4).abs().max()) <= 16


@pytest.mark.parametrize("dtype", HALF)
def test_blocks_solve_in_float32_and_answer_in_the_dtype(dtype):
    generator = torch.Generator().manual_seed(0)
    blocks = (3 * torch.eye(5) + torch.randn(2, 5, 5, generator=generator)).to(dtype)
    rhs = torch.randn(2, 5, generator=generator).to(dtype)
    exact = torch.linalg.solve(blocks.double(), rhs.double())
    x, info = solve(blocks, rhs)
    assert x.dtype == dtype and not bool(info.any()) and units(x, exact) <= UNITS
    factors = Factorization.of(blocks)
    assert factors.lu.dtype == torch.float32
    assert units(factors.solve(rhs), exact) <= UNITS
    transposed = torch.linalg.solve(blocks.double().mT, rhs.double())
    assert units(factors.solve(rhs, adjoint=True), transposed) <= UNITS


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 1e-3), (torch.float16, 1e-4)])
@pytest.mark.parametrize("width", [16, 80])  # dense backward, and Neumann (auto above 64)
def test_a_deq_trains_under_autocast_as_in_float32(dtype, tol, width):
    # Float32 states and parameters, the cell's matrix product in half precision under
    # torch.autocast; the solvers' arithmetic and the backward's linear solve in
    # float32. The gradients are as close to float64's as float32's own at the same
    # tolerance (bfloat16's products resolve about 1e-3 of the residual: a tolerance
    # of 1e-3 there).
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(2))

    def step(precision, autocast, tol):
        torch.manual_seed(0)
        layer = torch.nn.Linear(width, width)
        with torch.no_grad():
            layer.weight.mul_(0.7 / torch.linalg.matrix_norm(layer.weight, ord=2))
        layer = layer.to(precision)
        inputs = x.to(precision).clone().requires_grad_()
        deq = implicit.DEQ(lambda z, x: torch.tanh(layer(z) + x), tol=tol, on_failure="raise")
        with torch.autocast(device_type="cpu", dtype=dtype, enabled=autocast):
            z = deq(inputs)
            loss = z.float().square().sum()
        loss.backward()
        assert deq.last_info.status == "converged"
        assert deq.last_info.backward.status == "converged"
        return z.detach(), inputs.grad, layer.weight.grad

    mixed, single = step(torch.float32, True, tol), step(torch.float32, False, tol)
    reference = step(F64, False, 1e-12)
    for got, float32, want in zip(mixed, single, reference):
        assert got.dtype == torch.float32
        error = float((got.double() - want).norm() / want.norm())
        # Of the order of float32's own error (both are at the tolerance's level, where
        # either can land lucky).
        assert error <= 3 * float((float32.double() - want).norm() / want.norm())
