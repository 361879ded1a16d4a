"""The inverse front door: ``invert``, ``f(z) = y`` solved for ``z``, by a solver or by a
black box's answer (``inverse=``), reduced to a root problem like every other front door.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit import _aux, _blackbox, solvers
from implicit._problem import Problem, State
from implicit._progress import Callback, check_callback
from implicit._results import check_states
from implicit._tolerance import Tol
from implicit._torch import eager
from implicit.api import Backward, run


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
    problem as many equations as unknowns. Problem ``b`` stops when ``‖f(z) − y‖₂ ≤
    tol_b · (1 + s_b)`` with ``s = ‖y_b‖₂`` (``tol_mode="relative"``, the default) or
    ``s = 0`` (``"absolute"``). The other keyword arguments are [the options every
    front door takes][front-door-options]; the solver defaults to
    [`Newton`][implicit.solvers.Newton].

    Args:
        f: the forward function (with ``has_aux=True``, returning ``(f(z), aux)``).
        y: the target, a tensor (real or complex, as ``f(z)``). Receives gradients.
        *args: extra arguments of ``f`` (and of ``inverse``); tensors among them
            receive gradients.
        inverse: a black box ``inverse(y, *args)`` returning ``z`` (a tensor or a numpy
            array, computed by any means: numpy, scipy, C, no autograd). It replaces the
            iterative solver (``solver``, its options and ``callback`` do not apply, nor
            ``backward="unroll"``): its answer is converted to ``y``'s dtype and
            device, checked (shape, finite values, residual within ``tol``, else
            ``on_failure``) and differentiated by the implicit function theorem like
            any solver's.
        z0: initial guess (no gradient). Defaults to ``y``, which suits every ``f`` whose
            input has the shape of its output. When ``f`` takes ``z`` of another shape,
            pass ``z0``: otherwise ``f`` is called with a ``y``-shaped ``z`` and the error
            (``f``'s own, or ours naming ``z0``) says so. With ``inverse=`` there is no
            guess to make: ``z0`` only fixes the shape the answer must have.

    Returns:
        ``z``, then ``aux`` with ``has_aux=True``, then the
        [`SolveInfo`][implicit.SolveInfo] with ``return_info=True``.

    Example:
        >>> y = torch.tensor([0.1, 0.5], requires_grad=True)
        >>> implicit.invert(torch.sin, y)  # Newton, from z0 = y
        tensor([0.1002, 0.5236], grad_fn=<...>)
        >>> z = implicit.invert(torch.sin, y, inverse=lambda y: np.arcsin(y.numpy()))
        >>> z.sum().backward()
        >>> y.grad  # 1 / sqrt(1 − y²)
        tensor([1.0050, 1.1547])
    """
    check_states([y], ["y"], batched, "y")
    f, aux = _aux.split(f, "f") if has_aux else (f, None)
    options = {"tol": tol, "max_iter": max_iter, "on_failure": on_failure}
    options.update(return_info=return_info, aux=aux, args=args)
    if inverse is None:
        start = y if z0 is None else z0
        problem = Problem(f, start, (y, *args), batched=batched, form="inverse", tol_mode=tol_mode)
        return run(
            problem, solver, backward, callback=callback, solver_options=solver_options, **options
        )
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
        shapes=[_blackbox.shape_of(part, "z0") for part in parts],
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
    return run(problem, _blackbox.CheckAnswer(who), _blackbox.no_unroll(backward, who), **options)


__all__ = ["invert"]
