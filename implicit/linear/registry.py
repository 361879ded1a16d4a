"""The backward modes by name: the registry that ``backward=`` looks names up in."""

from __future__ import annotations

import functools
from collections.abc import Callable

from implicit.linear.auto import Auto
from implicit.linear.base import LinearSolver
from implicit.linear.bicgstab import BiCGStab
from implicit.linear.cg import CG
from implicit.linear.dense import Dense
from implicit.linear.gmres import GMRES
from implicit.linear.neumann import Neumann
from implicit.linear.one_step import OneStep, Phantom
from implicit.linear.unroll import Unroll

__all__ = ["NAMES", "named", "resolve"]

NAMES: dict[str, Callable[[], LinearSolver | Unroll]] = {
    "auto": Auto,
    "dense": Dense,
    "cg": CG,
    "gmres": GMRES,
    "bicgstab": BiCGStab,
    "neumann": Neumann,
    "one_step": OneStep,
    "phantom": Phantom,
    "unroll": Unroll,
}
"""The backward modes by the names ``backward=`` accepts (each with its default options)."""


def resolve(backward: str | LinearSolver | Unroll) -> LinearSolver | Unroll:
    """A backward mode given by name or instance, as an instance."""
    if isinstance(backward, (LinearSolver, Unroll)):
        return backward
    if isinstance(backward, str) and backward in NAMES:
        return _default(backward)
    raise ValueError(
        f"unknown backward {backward!r}: use one of {sorted(NAMES)} or an instance "
        f"from implicit.linear"
    )


@functools.cache
def _default(name: str) -> LinearSolver | Unroll:
    """The instance of a name, made once: instances are immutable, so one serves all."""
    return NAMES[name]()


@functools.cache
def named(name: str) -> LinearSolver | Unroll:
    """The backward mode ``name`` (as :func:`resolve`), looked up once per name: the front
    doors ask for it at every call."""
    return resolve(name)
