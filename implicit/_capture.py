"""Finding and substituting the tensors a user function reads from its closure.

Gradients must reach tensors that ``g`` captures (closure variables, module
parameters), and the differentiable core needs them as explicit inputs so that
autograd orders and frees the graph correctly and so that partial derivatives can
be taken. Both jobs use a :class:`~torch.overrides.TorchFunctionMode`, which sees
every tensor each torch operation receives:

* :class:`Recorder` lists the tensors carrying derivatives (requiring grad, dual
  tensors of forward mode, ``torch.func``-transformed tensors) that ``g`` reads but did
  not create itself (one evaluation of ``g``, at the initial guess);
* :class:`Substitute` swaps those tensors for stand-ins (the same values, but owned
  by a transform or detached) whenever ``g`` is evaluated again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch.overrides import TorchFunctionMode

from implicit._torch import compiler_loaded, is_transformed


def tree_map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if type(obj) in (list, tuple):
        return type(obj)(tree_map_tensors(item, fn) for item in obj)
    if type(obj) is dict:
        return {key: tree_map_tensors(value, fn) for key, value in obj.items()}
    return obj


def _collect(obj: Any, found: list[torch.Tensor]) -> None:
    # A plain recursion into a list: every torch call of g passes through here while
    # captures are recorded, so no generators.
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif type(obj) in (list, tuple):
        for item in obj:
            _collect(item, found)
    elif type(obj) is dict:
        for value in obj.values():
            _collect(value, found)


def carries_derivative(tensor: torch.Tensor) -> bool:
    """Whether derivatives with respect to ``tensor`` may be asked for: it requires
    grad, carries a forward-mode tangent, or belongs to a ``torch.func`` transform."""
    return (
        tensor.requires_grad
        or is_transformed(tensor)
        or forward_ad.unpack_dual(tensor).tangent is not None
    )


class _EagerMode(TorchFunctionMode):
    """A mode under which functions compiled with ``torch.compile`` run eagerly.

    Dynamo cannot trace through a mode's Python bookkeeping: meeting it, it gives up on
    the compiled function and never compiles that function again, even where no mode
    is active (the solver's own evaluations of ``f``). Under the ``"force_eager"``
    stance it does not try. Before the compiler is loaded nothing compiles, and setting
    the stance would load it.
    """

    def __enter__(self):
        self._stance = torch.compiler.set_stance("force_eager") if compiler_loaded() else None
        return super().__enter__()

    def __exit__(self, *exc_info):
        try:
            return super().__exit__(*exc_info)
        finally:
            if self._stance is not None:
                self._stance.__exit__(*exc_info)


#: The operations that hand a tensor's values to Python (which may branch on them), or
#: whose output's shape depends on the values (which Python may branch on in turn).
_VALUE_READS = frozenset(
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
_MAY_READ_VALUES = _VALUE_READS | {torch.Tensor.__getitem__, torch.where}


class Recorder(_EagerMode):
    """Records the tensors that flow into operations from outside and carry derivatives,
    and whether an operation read values that Python may branch on.

    Args:
        known: tensors that are not captures (the explicit arguments, the state).

    Attributes:
        captured: the captures found, by ``id``.
        read_values: whether an operation handed values to Python or made a shape from
            them (``bool(t)``, ``t.item()``, ``t[mask]``, ``torch.nonzero``, ...): then
            the function's control flow, and so the tensors it reads, may depend on its
            input's values. Otherwise every evaluation reads the same tensors.
    """

    def __init__(self, known: Iterable[torch.Tensor]):
        super().__init__()
        self._made = {id(t) for t in known}
        self._keep_alive = list(known)
        self.captured: dict[int, torch.Tensor] = {}
        self.read_values = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _MAY_READ_VALUES and not self.read_values:
            self.read_values = _reads_values(func, args)
        kwargs = kwargs or {}
        found: list[torch.Tensor] = []
        _collect(args, found)
        if kwargs:
            _collect(kwargs, found)
        made = self._made
        for tensor in found:
            if id(tensor) not in made and carries_derivative(tensor):
                self.captured.setdefault(id(tensor), tensor)
        out = func(*args, **kwargs)
        outputs = [out] if isinstance(out, torch.Tensor) else []
        if not outputs:
            _collect(out, outputs)
        for tensor in outputs:
            # Keep outputs alive so that their ids are not recycled for another tensor.
            made.add(id(tensor))
        self._keep_alive.extend(outputs)
        return out


def _reads_values(func, args: tuple) -> bool:
    """Whether ``func(*args)``, one of ``_MAY_READ_VALUES``, hands values to Python or
    makes a shape from them: those of ``_VALUE_READS``, indexing with a tensor, and
    ``torch.where(condition)``."""
    if func in _VALUE_READS:
        return True
    if func is torch.Tensor.__getitem__:
        indices: list[torch.Tensor] = []
        _collect(args[1:], indices)
        return bool(indices)
    return func is torch.where and len(args) == 1


class Substitute(_EagerMode):
    """Replaces captured tensors (matched by identity) in every operation."""

    def __init__(self, replacements: dict[int, torch.Tensor]):
        super().__init__()
        self._replacements = replacements

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def swap(tensor: torch.Tensor) -> torch.Tensor:
            return self._replacements.get(id(tensor), tensor)

        return func(*tree_map_tensors(args, swap), **tree_map_tensors(kwargs or {}, swap))
