"""Result codes, what happens when a solve fails, and the checks of bad input.

What the library tells its caller lives here: the status codes and their names, the
``on_failure`` policy (warnings and errors) and the argument checks every call runs
(:func:`check_number`, the one helper for every numeric option, so that every class
rejects the same bad values with the same message: a bool is never a number here,
``damping=True`` is an error everywhere, and NaN never passes). The reports themselves,
``SolveInfo`` and ``BackwardInfo``, and the warning and error are in :mod:`implicit._info`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from implicit._batch import cheap_host_reads
from implicit._complex import is_supported, same_precision
from implicit._info import BackwardInfo, ConvergenceError, ConvergenceWarning, SolveInfo

# Frames in these directories are the library's, not the caller's.
_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)

OnFailure = Literal["warn", "raise", "ignore"]

# Per-sample status codes. Those of a forward solve (SolveInfo.status_codes) are ordered by
# severity; the linear solves' own statuses (BackwardInfo) come after them, and rank as
# SEVERITY says: the status of a batch is its worst sample's.
CONVERGED = 0
MAX_ITER = 1
BREAKDOWN = 2
FAILED = 3
NONFINITE = 4
ILL_CONDITIONED = 5
DIVERGED = 6
STAGNATED = 7
STATUS_NAMES = {
    CONVERGED: "converged",
    MAX_ITER: "max_iter",
    BREAKDOWN: "breakdown",
    FAILED: "failed",
    NONFINITE: "nonfinite",
    ILL_CONDITIONED: "ill_conditioned",
    DIVERGED: "diverged",
    STAGNATED: "stagnated",
}
#: The statuses from the mildest to the worst.
SEVERITY = (
    "converged",
    "ill_conditioned",
    "stagnated",
    "max_iter",
    "breakdown",
    "diverged",
    "failed",
    "nonfinite",
)
_RANK = torch.tensor([SEVERITY.index(STATUS_NAMES[code]) for code in sorted(STATUS_NAMES)])
STATUS_CODES = {name: code for code, name in STATUS_NAMES.items()}

# What to do about a linear solve (the backward's, or forward mode's) that ended so.
_LINEAR_ADVICE = {
    "ill_conditioned": (
        "The solve met its tolerance, but an error of the solution z* or of rounding is "
        "amplified up to that much in the derivatives: check that the root is isolated "
        "(a nearly singular Jacobian means a nearly non-unique solution), rescale the "
        "unknowns or the equations, or damp the solve with implicit.linear.Dense(ridge=...)."
    ),
    "stagnated": (
        "The residual stopped decreasing at the level of the rounding errors of the "
        "dtype's products, above the tolerance: no iteration can do better in this "
        "dtype. Loosen the backward's tol, or compute in a wider dtype (float64)."
    ),
    "max_iter": (
        "Raise the backward's max_iter, use backward='dense' or 'gmres', or pass a preconditioner."
    ),
    "breakdown": (
        "The system is singular, or not what the method needs (cg: a symmetric definite "
        "Jacobian and preconditioner): use backward='gmres' or 'dense', check the "
        "preconditioner, or damp a nearly singular Jacobian with "
        "implicit.linear.Dense(ridge=...)."
    ),
    "diverged": (
        "The Neumann series diverges: ∂f/∂z is not contractive at the solution (spectral "
        "radius at least 1). Use backward='auto' or 'gmres', which need no contraction."
    ),
    "nonfinite": (
        "The Jacobian's products overflowed or are NaN at the solution: check the inputs "
        "and that g is differentiable there."
    ),
}


def condition_limit(dtype: torch.dtype) -> float:
    """The condition estimate above which a converged linear solve in ``dtype`` is
    reported ``"ill_conditioned"``: ``1/√eps`` (``6.7e7`` in float64, ``2.9e3`` in
    float32, and in half precision, whose linear algebra runs in float32). The
    derivative then has about half of the dtype's digits left at best."""
    return 1 / math.sqrt(torch.finfo(dtype).eps)


