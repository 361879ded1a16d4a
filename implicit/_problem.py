"""Normalising user input into one flat, batched root problem.

Every front door hands the core a :class:`Problem`: a residual ``g(z, *args)``
whose state may be a tensor or a tree of tensors, viewed by the solvers as one
flat ``(B, n)`` tensor (``B`` independent problems when batched, ``B = 1``
otherwise). The explicit tensor arguments and the captured tensors are the
problem's *inputs*: the tensors gradients flow to. A forward solver sees the
problem at its inputs as a [`Residual`][implicit.solvers.Residual].
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as forward_ad
from torch.overrides import TorchFunctionMode

from implicit import _complex, _tree
from implicit._batch import norms, working_dtype
from implicit._capture import MAY_READ_VALUES, Substitute, reads_values
from implicit._checks import arg_label, check_output, check_target
from implicit._results import check_arg, check_states
from implicit._torch import eager_stance, is_transformed
from implicit.solvers.base import Residual

#: A tensor, or tensors nested in tuples, lists and dicts (see :mod:`implicit._tree`).
State = torch.Tensor | tuple[torch.Tensor, ...] | list[Any] | dict[Any, Any]
Form = Literal["root", "fixed_point", "inverse"]
#: How the stopping test is scaled: not at all, or by the form's scale.
TOL_MODES = ("absolute", "relative")


class Problem:
    """A root problem seen as a residual on a flat ``(B, n)`` view.

    The three forms differ only in how the user's function becomes a residual and in
    how the stopping tolerance is scaled (problem ``b`` has converged when
    ``‖g(z)_b‖₂ ≤ tol_b · (1 + scale_b)``; with ``tol_mode="absolute"`` the scale is 0):

    ============  ========================  ==================================  ===========
    form          residual                  relative scale                      default
    ============  ========================  ==================================  ===========
    root          ``fn(z, *args)``          ``‖g(z0)_b‖₂``                      absolute
    fixed_point   ``fn(z, *args) − z``      ``max(‖z0_b‖₂, ‖f(z0)_b‖₂)``        relative
    inverse       ``fn(z, *args[1:]) − y``  ``‖y_b‖₂`` with ``y = args[0]``     relative
    ============  ========================  ==================================  ===========

    In the inverse form ``fn`` returns a tensor shaped like ``y`` (which may differ
    from the shape of ``z`` as long as each problem has as many equations as unknowns).

    Args:
        fn: the user's function; returns a tensor (or tuple) shaped like ``z`` (like
            ``y`` in the inverse form).
        z0: the initial state, a tensor or a tree of tensors (nested tuples, lists
            and dicts); ``fn`` returns the same structure.
        args: the extra positional arguments; tensors among them are inputs. For the
            inverse form ``args[0]`` is the target ``y``.
        batched: whether dim 0 of every state tensor indexes independent problems.
        form: ``"root"``, ``"fixed_point"`` or ``"inverse"``.
        initial: what error messages call ``z0`` (e.g. a black box's answer).
        tol_mode: ``"absolute"`` or ``"relative"`` (see above); ``None``: the form's
            default.
    """

    #: Whether ``∂g/∂z`` is symmetric whatever the point (the Hessian of an objective).
    symmetric = False

    def __init__(
        self,
        fn: Callable[..., Any],
        z0: State,
        args: Sequence[Any],
        *,
        batched: bool,
        form: Form = "root",
        initial: str = "z0",
        tol_mode: str | None = None,
    ):
        if tol_mode is not None and tol_mode not in TOL_MODES:
            raise ValueError(f"tol_mode must be one of {TOL_MODES}, got {tol_mode!r}")
        #: Whether the stopping test is scaled (``tol_mode="relative"``).
        self.relative = form != "root" if tol_mode is None else tol_mode == "relative"
        self.name = "g" if form == "root" else "f"
        if not callable(fn):
            raise TypeError(f"{self.name} must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.form = form
        self.batched = bool(batched)
        self.initial = z0
        if isinstance(z0, torch.Tensor):  # the common case: a leaf, no tree to walk
            states, self.spec, labels = [z0], _tree.LEAF, [initial]
        else:
            states, self.spec, labels = _tree.flatten(z0, initial)
        self.initial_name = initial
        check_states(states, labels, self.batched, initial)
        #: The state's dtype, and that of the flat view the solvers see (the real dtype
        #: of the same precision for a complex state: :mod:`implicit._complex`).
        self.dtype = states[0].dtype
        self.real_dtype = self.dtype.to_real()
        self.complex = self.dtype.is_complex
        self.device = states[0].device
        self.shapes = [s.shape for s in states]
        self.batch_size = states[0].shape[0] if self.batched else 1
        width = 2 if self.complex else 1  # real numbers per entry of the flat view
        self.sizes = [
            width * (math.prod(s.shape[1:]) if self.batched else s.numel()) for s in states
        ]
        self.n = sum(self.sizes)
        self.args = tuple(args)
        self.tensor_positions = [i for i, a in enumerate(self.args) if isinstance(a, torch.Tensor)]
        for i in self.tensor_positions:
            label = functools.partial(arg_label, self, i)
            check_arg(self.args[i], label, self.dtype, self.device, initial)
        # The structure fn returns: that of z, or of y in the inverse form.
        self.out_shapes, self.out_spec = self.shapes, self.spec
        if form == "inverse":
            self.out_shapes, self.out_spec = [check_target(self)], _tree.LEAF
        #: The tensors among the explicit arguments.
        self.explicit = [self.args[i] for i in self.tensor_positions]
        #: The tensors ``fn`` captures that carry derivatives (see :meth:`discover`).
        self.captured: list[torch.Tensor] = []
        #: Explicit tensor arguments followed by captured tensors.
        self.inputs = self.explicit
        #: Whether ``g`` handed a tensor's values to Python at ``z0`` (see :meth:`discover`).
        self.reads_values = True

    # -- the flat view ------------------------------------------------------------
    def pack(self, states: State) -> torch.Tensor:
        """A state (tensor or tree) as one ``(B, n)`` tensor."""
        if self.spec is _tree.LEAF and not self.complex:
            # A batch of vectors is its own flat view: no view, no operation.
            return (
                states
                if states.dim() == 2 and self.batched
                else states.reshape(self.batch_size, -1)
            )
        if self.spec is _tree.LEAF:
            return _flatten([states], self.batch_size)
        return _flatten(_tree.leaves_like(self.spec, states, "the state", "z"), self.batch_size)

    def unpack(self, flat: torch.Tensor) -> State:
        """The inverse of :meth:`pack`."""
        if self.complex:
            parts = torch.split(flat, self.sizes, dim=1) if len(self.sizes) > 1 else [flat]
            leaves = [_complex.from_real(p, shape) for p, shape in zip(parts, self.shapes)]
            return leaves[0] if self.spec is _tree.LEAF else _tree.unflatten(self.spec, leaves)
        if self.spec is _tree.LEAF:
            # Already the state's shape (a batch of vectors): no view, so that neither the
            # user's function nor a graph recorded through it sees an extra operation.
            return flat if flat.shape == self.shapes[0] else flat.reshape(self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return _tree.unflatten(
            self.spec, [p.reshape(shape) for p, shape in zip(parts, self.shapes)]
        )

    # -- inputs -------------------------------------------------------------------
    def residual(self, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """``g`` on the flat view, with ``inputs`` standing in for the problem's inputs.

        The stand-ins may be detached copies or transform-owned versions of the
        original inputs: captured tensors are swapped in by identity.
        """
        out = self.map(z, *inputs)
        if self.form == "fixed_point":
            return out - z
        if self.form == "inverse":
            # y, the inverse form's first argument, is its first input (or its stand-in).
            return out - _flatten([inputs[0]], self.batch_size)
        return out

    def solver_view(self, inputs: Sequence[torch.Tensor], source: Any = None) -> Residual:
        """What a forward solver sees: the residual on the flat view at ``inputs``.

        ``source`` evaluates the problem's functions in its place (the rows of the
        problem under ``vmap``); a problem type whose solvers need more than the
        residual (an objective: :mod:`implicit._optimization`) returns a richer view.
        """
        source = self if source is None else source
        return Residual(source.residual, source.scale, inputs)

    def map(self, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """The user's function at the flat ``z``, its output packed as rows: the residual
        before the form subtracts ``z`` (a fixed point's ``f``: ``residual = map(z) − z``)
        or ``y`` (an inverse's); a root's residual itself.

        With it a product with ``∂g/∂z = ∂f/∂z − I`` can skip the identity's pass over
        the data where a method wants ``∂f/∂z`` itself (the classic DEQ backward).
        """
        out = self.call(self.fn, z, inputs)
        if (
            type(out) is torch.Tensor
            and self.out_spec is _tree.LEAF
            and out.shape == self.out_shapes[0]
            and out.dtype == self.dtype
        ):  # the common case, checked in full otherwise
            if self.complex:
                return _complex.as_real(out).reshape(self.batch_size, -1)
            return out if out.dim() == 2 and self.batched else out.reshape(self.batch_size, -1)
        return _flatten(check_output(self, out), self.batch_size)

    def call(self, function: Callable[..., Any], z: torch.Tensor, inputs: Sequence[torch.Tensor]):
        """``function(state, *args)`` at the flat ``z``, with ``inputs`` standing in for
        the problem's inputs (explicit ones by position, captured ones by identity), as
        :meth:`residual` calls the user's function. The inverse form passes the
        arguments after ``y``. Returns ``function``'s output as it is."""
        positions = self.tensor_positions
        args = list(self.args)
        for position, tensor in zip(positions, inputs):  # (the explicit inputs come first)
            args[position] = tensor
        if self.form == "inverse":
            args = args[1:]
        stand_ins = inputs[len(positions) :]
        if all(map(operator.is_, stand_ins, self.captured)):
            return function(self.unpack(z), *args)
        replacements = {id(c): s for c, s in zip(self.captured, stand_ins)}
        with eager_stance(), Substitute(replacements):
            return function(self.unpack(z), *args)

    def scale(self, z0: torch.Tensor, r0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """Per-problem scale of the stopping tolerance, from the initial guess ``z0``, its
        residual ``r0`` and the problem's ``inputs`` (see the class docstring)."""
        # (Norms in float32 for half precision, where they would overflow from 256 on.)
        if not self.relative:
            return z0.new_zeros(z0.shape[0], dtype=working_dtype(z0.dtype))
        if self.form == "fixed_point":
            return torch.maximum(norms(z0), norms(z0 + r0))
        if self.form == "inverse":
            # The target y is the first input, possibly a stand-in (e.g. a vmapped slice).
            return norms(_flatten([inputs[0]], self.batch_size))
        return norms(r0)

    def discover(self, z0: torch.Tensor) -> torch.Tensor:
        """Evaluate ``g(z0)`` once, recording the captured tensors that carry derivatives,
        and whether ``g`` handed a tensor's values to Python (``reads_values``: only then
        may another point take another branch, and read other tensors).

        Returns the residual at ``z0`` (detached), which the solver reuses as its
        first evaluation.
        """
        z0 = z0.detach()
        known = [z0, *self.explicit]
        with torch.enable_grad(), eager_stance(), Recorder(known) as recorder:
            r0 = self.residual(z0, *self.explicit)
        self.captured = list(recorder.captured.values())
        self.inputs = self.explicit + self.captured
        self.reads_values = recorder.read_values
        return r0.detach()

    def rediscover(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Evaluate ``g`` at ``z`` (the solution) once more, recording the captured
        tensors that carry derivatives, and add those that :meth:`discover` did not see
        at ``z0``: ``g`` reads them only on a branch it did not take there. Returns the
        added tensors."""
        z = z.detach()
        with torch.enable_grad(), eager_stance(), Recorder([z, *self.explicit]) as recorder:
            self.residual(z, *self.explicit)
        seen = {id(t) for t in self.captured}
        added = [t for key, t in recorder.captured.items() if key not in seen]
        self.captured = [*self.captured, *added]
        self.inputs = self.explicit + self.captured
        return added


def _flatten(parts: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    flat = [_complex.as_real(p).reshape(batch_size, -1) for p in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


# -- the tensors g captures ------------------------------------------------------
def carries_derivative(tensor: torch.Tensor) -> bool:
    """Whether derivatives with respect to ``tensor`` may be asked for: it requires
    grad, carries a forward-mode tangent, or belongs to a ``torch.func`` transform."""
    return (
        tensor.requires_grad
        or is_transformed(tensor)
        or forward_ad.unpack_dual(tensor).tangent is not None
    )


class Recorder(TorchFunctionMode):
    """Records the tensors that flow into operations from outside and carry derivatives,
    and whether an operation read values that Python may branch on (entered under
    :func:`implicit._torch.eager_stance`).

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
        if func in MAY_READ_VALUES and not self.read_values:
            self.read_values = reads_values(func, args)
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
        # Outputs are kept alive so that their ids are not recycled for another tensor.
        if isinstance(out, torch.Tensor):
            made.add(id(out))
            self._keep_alive.append(out)
            return out
        outputs: list[torch.Tensor] = []
        _collect(out, outputs)
        for tensor in outputs:
            made.add(id(tensor))
        self._keep_alive.extend(outputs)
        return out


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
