"""Any solver made differentiable: ``custom_root`` and ``implicit_inverse_layer``.

The answer comes from the caller's solver (scipy, numpy, C: no autograd); it is checked
(``implicit/_blackbox.py``) and differentiated by the implicit function theorem like
any solver's, through the same differentiable solve.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from implicit import _blackbox, _tolerance, linear
from implicit._checks import check_max_iter
from implicit._invert import invert
from implicit._problem import Problem, State
from implicit._results import check_on_failure
from implicit._tolerance import Tol
from implicit._torch import eager
from implicit.api import Backward, run
from implicit.linear.diagonal import DiagonalFirst, resolution


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
    the precision and device of the first floating-point or complex tensor argument
    (its own when there is none; a complex answer stays complex), checked (finite;
    ``g(z, *args)`` shaped like ``z``; ``‖g(z)‖₂ ≤ tol``, else ``on_failure``), and
    differentiated by the implicit function theorem
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
        _blackbox.no_unroll(mode, who)

        @eager
        @functools.wraps(solver)
        def solve(*args: Any, **kwargs: Any) -> State:
            if kwargs:
                raise TypeError(
                    f"{who} takes positional arguments only (they are also g's), got "
                    f"{sorted(kwargs)}; bind options with functools.partial"
                )
            floating = [
                a
                for a in args
                if isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex())
            ]
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            answer = _blackbox.call(
                solver,
                args,
                who=who,
                dtype=floating[0].dtype.to_real() if floating else None,
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
            z, info = run(
                problem,
                _blackbox.CheckAnswer(who),
                mode,
                tol=tol,
                max_iter=max_iter,
                on_failure=on_failure,
                return_info=True,
            )
            solve.last_info = info
            return z

        solve.last_info = None
        return solve

    return decorator
