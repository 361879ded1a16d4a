"""What a solve tells its caller: the per-iteration callback, and the per-problem fields
of its report.

The drivers (``Solver.solve`` and the minimisation, bracketing and scipy loops) call a
callback with their own flat tensors: ``callback(iteration, norms, z)``, ``norms`` of
shape ``(rows,)`` and ``z`` of shape ``(rows, n)``. :class:`Watch` turns that into the
user's call: the residual norms in the shape of ``SolveInfo.residual`` and ``z`` in the
structure of ``z0``, both copies, detached, so that a callback that keeps or modifies
them cannot change the solve. Neither the drivers nor :class:`Watch` read a value on the
host: whatever the callback reads is its own synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit import _tree
from implicit._problem import Problem

#: The user's callback: ``callback(iteration, residual, z)``.
Callback = Callable[[int, torch.Tensor, Any], Any]

#: What the drivers call: ``callback(iteration, norms (rows,), z (rows, n))``.
DriverCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def check_callback(callback: object) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback must be callable as callback(iteration, residual, z) or None, got "
            f"{type(callback).__name__}"
        )


class Watch:
    """The user's ``callback`` as the drivers call it.

    Args:
        callback: the user's ``callback(iteration, residual, z)``.
        problem: the problem being solved (or its slices under ``vmap``, which are more
            blocks of its rows).
        report_shape: the shape of ``SolveInfo.residual``: ``(B,)`` when batched, ``()``
            otherwise, with the vmapped dimensions first under ``vmap``.
    """

    def __init__(self, callback: Callback, problem: Any, report_shape: tuple[int, ...]):
        while not isinstance(problem, Problem):  # the slices of a vmapped problem
            problem = problem.inner
        self.callback = callback
        self.problem = problem
        self.report_shape = report_shape
        # The vmapped dimensions that lead every leaf of the state.
        self.leading = report_shape[: len(report_shape) - (1 if problem.batched else 0)]

    def __call__(self, iteration: int, norms: torch.Tensor, z: torch.Tensor) -> None:
        residual = norms.detach().clone().reshape(self.report_shape)
        self.callback(iteration, residual, self.state(z.detach().clone()))

    def state(self, flat: torch.Tensor) -> Any:
        """The flat rows as the user's structure (with the vmapped dimensions first)."""
        problem = self.problem
        if not self.leading:
            return problem.unpack(flat)
        parts = torch.split(flat, problem.sizes, dim=1)
        leaves = [p.reshape(*self.leading, *shape) for p, shape in zip(parts, problem.shapes)]
        return _tree.unflatten(problem.spec, leaves)


def watch(
    callback: Callback | None, problem: Any, report_shape: tuple[int, ...]
) -> DriverCallback | None:
    """The drivers' callback for the user's ``callback`` (``None`` for none)."""
    return None if callback is None else Watch(callback, problem, report_shape)
