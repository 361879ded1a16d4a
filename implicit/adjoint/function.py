"""The differentiable solve: its entry (:func:`solve`) and the one
``torch.autograd.Function`` behind every solve, in every AD mode.

``forward`` solves its problem (:mod:`implicit.adjoint.problems`) where no graph is
recorded. Reverse and forward mode each take one path, built from ``g`` linearised at
the solution (:mod:`implicit.adjoint.linearize`):

* ``backward``: solve ``(∂g/∂z)ᵀ w = v`` (the adjoint system, a
  :class:`~implicit.adjoint.problems.LinearProblem` solved by this same Function, so that
  differentiating the backward applies the implicit function theorem again) and pull
  ``−w`` back to the inputs;
* ``jvp``: push the tangents ``dθ`` through ``∂g/∂θ`` and solve ``(∂g/∂z) dz = −b``;
* ``vmap``: the vmapped slices become more rows of one problem, or more right-hand
  sides of one system (:func:`~implicit.adjoint.vmap.fold`), solved in one call.

Where nothing differentiates the backward (first order) and no ``torch.func`` transform
wraps its tensors, the linearisation is one recorded autograd graph, shared by the
adjoint solve and the pullback, and the adjoint solve needs no autograd node: the same
path with a cheaper linearisation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from implicit import _progress, _tolerance, _torch
from implicit._problem import Problem, carries_derivative
from implicit._results import SolveInfo
from implicit.adjoint.problems import LinearProblem, RootProblem
from implicit.adjoint.settings import Given, Settings
from implicit.adjoint.vmap import fold, rows
from implicit.linear import Auto, LinearSolver, Unroll
from implicit.solvers.base import Solver


class ImplicitFunction(torch.autograd.Function):
    """``z* = problem.solve(z0, inputs)`` with implicit derivatives in the inputs."""

    @staticmethod
    def forward(problem, z0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(problem, Solved):
            return problem.z
        # autograd.Function turns forward-mode AD off here; a user function that opens
        # its own dual level must see it on, as it does outside the solve.
        with _torch.forward_grad_as_outside():
            z = problem.solve(z0, inputs)
        # A solve that took no step returns its start: never hand the caller a view of z0.
        return z.clone() if z is z0 else z

    @staticmethod
    def setup_context(ctx, inputs, output):
        problem, _z0, *tensors = inputs
        ctx.problem = problem.problem if isinstance(problem, Solved) else problem
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
        # Nothing differentiates a first-order backward (grad mode is off in here) and,
        # outside transforms, nothing wraps its tensors: then g's linearisation can be
        # one recorded graph, and the adjoint solve needs no node of its own.
        recorded = not torch.is_grad_enabled() and not _torch.transforms_active(v, z, *inputs)
        linearization = problem.linearize(z, inputs, needed, recorded)
        # What the forward solver knew of ∂g/∂z goes to the systems of its derivatives
        # (not to those of a linear system's: second order).
        hint = problem.hint if isinstance(problem, RootProblem) else None
        jacobian = linearization.jacobian if recorded else None
        adjoint = LinearProblem(problem, True, jacobian=jacobian, hint=hint)
        if recorded:
            w = ImplicitFunction.forward(adjoint, torch.zeros_like(v), v, z, *inputs)
        else:
            w = implicit_solve(adjoint, torch.zeros_like(v), v, z, *inputs)
        for i, grad in zip(needed, linearization.pullback(-w)):
            grads[i] = grad
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx, _problem_tangent, _z0_tangent, *tangents):
        z, *inputs = ctx.saved_tensors
        if _torch.nested_forward_mode(z):
            raise RuntimeError(
                "forward-mode AD over forward-mode AD through an implicit solve (torch.func.jvp "
                "over jvp, jacfwd over jacfwd, hessian of a hessian) is not supported: torch "
                "cannot apply forward mode to a custom jvp rule and would silently drop the "
                "second-order term. Put reverse mode on one side instead: "
                "torch.func.hessian (jacfwd over jacrev), jacrev over jacfwd, or jacrev over "
                "jacrev."
            )
        moving = [i for i, tangent in enumerate(tangents) if tangent is not None]
        if not moving:
            return torch.zeros_like(z)
        problem = ctx.problem
        # dz = −(∂g/∂z)⁻¹ (∂g/∂θ) dθ: the tangent system, solved as a linear problem.
        linearization = problem.linearize(z, inputs, moving, False)
        pushed = linearization.push([tangents[i] for i in moving])
        hint = problem.hint if isinstance(problem, RootProblem) else None
        tangent = LinearProblem(problem, False, hint=hint)
        return implicit_solve(tangent, torch.zeros_like(pushed), -pushed, z, *inputs)

    @staticmethod
    def vmap(info, in_dims, problem, z0, *inputs):
        # The vmapped slices become more rows of one problem: one solve for all of them.
        size = info.batch_size
        z0_dim, *input_dims = in_dims[1:]
        z0 = z0 if z0_dim is None else z0.movedim(z0_dim, 0)
        inputs = [t if d is None else t.movedim(d, 0) for t, d in zip(inputs, input_dims)]
        dims = [None if d is None else 0 for d in input_dims]
        folded = fold(problem, size, dims, inputs)
        if folded is None:
            # No one problem covers the slices: one solve per slice.
            slices = [
                implicit_solve(
                    problem,
                    *(t if d is None else t[index] for t, d in zip((z0, *inputs), (z0_dim, *dims))),
                    vmapped=True,
                )
                for index in range(size)
            ]
            return torch.stack(slices), 0
        folded_problem, folded_inputs = folded
        z = implicit_solve(folded_problem, rows(z0, z0_dim, size), *folded_inputs, vmapped=True)
        return z.reshape(size, -1, z.shape[-1]), 0


@dataclasses.dataclass(frozen=True, eq=False)
class Solved:
    """A problem already solved before ``ImplicitFunction.apply`` (see
    :func:`implicit_solve`): the problem and its solution ``z``."""

    problem: Any
    z: torch.Tensor


def implicit_solve(
    problem, z0: torch.Tensor, *inputs: torch.Tensor, vmapped: bool = False
) -> torch.Tensor:
    """``ImplicitFunction.apply(problem, z0, *inputs)``: ``problem``'s solution,
    differentiable in ``inputs``.

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
            z = problem.solve(z0, inputs)
            problem = Solved(problem, z.clone() if z is z0 else z)
    return _torch.apply(ImplicitFunction, problem, z0, *inputs, inherit=vmapped)


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

    The solve runs inside :class:`~implicit.adjoint.function.ImplicitFunction` only
    where a derivative may be asked for: grad mode on, a dual level open, or a
    ``torch.func`` transform active, and an input that carries a derivative.
    """
    z0 = problem.pack(problem.initial).detach()  # z0 gets no gradient, in every mode
    report_shape = (problem.batch_size,) if problem.batched else ()
    if isinstance(backward, Unroll):
        from implicit.adjoint.unroll import unrolled  # (which imports this module)

        return unrolled(problem, solver, z0, tol, max_iter, on_failure, report_shape, callback)
    if isinstance(backward, Auto) and problem.n <= backward.max_dense:
        backward = backward.dense  # Auto's choice at this size, made once per call
    settings = Settings(
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
    root = RootProblem(problem, solver, settings, None if transforming else r0, report_shape)
    # Under a torch.func transform the solve always runs inside the Function: its vmap
    # rule also serves a vmapped z0 when nothing else carries a derivative.
    differentiable = transforming or (
        derivatives_possible and any(carries_derivative(t) for t in problem.inputs)
    )
    if differentiable:
        z = implicit_solve(root, z0, *problem.inputs)
    else:
        with torch.no_grad():
            z = root.solve(z0, problem.inputs)
            z = z.clone() if z is z0 else z  # (as the Function's forward)
    if r0 is not None:
        root.info.f_evals += 1  # capture discovery's evaluation of g at z0
    # Another point may read other tensors only on another branch: where g read no value.
    if derivatives_possible and root.info.iterations > 0 and problem.reads_values:
        z = _recaptured(root, z)
    return z, root.info


def _recaptured(root: RootProblem, z: torch.Tensor) -> torch.Tensor:
    """``z``, wired also to the tensors that ``g`` reads at the solution but did not
    read at ``z0`` (a branch taken only near the solution), which would otherwise get
    no derivative. Only for a ``g`` that handed a tensor's values to Python at ``z0``
    (``Problem.reads_values``): without a branch on values every point reads the same
    tensors.

    Costs one evaluation of ``g`` at ``z``, counted in ``f_evals``. The solution does
    not change (``g`` read those tensors while it was solved): the solved problem is
    wired again, with every captured tensor as an input, by a solve that takes no step
    and keeps the forward's report (:class:`~implicit.adjoint.problems.Given`).
    """
    problem = root.problem
    added = problem.rediscover(z)
    root.info.f_evals += 1
    if not added:
        return z
    again = RootProblem(problem, Given(root.info), root.settings, None, root.report_shape)
    z = implicit_solve(again, z.detach(), *problem.inputs)
    # The same problem at the same solution: what its solve learned of ∂g/∂z holds.
    again.hint, again.positive_definite = root.hint, root.positive_definite
    return z
