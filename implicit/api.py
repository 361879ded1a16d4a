"""The front doors: every one reduces to a root problem for :func:`implicit._core.solve`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from implicit import _core, linear, solvers
from implicit._checks import check_max_iter, check_on_failure, check_tol
from implicit._problem import Problem, State
from implicit._results import SolveInfo

Backward = str | linear.LinearSolver | linear.Unroll


def _run(
    problem: Problem,
    solver: str | solvers.Solver,
    backward: Backward,
    tol: float,
    max_iter: int,
    on_failure: str,
    return_info: bool,
    solver_options: dict[str, Any],
) -> State | tuple[State, SolveInfo]:
    check_tol(tol)
    check_max_iter(max_iter)
    check_on_failure(on_failure)
    method = solvers.resolve(solver, solver_options)
    mode = linear.resolve(backward)
    z, info = _core.solve(problem, method, mode, tol=tol, max_iter=max_iter, on_failure=on_failure)
    out = problem.unpack(z)
    return (out, info) if return_info else out


def fixed_point(
    f: Callable[..., Any],
    z0: State,
    *args: Any,
    solver: str | solvers.Solver = "anderson",
    backward: Backward = "auto",
    tol: float = 1e-6,
    max_iter: int = 100,
    batched: bool = False,
    on_failure: str = "warn",
    return_info: bool = False,
    **solver_options: Any,
) -> State | tuple[State, SolveInfo]:
    """Find ``z`` with ``z = f(z, *args)``, differentiably.

    The forward solve records no graph; gradients with respect to ``args``, and to
    every tensor ``f`` captures (closure variables, module parameters), come from the
    implicit function theorem.

    Args:
        f: the map; ``f(z, *args)`` returns a tensor (or tuple) shaped like ``z``.
        z0: initial guess, a tensor or a tuple of tensors. Receives no gradient.
        *args: extra arguments of ``f``; tensors among them receive gradients.
        solver: a name from ``implicit.solvers.NAMES`` or a
            :class:`~implicit.solvers.Solver` instance.
        backward: a name from ``implicit.linear.NAMES`` or an instance from
            :mod:`implicit.linear`.
        tol: stop when ``‖f(z) − z‖₂ ≤ tol · (1 + s)`` for each problem, with the scale
            ``s = max(‖z0‖₂, ‖f(z0)‖₂)`` fixed at the initial guess.
        max_iter: the iteration cap.
        batched: dim 0 of ``z`` indexes independent problems.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when a solve (forward or
            backward) does not converge.
        return_info: also return the :class:`~implicit.SolveInfo`.
        **solver_options: options of the named solver's constructor.

    Returns:
        ``z``, or ``(z, info)`` with ``return_info=True``.

    Example:
        >>> W = 0.5 * torch.eye(2)
        >>> fixed_point(lambda z, x: torch.tanh(W @ z + x), torch.zeros(2), torch.ones(2))
        tensor([0.9...
    """
    problem = Problem(f, z0, args, batched=batched, form="fixed_point")
    return _run(problem, solver, backward, tol, max_iter, on_failure, return_info, solver_options)


def root_solve(
    g: Callable[..., Any],
    z0: State,
    *args: Any,
    solver: str | solvers.Solver = "newton",
    backward: Backward = "auto",
    tol: float = 1e-6,
    max_iter: int = 50,
    batched: bool = False,
    on_failure: str = "warn",
    return_info: bool = False,
    **solver_options: Any,
) -> State | tuple[State, SolveInfo]:
    """Find ``z`` with ``g(z, *args) = 0``, differentiably.

    Args:
        g: the residual; ``g(z, *args)`` returns a tensor (or tuple) shaped like ``z``.
        z0: initial guess, a tensor or a tuple of tensors. Receives no gradient.
        *args: extra arguments of ``g``; tensors among them receive gradients.
        solver: a name from ``implicit.solvers.NAMES`` or a solver instance.
        backward: a name from ``implicit.linear.NAMES`` or an instance.
        tol: stop when ``‖g(z)‖₂ ≤ tol`` for each problem (absolute).
        max_iter: the iteration cap.
        batched: dim 0 of ``z`` indexes independent problems.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
        return_info: also return the :class:`~implicit.SolveInfo`.
        **solver_options: options of the named solver's constructor.

    Returns:
        ``z``, or ``(z, info)`` with ``return_info=True``.
    """
    problem = Problem(g, z0, args, batched=batched, form="root")
    return _run(problem, solver, backward, tol, max_iter, on_failure, return_info, solver_options)


__all__ = ["fixed_point", "root_solve"]
