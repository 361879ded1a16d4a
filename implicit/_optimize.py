"""The optimisation front doors: ``minimize`` and ``least_squares``.

Both reduce to the root problem of their optimality condition
(:class:`~implicit._optimization.OptimizationProblem`) and call the one differentiable
core, like every other front door.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit import _aux, _bounds, linear, solvers
from implicit._batch import is_half
from implicit._optimization import OptimizationProblem
from implicit._problem import State
from implicit._progress import Callback
from implicit._tolerance import Tol
from implicit._torch import eager
from implicit.api import run

Backward = str | linear.LinearSolver | linear.Unroll
Bounds = tuple[Any, Any] | None


@eager
def minimize(
    fun: Callable[..., torch.Tensor],
    z0: State,
    *args: Any,
    solver: str | solvers.Solver = "lbfgs",
    backward: Backward = "auto",
    bounds: Bounds = None,
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
    """Find a local minimiser ``z*`` of ``fun(z, *args)``, differentiably.

    The derivative is the implicit function theorem on the optimality condition
    ``∇_z fun(z*, θ) = 0``: ``dz*/dθ = −(∇²_z fun)⁻¹ ∂_θ∇_z fun``, with exact Hessian
    products (``torch.func``), so gradients, double backward (Hessians of a loss of
    ``z*``, bilevel hypergradients) and forward mode work as for
    [`root_solve`][implicit.root_solve]. The forward solve records no graph.

    Args:
        fun: the objective. ``fun(z, *args)`` returns a real scalar tensor (``z`` may
            be complex); with ``batched=True`` a ``(B,)`` tensor whose entry ``b``
            depends only on problem ``b`` (row ``b`` of every leaf of ``z``).
        z0: initial guess: a tensor or a tree (nested tuples, lists, dicts) of
            tensors, real or complex ([complex numbers][complex-states]). Receives no
            gradient. Clipped into the bounds first.
        *args: extra arguments of ``fun``; tensors among them receive gradients (so
            do tensors ``fun`` captures).
        solver: ``"lbfgs"`` (default), ``"newton"``, ``"scipy"`` (with ``method=`` any
            ``scipy.optimize.minimize`` method), or a
            [`Minimizer`][implicit.solvers.Minimizer] instance (see
            [`MINIMIZERS`][implicit.solvers.MINIMIZERS]).
        backward: a name from ``implicit.linear.NAMES`` or an instance. The Hessian
            is symmetric: ``"cg"`` suits a positive-definite one.
        bounds: ``(lower, upper)``, each ``None``, a number, or a tensor broadcastable
            to ``z0`` (for a tree ``z0``, a tree of its structure); ``±inf`` for no
            bound. The solution then satisfies ``z* = clip(z* − ∇fun(z*), l, u)``: a
            coordinate held at a bound has derivative 0 with respect to ``args`` and 1
            with respect to that bound, which may require grad.
        tol: the stopping tolerance, a number or a tensor of one per problem: problem
            ``b`` has converged when ``‖g(z)_b‖₂ ≤ tol_b · (1 + s_b)``, with ``g = ∇fun``
            (``z − clip(z − ∇fun, l, u)`` with bounds).
        tol_mode: ``"relative"`` (default): ``s = min(|fun(z0)_b|, |fun(z)_b|)``, with
            ``z0`` clipped into the bounds; ``"absolute"``: ``s = 0``.
        max_iter: the cap on iterations; every evaluation of ``fun`` along a line
            search counts as one.
        batched: dim 0 of ``z`` indexes independent problems.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when a solve (forward or
            backward) does not converge.
        return_info: also return the [`SolveInfo`][implicit.SolveInfo].
        callback: ``callback(iteration, residual, z)``, called after each iteration
            with the norms of ``g`` per problem and a copy of the iterate (see
            [the options every front door takes][front-door-options]); once, at the
            end, for ``solver="scipy"``.
        has_aux: ``fun`` returns ``(objective, aux)``; ``aux`` at the solution is
            returned after ``z`` (see the guide for its gradient).
        **solver_options: options of the named solver's constructor.

    Returns:
        ``z``; ``(z, info)`` with ``return_info``; ``(z, aux)`` or ``(z, aux, info)``
        with ``has_aux``.

    Raises:
        ValueError: ``fun`` does not return one value per problem; bad ``bounds``.

    Example:
        >>> lam = torch.tensor(0.5, requires_grad=True)
        >>> z = implicit.minimize(lambda z, lam: ((z - 1) ** 2).sum() + lam * (z**2).sum(),
        ...                       torch.zeros(2), lam)  # z* = 1 / (1 + λ)
        >>> z
        tensor([0.6667, 0.6667], grad_fn=<...>)
        >>> z.sum().backward()
        >>> lam.grad  # d/dλ 2/(1 + λ) = −2/(1 + λ)²
        tensor(-0.8889)
    """
    return _solve(fun, z0, args, locals(), least_squares=False)


@eager
def least_squares(
    residual: Callable[..., torch.Tensor],
    z0: State,
    *args: Any,
    solver: str | solvers.Solver = "levenberg_marquardt",
    backward: Backward = "auto",
    bounds: Bounds = None,
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
    """Minimise ``½‖residual(z, *args)‖²``, differentiably.

    The residual may have more entries than ``z`` (a fit of ``n`` parameters to ``m``
    data). The derivative is the implicit function theorem on
    ``∇_z ½‖r‖² = Jᵀr = 0`` with the **exact** Hessian ``JᵀJ + Σ rᵢ∇²rᵢ`` (by
    products), not its Gauss–Newton part ``JᵀJ``, which is wrong wherever the fit
    leaves residuals. Double backward and forward mode work as for
    [`root_solve`][implicit.root_solve].

    Args:
        residual: ``residual(z, *args)`` returns a tensor of any shape, real or
            complex (``½Σ|rᵢ|²`` is minimised); with ``batched=True`` dim 0 indexes
            the problems.
        z0: initial guess, a tensor or a tree of tensors (no gradient).
        *args: extra arguments of ``residual``; tensors among them receive gradients.
        solver: ``"levenberg_marquardt"`` (default), ``"gauss_newton"``, ``"scipy"``
            (``method=`` ``"trf"``, ``"dogbox"`` or ``"lm"``), a minimisation solver
            (``"lbfgs"``, ``"newton"``), or an instance (see
            [`LEAST_SQUARES`][implicit.solvers.LEAST_SQUARES]).
        backward: a name from ``implicit.linear.NAMES`` or an instance.
        bounds: as for [`minimize`][implicit.minimize].
        tol: the stopping tolerance, a number or a tensor of one per problem: problem
            ``b`` has converged when ``‖g(z)_b‖₂ ≤ tol_b · (1 + s_b)`` with ``g = Jᵀr``
            (projected with bounds, as for ``minimize``).
        tol_mode: ``"relative"`` (default): ``s = ½‖r(z0)_b‖²``; ``"absolute"``:
            ``s = 0``.
        max_iter: the cap on iterations; every evaluation of the residual counts.
        batched: dim 0 of ``z`` and of the residual indexes independent problems.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
        return_info: also return the [`SolveInfo`][implicit.SolveInfo].
        callback: as for [`minimize`][implicit.minimize].
        has_aux: ``residual`` returns ``(r, aux)``; ``aux`` at the solution is
            returned after ``z``.
        **solver_options: options of the named solver's constructor.

    Returns:
        As for [`minimize`][implicit.minimize].

    Example:
        >>> t = torch.linspace(0, 1, 5, dtype=torch.float64)
        >>> y = torch.tensor([1.0, 1.3, 1.6, 2.1, 2.6], dtype=torch.float64, requires_grad=True)
        >>> ab = implicit.least_squares(lambda ab, y: ab[0] * torch.exp(ab[1] * t) - y,
        ...                             torch.ones(2, dtype=torch.float64), y)
        >>> ab.detach()  # scipy.optimize.least_squares: [1.01249789, 0.94899707]
        tensor([1.0125, 0.9490], dtype=torch.float64)
        >>> ab[1].backward()  # how the rate moves with each datum
    """
    return _solve(residual, z0, args, locals(), least_squares=True)


def _solve(
    fun: Callable[..., Any],
    z0: State,
    args: tuple[Any, ...],
    settings: dict[str, Any],
    *,
    least_squares: bool,
) -> Any:
    """The common body of the two front doors; ``settings`` are their keyword arguments."""
    solver, backward, bounds = settings["solver"], settings["backward"], settings["bounds"]
    tol, max_iter, batched = settings["tol"], settings["max_iter"], settings["batched"]
    on_failure, return_info = settings["on_failure"], settings["return_info"]
    callback = settings["callback"]
    name = "residual" if least_squares else "fun"
    fun, aux = _aux.split(fun, name) if settings["has_aux"] else (fun, None)
    z0, packed = _bounds.prepare(bounds, z0, batched)
    problem = OptimizationProblem(
        fun,
        z0,
        args,
        batched=batched,
        least_squares=least_squares,
        bounds=packed,
        tol_mode=settings["tol_mode"],
    )
    names = solvers.LEAST_SQUARES if least_squares else solvers.MINIMIZERS
    front_door = "least_squares" if least_squares else "minimize"
    if is_half(problem.dtype):
        raise TypeError(
            f"{front_door} does not solve {problem.dtype} states (its curvature tests and "
            f"factorisations run in the state's dtype, which LAPACK lacks): cast z0 and the "
            f"inputs to float32"
        )
    method = solvers.resolve(solver, settings["solver_options"], names=names, owner=front_door)
    if not isinstance(method, solvers.Minimizer):
        raise TypeError(
            f"{front_door} needs a minimisation solver (one of {sorted(names)} or an "
            f"implicit.solvers.Minimizer), got {type(method).__name__}: a root solver on the "
            f"gradient may converge to a maximum or a saddle"
        )
    return run(
        problem,
        method,
        backward,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        return_info=return_info,
        callback=callback,
        aux=aux,
        args=args,
    )
