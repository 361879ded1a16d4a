"""The random problem families of the fuzz, reproducible by ``(family, seed)``.

``make(family, seed)`` draws an :class:`Instance`: the problem, the settings it is
solved with, and its float64 oracle (see :mod:`families._base`).
"""

from __future__ import annotations

from . import linear, nonfinite, scalar, tanh
from ._base import Instance, flat, reference_gradient, refine

_MODULES = (tanh, linear, scalar, nonfinite)

#: name → ``draw(seed, small) -> Instance``.
FAMILIES = {name: draw for module in _MODULES for name, draw in module.FAMILIES.items()}
#: name → the doors the family can be entered by.
DOORS = {name: doors for module in _MODULES for name, doors in module.DOORS.items()}
#: Families whose Jacobian ``∂g/∂z`` is symmetric (CG applies), known without drawing.
SYMMETRIC = {
    "linear_spd",
    "linear_fixed_point",
    "kepler",
    "monotone_inverse",
    "nan_root",
    "exp_overflow",
}


def make(family: str, seed: int, small: bool = False) -> Instance:
    """Draw problem ``seed`` of ``family`` (``small``: at most 6 unknowns, 3 problems)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: use one of {sorted(FAMILIES)}")
    return FAMILIES[family](seed, small)


__all__ = [
    "DOORS",
    "FAMILIES",
    "SYMMETRIC",
    "Instance",
    "flat",
    "make",
    "reference_gradient",
    "refine",
]
