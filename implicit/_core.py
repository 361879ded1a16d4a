"""The differentiable solve: the one place in the package that computes derivatives.

Every front door reduces to a :class:`~implicit._problem.Problem` ``g(z, θ) = 0`` and
calls :func:`solve`. In three steps:

1. **forward**: a solver finds ``z*`` inside :class:`_ImplicitFunction.forward`, where no
   graph is recorded (memory flat in the number of iterations) and where the
   ``torch.func`` transforms hand us plain tensors;
2. **wiring**: the function's inputs are the explicit tensor arguments *and* the tensors
   ``g`` captures (found by :meth:`Problem.discover`), so autograd orders the graph
   correctly and every one of them receives a gradient;
3. **backward**: ``v ↦ −(∂g/∂θ)ᵀ w`` with ``(∂g/∂z)ᵀ w = v``.

The adjoint equation of step 3 is itself a root problem, linear in ``w`` with inputs
``(v, z, θ)``; it is solved by the *same* :class:`_ImplicitFunction` with a linear
solver as its forward solver. Differentiating the backward (double backward, Hessians)
therefore applies the implicit function theorem again, rather than differentiating
through Krylov iterations. Forward mode (:meth:`_ImplicitFunction.jvp`) solves the
tangent system ``(∂g/∂z) dz = −(∂g/∂θ) dθ`` with the same linear solver. Partial
derivatives are taken with ``torch.func.vjp``, which treats ``z`` and ``θ`` as
independent even when ``z`` is (through this function) a function of ``θ``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as forward_ad

from implicit._operators import GraphJacobian, Jacobian, Operator, Residual
from implicit._problem import Problem
from implicit._results import (
    CONVERGED,
    BackwardInfo,
    SolveInfo,
    report_failure,
    status_name,
)
from implicit.linear import LinearSolver, Unroll
from implicit.solvers.base import Solver


def _per_problem(values: torch.Tensor, batched: bool) -> torch.Tensor:
    """Per-problem values as reported: shape ``(B,)`` when batched, ``()`` otherwise."""
    return values if batched else values.reshape(())


class _Settings:
    """Tolerances and failure policy shared by a solve and its linear solves."""

    def __init__(
        self, tol: float, max_iter: int, on_failure: str, linear: LinearSolver, batched: bool
    ):
        self.tol = tol
        self.max_iter = max_iter
        self.on_failure = on_failure
        self.linear = linear
        self.batched = batched

    def linear_solve(
        self, op: Operator, rhs: torch.Tensor, what: str
    ) -> tuple[torch.Tensor, BackwardInfo]:
        linear = self.linear
        tol = linear.tol if linear.tol is not None else self.tol
        max_iter = linear.max_iter if linear.max_iter is not None else self.max_iter
        result = linear.solve(op, rhs, tol=tol, max_iter=max_iter)
        info = BackwardInfo(
            converged=_per_problem(result.codes == CONVERGED, self.batched),
            residual=_per_problem(result.residual.detach(), self.batched),
            iterations=result.iterations,
            matvecs=op.products,
            status=status_name(result.codes),
            method=linear.name,
        )
        report_failure(info, self.on_failure, what)
        return result.x, info


class _RootProblem:
    """A user problem solved by a nonlinear solver (the forward of step 1)."""

    def __init__(
        self, problem: Problem, solver: Solver, settings: _Settings, r0: torch.Tensor | None
    ):
        self.problem = problem
        self.solver = solver
        self.settings = settings
        self.r0 = r0
        self.info: SolveInfo | None = None

    def residual(self, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.problem.residual(z, *inputs)

    def solve(self, z0: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        settings = self.settings
        fn = Residual(lambda z: self.problem.residual(z, *inputs), self.problem.scale)
        r0, self.r0 = self.r0, None  # reusable once, and only where it was computed
        z, info = self.solver.solve(fn, z0, r0, tol=settings.tol, max_iter=settings.max_iter)
        _shape_report(info, settings.batched)
        if self.info is not None:  # a vmap rule solves one slice at a time: keep them all
            info.backward = self.info.backward
        self.info = info
        report_failure(info, settings.on_failure, "forward solve")
        return z

    def record_backward(self, info: BackwardInfo) -> None:
        if self.info is not None:
            self.info.backward = info


class _LinearProblem:
    """The linear system of a derivative of ``parent``, as a root problem of its own.

    With ``A = ∂g/∂z`` of the parent at ``(z, θ)``:

    * ``transpose=True``: the adjoint system ``h(w; v, z, θ) = Aᵀ w − v`` (backward);
    * ``transpose=False``: the tangent system ``h(u; b, z, θ) = A u − b`` (forward mode).

    Its forward is a linear solve. Being a problem like any other, it is solved through
    :class:`_ImplicitFunction`, so its derivatives (second order), its batching under
    ``vmap`` and its forward mode come from the same machinery.
    """

    def __init__(
        self,
        parent: _RootProblem | _LinearProblem,
        transpose: bool,
        linearization: GraphJacobian | None = None,
    ):
        self.parent = parent
        self.transpose = transpose
        self.settings = parent.settings
        # ∂g/∂z already recorded at exactly the (z, θ) this system is solved at (the
        # first-order backward records it once and also takes the partials from it).
        self.linearization = linearization

    def _jacobian(self, z: torch.Tensor, theta: Sequence[torch.Tensor]) -> Jacobian:
        return Jacobian(lambda state: self.parent.residual(state, *theta), z)

    def residual(
        self, x: torch.Tensor, rhs: torch.Tensor, z: torch.Tensor, *theta: torch.Tensor
    ) -> torch.Tensor:
        jacobian = self._jacobian(z, theta)
        product = jacobian.rmatvec(x) if self.transpose else jacobian.matvec(x)
        return product - rhs

    def solve(self, x0: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        rhs, z, *theta = inputs
        jacobian = self.linearization or self._jacobian(z, theta)
        op = Operator(jacobian, transpose=self.transpose)
        what = "backward linear solve" if self.transpose else "forward-mode linear solve"
        x, info = self.settings.linear_solve(op, rhs, what)
        if self.transpose:
            self.parent.record_backward(info)
        return x

    def record_backward(self, info: BackwardInfo) -> None:
        """Linear solves of higher orders are not reported."""


class _ImplicitFunction(torch.autograd.Function):
    """``z* = solve(problem)(inputs)`` with implicit derivatives, in every AD mode."""

    @staticmethod
    def forward(problem, z0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return _not_a_view_of(z0, problem.solve(z0, inputs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, _z0, *tensors = inputs
        ctx.problem = problem
        ctx.save_for_backward(output, *tensors)
        ctx.save_for_forward(output, *tensors)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, v):
        z, *inputs = ctx.saved_tensors
        needed = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        grads: list[torch.Tensor | None] = [None] * len(inputs)
        if v is None or not needed:
            return (None, None, *grads)
        problem = ctx.problem
        if _plain_backward(problem):
            for i, grad in zip(needed, _first_order_grads(problem, v, z, inputs, needed)):
                grads[i] = grad
            return (None, None, *grads)
        adjoint = _LinearProblem(problem, transpose=True)
        w = _ImplicitFunction.apply(adjoint, torch.zeros_like(v), v, z, *inputs)
        _, vjp = torch.func.vjp(_partial(problem, z, inputs, needed), *(inputs[i] for i in needed))
        for i, grad in zip(needed, vjp(-w)):
            grads[i] = grad
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx, _problem_tangent, _z0_tangent, *tangents):
        z, *inputs = ctx.saved_tensors
        moving = [i for i, tangent in enumerate(tangents) if tangent is not None]
        if not moving:
            return torch.zeros_like(z)
        problem = ctx.problem
        # (∂g/∂θ) dθ by reverse over reverse: forward mode cannot nest here.
        value, vjp = torch.func.vjp(
            _partial(problem, z, inputs, moving), *(inputs[i] for i in moving)
        )
        _, linear_in_w = torch.func.vjp(vjp, torch.zeros_like(value))
        (rhs,) = linear_in_w(tuple(tangents[i] for i in moving))
        tangent = _LinearProblem(problem, transpose=False)
        return _ImplicitFunction.apply(tangent, torch.zeros_like(rhs), -rhs, z, *inputs)

    @staticmethod
    def vmap(info, in_dims, problem, z0, *inputs):
        # One solve per slice: each keeps its own stopping test and derivatives.
        slices = []
        for index in range(info.batch_size):
            tensors = [
                t if dim is None else t.select(dim, index)
                for t, dim in zip((z0, *inputs), in_dims[1:])
            ]
            slices.append(_ImplicitFunction.apply(problem, *tensors))
        return torch.stack(slices), 0


def _plain_backward(problem) -> bool:
    """Whether this backward is first order and outside every transform.

    Then nothing differentiates the backward itself (``create_graph=False`` leaves grad
    mode off in here) and no ``torch.func`` transform wraps the tensors, so the adjoint
    solve and the partial derivatives can share one recorded graph of ``g``
    (:func:`_first_order_grads`). Otherwise (double backward, ``jacrev``, ``vmap``, ...)
    the general path differentiates the same quantities with ``torch.func``.
    """
    return isinstance(problem, _RootProblem) and not torch.is_grad_enabled() and not _transforming()


def _first_order_grads(
    problem: _RootProblem,
    v: torch.Tensor,
    z: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    needed: Sequence[int],
) -> list[torch.Tensor]:
    """``−(∂g/∂θ_i)ᵀ w`` for the ``needed`` inputs, with ``(∂g/∂z)ᵀ w = v``, from ONE graph.

    ``g`` is recorded once at ``(z*, θ)``: ``z*`` as a fresh leaf, the explicit inputs as
    detached leaves and the captured tensors as themselves when they are leaves (a leaf
    cannot depend on another input, so its partial derivative is the total one here;
    a captured non-leaf is swapped for a detached leaf). The adjoint solve is the
    forward of :class:`_ImplicitFunction` on the adjoint :class:`_LinearProblem`, as
    always, handed this graph as its Jacobian; the partials are one more pass through
    the same graph.
    """
    n_explicit = len(problem.problem.tensor_positions)
    stand_ins = [
        t if i >= n_explicit and t.is_leaf else t.detach().requires_grad_(t.requires_grad)
        for i, t in enumerate(inputs)
    ]
    user = problem.problem
    if user.form == "fixed_point":  # record f itself: ∂g/∂z = ∂f/∂z − I, ∂g/∂θ = ∂f/∂θ
        linearization = GraphJacobian.record(
            lambda point: user.map(point, *stand_ins), z, shifted=True
        )
    else:
        linearization = GraphJacobian.record(lambda point: user.residual(point, *stand_ins), z)
    adjoint = _LinearProblem(problem, transpose=True, linearization=linearization)
    # Nothing records a graph here, so ``apply`` would only run this same forward
    # (after binding its arguments by introspection, which costs more than a product).
    w = _ImplicitFunction.forward(adjoint, torch.zeros_like(v), v, z, *inputs)
    wanted = [stand_ins[i] for i in needed]
    if not linearization.out.requires_grad:
        return [torch.zeros_like(t) for t in wanted]
    grads = torch.autograd.grad(linearization.out, wanted, -w, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, grads)]


def _shape_report(info: SolveInfo, batched: bool) -> None:
    info.converged = _per_problem(info.converged, batched)
    info.residual = _per_problem(info.residual, batched)


def _partial(problem, z: torch.Tensor, inputs: Sequence[torch.Tensor], moving: Sequence[int]):
    """``g(z, θ)`` as a function of the inputs at positions ``moving`` only."""

    def residual_of(*moved: torch.Tensor) -> torch.Tensor:
        tensors = list(inputs)
        for i, tensor in zip(moving, moved):
            tensors[i] = tensor
        return problem.residual(z, *tensors)

    return residual_of


def _transforming() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open."""
    return forward_ad._current_level >= 0


