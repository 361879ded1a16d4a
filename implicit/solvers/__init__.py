"""Forward solvers: one file per method, all behind [`Solver`][implicit.solvers.Solver].

Pick one by name (``solver="anderson"``, with options as keyword arguments of the
front door) or pass an instance (``solver=implicit.solvers.Anderson(m=8)``).
"""

from __future__ import annotations

import inspect
from typing import Any

from implicit._checks import check_options
from implicit.solvers.anderson import Anderson
from implicit.solvers.base import Solver
from implicit.solvers.broyden import Broyden
from implicit.solvers.fixed_point import FixedPoint
from implicit.solvers.newton import Newton
from implicit.solvers.scipy import Scipy

__all__ = [
    "NAMES",
    "Anderson",
    "Broyden",
    "FixedPoint",
    "Newton",
    "Scipy",
    "Solver",
    "resolve",
]

NAMES: dict[str, type[Solver]] = {
    FixedPoint.name: FixedPoint,
    Anderson.name: Anderson,
    Newton.name: Newton,
    Broyden.name: Broyden,
    Scipy.name: Scipy,
}
"""The solvers by the names ``solver=`` accepts: ``"fixed_point"``, ``"anderson"``,
``"newton"``, ``"broyden"``, ``"scipy"``. A front door's ``**solver_options`` are the
keyword arguments of the named class."""


def resolve(solver: str | Solver, options: dict[str, Any]) -> Solver:
    """A solver given by name (with constructor options) or by instance."""
    if isinstance(solver, Solver):
        if options:
            raise TypeError(
                f"solver options {sorted(options)} can only be given with a solver name; "
                f"set them on the instance instead"
            )
        return solver
    if not isinstance(solver, str) or solver not in NAMES:
        raise ValueError(
            f"unknown solver {solver!r}: use one of {sorted(NAMES)} or an instance of "
            f"implicit.solvers.Solver"
        )
    cls = NAMES[solver]
    if options:  # (introspection costs more than a small solve's iteration)
        check_options(f"solver {solver!r}", options, inspect.signature(cls).parameters)
    return cls(**options)
