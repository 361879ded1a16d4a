"""Substituting the tensors a user function reads from its closure, and the
operations that hand a tensor's values to Python.

Gradients must reach tensors that ``g`` captures (closure variables, module
parameters), and the differentiable core needs them as explicit inputs so that
autograd orders and frees the graph correctly and so that partial derivatives can
be taken. Both jobs use a :class:`~torch.overrides.TorchFunctionMode`, which sees
every tensor each torch operation receives:

* :class:`implicit._problem.Recorder` (beside ``Problem.discover``, which runs it) lists
  the tensors carrying derivatives (requiring grad, dual tensors of forward mode,
  ``torch.func``-transformed tensors) that ``g`` reads but did not create itself, and
  whether ``g`` read values (:data:`VALUE_READS`);
* :class:`Substitute` swaps those tensors for stand-ins (the same values, but owned
  by a transform or detached) whenever ``g`` is evaluated again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


def tree_map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if type(obj) in (list, tuple):
        return type(obj)(tree_map_tensors(item, fn) for item in obj)
    if type(obj) is dict:
        return {key: tree_map_tensors(value, fn) for key, value in obj.items()}
    return obj


#: The operations that hand a tensor's values to Python (which may branch on them), or
#: whose output's shape depends on the values (which Python may branch on in turn).
VALUE_READS = frozenset(
    {
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__index__,
        torch.Tensor.__complex__,
        torch.Tensor.__contains__,
        torch.Tensor.__format__,
        torch.Tensor.__array__,
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.nonzero,
        torch.Tensor.masked_select,
        torch.Tensor.unique,
        torch.Tensor.unique_consecutive,
        torch.Tensor.bincount,
        torch.Tensor.repeat_interleave,
        torch.equal,
        torch.allclose,
        torch.is_nonzero,
        torch.nonzero,
        torch.argwhere,
        torch.masked_select,
        torch.unique,
        torch.unique_consecutive,
        torch.bincount,
        torch.repeat_interleave,
    }
)
#: The operations that may hand values to Python, depending on their arguments.
MAY_READ_VALUES = VALUE_READS | {torch.Tensor.__getitem__, torch.where}


class Substitute(TorchFunctionMode):
    """Replaces captured tensors (matched by identity) in every operation (entered under
    :func:`implicit._torch.eager_stance`)."""

    def __init__(self, replacements: dict[int, torch.Tensor]):
        super().__init__()
        self._replacements = replacements

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def swap(tensor: torch.Tensor) -> torch.Tensor:
            return self._replacements.get(id(tensor), tensor)

        return func(*tree_map_tensors(args, swap), **tree_map_tensors(kwargs or {}, swap))


def reads_values(func, args: tuple) -> bool:
    """Whether ``func(*args)``, one of ``MAY_READ_VALUES``, hands values to Python or
    makes a shape from them: those of ``VALUE_READS``, indexing with a tensor, and
    ``torch.where(condition)``."""
    if func in VALUE_READS:
        return True
    if func is torch.Tensor.__getitem__:
        indices: list[torch.Tensor] = []
        tree_map_tensors(args[1:], indices.append)
        return bool(indices)
    return func is torch.where and len(args) == 1
