"""Every use of PyTorch's private API in the package, each with a public fallback, and
how the solves meet ``torch.compile``.

The private names make the solves cheaper (fewer Python layers per call) or let the
core see which ``torch.func`` transforms are active. Each is looked up once, at import;
where one is missing (a torch release that renamed it) its public fallback is used
instead, and the environment variable ``IMPLICIT_TORCH_FALLBACKS=1`` forces every
fallback (CI runs the test suite both ways). :data:`FALLBACKS` names the ones in use.
With the fallbacks the results are the same; what changes (transforms seen through
tensors, nested forward mode counted by wrapper depths, forward mode inside the
solve, per-call costs) is listed in the developer notes ("Torch internals").

``torch.compile``'s machinery (``torch._dynamo``) takes about as long to import as
torch itself, and ``torch.compiler.disable`` and ``set_stance`` import it. Until
something imports it, nothing compiles: the package asks for it only once it is
loaded (:func:`eager`, :func:`eager_stance`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.autograd.forward_ad as forward_ad
from torch.overrides import has_torch_function

#: Whether every fallback is forced (the environment variable ``IMPLICIT_TORCH_FALLBACKS=1``).
FORCED = os.environ.get("IMPLICIT_TORCH_FALLBACKS", "") == "1"
#: The private names replaced by their public fallbacks in this process.
FALLBACKS: set[str] = set()


def _private(name: str, load: Callable[[], Any]) -> Any:
    """``load()``, or ``None`` (and ``name`` added to :data:`FALLBACKS`) when the
    fallbacks are forced or torch lacks the private name."""
    if not FORCED:
        try:
            return load()
        except (AttributeError, ImportError):
            pass
    FALLBACKS.add(name)
    return None


def _functorch_wrapped():
    return torch._C._functorch.is_functorch_wrapped_tensor


def _interpreter_stack():
    from torch._C._functorch import TransformType

    functorch = torch._C._functorch
    return functorch.peek_interpreter_stack, functorch.get_interpreter_stack, TransformType.Jvp


def _function_apply():
    from torch._functorch.utils import unwrap_dead_wrappers

    return torch._C._are_functorch_transforms_active, unwrap_dead_wrappers


def _engine_run_backward():
    from torch.autograd.graph import _engine_run_backward

    return _engine_run_backward


def _vmap_levels():
    from torch._functorch.vmap import vmap_increment_nesting

    functorch = torch._C._functorch
    return vmap_increment_nesting, functorch._add_batch_dim, functorch._remove_batch_dim


def _forward_grad_switch():
    forward_ad._current_level  # noqa: B018 (the lookup is the check)
    return forward_ad._set_fwd_grad_enabled


_is_wrapped = _private("functorch.is_functorch_wrapped_tensor", _functorch_wrapped)
_stack = _private("functorch interpreter stack", _interpreter_stack)
_apply = _private("Function.apply without argument binding", _function_apply)
_engine = _private("autograd.graph._engine_run_backward", _engine_run_backward)
_vmap = _private("functorch vmap levels", _vmap_levels)
_forward_grad = _private("forward_ad._set_fwd_grad_enabled", _forward_grad_switch)
_DYNAMO_MARK = _private("dynamo's disable mark", lambda: "_torchdynamo_disable")

#: Whether :func:`transforms_active` knows the active transforms whatever tensors it is
#: given (with the private names), rather than only through those tensors.
KNOWS_TRANSFORMS = _stack is not None
#: Whether :func:`forward_grad_as_outside` can switch forward-mode AD back on inside
#: ``torch.autograd.Function.forward``.
FORWARD_GRAD_IN_FUNCTIONS = _forward_grad is not None


def is_transformed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is wrapped by a ``torch.func`` transform (batched, tracked)."""
    if _is_wrapped is not None:
        return _is_wrapped(tensor)
    return torch.func.debug_unwrap(tensor, recurse=False) is not tensor


