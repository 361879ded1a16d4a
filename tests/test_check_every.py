"""Loops ready for accelerators: with ``check_every=4`` a forward or backward solver
reads the host (a synchronisation on a GPU) at most once per 4 iterations, plus a
constant per solve; and what it returns is what it returns reading every iteration.

The reads are counted as the aten operators that hand a value to Python
(``_local_scalar_dense`` behind ``.item()``, ``bool()``, ``int()``; ``is_nonzero``;
``equal``) over solves forced to run exactly ``max_iter`` iterations (an unreachable
tolerance), at two lengths: the difference is what the loop reads per iteration.
Scipy and the bracketing solvers read the host by nature and take no ``check_every``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

import implicit
from implicit import linear

#: The aten operators that return a Python value (a host read).
HOST_READS = {"_local_scalar_dense", "is_nonzero", "item", "equal"}
F64 = torch.float64


class HostReads(TorchDispatchMode):
    """Counts the host reads of the operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def problem(n=16):
    """``z = tanh(W z + x)``, ‖W‖₂ = 0.95, a batch of 4, in float64."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=gen, dtype=F64)
    w = 0.95 * w / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(4, n, generator=gen, dtype=F64)
    return (lambda z, x: torch.tanh(z @ w.T + x)), x


def forward_reads(solver, max_iter, check_every=4):
    f, x = problem()
    options = {} if check_every is None else {"check_every": check_every}
    with HostReads() as reads, warnings.catch_warnings():
        warnings.simplefilter("ignore", implicit.ConvergenceWarning)
        _, info = implicit.fixed_point(
            f, torch.zeros_like(x), x, solver=solver, tol=1e-300, max_iter=max_iter,
            batched=True, return_info=True, **options,
        )  # fmt: skip
    assert info.iterations == max_iter and info.status == "max_iter"
    return reads.count


def backward_reads(method, max_iter, n=16):
    f, x = problem(n)
    x.requires_grad_()
    backward = method(tol=1e-300, max_iter=max_iter, check_every=4)
    z, info = implicit.fixed_point(
        f, torch.zeros_like(x), x, solver="fixed_point", tol=1e-300, max_iter=3,
        batched=True, backward=backward, on_failure="ignore", return_info=True,
    )  # fmt: skip
    with HostReads() as reads:
        z.sum().backward()
    assert info.backward.iterations == max_iter
    return reads.count


def assert_once_per_four(count):
    short, long = count(8), count(32)
    assert long - short <= (32 - 8) / 4, (short, long)
    assert short <= 8 / 4 + 8, (short, long)  # a constant per solve: its end, its report


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "newton", "broyden"])
def test_forward_solvers_read_once_per_check(solver):
    assert_once_per_four(lambda max_iter: forward_reads(solver, max_iter))


def test_the_line_search_reads_once_per_check():
    # Newton with its Krylov inner solve off: the dense steps and the line search.
    solver = implicit.solvers.Newton(linear="dense", check_every=4)
    assert_once_per_four(lambda max_iter: forward_reads(solver, max_iter, check_every=None))


def spd_system(seed, decades):
    """A 40 × 40 symmetric positive definite matrix with eigenvalues spread over
    ``decades`` decades, and three right-hand sides."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=F64))
    matrix = q @ torch.diag(torch.logspace(0, decades, 40, dtype=F64)) @ q.T
    return matrix, torch.randn(3, 40, generator=gen, dtype=F64)


def objective_problem():
    """A batch of 4 smooth convex problems in 12 unknowns: a quadratic plus a quartic
    (so that no method finishes in one step), as an objective and as a residual."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 12, 12, generator=gen, dtype=F64)
    a = a @ a.transpose(1, 2) + torch.eye(12, dtype=F64)
    c = torch.randn(4, 12, generator=gen, dtype=F64)

    def fun(z):
        return 0.5 * torch.einsum("bi,bij,bj->b", z - c, a, z - c) + (z**4).sum(dim=1)

    def residual(z):
        return torch.cat([torch.einsum("bij,bj->bi", a, z - c), z**2], dim=1)

    return fun, residual


def slow_problem():
    """A batch of 4 problems in 12 unknowns whose minimum ``z = c`` is degenerate:
    ``Σ (A(z − c))⁴``, or the residual ``(A(z − c))²``. Every method converges only
    linearly there (Newton by 2/3 per step), so that each runs 32 iterations from zero
    far above rounding level, where no line search can stall."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 12, 12, generator=gen, dtype=F64) / 12**0.5 + torch.eye(12, dtype=F64)
    c = torch.randn(4, 12, generator=gen, dtype=F64)

    def fun(z):
        return (torch.einsum("bij,bj->bi", a, z - c) ** 4).sum(dim=1)

    def residual(z):
        return torch.einsum("bij,bj->bi", a, z - c) ** 2

    return fun, residual


