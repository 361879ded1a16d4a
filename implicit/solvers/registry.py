"""The forward solvers by name: the registries that ``solver=`` looks names up in.

A new solver is one file (a subclass of [`Solver`][implicit.solvers.Solver]) plus one
line in the registry of the front doors that take it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from implicit._checks import check_options
from implicit.solvers.anderson import Anderson
from implicit.solvers.base import Solver
from implicit.solvers.bisection import Bisection
from implicit.solvers.broyden import Broyden
from implicit.solvers.chandrupatla import Chandrupatla
from implicit.solvers.fixed_point import FixedPoint
from implicit.solvers.gauss_newton import GaussNewton
from implicit.solvers.lbfgs import LBFGS
from implicit.solvers.levenberg_marquardt import LevenbergMarquardt
from implicit.solvers.modified_newton import ModifiedNewton
from implicit.solvers.newton import Newton
from implicit.solvers.scipy import Scipy
from implicit.solvers.scipy_least_squares import ScipyLeastSquares
from implicit.solvers.scipy_minimize import ScipyMinimize

__all__ = ["BRACKETING", "LEAST_SQUARES", "MINIMIZERS", "NAMES", "named", "resolve"]

NAMES: dict[str, type[Solver]] = {
    FixedPoint.name: FixedPoint,
    Anderson.name: Anderson,
    Newton.name: Newton,
    Broyden.name: Broyden,
    Scipy.name: Scipy,
}
"""The solvers by the names ``solver=`` accepts for any root or fixed-point problem:
``"fixed_point"``, ``"anderson"``, ``"newton"``, ``"broyden"``, ``"scipy"``. A front
door's ``**solver_options`` are the keyword arguments of the named class."""

BRACKETING: dict[str, type[Solver]] = {
    Bisection.name: Bisection,
    Chandrupatla.name: Chandrupatla,
}
"""The bracketing solvers, which the root front doors also accept by name:
``"bisection"`` and ``"chandrupatla"``, for problems of one unknown each with
``lower=`` and ``upper=`` (``root_solve(g, z0, solver="bisection", lower=-1.0,
upper=1.0)``)."""


MINIMIZERS: dict[str, type[Solver]] = {
    LBFGS.name: LBFGS,
    ModifiedNewton.name: ModifiedNewton,
    ScipyMinimize.name: ScipyMinimize,
}
"""The solvers of [`implicit.minimize`][implicit.minimize] by name: ``"lbfgs"``,
``"newton"`` ([`ModifiedNewton`][implicit.solvers.ModifiedNewton]), ``"scipy"``
([`ScipyMinimize`][implicit.solvers.ScipyMinimize])."""

LEAST_SQUARES: dict[str, type[Solver]] = {
    LevenbergMarquardt.name: LevenbergMarquardt,
    GaussNewton.name: GaussNewton,
    ScipyLeastSquares.name: ScipyLeastSquares,
    LBFGS.name: LBFGS,
    ModifiedNewton.name: ModifiedNewton,
}
"""The solvers of [`implicit.least_squares`][implicit.least_squares] by name:
``"levenberg_marquardt"``, ``"gauss_newton"``, ``"scipy"``
([`ScipyLeastSquares`][implicit.solvers.ScipyLeastSquares]), and the minimisation
solvers ``"lbfgs"`` and ``"newton"``, which minimise ``½‖r‖²`` as any objective."""


def resolve(
    solver: str | Solver,
    options: dict[str, Any],
    names: dict[str, type[Solver]] | None = None,
    owner: str = "solver",
) -> Solver:
    """A solver given by name (with constructor options) or by instance.

    Args:
        solver: a name from ``names`` or an instance.
        options: the named solver's constructor options.
        names: the registry the name is looked up in: ``MINIMIZERS``,
            ``LEAST_SQUARES``, or by default the root solvers (``NAMES`` and
            ``BRACKETING``).
        owner: the front door, for error messages.
    """
    if isinstance(solver, Solver):
        if options:
            raise TypeError(
                f"solver options {sorted(options)} can only be given with a solver name; "
                f"set them on the instance instead"
            )
        return solver
    where = "" if names is None else f" for {owner}"
    names = {**NAMES, **BRACKETING} if names is None else names
    if not isinstance(solver, str) or solver not in names:
        raise ValueError(
            f"unknown solver {solver!r}{where}: use one of {sorted(names)} or an instance of "
            f"implicit.solvers.Solver"
        )
    cls = names[solver]
    if not options:
        return _default(cls)
    check_options(f"solver {solver!r}", options, inspect.signature(cls).parameters)
    return cls(**options)


@functools.cache
def _default(cls: type[Solver]) -> Solver:
    """The instance of a solver with its default options, made once: instances are
    immutable, so one serves every call."""
    return cls()


@functools.cache
def named(name: str) -> Solver:
    """The root solver ``name`` with its default options (as :func:`resolve`), looked up
    once per name: the front doors ask for it at every call."""
    return resolve(name, {})