def transforms_active(*tensors: torch.Tensor) -> bool:
    """Whether a ``torch.func`` transform is active; without the private names, whether
    one of ``tensors`` is wrapped by one (see the module docstring)."""
    if _stack is not None:
        return _stack[0]() is not None
    return any(is_transformed(tensor) for tensor in tensors)


def _wrapper_depth(tensor: torch.Tensor) -> int:
    depth = 0
    while (inner := torch.func.debug_unwrap(tensor, recurse=False)) is not tensor:
        depth, tensor = depth + 1, inner
    return depth


_scopes = threading.local()


@contextlib.contextmanager
def _solve_scope(inherit: bool) -> Iterator[None]:
    """The bookkeeping of :func:`nested_forward_mode` without the transform stack: the
    depths at which the forward-mode rules of one solve ran (see :func:`apply`)."""
    stack = _scopes.__dict__.setdefault("stack", [])
    stack.append(stack[-1] if inherit and stack else set())
    try:
        yield
    finally:
        stack.pop()


_NO_SCOPE = contextlib.nullcontext()


def nested_forward_mode(output: torch.Tensor) -> bool:
    """Whether two forward-mode transforms (``jvp``, ``jacfwd``) are active; called by a
    solve's forward-mode rule, with the solve's output as the rule sees it.

    Without the private names: whether rules of the same solve (see :func:`apply`) ran
    at two depths of transform wrappers around ``output``, that is, at two levels.
    """
    if _stack is not None:
        levels = _stack[1]() or []
        return sum(level.key() == _stack[2] for level in levels) >= 2
    stack = getattr(_scopes, "stack", None)
    if not stack:
        return False
    depths = stack[-1]
    depths.add(_wrapper_depth(output))
    return len(depths) >= 2


def apply(function: type[torch.autograd.Function], *args: Any, inherit: bool = False) -> Any:
    """``function.apply(*args)`` for one differentiable solve; outside ``torch.func``
    transforms without ``apply``'s binding of the arguments to ``forward``'s signature
    (it fills in defaults, which a ``forward`` without defaults does not need).

    ``inherit``: the solve continues the enclosing one (the ``vmap`` rule solving its
    slices), so that :func:`nested_forward_mode` counts the forward-mode rules of both
    together.
    """
    if _apply is not None and not _apply[0]():
        return _autograd_apply(function)(*_apply[1](args))
    if _stack is not None:
        return function.apply(*args)
    with _solve_scope(inherit):
        return function.apply(*args)


@functools.cache
def _autograd_apply(function: type[torch.autograd.Function]) -> Callable[..., Any]:
    """What ``function.apply`` calls outside transforms, once it has bound the arguments."""
    return super(torch.autograd.Function, function).apply


