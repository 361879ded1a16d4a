"""Argument checks shared by the front doors, the solvers and the linear solvers.

One helper for every numeric option (:func:`check_number`), so that every class rejects
the same bad values with the same message: a bool is never a number here
(``damping=True`` is an error everywhere), and NaN never passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

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
