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

Under ``vmap`` (:meth:`_ImplicitFunction.vmap`, also behind ``jacrev``, ``jacfwd`` and
``hessian``) the vmapped slices are independent problems: they become more rows of one
problem (:class:`_Folded`), or more right-hand sides of one linear system
(:class:`~implicit._operators.Repeated`), and are solved in one call. Forward mode over
forward mode is refused (:func:`implicit._torch.nested_forward_mode`): PyTorch cannot
differentiate a custom ``jvp`` rule in forward mode and would drop the second-order term.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence

import torch

from implicit import _progress, _tolerance, _torch
from implicit._operators import GraphJacobian, Jacobian, Repeated, Residual
from implicit._precision import attainable, is_half, upcast
from implicit._problem import Problem
from implicit._results import (
    CONVERGED,
    BackwardInfo,
    SolveInfo,
    report_failure,
    status_name,
)
from implicit.linear import Hint, IterativeSolver, JacobianOperator, LinearSolver, Unroll
from implicit.linear import resolve as resolve_linear
from implicit.linear.base import WorkingOperator
from implicit.solvers.base import Solver, residual_norms, thresholds

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _Settings:
    """Tolerances, failure policy and linear solver shared by a solve and its linear solves.

    Args:
        tol: a number, or a ``(B,)`` tensor of per-problem tolerances (see
            :mod:`implicit._tolerance`).
        rows: the number of rows ``B`` of the user's problem. The systems of ``vmap``,
            ``jacrev``, ... stack several blocks of ``B`` rows; an initial guess and a
            preconditioner are written for one block.
        backward_x0: the initial guess of the backward's adjoint solve (a layer's warm
            start), or ``None``.
        callback: the user's per-iteration callback of the forward solve, or ``None``.
    """

    def __init__(
        self,
        tol: _tolerance.Tol,
        max_iter: int,
        on_failure: str,
        linear: LinearSolver,
        rows: int,
        backward_x0: torch.Tensor | None = None,
        callback: _progress.Callback | None = None,
    ):
        self.tol = tol
        self.max_iter = max_iter
        self.on_failure = on_failure
        self.linear = linear
        self.rows = rows
        self.backward_x0 = backward_x0
        self.callback = callback

    def linear_solve(
        self,
        op: JacobianOperator,
        rhs: torch.Tensor,
        what: str,
        report_shape: tuple[int, ...],
        *,
        hint: Hint | None = None,
        x0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, BackwardInfo]:
        linear = self.linear
        tol = linear.tol if linear.tol is not None else _tolerance.for_backward(self.tol)
        max_iter = linear.max_iter if linear.max_iter is not None else self.max_iter
        x0, preconditioner = self._per_call(rhs.shape, x0)
        dtype = rhs.dtype
        if is_half(dtype):  # solved in float32 around products in half precision
            op, rhs, tol = WorkingOperator(op, dtype), upcast(rhs), attainable(tol, dtype)
            x0 = None if x0 is None else upcast(x0)
        # Passed only when set: a method that takes neither may leave them out.
        options = {"x0": x0} if x0 is not None else {}
        if preconditioner is not None:
            options["preconditioner"] = preconditioner
        result = linear.solve(linear.init(op, hint), rhs, tol=tol, max_iter=max_iter, **options)
        info = BackwardInfo(
            converged=_reported(result.codes == CONVERGED, report_shape),
            residual=_reported(result.residual.detach(), report_shape),
            iterations=result.iterations,
            matvecs=op.products,
            status=status_name(result.codes),
            method=result.method or linear.name,
            solution=result.x.detach(),
            condition=None
            if result.condition is None
            else _reported(result.condition, report_shape),
        )
        report_failure(info, self.on_failure, what)
        return (result.x.to(dtype) if is_half(dtype) else result.x), info

    def _per_call(
        self, shape: torch.Size, x0: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, Callable | None]:
        """The initial guess and preconditioner of one linear solve, fitted to its rows.

        The one place where they meet ``vmap``: the user wrote them for one block of
        ``B`` rows, a system of ``jacrev``, ``vmap``, ... stacks several blocks, so a
        one-block guess is repeated for each block and the preconditioner is applied
        block by block. ``x0`` (a layer's warm start, the solution of an earlier
        system) takes precedence over the solver's own and is dropped (a cold start)
        where it fits neither the system nor one block; the solver's own must fit.
        """
        linear = self.linear
        own = isinstance(linear, IterativeSolver)
        preconditioner = linear.preconditioner if own else None
        blocks = shape[0] // self.rows
        block = self.rows * shape[1]
        if x0 is not None and x0.numel() not in (block, blocks * block):
            x0 = None
        if x0 is None and own:
            x0 = linear.x0
        if blocks > 1 and x0 is not None and x0.numel() == block:
            x0 = x0.reshape(self.rows, shape[1]).repeat(blocks, 1)
        if blocks > 1 and preconditioner is not None:
            one_block = preconditioner

            def preconditioner(r: torch.Tensor) -> torch.Tensor:
                return torch.cat([one_block(part) for part in r.chunk(blocks)])

        return x0, preconditioner


