"""Argument checks shared by the front doors, the solvers and the linear solvers, and
the full checks of a problem's input and output where the common case's fail.

One helper for every numeric option (:func:`check_number`), so that every class rejects
the same bad values with the same message: a bool is never a number here
(``damping=True`` is an error everywhere), and NaN never passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from implicit import _tree
from implicit._complex import is_supported, same_precision

ON_FAILURE_CHOICES = ("warn", "raise", "ignore")


#: What ``check_number`` accepts, by the words of its message: the lower bound and
#: whether it is excluded, the upper bound and whether it is excluded, integers only.
NUMBER_RULES = {
    "an integer >= 0": (0, False, math.inf, True, True),
    "an integer >= 1": (1, False, math.inf, True, True),
    "in (0, 1]": (0, True, 1, False, False),
    "in [0, 1]": (0, False, 1, False, False),
    "a finite number >= 0": (0, False, math.inf, True, False),
    "a number > 0": (0, True, math.inf, False, False),
    "a number > 1": (1, True, math.inf, False, False),
    "a positive finite number": (0, True, math.inf, True, False),
}


def check_number(value: object, name: str, rule: str) -> None:
    """Raise ``ValueError("{name} must be {rule}, got {value!r}")`` unless ``value``
    is a number (never a bool) that ``rule`` (a key of ``NUMBER_RULES``) accepts; NaN
    is accepted by none."""
    low, low_open, high, high_open, integer = NUMBER_RULES[rule]
    if (
        isinstance(value, bool)
        or not isinstance(value, int if integer else (int, float))
        or not (low < value if low_open else low <= value)
        or not (value < high if high_open else value <= high)
    ):
        raise ValueError(f"{name} must be {rule}, got {value!r}")


def check_shared_options(
    tol: object, max_iter: object, on_failure: object, callback: object
) -> None:
    """The options every front door takes, checked in one place: the first wrong one
    raises, naming it. A tolerance tensor's entries are checked with the problem's
    batch (:func:`implicit._tolerance.per_problem`)."""
    if not isinstance(tol, torch.Tensor):
        check_number(tol, "tol", "a positive finite number")
    check_number(max_iter, "max_iter", "an integer >= 1")
    if on_failure not in ON_FAILURE_CHOICES:
        check_on_failure(on_failure)
    if callback is not None and not callable(callback):
        raise TypeError(
            f"callback must be callable as callback(iteration, residual, z) or None, got "
            f"{type(callback).__name__}"
        )


def check_tol(tol: object, name: str = "tol") -> None:
    check_number(tol, name, "a positive finite number")


def check_max_iter(max_iter: object, name: str = "max_iter") -> None:
    check_number(max_iter, name, "an integer >= 1")


def check_on_failure(on_failure: object) -> None:
    if on_failure not in ON_FAILURE_CHOICES:
        raise ValueError(f"on_failure must be one of {ON_FAILURE_CHOICES}, got {on_failure!r}")


def check_options(owner: str, options: dict, allowed: dict) -> None:
    """Raise on misspelt solver options, naming the closest valid ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"{owner} got unknown option(s) {unknown}; valid options are {sorted(allowed)}"
        )


def check_states(states: Sequence[Any], labels: Sequence[str], batched: bool, name: str) -> None:
    if not states:
        raise ValueError(f"{name} must be a tensor or a non-empty tuple of tensors")
    first = labels[0]
    for state, label in zip(states, labels):
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(state).__name__}")
        check_storage(state, label)
        # (A real state needs no look at the complex rules: the default path stays short.)
        if not state.is_floating_point() and not is_supported(state.dtype):
            half = " (complex32 is not supported: use complex64)"
            raise TypeError(
                f"{label} must be a floating-point or complex tensor, got {state.dtype}"
                + (half if state.dtype is torch.complex32 else "")
            )
        if state.numel() == 0:
            raise ValueError(f"{label} is empty: there is nothing to solve for")
        if batched and state.dim() == 0:
            raise ValueError(f"{label} is a scalar but batched=True needs a batch dimension first")
        if state.dtype != states[0].dtype:
            raise TypeError(f"{label} has dtype {state.dtype}, {first} has {states[0].dtype}")
        if state.device != states[0].device:
            raise ValueError(f"{label} is on {state.device}, {first} is on {states[0].device}")
        if batched and state.shape[0] != states[0].shape[0]:
            raise ValueError(
                f"{label} has batch size {state.shape[0]}, {first} has {states[0].shape[0]}"
            )


