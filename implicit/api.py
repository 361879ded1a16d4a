"""The front doors ``fixed_point`` and ``root_solve``, and :func:`run`, which every front
door calls (``invert`` in :mod:`implicit._invert`, ``minimize`` and ``least_squares`` in
:mod:`implicit._optimize`): each reduces to a root problem for the differentiable solve
(:func:`implicit.adjoint.function.solve`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit import _aux, _tolerance, linear, solvers
from implicit._batch import is_half
from implicit._problem import Problem, State
from implicit._progress import Callback, check_callback
from implicit._results import ON_FAILURE_CHOICES, check_number, check_on_failure
from implicit._tolerance import Tol
from implicit._torch import eager
from implicit.adjoint.function import solve

Backward = str | linear.LinearSolver | linear.Unroll


@eager
def run(
    problem: Problem,
    solver: str | solvers.Solver,
    backward: Backward,
    *,
    tol: Tol,
    max_iter: int,
    on_failure: str,
    return_info: bool,
    callback: Callback | None = None,
    solver_options: dict[str, Any] | None = None,
    aux: Callable[..., Any] | None = None,
    args: tuple[Any, ...] = (),
    backward_x0: torch.Tensor | None = None,
) -> Any:
    """Solve ``problem`` with the options every front door takes, and return what the
    front door returns: ``z``, then ``aux`` (where ``aux`` is given), then the info
    (with ``return_info``).

    The options are documented once ([the options every front door
    takes][front-door-options]) and checked here, once for every front door: ``tol``
    made one per problem where it is a tensor, the solver and the backward resolved to
    their (immutable) instances. ``backward_x0``: the initial guess of the backward's
    adjoint solve (a layer's warm start).
    """
    # The first wrong option raises, naming it. A tolerance tensor's entries are checked
    # with the problem's batch (implicit._tolerance.per_problem).
    if not isinstance(tol, torch.Tensor):
        check_number(tol, "tol", "a positive finite number")
    check_number(max_iter, "max_iter", "an integer >= 1")
    if on_failure not in ON_FAILURE_CHOICES:
        check_on_failure(on_failure)
    if callback is not None:
        check_callback(callback)
    # A name without options is the same immutable instance at every call: looked up once.
    if isinstance(solver, str) and not solver_options:
        method = solvers.registry.named(solver)
    else:
        method = solvers.resolve(solver, solver_options or {})
    mode = (
        linear.registry.named(backward) if isinstance(backward, str) else linear.resolve(backward)
    )
    if problem.complex and isinstance(method, solvers.Bracketing):
        raise ValueError(
            f"solver={method.name!r} brackets a real root, but {problem.initial_name} is "
            f"{problem.dtype}: complex numbers have no order to bracket with lower and upper "
            f"(use solver='newton')"
        )
    if isinstance(tol, torch.Tensor) or is_half(problem.dtype):
        # Per problem where a tensor; a few units of rounding at least in half precision.
        tol = _tolerance.per_problem(tol, problem.batch_size, problem.real_dtype, problem.device)
    z, info = solve(
        problem,
        method,
        mode,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        backward_x0=backward_x0,
        callback=callback,
    )
    z = problem.unpack(z)
    out = (z,) if aux is None else (z, aux(z, *args))
    if return_info:
        out = (*out, info)
    return out[0] if len(out) == 1 else out


@eager
def fixed_point(
    f: Callable[..., Any],
    z0: State,
    *args: Any,
    solver: str | solvers.Solver = "anderson",
    backward: Backward = "auto",
    tol: Tol = 1e-6,
    tol_mode: str = "relative",
    max_iter: int = 100,
    batched: bool = False,
    on_failure: str = "warn",
    return_info: bool = False,
    callback: Callback | None = None,
    has_aux: bool = False,
    **solver_options: Any,
) -> Any:
    """Find ``z`` with ``z = f(z, *args)``, differentiably.

    The forward solve records no graph; gradients with respect to ``args``, and to
    every tensor ``f`` captures (closure variables, module parameters), come from the
    implicit function theorem. Problem ``b`` stops when ``‖f(z) − z‖₂ ≤ tol_b · (1 +
    s_b)``, with ``s = max(‖z0‖₂, ‖f(z0)‖₂)`` fixed at the initial guess
    (``tol_mode="relative"``, the default) or ``s = 0`` (``"absolute"``). The other
    keyword arguments are [the options every front door takes][front-door-options];
    the solver defaults to [`Anderson`][implicit.solvers.Anderson].

    Args:
        f: the map; ``f(z, *args)`` returns a state of ``z``'s structure (with
            ``has_aux=True``, the pair ``(z_next, aux)``: the solve sees ``z_next`` and
            ``aux`` at the solution is returned after ``z``, differentiable as a
            function of ``(z*, args)``).
        z0: initial guess: a tensor or a tree (nested tuples, lists, dicts) of
            tensors, real or complex ([complex numbers][complex-states]).
            Receives no gradient.
        *args: extra arguments of ``f``; tensors among them receive gradients.

    Returns:
        ``z``, then ``aux`` with ``has_aux=True``, then the
        [`SolveInfo`][implicit.SolveInfo] with ``return_info=True``.

    Example:
        >>> W = 0.5 * torch.eye(2)
        >>> x = torch.ones(2, requires_grad=True)
        >>> z = implicit.fixed_point(lambda z, x: torch.tanh(W @ z + x), torch.zeros(2), x)
        >>> z
        tensor([0.8952, 0.8952], grad_fn=<...>)
        >>> z.sum().backward()
        >>> x.grad  # dz/dx = d / (1 − 0.5 d) with d = 1 − z², by the implicit function theorem
        tensor([0.2205, 0.2205])
    """
    f, aux = _aux.split(f, "f") if has_aux else (f, None)
    problem = Problem(f, z0, args, batched=batched, form="fixed_point", tol_mode=tol_mode)
    return run(
        problem,
        solver,
        backward,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        return_info=return_info,
        callback=callback,
        solver_options=solver_options,
        aux=aux,
        args=args,
    )


@eager
def root_solve(
    g: Callable[..., Any],
    z0: State,
    *args: Any,
    solver: str | solvers.Solver = "newton",
    backward: Backward = "auto",
    tol: Tol = 1e-6,
    tol_mode: str = "absolute",
    max_iter: int = 50,
    batched: bool = False,
    on_failure: str = "warn",
    return_info: bool = False,
    callback: Callback | None = None,
    has_aux: bool = False,
    **solver_options: Any,
) -> Any:
    """Find ``z`` with ``g(z, *args) = 0``, differentiably.

    Problem ``b`` stops when ``‖g(z)_b‖₂ ≤ tol_b · (1 + s_b)`` with ``s = 0``
    (``tol_mode="absolute"``, the default) or ``s = ‖g(z0)_b‖₂`` (``"relative"``; for
    a bracketing solver, at ``lower``). The other keyword arguments are [the options
    every front door takes][front-door-options]; the solver defaults to
    [`Newton`][implicit.solvers.Newton], and the bracketing solvers
    (``implicit.solvers.BRACKETING``) take ``lower=`` and ``upper=``.

    Args:
        g: the residual; ``g(z, *args)`` returns a state of ``z``'s structure (with
            ``has_aux=True``, the pair ``(residual, aux)``, as for
            [`fixed_point`][implicit.fixed_point]).
        z0: initial guess: a tensor or a tree (nested tuples, lists, dicts) of
            tensors, real or complex ([complex numbers][complex-states]).
            Receives no gradient.
        *args: extra arguments of ``g``; tensors among them receive gradients.

    Returns:
        ``z``, then ``aux`` with ``has_aux=True``, then the
        [`SolveInfo`][implicit.SolveInfo] with ``return_info=True``.

    Example:
        >>> a = torch.tensor([2.0, 3.0], requires_grad=True)
        >>> z = implicit.root_solve(lambda z, a: z**2 - a, torch.ones(2), a)  # z = √a
        >>> z.sum().backward()
        >>> a.grad  # dz/da = 1 / (2√a)
        tensor([0.3536, 0.2887])
    """
    g, aux = _aux.split(g, "g") if has_aux else (g, None)
    problem = Problem(g, z0, args, batched=batched, form="root", tol_mode=tol_mode)
    return run(
        problem,
        solver,
        backward,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        return_info=return_info,
        callback=callback,
        solver_options=solver_options,
        aux=aux,
        args=args,
    )


__all__ = ["fixed_point", "root_solve"]
