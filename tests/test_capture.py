"""Captured tensors (_problem.py, _capture.py): found, substituted, also under torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import TanhProblem, rel_err
from torch._dynamo.testing import CompileCounter

import implicit
from implicit._problem import Recorder


def test_compiled_function_gets_the_same_gradients():
    # Discovery and substitution run a TorchFunctionMode around f; a compiled f must
    # still give the eager gradients (the mode's bookkeeping is not traced).
    p = TanhProblem(n=5, batch=3)
    compiled = torch.compile(p.f)
    grads = {}
    for name, f in (("eager", p.f), ("compiled", compiled)):
        z = implicit.fixed_point(f, p.z0, p.x, batched=True, tol=1e-12)
        grads[name] = torch.autograd.grad(z.square().sum(), [p.x, p.W])
    for got, want in zip(grads["compiled"], grads["eager"]):
        assert rel_err(got, want) <= 1e-12


def test_compiled_module_parameters_receive_gradients():
    torch.manual_seed(0)
    cell = torch.nn.Linear(4, 4).double()
    with torch.no_grad():
        cell.weight.mul_(0.3)
    compiled = torch.compile(cell)
    x = torch.randn(2, 4, dtype=torch.float64)
    grads = {}
    for name, module in (("eager", cell), ("compiled", compiled)):
        z = implicit.fixed_point(
            lambda z, x, m=module: torch.tanh(m(z) + x),
            torch.zeros_like(x),
            x,
            batched=True,
            tol=1e-12,
        )
        grads[name] = torch.autograd.grad(z.square().sum(), [cell.weight, cell.bias])
    for got, want in zip(grads["compiled"], grads["eager"]):
        assert rel_err(got, want) <= 1e-12


def test_compiled_function_met_first_in_a_solve_is_still_compiled():
    # Discovery evaluates f under a TorchFunctionMode. Dynamo cannot trace through the
    # mode and, meeting it, would give up on f for good: every later evaluation eager.
    torch._dynamo.reset()
    counter = CompileCounter()
    p = TanhProblem(n=5, batch=3)
    compiled = torch.compile(p.f, backend=counter)
    z = implicit.fixed_point(compiled, p.z0, p.x, batched=True, tol=1e-12)
    assert counter.frame_count >= 1
    grads = torch.autograd.grad(z.square().sum(), [p.x, p.W])
    z_eager = implicit.fixed_point(p.f, p.z0, p.x, batched=True, tol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(z_eager.square().sum(), [p.x, p.W])):
        assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("front_door", ["root_solve", "fixed_point"])
def test_a_solve_inside_a_compiled_function_runs_eagerly(front_door):
    # The front doors break the graph: the solve's data-dependent loop is not traced
    # (aot_eager failed on tracing Newton's before), the code around it still is.
    p = TanhProblem(n=5, batch=3)

    def loss(x):
        if front_door == "root_solve":
            z = implicit.root_solve(lambda z, x: p.f(z, x) - z, p.z0, 2 * x, batched=True)
        else:
            z = implicit.fixed_point(p.f, p.z0, 2 * x, batched=True)
        return z.square().sum()

    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager")(p.x), [p.x, p.W])
    eager = torch.autograd.grad(loss(p.x), [p.x, p.W])
    for got, want in zip(compiled, eager):
        assert rel_err(got, want) <= 1e-12


def test_a_solve_inside_f_of_another_solve():
    # Discovery of the outer f runs the inner solve, with its own discovery, inside
    # the outer one's mode (and the compiler stance it sets); gradients against
    # autograd through both fixed-point iterations unrolled.
    gen = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(4, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64).requires_grad_()

    def inner_map(u, s):
        return torch.tanh(0.5 * u @ w.T + s)

    def outer_map(z, x):
        u = implicit.fixed_point(inner_map, torch.zeros_like(x), z + x, batched=True, tol=1e-13)
        return 0.5 * torch.tanh(u)

    z = implicit.fixed_point(outer_map, torch.zeros_like(x), x, batched=True, tol=1e-13)
    grads = torch.autograd.grad(z.square().sum(), (w, x))
    unrolled = torch.zeros_like(x)
    for _ in range(60):
        u = torch.zeros_like(x)
        for _ in range(60):
            u = inner_map(u, unrolled + x)
        unrolled = 0.5 * torch.tanh(u)
    assert rel_err(z, unrolled) <= 1e-11
    for got, want in zip(grads, torch.autograd.grad(unrolled.square().sum(), (w, x))):
        assert rel_err(got, want) <= 1e-10


class TestBranchNotTakenAtZ0:
    """``f`` reads ``W`` only away from ``z = 0``, the initial guess: discovery at ``z0``
    missed it, and ``W`` silently got no gradient. Found again at the solution."""

    n = 5

    def setup_method(self):
        gen = torch.Generator().manual_seed(0)
        n = self.n
        self.W = 0.5 * torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
        self.W.requires_grad_()
        self.x = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
        self.c = torch.randn(n, generator=gen, dtype=torch.float64)

    def f(self, z, x):
        if not bool(z.any()):  # a shortcut at zero: f(0) = x, without W
            return x
        return torch.tanh(self.W @ z + x)

    def reference(self, z):
        """dL/dx and dL/dW of L = c·z by the implicit function theorem, densely:
        dz = (I − D W)⁻¹ D (dW z + dx), D = diag(1 − z²)."""
        z = z.detach()
        d = 1 - z**2
        w = torch.linalg.solve((torch.eye(self.n, dtype=z.dtype) - d[:, None] * self.W).T, self.c)
        u = d * w
        return u, torch.outer(u, z)

    def solve(self, x=None, **options):
        z0 = torch.zeros(self.n, dtype=torch.float64)
        x = self.x if x is None else x
        return implicit.fixed_point(self.f, z0, x, tol=1e-12, return_info=True, **options)

    @pytest.mark.parametrize("backward", ["dense", "gmres", "neumann"])
    def test_reverse_mode(self, backward):
        z, info = self.solve(backward=backward)
        grad_x, grad_w = torch.autograd.grad((self.c * z).sum(), [self.x, self.W])
        ref_x, ref_w = self.reference(z)
        assert rel_err(grad_x, ref_x) <= 1e-10 and rel_err(grad_w, ref_w) <= 1e-10
        # The backward reports to the forward's info; discovery at z* is one evaluation.
        assert info.backward is not None and info.backward.status == "converged"
        assert info.f_evals == info.iterations + 2  # discovery at z0 and at z*

    def test_only_the_captured_tensor_carries_derivatives(self):
        # Nothing at z0 needed a graph at all.
        self.x.requires_grad_(False)
        z, _ = self.solve()
        (grad_w,) = torch.autograd.grad((self.c * z).sum(), [self.W])
        assert rel_err(grad_w, self.reference(z)[1]) <= 1e-10

    def test_under_jacrev(self):
        # (vmap refuses the Python branch on a value of z: the user's function's.)
        z, _ = self.solve()
        jacobian = torch.func.jacrev(lambda x: self.solve(x)[0])(self.x.detach())
        d = 1 - z.detach() ** 2
        inverse = torch.linalg.inv(torch.eye(self.n, dtype=torch.float64) - d[:, None] * self.W)
        assert rel_err(jacobian, inverse * d) <= 1e-10
        # The tensors W reaches are wired: the Jacobian differentiates with respect to W.
        (grad_w,) = torch.autograd.grad(jacobian.trace(), [self.W])
        eps = 1e-6
        bumped = []
        for sign in (1, -1):
            with torch.no_grad():
                self.W += sign * eps * torch.ones_like(self.W)
            bumped.append(
                torch.func.jacrev(lambda x: self.solve(x)[0])(self.x.detach()).trace().detach()
            )
            with torch.no_grad():
                self.W -= sign * eps * torch.ones_like(self.W)
        directional = (bumped[0] - bumped[1]) / (2 * eps)
        assert abs(float(grad_w.sum() - directional)) <= 1e-6 * abs(float(directional))

    def test_forward_mode(self):
        tangent = torch.randn(self.n, dtype=torch.float64)
        z, dz = torch.func.jvp(lambda x: self.solve(x)[0], (self.x.detach(),), (tangent,))
        d = 1 - z**2
        expected = torch.linalg.solve(
            torch.eye(self.n, dtype=torch.float64) - d[:, None] * self.W, d * tangent
        )
        assert rel_err(dz, expected.detach()) <= 1e-10

    def test_a_branch_on_a_shape_made_from_values_is_found(self):
        # No value reaches Python directly: the shape of z[z != 0] does.
        def f(z, x):
            if z[z != 0].numel() == 0:
                return x
            return torch.tanh(self.W @ z + x)

        z0 = torch.zeros(self.n, dtype=torch.float64)
        z = implicit.fixed_point(f, z0, self.x, tol=1e-12)
        grad_x, grad_w = torch.autograd.grad((self.c * z).sum(), [self.x, self.W])
        ref_x, ref_w = self.reference(z)
        assert rel_err(grad_x, ref_x) <= 1e-10 and rel_err(grad_w, ref_w) <= 1e-10

    def test_no_discovery_at_the_solution_without_a_branch_on_values(self):
        # Every point reads the same tensors: discovery at z0 found them all.
        z0 = torch.zeros(self.n, dtype=torch.float64)
        f = lambda z, x: torch.tanh(self.W @ z + x)  # noqa: E731
        z, info = implicit.fixed_point(f, z0, self.x, tol=1e-12, return_info=True)
        assert info.f_evals == info.iterations + 1
        (grad_w,) = torch.autograd.grad((self.c * z).sum(), [self.W])
        assert rel_err(grad_w, self.reference(z)[1]) <= 1e-10

    def test_no_second_evaluation_without_iterations(self):
        # A black box's answer is z0: discovery already ran at the solution.
        z0 = torch.zeros(self.n, dtype=torch.float64)
        solved = self.solve()[0].detach()
        _, info = implicit.fixed_point(self.f, solved, self.x, tol=1e-8, return_info=True)
        assert info.iterations == 0 and info.f_evals == 1
        assert z0.sum() == 0


@pytest.mark.parametrize(
    ("reads", "g"),
    [
        (True, lambda z, w: 2 * w if bool(z.any()) else z),
        (True, lambda z, w: z * w.sum().item()),
        (True, lambda z, w: z[z > 0].sum() * w),
        (True, lambda z, w: z[torch.nonzero(z).flatten()] * w[0]),
        (True, lambda z, w: torch.where(z > 0)[0].numel() * w),
        (True, lambda z, w: 2 * w if torch.equal(z, z) else z),
        (True, lambda z, w: torch.unique(z) * w[0]),
        (False, lambda z, w: torch.tanh(z @ w.T + 1)),
        (False, lambda z, w: torch.where(z > 0, z, w[0]) + z[1:].sum() + z.shape[0]),
    ],
)
def test_the_recorder_sees_values_handed_to_python(reads, g):
    # Only a function that hands values to Python (or makes a shape from them) may read
    # other tensors at another point; the others are not watched again at the solution.
    z, w = torch.tensor([0.5, -1.0]), torch.ones(2, 2, requires_grad=True)
    with Recorder([z]) as recorder:
        g(z, w)
    assert recorder.read_values is reads
    assert [id(t) for t in recorder.captured.values()] == [id(w)]