def minimizer_reads(solver, max_iter, check_every=4):
    fun, residual = slow_problem()
    options = {} if check_every is None else {"check_every": check_every}
    door = implicit.least_squares if solver in ("gauss_newton", "levenberg_marquardt") else None
    call = door or implicit.minimize
    with HostReads() as reads, warnings.catch_warnings():
        warnings.simplefilter("ignore", implicit.ConvergenceWarning)
        _, info = call(
            residual if door else fun, torch.zeros(4, 12, dtype=F64), solver=solver,
            tol=1e-300, max_iter=max_iter, batched=True, return_info=True,
            on_failure="ignore", **options,
        )  # fmt: skip
    assert info.status == "max_iter"
    assert info.iterations_per_problem.eq(max_iter).all()  # no row gave up early
    return reads.count


@pytest.mark.parametrize("solver", ["lbfgs", "newton", "gauss_newton", "levenberg_marquardt"])
def test_minimizers_read_once_per_check(solver):
    assert_once_per_four(lambda max_iter: minimizer_reads(solver, max_iter))


def test_newton_s_inner_cg_reads_once_per_four_of_its_products():
    # Above max_dense unknowns, Newton's direction comes from truncated CG: a loop of its
    # own, which reads the host once per check_every of its iterations.
    from implicit.solvers.modified_newton import _truncated_cg

    matrix, rhs = spd_system(seed=2, decades=6)
    rhs = 1e-8 * rhs  # CG's relative target is then 1e-4

    def count(max_iter):
        products = []
        with HostReads() as reads:
            _truncated_cg(lambda v: products.append(v) or v @ matrix, rhs, max_iter, 4)
        assert len(products) == max_iter  # no row reached the target
        return reads.count

    assert_once_per_four(count)


@pytest.mark.parametrize("solver", ["lbfgs", "newton", "gauss_newton", "levenberg_marquardt"])
def test_minimizers_find_the_same_minimum_reading_every_four_iterations(solver):
    fun, residual = objective_problem()
    door = implicit.least_squares if solver in ("gauss_newton", "levenberg_marquardt") else None
    answers = []
    for check_every in (1, 4):
        z, info = (door or implicit.minimize)(
            residual if door else fun, torch.zeros(4, 12, dtype=F64), solver=solver,
            tol=1e-8, max_iter=500, batched=True, return_info=True,
            check_every=check_every, on_failure="raise",
        )  # fmt: skip
        assert info.status == "converged"
        answers.append(z)
    assert rel_err(answers[1], answers[0]) <= 1e-6


@pytest.mark.parametrize("method", [linear.Neumann, linear.GMRES, linear.BiCGStab], ids=str)
def test_backward_solvers_read_once_per_check(method):
    # (CG, which breaks down at once on this non-symmetric system, has its own test.)
    assert_once_per_four(lambda max_iter: backward_reads(method, max_iter))


def test_cg_reads_once_per_check():
    matrix, rhs = spd_system(seed=1, decades=3)
    op = linear.JacobianOperator.of(lambda z: z @ matrix, torch.zeros(3, 40, dtype=F64))

    def count(max_iter):
        solver = linear.CG(check_every=4)
        with HostReads() as reads:
            result = solver.solve(solver.init(op), rhs, tol=1e-300, max_iter=max_iter)
        assert result.iterations == max_iter
        return reads.count

    assert_once_per_four(count)


def test_auto_reads_once_per_check_through_neumann():
    assert_once_per_four(lambda k: backward_reads(linear.Auto, k, n=80))


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "newton", "broyden"])
@pytest.mark.parametrize("backward", ["neumann", "gmres", "bicgstab", "auto"])
def test_the_same_answers_reading_every_four_iterations(solver, backward):
    # A solve that converges: the answer and the gradient with check_every=4 are those
    # of the loop reading every iteration (the problems finish within the same
    # tolerance), and the statuses are true.
    f, x = problem(80)
    grads = []
    for check_every in (1, 4):
        xx = x.clone().requires_grad_()
        method = {"auto": linear.Auto, "neumann": linear.Neumann}.get(backward)
        method = method or {"gmres": linear.GMRES, "bicgstab": linear.BiCGStab}[backward]
        z, info = implicit.fixed_point(
            f, torch.zeros_like(x), xx, solver=solver, tol=1e-10, max_iter=200, batched=True,
            backward=method(check_every=check_every), on_failure="raise", return_info=True,
            check_every=check_every,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(z.sum(), xx)
        assert info.status == "converged" and info.backward.status == "converged"
        assert rel_err(f(z, x), z) <= 1e-8
        grads.append(grad)
    assert rel_err(grads[1], grads[0]) <= 1e-8


def test_check_every_is_validated():
    for method in (linear.Neumann, linear.GMRES, linear.Auto):
        with pytest.raises(ValueError, match="check_every"):
            method(check_every=0)