def check_storage(tensor: torch.Tensor, label: str) -> None:
    """A state must hold values in dense (strided) storage: not a sparse tensor (the
    solvers reshape and combine states densely), not a meta tensor (no values)."""
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{label} is a {tensor.layout} tensor: states must be dense, pass {label}.to_dense()"
        )
    if tensor.is_meta:
        raise ValueError(
            f"{label} is on the meta device, which holds no values to solve for: create "
            f"it on a real device (cpu, cuda, ...)"
        )


def check_arg(
    arg: torch.Tensor, label: Callable[[], str], dtype: torch.dtype, device, name: str
) -> None:
    """A tensor argument on the state's device, floating point or complex only in the
    state's precision (a complex argument of a real state, or a real one of a complex
    state, is fine: float64 goes with complex128, float32 with complex64); ``label()``
    names it in the error (made only for an error)."""
    if arg.device != device:
        raise ValueError(f"{label()} is on {arg.device} but {name} is on {device}")
    if arg.dtype is dtype or not (arg.is_floating_point() or arg.is_complex()):
        return
    if not same_precision(arg.dtype, dtype) or arg.dtype is torch.complex32:
        advice = (
            "one precision (float64 with complex128, float32 with complex64)"
            if dtype.is_complex or arg.is_complex()
            else "one floating-point dtype"
        )
        raise TypeError(
            f"{label()} has dtype {arg.dtype} but {name} has dtype {dtype}: use {advice}"
        )


def check_target(problem: Any) -> torch.Size:
    """The inverse form's ``y`` (``problem.args[0]``): a tensor with one equation per
    unknown. Returns its shape."""
    target = problem.args[0] if problem.args else None
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(target).__name__}")
    if problem.batched and (target.dim() == 0 or target.shape[0] != problem.batch_size):
        raise ValueError(
            f"y has shape {tuple(target.shape)} but z0 has batch size {problem.batch_size}: "
            f"with batched=True dim 0 of y and z0 indexes the problems"
        )
    if target.is_complex() != problem.complex:
        raise TypeError(
            f"y has dtype {target.dtype} but {problem.initial_name} has dtype {problem.dtype}: "
            f"f(z) = y needs y and f(z) in z's dtype (both complex or both real)"
        )
    per_problem = target.numel() // problem.batch_size
    unknowns = problem.n // 2 if problem.complex else problem.n  # entries, not real numbers
    if per_problem != unknowns:
        raise ValueError(
            f"y has {per_problem} entries per problem but z0 has {unknowns}: f(z) = y needs "
            f"as many equations as unknowns (z0 defaults to y; pass z0 shaped like f's input)"
        )
    return target.shape


def check_output(problem: Any, out: Any) -> list[torch.Tensor]:
    """The tensors of ``out``, what ``problem``'s function returned, checked against the
    structure, shapes and dtype it must return (errors name the function)."""
    like = "z" if problem.initial_name == "z0" else f"z ({problem.initial_name})"
    like = "y" if problem.form == "inverse" else like
    if problem.out_spec is _tree.LEAF and not isinstance(out, torch.Tensor):
        raise ValueError(
            f"{problem.name} must return the same structure as {like}: expected "
            f"a tensor of shape {tuple(problem.out_shapes[0])}, got {_describe_value(out)}"
        )
    parts = _tree.leaves_like(problem.out_spec, out, problem.name, like)
    for part, shape in zip(parts, problem.out_shapes):
        if not isinstance(part, torch.Tensor):
            raise TypeError(f"{problem.name} must return tensors, got {type(part).__name__}")
        if part.shape != shape:
            hint = (
                "f(z) must have the shape of y (z has the shape of z0, which defaults to y)"
                if problem.form == "inverse"
                else "the residual must have the shape of z"
            )
            raise ValueError(
                f"{problem.name} returned shape {tuple(part.shape)} but {like} has shape "
                f"{tuple(shape)}: {hint}"
            )
        if part.dtype != problem.dtype:
            raise TypeError(
                f"{problem.name} returned dtype {part.dtype} but z has dtype "
                f"{problem.dtype}: cast the inputs or z0 so that they agree"
            )
    return parts


def _describe_value(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} item(s)"
    return f"a {type(out).__name__}"
