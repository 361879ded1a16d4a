"""Argument checks off the common path: the solvers' and linear solvers' options (over
:func:`implicit._results.check_number`), and the full checks of a problem's input and
output where the common case's fail. The checks every call runs are in
:mod:`implicit._results`.
"""

from __future__ import annotations

from typing import Any

import torch

from implicit import _tree
from implicit._results import check_number


def check_tol(tol: object, name: str = "tol") -> None:
    check_number(tol, name, "a positive finite number")


def check_max_iter(max_iter: object, name: str = "max_iter") -> None:
    check_number(max_iter, name, "an integer >= 1")


def check_options(owner: str, options: dict, allowed: dict) -> None:
    """Raise on misspelt solver options, naming the closest valid ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"{owner} got unknown option(s) {unknown}; valid options are {sorted(allowed)}"
        )


def arg_label(problem: Any, position: int) -> str:
    """How errors name ``problem``'s explicit argument at ``position``."""
    if problem.form != "inverse":
        return f"argument {position}" + (" (after z0)" if problem.initial_name == "z0" else "")
    return "y" if position == 0 else f"argument {position - 1} (after y)"


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