def _reported(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A per-problem field in the shape of the reports (reshaped only where it differs)."""
    return tensor if tensor.shape == shape else tensor.reshape(shape)


class _RootProblem:
    """A user problem solved by a nonlinear solver (the forward of step 1).

    Args:
        problem: the residual ``problem.residual(z, *inputs)`` on ``(B, n)`` rows and
            the scale of its stopping test, ``problem.scale(z0, r0, *inputs)``.
        solver: the forward solver.
        settings: tolerances, failure policy and linear solver.
        r0: the residual at the initial guess when already known (used once).
        report_shape: the shape of the per-problem fields of the reports: ``(B,)``
            when batched, ``()`` otherwise, ``(V, ...)`` when folded under ``vmap``.
    """

    def __init__(
        self,
        problem: Problem | _Folded,
        solver: Solver,
        settings: _Settings,
        r0: torch.Tensor | None,
        report_shape: tuple[int, ...],
    ):
        self.problem = problem
        self.solver = solver
        self.settings = settings
        self.r0 = r0
        self.report_shape = report_shape
        self.info: SolveInfo | None = None
        # The initial guess of this problem's adjoint solve (a layer's warm start).
        self.backward_x0 = settings.backward_x0
        # What the forward solver knew of ∂g/∂z, where the backward's solver uses it.
        self.hint: Hint | None = None
        # The problem this one folds (under vmap): it reports through the same info.
        self._unfolded: _RootProblem | None = None

    def residual(self, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self.problem.residual(z, *inputs)

    def solve(self, z0: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        settings = self.settings
        fn = self.problem.solver_view(inputs)
        r0, self.r0 = self.r0, None  # reusable once, and only where it was computed
        z, info = self.solver.solve(
            fn,
            z0,
            r0,
            tol=_tolerance.for_rows(settings.tol, z0.shape[0]),
            max_iter=settings.max_iter,
            callback=_progress.watch(settings.callback, self.problem, self.report_shape),
        )
        # Kept (Newton's: B·n² numbers, until the backward) only where it will be used.
        hint, info.hint = info.hint, None
        self.hint = hint if hint is not None and settings.linear.uses(hint, z.shape) else None
        _progress.shape_report(info, self.report_shape)
        problem: _RootProblem | None = self
        while problem is not None:
            problem.info, problem = info, problem._unfolded
        if not isinstance(self.solver, _Given):  # (a given answer's report was made)
            report_failure(info, settings.on_failure, "forward solve")
        return z

    def record_backward(self, info: BackwardInfo) -> None:
        if self.info is not None:
            self.info.backward = info

    def fold(
        self, size: int, in_dims: Sequence[int | None], inputs: Sequence[torch.Tensor]
    ) -> tuple[_RootProblem, Sequence[torch.Tensor]]:
        """This problem for ``size`` vmapped slices at once (see :class:`_Folded`)."""
        folded = _RootProblem(
            _Folded(self.problem, size, in_dims),
            self.solver,
            self.settings,
            None,
            (size, *self.report_shape),
        )
        folded._unfolded = self
        return folded, inputs


class _LinearProblem:
    """The linear system of a derivative of ``parent``, as a root problem of its own.

    With ``A = ∂g/∂z`` of the parent at ``(z, θ)``:

    * ``transpose=True``: the adjoint system ``h(w; v, z, θ) = Aᵀ w − v`` (backward);
    * ``transpose=False``: the tangent system ``h(u; b, z, θ) = A u − b`` (forward mode).

    Its forward is a linear solve. Being a problem like any other, it is solved through
    :class:`_ImplicitFunction`, so its derivatives (second order), its batching under
    ``vmap`` and its forward mode come from the same machinery.

    Args:
        parent: the problem whose Jacobian ``A`` is.
        transpose: which of the two systems.
        copies: the number of right-hand sides per row of the parent: ``x`` and ``v``
            (or ``b``) have ``copies·B`` rows, copy-major, all with the same ``A``.
        linearization: ``∂g/∂z`` already recorded at exactly the ``(z, θ)`` this system
            is solved at (the first-order backward records it once and also takes the
            partials from it).
        hint: what the forward solver knew of ``A`` (the parent's), for the linear
            solver to use.
    """

    #: Linear solves of higher orders are not warm-started.
    backward_x0 = None

    def __init__(
        self,
        parent: _RootProblem | _LinearProblem | _Folded,
        transpose: bool,
        copies: int = 1,
        linearization: GraphJacobian | None = None,
        hint: Hint | None = None,
    ):
        self.parent = parent
        self.transpose = transpose
        self.copies = copies
        self.settings = parent.settings
        self.report_shape = (copies, *parent.report_shape) if copies > 1 else parent.report_shape
        self.linearization = linearization
        self.hint = hint

    def _jacobian(self, z: torch.Tensor, theta: Sequence[torch.Tensor]) -> Jacobian | Repeated:
        jacobian = Jacobian(lambda state: self.parent.residual(state, *theta), z)
        return Repeated(jacobian, self.copies) if self.copies > 1 else jacobian

    def residual(
        self, x: torch.Tensor, rhs: torch.Tensor, z: torch.Tensor, *theta: torch.Tensor
    ) -> torch.Tensor:
        jacobian = self._jacobian(z, theta)
        product = jacobian.rmatvec(x) if self.transpose else jacobian.matvec(x)
        return product - rhs

    def solve(self, x0: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        rhs, z, *theta = inputs
        jacobian = self.linearization or self._jacobian(z, theta)
        op = JacobianOperator(jacobian, transposed=self.transpose)
        what = "backward linear solve" if self.transpose else "forward-mode linear solve"
        guess = self.parent.backward_x0 if self.transpose else None
        x, info = self.settings.linear_solve(
            op, rhs, what, self.report_shape, hint=self.hint, x0=guess
        )
        if self.transpose:
            self.parent.record_backward(info)
        return x

    def record_backward(self, info: BackwardInfo) -> None:
        """Linear solves of higher orders are not reported."""

    def fold(
        self, size: int, in_dims: Sequence[int | None], inputs: Sequence[torch.Tensor]
    ) -> tuple[_LinearProblem, Sequence[torch.Tensor]] | None:
        """This system for ``size`` vmapped slices at once, or ``None`` when no single
        system covers them.

        Where only the right-hand sides differ between slices (``jacrev``, ``jacfwd``:
        one matrix, many vectors), the slices are more copies of the same system and
        ``g`` is not evaluated under ``vmap`` at all. Where the matrices differ, the
        slices are rows of the system of the folded parent.
        """
        rhs, z, *theta = inputs
        rhs_dim, z_dim, *theta_dims = in_dims
        rows = _rows(rhs, rhs_dim, size)
        if z_dim is None and all(dim is None for dim in theta_dims):
            return _LinearProblem(self.parent, self.transpose, size * self.copies), (
                rows,
                z,
                *theta,
            )
        if self.copies > 1:
            return None
        folded = _LinearProblem(_Folded(self.parent, size, theta_dims), self.transpose)
        return folded, (rows, _rows(z, z_dim, size), *theta)


class _Folded:
    """``size`` slices of a problem under ``torch.func.vmap``, as one batch of rows.

    The slices of a vmapped problem are independent problems, just like the rows of a
    batched one. So ``size`` slices of a problem on ``(B, n)`` rows are solved as one
    problem on ``(size·B, n)`` rows, each row with its own stopping test, in one call
    of the solver; the residual evaluates the original one under ``vmap``.

    Args:
        inner: the problem (or the parent of a linear system) being folded.
        size: the number of vmapped slices.
        in_dims: for each input, 0 when it has the vmapped dimension first, ``None``
            when it is shared by every slice.
    """

    def __init__(self, inner, size: int, in_dims: Sequence[int | None]):
        self.inner = inner
        self.size = size
        self.in_dims = tuple(in_dims)

    @property
    def settings(self) -> _Settings:
        return self.inner.settings

    @property
    def report_shape(self) -> tuple[int, ...]:
        return (self.size, *self.inner.report_shape)

    def _per_slice(self, fn, rows: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]):
        slices = [row.reshape(self.size, -1, *row.shape[1:]) for row in rows]
        in_dims = (*(0 for _ in rows), *self.in_dims)
        out = _torch.vmap_call(fn, self.size, (*slices, *inputs), in_dims)
        return out.reshape(-1, *out.shape[2:])

    def residual(self, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self._per_slice(self.inner.residual, [z], inputs)

    def scale(self, z0: torch.Tensor, r0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self._per_slice(self.inner.scale, [z0, r0], inputs)

    def per_row(self, name: str, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """The inner problem's per-row function ``name`` (an objective's value, ...)."""
        return self._per_slice(lambda *a: self.inner.per_row(name, *a), [z], inputs)

    def solver_view(self, inputs: Sequence[torch.Tensor], source=None) -> Residual:
        """The inner problem's view for its solvers, evaluated by these slices."""
        return self.inner.solver_view(inputs, self if source is None else source)

    def record_backward(self, info: BackwardInfo) -> None:
        self.inner.record_backward(info)

    @property
    def backward_x0(self) -> torch.Tensor | None:
        return self.inner.backward_x0


def _rows(tensor: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """``(size, B, n)`` slices (or one ``(B, n)`` tensor shared by all) as rows."""
    if dim is None:
        tensor = tensor.expand(size, *tensor.shape)
    return tensor.reshape(-1, tensor.shape[-1])


class _ImplicitFunction(torch.autograd.Function):
    """``z* = solve(problem)(inputs)`` with implicit derivatives, in every AD mode."""

    @staticmethod
    def forward(problem, z0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(problem, _Solved):
            return problem.z
        # autograd.Function turns forward-mode AD off here; a user function that opens
        # its own dual level must see it on, as it does outside the solve.
        with _torch.forward_grad_as_outside():
            z = problem.solve(z0, inputs)
        return _not_a_view_of(z0, z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, _z0, *tensors = inputs
        ctx.problem = problem.problem if isinstance(problem, _Solved) else problem
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
        if _plain_backward(problem, v, z, inputs):
            for i, grad in zip(needed, _first_order_grads(problem, v, z, inputs, needed)):
                grads[i] = grad
            return (None, None, *grads)
        adjoint = _LinearProblem(problem, transpose=True)
        w = _implicit(adjoint, torch.zeros_like(v), v, z, *inputs)
        _, vjp = torch.func.vjp(_partial(problem, z, inputs, needed), *(inputs[i] for i in needed))
        for i, grad in zip(needed, vjp(-w)):
            grads[i] = grad
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx, _problem_tangent, _z0_tangent, *tangents):
        if _torch.nested_forward_mode(ctx.saved_tensors[0]):
            raise RuntimeError(
                "forward-mode AD over forward-mode AD through an implicit solve (torch.func.jvp "
                "over jvp, jacfwd over jacfwd, hessian of a hessian) is not supported: torch "
                "cannot apply forward mode to a custom jvp rule and would silently drop the "
                "second-order term. Put reverse mode on one side instead: "
                "torch.func.hessian (jacfwd over jacrev), jacrev over jacfwd, or jacrev over "
                "jacrev."
            )
        return _tangent(ctx, tangents)

    @staticmethod
    def vmap(info, in_dims, problem, z0, *inputs):
        # The vmapped slices become more rows of one problem: one solve for all of them.
        size = info.batch_size
        z0_dim, *input_dims = in_dims[1:]
        z0 = z0 if z0_dim is None else z0.movedim(z0_dim, 0)
        inputs = [t if d is None else t.movedim(d, 0) for t, d in zip(inputs, input_dims)]
        dims = [None if d is None else 0 for d in input_dims]
        folded = problem.fold(size, dims, inputs)
        if folded is None:
            # No one problem covers the slices: one solve per slice.
            slices = [
                _implicit(
                    problem,
                    *(t if d is None else t[index] for t, d in zip((z0, *inputs), (z0_dim, *dims))),
                    vmapped=True,
                )
                for index in range(size)
            ]
            return torch.stack(slices), 0
        folded_problem, folded_inputs = folded
        z = _implicit(folded_problem, _rows(z0, z0_dim, size), *folded_inputs, vmapped=True)
        return z.reshape(size, -1, z.shape[-1]), 0


class _Solved:
    """A problem already solved before ``_ImplicitFunction.apply`` (see :func:`_implicit`)."""

    def __init__(self, problem, z: torch.Tensor):
        self.problem = problem
        self.z = z


def _implicit(
    problem, z0: torch.Tensor, *inputs: torch.Tensor, vmapped: bool = False
) -> torch.Tensor:
    """``_ImplicitFunction.apply(problem, z0, *inputs)``.

    ``vmapped``: called by the ``vmap`` rule for its slices (a continuation of the
    solve the rule serves, see :func:`implicit._torch.apply`). Where torch cannot
    switch forward-mode AD back on inside the Function's forward, the problem is solved
    first, here, outside ``torch.func`` transforms and dual levels (the same solve, with
    no graph recorded, as in the forward).
    """
    if not (
        _torch.FORWARD_GRAD_IN_FUNCTIONS
        or _torch.transforms_active(z0, *inputs)
        or _torch.dual_level_open()
    ):
        with torch.no_grad():
            problem = _Solved(problem, _not_a_view_of(z0, problem.solve(z0, inputs)))
    return _torch.apply(_ImplicitFunction, problem, z0, *inputs, inherit=vmapped)


def _tangent(ctx, tangents: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``dz = −(∂g/∂z)⁻¹ (∂g/∂θ) dθ``, the tangent system solved as a linear problem."""
    z, *inputs = ctx.saved_tensors
    moving = [i for i, tangent in enumerate(tangents) if tangent is not None]
    if not moving:
        return torch.zeros_like(z)
    problem = ctx.problem
    # (∂g/∂θ) dθ by reverse over reverse: forward mode cannot nest here.
    value, vjp = torch.func.vjp(_partial(problem, z, inputs, moving), *(inputs[i] for i in moving))
    _, linear_in_w = torch.func.vjp(vjp, torch.zeros_like(value))
    (rhs,) = linear_in_w(tuple(tangents[i] for i in moving))
    tangent = _LinearProblem(problem, transpose=False)
    return _implicit(tangent, torch.zeros_like(rhs), -rhs, z, *inputs)


def _plain_backward(problem, v: torch.Tensor, z: torch.Tensor, inputs) -> bool:
    """Whether this backward is first order and outside every transform.

    Then nothing differentiates the backward itself (``create_graph=False`` leaves grad
    mode off in here) and no ``torch.func`` transform wraps the tensors, so the adjoint
    solve and the partial derivatives can share one recorded graph of ``g``
    (:func:`_first_order_grads`). Otherwise (double backward, ``jacrev``, ``vmap``, ...)
    the general path differentiates the same quantities with ``torch.func``.
    """
    return (
        isinstance(problem, _RootProblem)
        and isinstance(problem.problem, Problem)  # not the rows of a vmap (_Folded)
        and not torch.is_grad_enabled()
        and not _torch.transforms_active(v, z, *inputs)
    )


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
    adjoint = _LinearProblem(
        problem, transpose=True, linearization=linearization, hint=problem.hint
    )
    # Nothing records a graph here, so ``apply`` would only wrap this same forward in an
    # autograd node that nothing uses.
    w = _ImplicitFunction.forward(adjoint, torch.zeros_like(v), v, z, *inputs)
    return linearization.partials(-w, [stand_ins[i] for i in needed])


def _partial(problem, z: torch.Tensor, inputs: Sequence[torch.Tensor], moving: Sequence[int]):
    """``g(z, θ)`` as a function of the inputs at positions ``moving`` only."""

    def residual_of(*moved: torch.Tensor) -> torch.Tensor:
        tensors = list(inputs)
        for i, tensor in zip(moving, moved):
            tensors[i] = tensor
        return problem.residual(z, *tensors)

    return residual_of


def solve(
    problem: Problem,
    solver: Solver,
    backward: LinearSolver | Unroll,
    *,
    tol: _tolerance.Tol,
    max_iter: int,
    on_failure: str,
    backward_x0: torch.Tensor | None = None,
    callback: _progress.Callback | None = None,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``problem`` from its packed initial state; differentiable in its inputs.

    ``tol`` is a number or a ``(B,)`` tensor (:func:`implicit._tolerance.per_problem`);
    ``callback`` is the user's, called after each iteration of the forward solve.
    Returns the packed solution ``(B, n)`` and the forward :class:`SolveInfo`.
    ``backward_x0``: an initial guess for the backward's adjoint solve (a layer's warm
    start: an earlier ``BackwardInfo.solution``).
    """
    z0 = problem.pack(problem.initial).detach()  # z0 gets no gradient, in every mode
    report_shape = (problem.batch_size,) if problem.batched else ()
    if isinstance(backward, Unroll):
        return _unrolled(problem, solver, z0, tol, max_iter, on_failure, report_shape, callback)
    settings = _Settings(
        tol, max_iter, on_failure, backward, problem.batch_size, backward_x0, callback
    )
    transforming = _torch.transforms_active(z0, *problem.explicit)
    derivatives_possible = torch.is_grad_enabled() or transforming or _torch.dual_level_open()
    r0 = None
    if derivatives_possible or not _torch.KNOWS_TRANSFORMS:
        r0 = problem.discover(z0)
        # Known from the tensors alone, a transform may wrap only what g captures; then
        # it wraps g's value at z0.
        if not _torch.KNOWS_TRANSFORMS and _torch.transforms_active(r0):
            derivatives_possible = transforming = True
    root = _RootProblem(problem, solver, settings, None if transforming else r0, report_shape)
    # Under a torch.func transform the solve always runs inside the Function: its vmap
    # rule also serves a vmapped z0 when nothing else carries a derivative.
    differentiable = transforming or (derivatives_possible and problem.carries_derivatives())
    if differentiable:
        z = _implicit(root, z0, *problem.inputs)
    else:
        with torch.no_grad():
            z = _not_a_view_of(z0, root.solve(z0, problem.inputs))
    if r0 is not None:
        root.info.f_evals += 1  # capture discovery's evaluation of g at z0
    if derivatives_possible and root.info.iterations > 0:
        z = _recaptured(root, z, z0)
    return z, root.info


def _recaptured(root: _RootProblem, z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """``z``, wired also to the tensors that ``g`` reads at the solution but did not
    read at ``z0`` (a branch taken only near the solution), which would otherwise get
    no derivative.

    Costs one evaluation of ``g`` at ``z``, counted in ``f_evals``. The solution does
    not change (``g`` read those tensors while it was solved): the solved problem is
    wired again, with every captured tensor as an input, by a solve that takes no step
    and keeps the forward's report (:class:`_Given`).
    """
    problem = root.problem
    added = problem.rediscover(z)
    root.info.f_evals += 1
    if not added:
        return z
    again = _RootProblem(problem, _Given(root.info), root.settings, None, root.report_shape)
    return _implicit(again, z.detach(), *problem.inputs)


def _unrolled(problem, solver, z0, tol, max_iter, on_failure, report_shape, callback):
    """The reference mode: autograd records every iteration of the solver (a callback
    receives the iterates detached).

    A problem that meets its tolerance at ``z0`` takes no iteration, and the unrolled
    derivative of no iteration is zero, not the derivative of the solution: those
    problems get the implicit one (:func:`_implicit_at_start`).
    """
    fn = problem.solver_view(problem.inputs)
    try:
        r0 = fn(z0)
        watch = _progress.watch(callback, problem, report_shape)
        z, info = solver.solve(fn, z0, r0, tol=tol, max_iter=max_iter, callback=watch)
    except RuntimeError as error:
        innermost = traceback.extract_tb(error.__traceback__)[-1].filename
        if "data-dependent control flow" not in str(error) or not innermost.startswith(_PACKAGE):
            raise  # not the solver's own loop (e.g. the user's function branched on a value)
        raise RuntimeError(
            "backward='unroll' cannot run under torch.func.vmap with batched inputs: the "
            "solver's stopping test is data-dependent control flow, which vmap refuses. "
            "Use an implicit backward ('auto', 'dense', 'gmres', ...), which supports vmap."
        ) from error
    info.hint = None  # no linear solve to hand it to
    _progress.shape_report(info, report_shape)
    report_failure(info, on_failure, "forward solve")
    at_start = residual_norms(z0, r0) <= thresholds(tol, fn.scale(z0, r0))
    derivatives_possible = (
        torch.is_grad_enabled()
        or _torch.transforms_active(z, *problem.inputs)
        or _torch.dual_level_open()
    )
    if derivatives_possible and bool(at_start.any()):
        z = _implicit_at_start(problem, z, at_start, tol, max_iter, on_failure)
        info.f_evals += 1  # capture discovery
    return _not_a_view_of(z0, z), info


def _implicit_at_start(problem, z, rows, tol, max_iter, on_failure):
    """``z`` with the implicit derivative (``backward="auto"``) in the ``rows`` that
    took no iteration; the same values.

    Those rows are solved again by :class:`_ImplicitFunction`, which takes no step
    (:class:`_Given`); the other rows are pinned by the residual ``z − z*``, which has
    no inputs, so that their (unrolled) derivatives come from ``z`` alone.
    """
    anchor = z.detach()
    problem.discover(anchor)  # the captured tensors, as inputs of the function
    if not (_torch.transforms_active(z, *problem.inputs) or problem.carries_derivatives()):
        return z
    linear = resolve_linear("auto")
    settings = _Settings(tol, max_iter, on_failure, linear, problem.batch_size)
    root = _RootProblem(_Pinned(problem), _Given(), settings, None, (problem.batch_size,))
    rows = rows.unsqueeze(1)
    return torch.where(rows, _implicit(root, anchor, rows, anchor, *problem.inputs), z)


class _Pinned:
    """``problem``'s residual in some rows, ``z − anchor`` in the others: the residual
    of inputs ``(rows, anchor, *problem's inputs)``, ``rows`` of shape ``(B, 1)``
    (inputs rather than attributes, so that ``torch.func`` transforms see them)."""

    def __init__(self, problem: Problem):
        self.problem = problem

    def residual(self, z: torch.Tensor, rows, anchor, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.where(rows, self.problem.residual(z, *inputs), z - anchor)

    def scale(self, z0: torch.Tensor, r0: torch.Tensor, rows, anchor, *inputs) -> torch.Tensor:
        return self.problem.scale(z0, r0, *inputs)

    def solver_view(self, inputs: Sequence[torch.Tensor], source=None) -> Residual:
        source = self if source is None else source
        return Residual(
            lambda z: source.residual(z, *inputs), lambda z, r: source.scale(z, r, *inputs)
        )


class _Given(Solver):
    """The forward of a solve whose answer is known: its start, without an evaluation.

    Args:
        info: the report of the solve that found it (already reported), or ``None``
            for a report of convergence.
    """

    name = "given"

    def __init__(self, info: SolveInfo | None = None):
        self.info = info

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        if self.info is not None:
            return z0, self.info
        converged = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
        residual = torch.zeros(z0.shape[0], dtype=z0.dtype, device=z0.device)
        info = SolveInfo(converged, residual, 0, 0, [], "converged", self.name)
        return z0, info


def _not_a_view_of(z0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A solve that took no step returns its start: never hand the caller a view of z0."""
    return z.clone() if z is z0 else z
