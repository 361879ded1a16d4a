"""The random problem families of the fuzz, reproducible by ``(family, seed)``.

``make(family, seed)`` draws an :class:`Instance`: the problem, the settings it is
solved with, and its float64 oracle (see :mod:`families._base`).
"""

from __future__ import annotations

from . import bracket, linear, lsq, nonconvex, nonfinite, quadratic, scalar, tanh
from ._base import (
    Instance,
    Unchecked,
    flat,
    reference_gradient,
    reference_root,
    reference_tangent,
    refine,
    shifted,
)

_MODULES = (tanh, linear, scalar, nonfinite, quadratic, nonconvex, lsq, bracket)

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
    # Hessians, positive (semi-)definite at a minimum; increasing scalar residuals.
    "opt_quadratic",
    "opt_illcond",
    "opt_nonconvex",
    "opt_nonfinite",
    "lsq_random",
    "lsq_curve",
    "bracket_monotone",
}
#: What a family's problems are: ``"root"`` (roots, fixed points, inverses),
#: ``"minimize"``, ``"least_squares"`` or ``"bracket"`` (one unknown per problem).
KIND = {
    **{name: "root" for module in (tanh, linear, scalar, nonfinite) for name in module.FAMILIES},
    **{name: "minimize" for module in (quadratic, nonconvex) for name in module.FAMILIES},
    **{name: "least_squares" for name in lsq.FAMILIES},
    **{name: "bracket" for name in bracket.FAMILIES},
}
#: Families drawn with bounds (only bounded methods apply).
BOUNDED = {"opt_bounded", "lsq_bounded"}


def make(family: str, seed: int, small: bool = False) -> Instance:
    """Draw problem ``seed`` of ``family`` (``small``: at most 6 unknowns, 3 problems)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: use one of {sorted(FAMILIES)}")
    return FAMILIES[family](seed, small)


__all__ = [
    "BOUNDED",
    "DOORS",
    "FAMILIES",
    "KIND",
    "SYMMETRIC",
    "Instance",
    "Unchecked",
    "flat",
    "make",
    "reference_gradient",
    "reference_root",
    "reference_tangent",
    "refine",
    "shifted",
]