def solve(
    problem: Problem,
    solver: Solver,
    backward: LinearSolver | Unroll,
    *,
    tol: float,
    max_iter: int,
    on_failure: str,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``problem`` from its packed initial state; differentiable in its inputs.

    Returns the packed solution ``(B, n)`` and the forward :class:`SolveInfo`.
    """
    z0 = problem.pack(problem.initial).detach()  # z0 gets no gradient, in every mode
    if isinstance(backward, Unroll):
        # The reference mode: autograd records every iteration of the solver.
        fn = Residual(lambda z: problem.residual(z, *problem.inputs), problem.scale)
        z, info = solver.solve(fn, z0, None, tol=tol, max_iter=max_iter)
        _shape_report(info, problem.batched)
        report_failure(info, on_failure, "forward solve")
        return _not_a_view_of(z0, z), info
    settings = _Settings(tol, max_iter, on_failure, backward.for_size(problem.n), problem.batched)
    transforming = _transforming()
    derivatives_possible = torch.is_grad_enabled() or transforming or _forward_ad_active()
    r0 = problem.discover(z0) if derivatives_possible else None
    root = _RootProblem(problem, solver, settings, None if transforming else r0)
    differentiable = derivatives_possible and problem.carries_derivatives()
    if differentiable:
        z = _ImplicitFunction.apply(root, z0, *problem.inputs)
    else:
        with torch.no_grad():
            z = _not_a_view_of(z0, root.solve(z0, problem.inputs))
    return z, root.info


def _not_a_view_of(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A solve that took no step returns its start: never hand the caller a view of z0."""
    return z.clone() if z is z0 else z
