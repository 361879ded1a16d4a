"""The front doors: every one reduces to a root problem for the differentiable solve
(:func:`implicit.adjoint.solve.solve`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from implicit import _aux, _blackbox, _tolerance, linear, solvers
from implicit._checks import check_max_iter, check_on_failure, check_storage
from implicit._compile import eager
from implicit._problem import Problem, State
from implicit._progress import Callback, check_callback
from implicit._results import SolveInfo
from implicit._tolerance import Tol
from implicit.adjoint.solve import solve
from implicit.linear.diagonal import DiagonalFirst, resolution
from implicit.linear.operator import Jacobian

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
    backward_x0: torch.Tensor | None = None,
    callback: Callback | None = None,
) -> State | tuple[State, SolveInfo]:
    _tolerance.check_tol(tol)
    check_max_iter(max_iter)
    check_on_failure(on_failure)
    check_callback(callback)
    method = solvers.resolve(solver, solver_options)
    mode = linear.resolve(backward)
    # Per problem where a tensor; a few units of rounding at least in half precision.
    tol = _tolerance.per_problem(tol, problem.batch_size, problem.dtype, problem.device)
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
    out = problem.unpack(z)
    return (out, info) if return_info else out


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
    implicit function theorem.

    Args:
        f: the map; ``f(z, *args)`` returns a state of ``z``'s structure.
        z0: initial guess: a tensor or a tree (nested tuples, lists, dicts) of
            tensors. Receives no gradient.
        *args: extra arguments of ``f``; tensors among them receive gradients.
        solver: a name from ``implicit.solvers.NAMES`` or a
            [`Solver`][implicit.solvers.Solver] instance.
        backward: a name from ``implicit.linear.NAMES`` or an instance from
            [`implicit.linear`][implicit.linear].
        tol: the stopping tolerance, a number or a tensor of one per problem: problem
            ``b`` stops when ``‖f(z) − z‖₂ ≤ tol_b · (1 + s_b)``.
        tol_mode: ``"relative"`` (default): ``s = max(‖z0‖₂, ‖f(z0)‖₂)``, fixed at the
            initial guess; ``"absolute"``: ``s = 0``.
        max_iter: the iteration cap.
        batched: dim 0 of ``z`` indexes independent problems.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when a solve (forward or
            backward) does not converge.
        return_info: also return the [`SolveInfo`][implicit.SolveInfo].
        callback: ``callback(iteration, residual, z)``, called after each iteration
            with the residual norms per problem and a copy of the iterate (see
            [the options every front door takes][front-door-options]).
        has_aux: ``f`` returns ``(z_next, aux)``; the solve sees ``z_next`` and ``aux``
            is returned at the solution, ``f(z*, *args)[1]``, differentiable as a
            function of ``(z*, args)`` (``z*`` by the implicit function theorem).
        **solver_options: options of the named solver's constructor.

    Returns:
        ``z``, or ``(z, info)`` with ``return_info=True``; ``(z, aux)`` or
        ``(z, aux, info)`` with ``has_aux=True``.

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
    f, aux = _aux.split(f, has_aux, "f")
    problem = Problem(f, z0, args, batched=batched, form="fixed_point", tol_mode=tol_mode)
    result = _run(
        problem,
        solver,
        backward,
        tol,
        max_iter,
        on_failure,
        return_info,
        solver_options,
        callback=callback,
    )
    return _aux.attach(result, aux, args, return_info)


@eager
def warm_fixed_point(
    f: Callable[..., Any],
    z0: State,
    *args: Any,
    backward_x0: torch.Tensor | None,
    batched: bool,
    solver: str | solvers.Solver,
    backward: Backward,
    tol: Tol,
    tol_mode: str,
    max_iter: int,
    on_failure: str,
    return_info: bool,
    callback: Callback | None,
) -> State | tuple[State, SolveInfo]:
    """:func:`fixed_point` whose backward starts its adjoint solve from ``backward_x0``
    where that fits: a layer's warm start, an earlier ``BackwardInfo.solution``."""
    problem = Problem(f, z0, args, batched=batched, form="fixed_point", tol_mode=tol_mode)
    return _run(
        problem,
        solver,
        backward,
        tol,
        max_iter,
        on_failure,
        return_info,
        {},
        backward_x0,
        callback=callback,
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

    Args:
        g: the residual; ``g(z, *args)`` returns a state of ``z``'s structure.
        z0: initial guess: a tensor or a tree (nested tuples, lists, dicts) of
            tensors. Receives no gradient.
        *args: extra arguments of ``g``; tensors among them receive gradients.
        solver: a name from ``implicit.solvers.NAMES`` or ``BRACKETING`` (with
            ``lower=`` and ``upper=``), or a solver instance.
        backward: a name from ``implicit.linear.NAMES`` or an instance.
        tol: the stopping tolerance, a number or a tensor of one per problem: problem
            ``b`` stops when ``‖g(z)_b‖₂ ≤ tol_b · (1 + s_b)``.
        tol_mode: ``"absolute"`` (default): ``s = 0``; ``"relative"``: ``s = ‖g(z0)_b‖₂``,
            the residual at the initial guess (for a bracketing solver, at ``lower``).
        max_iter: the iteration cap.
        batched: dim 0 of ``z`` indexes independent problems.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
        return_info: also return the [`SolveInfo`][implicit.SolveInfo].
        callback: ``callback(iteration, residual, z)``, called after each iteration
            with the residual norms per problem and a copy of the iterate (see
            [the options every front door takes][front-door-options]).
        has_aux: ``g`` returns ``(residual, aux)``; ``aux`` at the solution is
            returned after ``z`` (as for [`fixed_point`][implicit.fixed_point]).
        **solver_options: options of the named solver's constructor.

    Returns:
        ``z``, or ``(z, info)`` with ``return_info=True``; ``(z, aux)`` or
        ``(z, aux, info)`` with ``has_aux=True``.

    Example:
        >>> a = torch.tensor([2.0, 3.0], requires_grad=True)
        >>> z = implicit.root_solve(lambda z, a: z**2 - a, torch.ones(2), a)  # z = √a
        >>> z.sum().backward()
        >>> a.grad  # dz/da = 1 / (2√a)
        tensor([0.3536, 0.2887])
    """
    g, aux = _aux.split(g, has_aux, "g")
    problem = Problem(g, z0, args, batched=batched, form="root", tol_mode=tol_mode)
    result = _run(
        problem,
        solver,
        backward,
        tol,
        max_iter,
        on_failure,
        return_info,
        solver_options,
        callback=callback,
    )
    return _aux.attach(result, aux, args, return_info)


@eager
def invert(
    f: Callable[..., Any],
    y: torch.Tensor,
    *args: Any,
    inverse: Callable[..., Any] | None = None,
    z0: State | None = None,
    solver: str | solvers.Solver = "newton",
    backward: Backward = "auto",
    tol: Tol = 1e-6,
    tol_mode: str = "relative",
    max_iter: int = 50,
    batched: bool = False,
    on_failure: str = "warn",
    return_info: bool = False,
    callback: Callback | None = None,
    has_aux: bool = False,
    **solver_options: Any,
) -> Any:
    """Find ``z`` with ``f(z, *args) = y``, differentiably in ``y``, ``args`` and captures.

    The residual is ``f(z, *args) − y``; ``f(z)`` must have the shape of ``y`` and each
    problem as many equations as unknowns.

    Args:
        f: the forward function.
        y: the target, a tensor. Receives gradients.
        *args: extra arguments of ``f`` (and of ``inverse``); tensors among them
            receive gradients.
        inverse: a black box ``inverse(y, *args)`` returning ``z`` (a tensor or a numpy
            array, computed by any means: numpy, scipy, C, no autograd). It replaces the
            iterative solver: its answer is converted to ``y``'s dtype and device,
            checked (shape, finite values, residual within ``tol``) and differentiated
            by the implicit function theorem like any solver's.
        z0: initial guess (no gradient). Defaults to ``y``, which suits every ``f`` whose
            input has the shape of its output. When ``f`` takes ``z`` of another shape,
            pass ``z0``: otherwise ``f`` is called with a ``y``-shaped ``z`` and the error
            (``f``'s own, or ours naming ``z0``) says so. With ``inverse=`` there is no
            guess to make: ``z0`` only fixes the shape the answer must have.
        solver: a name from ``implicit.solvers.NAMES`` or a solver instance; not used
            with ``inverse=``.
        backward: a name from ``implicit.linear.NAMES`` or an instance (``"unroll"``
            has no iterations to unroll with ``inverse=``).
        tol: the stopping tolerance, a number or a tensor of one per problem: problem
            ``b`` stops when ``‖f(z) − y‖₂ ≤ tol_b · (1 + s_b)``; with ``inverse=``, the
            test the black box's answer must pass.
        tol_mode: ``"relative"`` (default): ``s = ‖y_b‖₂``; ``"absolute"``: ``s = 0``.
        max_iter: the iteration cap.
        batched: dim 0 of ``y`` and ``z`` indexes independent problems.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when a solve (forward or
            backward) does not converge, or when the black box's answer is not a root.
        return_info: also return the [`SolveInfo`][implicit.SolveInfo].
        callback: ``callback(iteration, residual, z)``, called after each iteration
            with the residual norms per problem and a copy of the iterate (see
            [the options every front door takes][front-door-options]); never called
            with ``inverse=``, whose black box takes no iteration here.
        has_aux: ``f`` returns ``(f(z), aux)``; ``aux`` at the solution is returned
            after ``z`` (as for [`fixed_point`][implicit.fixed_point]).
        **solver_options: options of the named solver's constructor.

    Returns:
        ``z``, or ``(z, info)`` with ``return_info=True``; ``(z, aux)`` or
        ``(z, aux, info)`` with ``has_aux=True``.

    Example:
        >>> y = torch.tensor([0.1, 0.5], requires_grad=True)
        >>> implicit.invert(torch.sin, y)  # Newton, from z0 = y
        tensor([0.1002, 0.5236], grad_fn=<...>)
        >>> z = implicit.invert(torch.sin, y, inverse=lambda y: np.arcsin(y.numpy()))
        >>> z.sum().backward()
        >>> y.grad  # 1 / sqrt(1 − y²)
        tensor([1.0050, 1.1547])
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    check_storage(y, "y")
    if not y.is_floating_point():
        raise TypeError(f"y must be a floating-point tensor, got {y.dtype}")
    f, aux = _aux.split(f, has_aux, "f")
    if inverse is None:
        start = y if z0 is None else z0
        problem = Problem(f, start, (y, *args), batched=batched, form="inverse", tol_mode=tol_mode)
        result = _run(
            problem,
            solver,
            backward,
            tol,
            max_iter,
            on_failure,
            return_info,
            solver_options,
            callback=callback,
        )
        return _aux.attach(result, aux, args, return_info)
    if not callable(inverse):
        raise TypeError(f"inverse must be callable, got {type(inverse).__name__}")
    if solver != "newton" or solver_options:
        raise ValueError(
            "solver and solver options do not apply with inverse=: the black box replaces "
            "the solver"
        )
    who = _blackbox.describe(inverse, "inverse")
    template = y if z0 is None else z0
    parts = tuple(template) if isinstance(template, (tuple, list)) else (template,)
    answer = _blackbox.call(
        inverse,
        (y, *args),
        who=who,
        dtype=y.dtype,
        device=y.device,
        shapes=[_shape_of(part, "z0") for part in parts],
    )
    problem = Problem(
        f,
        answer,
        (y, *args),
        batched=batched,
        form="inverse",
        initial=f"the answer of {who}",
        tol_mode=tol_mode,
    )
    check_callback(callback)  # never called: the black box takes no iteration
    result = _run(
        problem,
        _blackbox.CheckAnswer(who),
        _no_unroll(backward, who),
        tol,
        max_iter,
        on_failure,
        return_info,
        {},
    )
    return _aux.attach(result, aux, args, return_info)


def implicit_inverse_layer(
    data: torch.Tensor, g: Callable[..., Any], forward_func: Callable[..., Any]
) -> torch.Tensor:
    """``z`` with ``forward_func(z) = data``, computed by the black box ``g(data)``.

    For a function whose inverse you can compute but not differentiate: ``g`` is any
    inverse of ``forward_func`` computed without autograd (e.g. ``numpy.arcsin`` for
    ``torch.sin``); the result is differentiable in ``data`` through the implicit
    function theorem, ``dz/dy = (∂f/∂z)⁻¹``. It is
    ``invert(forward_func, data, inverse=g)`` with derivatives accurate to the dtype:
    its backward solves to a relative residual of ``8·eps`` (``1.8e-15`` in float64),
    for an elementwise ``forward_func`` (a diagonal Jacobian) by one division, checked
    by one more product, and otherwise with ``backward="auto"`` (a ``ConvergenceWarning``
    says when that tolerance is out of reach).

    Example:
        >>> data = torch.tensor([0.1, 0.5], requires_grad=True)
        >>> y = implicit.implicit_inverse_layer(data, lambda y: np.arcsin(y.numpy()), torch.sin)
        >>> y.sum().backward()
        >>> data.grad  # 1 / sqrt(1 − data²)
        tensor([1.0050, 1.1547])
    """
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    accurate = DiagonalFirst(tol=resolution(data.dtype))
    return invert(forward_func, data, inverse=g, backward=accurate)


def custom_root(
    g: Callable[..., Any],
    backward: Backward = "auto",
    batched: bool = False,
    tol: Tol = 1e-6,
    max_iter: int = 100,
    on_failure: str = "warn",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate any solver of ``g(z, *args) = 0`` to make its answer differentiable.

    The decorated function ``solve(*args)`` may be anything (scipy, numpy, a C
    library): it receives its arguments detached (``A.numpy()`` works) and returns
    ``z`` as a tensor or a numpy array (or a tuple of them). The answer is converted to
    the dtype and device of the first floating-point tensor argument (its own when
    there is none), checked (finite; ``g(z, *args)`` shaped like ``z``; ``‖g(z)‖₂ ≤
    tol``, else ``on_failure``), and differentiated by the implicit function theorem
    with respect to every tensor argument and every tensor ``g`` captures. The latest
    call's [`SolveInfo`][implicit.SolveInfo] is kept in ``solve.last_info``. There is no
    ``callback``: the iterations, if any, are the decorated solver's own (give it a
    callback of its own).

    Args:
        g: the optimality condition; ``g(z, *args)`` returns a tensor shaped like ``z``.
        backward: a name from ``implicit.linear.NAMES`` or an instance (not
            ``"unroll"``: a black box has no iterations to unroll).
        batched: dim 0 of ``z`` indexes independent problems.
        tol: the residual test of the answer, ``‖g(z)_b‖₂ ≤ tol_b`` (absolute; a number
            or a tensor of one per problem), and the backward solve's tolerance.
        max_iter: the backward solve's iteration cap.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when the answer is not a
            root or the backward solve does not converge.

    Returns:
        A decorator. The decorated function takes positional arguments only (they are
        also ``g``'s); bind options with ``functools.partial``.

    Example:
        >>> import scipy.linalg
        >>> @implicit.custom_root(lambda z, A, b: A @ z - b)
        ... def solve(A, b):
        ...     return scipy.linalg.solve(A.numpy(), b.numpy())
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], requires_grad=True)
        >>> b = torch.tensor([1.0, 0.0], requires_grad=True)
        >>> z = solve(A, b)  # differentiable in A and b
        >>> z.sum().backward()
        >>> torch.allclose(b.grad, torch.linalg.solve(A.T, torch.ones(2)))
        True
    """
    if not callable(g):
        raise TypeError(f"g must be callable, got {type(g).__name__}")
    _tolerance.check_tol(tol)
    check_max_iter(max_iter)
    check_on_failure(on_failure)
    mode = linear.resolve(backward)

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(solver):
            raise TypeError(f"custom_root decorates a function, got {type(solver).__name__}")
        who = _blackbox.describe(solver, "custom_root solver")
        _no_unroll(mode, who)

        @eager
        @functools.wraps(solver)
        def solve(*args: Any, **kwargs: Any) -> State:
            if kwargs:
                raise TypeError(
                    f"{who} takes positional arguments only (they are also g's), got "
                    f"{sorted(kwargs)}; bind options with functools.partial"
                )
            floating = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            answer = _blackbox.call(
                solver,
                args,
                who=who,
                dtype=floating[0].dtype if floating else None,
                device=tensors[0].device if tensors else None,
            )
            problem = Problem(
                _blackbox.evaluated_at_answer(g, who),
                answer,
                args,
                batched=batched,
                form="root",
                initial=f"the answer of {who}",
            )
            z, info = _run(
                problem, _blackbox.CheckAnswer(who), mode, tol, max_iter, on_failure, True, {}
            )
            solve.last_info = info
            return z

        solve.last_info = None
        return solve

    return decorator


def batch_jacobian(func: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians of a batch-first function: ``(B, out, in)``.

    ``func`` maps ``x`` of shape ``(B, *in)`` to ``(B, *out)`` with sample ``b`` of the
    output depending only on sample ``b`` of the input (no batch statistics, e.g.
    batch norm in training mode). Then the full ``(B·out) × (B·in)`` Jacobian is block
    diagonal, and its blocks come from ``out`` vector-Jacobian products (vectorised
    with ``vmap``) whose cotangent is the same unit vector in every sample.

    Args:
        func: the batch-first function.
        x: the point, shape ``(B, *in)``.

    Returns:
        ``J`` of shape ``(B, prod(out), prod(in))`` with
        ``J[b, i, j] = ∂func(x)[b].flatten()[i] / ∂x[b].flatten()[j]``. It is
        differentiable (``create_graph`` is implied): second derivatives flow through.

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``func`` returns no tensor.
        ValueError: ``x`` has no batch dimension, or ``func``'s output batch size
            differs from ``x``'s.
    """
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {_describe_value(x)}")
    if x.dim() == 0:
        raise ValueError("x is a scalar: batch_jacobian needs a batch dimension first")
    batch = x.shape[0]

    def flat_func(flat: torch.Tensor) -> torch.Tensor:
        out = func(flat.reshape(x.shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"func must return a tensor, got {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != batch:
            raise ValueError(
                f"func returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}: "
                f"its output must keep the batch size {batch} in dim 0"
            )
        return out.reshape(batch, -1)

    return Jacobian(flat_func, x.reshape(batch, -1)).dense()


def _shape_of(value: Any, name: str) -> torch.Size:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value.shape


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _no_unroll(backward: Backward, who: str) -> Backward:
    """A black box has no iterations for ``backward="unroll"`` to differentiate."""
    if isinstance(backward, linear.Unroll) or backward == "unroll":
        raise ValueError(
            f"backward='unroll' differentiates through a solver's iterations, but {who} is "
            f"a black box: use an implicit backward ('auto', 'dense', 'gmres', ...)"
        )
    return backward


__all__ = [
    "batch_jacobian",
    "custom_root",
    "fixed_point",
    "implicit_inverse_layer",
    "invert",
    "root_solve",
]
