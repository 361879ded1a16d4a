"""Auxiliary outputs: ``has_aux=True`` for functions that return ``(output, aux)``.

The solve sees ``output`` only. ``aux`` is evaluated once more at the solution, by an
ordinary call ``fn(z*, *args)[1]`` made in the caller's autograd mode: it is the
function ``θ ↦ aux(z*(θ), θ)``, differentiable like any other (through ``z*`` by the
implicit function theorem, and directly through the arguments and captured tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def split(fn: Callable[..., Any], name: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``fn`` (``has_aux=True``: it returns ``(output, aux)``) without its auxiliary
    output, and the function returning that output."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")

    def pair(*args: Any) -> tuple[Any, Any]:
        out = fn(*args)
        if not isinstance(out, tuple) or len(out) != 2:
            got = f"a tuple of {len(out)} items" if isinstance(out, tuple) else type(out).__name__
            raise TypeError(f"{name} must return a pair (output, aux) with has_aux=True, got {got}")
        return out

    return (lambda *args: pair(*args)[0]), (lambda *args: pair(*args)[1])