def dual_level_open() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open."""
    if _forward_grad is not None:
        return forward_ad._current_level >= 0
    try:
        # make_dual refuses to work without an open level, before it looks at its arguments.
        forward_ad.make_dual(_PROBE, _PROBE)
    except RuntimeError:
        return False
    return True


_PROBE = torch.zeros(())


def forward_grad_as_outside() -> contextlib.AbstractContextManager:
    """Inside ``torch.autograd.Function.forward`` (which switches forward-mode AD off):
    forward mode on again where no dual level is open, so that a user function opening
    its own sees it as it does outside the solve. A no-op without the private switch
    (see :data:`FORWARD_GRAD_IN_FUNCTIONS`)."""
    if _forward_grad is None:
        return _NO_SCOPE
    return _forward_grad(forward_ad._current_level < 0)


def autograd_grad(
    out: torch.Tensor,
    cotangent: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    *,
    retain_graph: bool = True,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """``torch.autograd.grad(out, inputs, cotangent, allow_unused=True)``, with zero for
    an input that ``out`` does not depend on (also when ``out`` depends on nothing that
    requires grad).

    With the private name, the same call to autograd's engine without that function's
    normalising and checking of its arguments in Python, which these arguments (one
    tensor each, the cotangent shaped like ``out``) do not need; where a tensor subclass
    or a mode may override ``torch.autograd.grad`` (``__torch_function__``), it is
    called itself.
    """
    if not out.requires_grad:
        grads: tuple[torch.Tensor | None, ...] = (None,) * len(inputs)
    elif _engine is None or has_torch_function((out, *inputs)):
        grads = torch.autograd.grad(
            out,
            inputs,
            cotangent,
            retain_graph=retain_graph,
            create_graph=create_graph,
            allow_unused=True,
        )
    else:
        grads = _engine(
            (out,), (cotangent,), retain_graph, create_graph, inputs, True, accumulate_grad=False
        )
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def vmap_call(
    fn: Callable[..., torch.Tensor],
    size: int,
    args: Sequence[torch.Tensor],
    in_dims: Sequence[int | None],
) -> torch.Tensor:
    """``torch.func.vmap(fn, in_dims)(*args)`` for ``size`` slices: each argument batched
    along dim 0 (``in_dims`` 0) or shared by every slice (``None``), and one tensor
    output, batched along dim 0.

    With the private names, the same batching (``torch.func.vmap`` enters the same level
    and adds and removes the same batch dimensions) without its flattening and checking
    of arbitrary in/out structures in Python.
    """
    if _vmap is None:
        return torch.func.vmap(fn, in_dims=tuple(in_dims))(*args)
    increment_nesting, add_batch_dim, remove_batch_dim = _vmap
    with increment_nesting(size, "error") as level:
        batched = [
            arg if dim is None else add_batch_dim(arg, dim, level)
            for arg, dim in zip(args, in_dims)
        ]
        return remove_batch_dim(fn(*batched), level, size, 0)


#: ``torch.compile``'s machinery: until ``_COMPILER in sys.modules``, nothing compiles.
#: A look-up of the module's name, not a call: were torch to rename it, the package would
#: take the compiler for not loaded and not disable it around its solves, which only
#: costs a compiled caller more graph breaks.
_COMPILER = "torch._dynamo"


def mark_compiler_disabled(fn: Callable[..., Any]) -> None:
    """Put dynamo's own mark of a disabled function on ``fn``, which dynamo reads while
    it traces a caller (it breaks the graph there rather than trace ``fn``). Without it
    dynamo traces into ``fn`` until ``fn`` calls a function disabled by
    ``torch.compiler.disable``."""
    if _DYNAMO_MARK is not None:
        setattr(fn, _DYNAMO_MARK, True)


F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F) -> F:
    """``torch.compiler.disable(fn)``, without loading the compiler before something
    else has.

    A compiled caller breaks its graph at ``fn`` (the solves' loops depend on the
    data), and ``fn`` runs eagerly, with nothing it calls compiled except what the user
    compiled. The wrapper carries dynamo's own mark of a disabled function, which
    dynamo reads while it traces a caller.
    """
    disabled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def run_eagerly(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if _COMPILER not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    mark_compiler_disabled(run_eagerly)
    return run_eagerly  # type: ignore[return-value]


def eager_stance() -> contextlib.AbstractContextManager:
    r"""The compiler's ``"force_eager"`` stance, for as long as one of the package's
    ``TorchFunctionMode``\ s is active (capture discovery, substitution): functions
    compiled with ``torch.compile`` then run eagerly.

    Dynamo cannot trace through a mode's Python bookkeeping: meeting it, it gives up on
    the compiled function and never compiles that function again, even where no mode
    is active (the solver's own evaluations of ``f``). Under the ``"force_eager"``
    stance it does not try. Before the compiler is loaded nothing compiles, and setting
    the stance would load it: then no stance.
    """
    if _COMPILER not in sys.modules:
        return _NO_SCOPE
    return torch.compiler.set_stance("force_eager")