def flag_ill_conditioned(codes: torch.Tensor | None, condition: torch.Tensor) -> torch.Tensor:
    """``codes`` with ``ILL_CONDITIONED`` where a problem converged but its
    ``condition`` exceeds :func:`condition_limit` of its dtype. ``codes`` ``None``:
    every problem converged, and the codes are made from the estimates alone."""
    limit = condition_limit(condition.dtype)
    if codes is not None:
        return torch.where((codes == CONVERGED) & (condition > limit), ILL_CONDITIONED, codes)
    if condition.shape[0] == 1 and cheap_host_reads(condition):
        # One problem, read on the host: the limit rounds down to every dtype, so the
        # comparison is the tensor's (no number of the dtype lies in between).
        code = ILL_CONDITIONED if condition.item() > limit else CONVERGED
        return torch.full_like(condition, code, dtype=torch.long)
    return torch.where(condition > limit, ILL_CONDITIONED, CONVERGED)


def status_name(codes: torch.Tensor) -> str:
    """The name of the worst status (by ``SEVERITY``) in a tensor of per-sample codes."""
    if not codes.numel():
        return "converged"
    top = int(codes.max())
    if top < ILL_CONDITIONED:  # a forward's codes, ordered by severity
        return STATUS_NAMES[top]
    return SEVERITY[int(_RANK.to(codes.device)[codes].max())]


def report_failure(info: SolveInfo | BackwardInfo, on_failure: str, what: str) -> None:
    """Warn, raise or stay silent when ``info`` says the solve did not converge."""
    if on_failure == "ignore" or bool(info.converged.all()):
        return
    failed = int((~info.converged).sum())
    total = info.converged.numel()
    # NaN is the worst (and prints as nan; inf as inf).
    residual = info.residual
    worst = math.nan if bool(residual.isnan().any()) else float(residual.max())
    if info.status == "ill_conditioned":
        condition = info.condition
        message = (
            f"{what} is ill-conditioned: condition estimate {float(condition.max()):.1e} "
            f"for {failed} of {total} problem(s), above {condition_limit(condition.dtype):.1e} "
            f"(1/√eps of {str(condition.dtype).removeprefix('torch.')})."
        )
    else:
        message = (
            f"{what} did not converge: status {info.status!r} for {failed} of {total} "
            f"problem(s), worst residual {worst:.3e} after {info.iterations} iteration(s)."
        )
    if isinstance(info, SolveInfo):
        # A solver that explains its failure (scipy, a black box) also says what to do.
        message += (
            f" {info.message}"
            if info.message
            else " Raise max_iter, loosen tol, or try another solver."
        )
    else:
        message += " " + _LINEAR_ADVICE.get(info.status, _LINEAR_ADVICE["max_iter"])
    if on_failure == "raise":
        raise ConvergenceError(message, info)
    warnings.warn(message, ConvergenceWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the user's line.

    That is the first frame outside ``implicit`` and ``torch`` (the front door's caller,
    or the ``backward()`` call); a fixed level cannot work, since the forward and the
    backward reach ``report_failure`` through stacks of different depths.
    """
    level, frame = 2, sys._getframe(2)  # 1 is report_failure itself
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        level, frame = level + 1, frame.f_back
    return level


# -- bad input: the checks every call runs -------------------------------------------
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


def check_on_failure(on_failure: object) -> None:
    if on_failure not in ON_FAILURE_CHOICES:
        raise ValueError(f"on_failure must be one of {ON_FAILURE_CHOICES}, got {on_failure!r}")


def check_states(states: Sequence[Any], labels: Sequence[str], batched: bool, name: str) -> None:
    """The states of a problem (or the target ``y`` of an inverse): tensors of one dtype
    and device, floating point or complex, not empty, with values in dense (strided)
    storage: not a sparse tensor (the solvers reshape and combine states densely), not
    a meta tensor (no values)."""
    if not states:
        raise ValueError(f"{name} must be a tensor or a non-empty tuple of tensors")
    first = labels[0]
    for state, label in zip(states, labels):
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{label} must be a torch.Tensor, got {type(state).__name__}")
        if state.layout != torch.strided:
            raise TypeError(
                f"{label} is a {state.layout} tensor: states must be dense, pass {label}.to_dense()"
            )
        if state.is_meta:
            raise ValueError(
                f"{label} is on the meta device, which holds no values to solve for: create "
                f"it on a real device (cpu, cuda, ...)"
            )
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
