"""What the three layers share: solve settings checked once, and ``last_info``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from implicit import linear, solvers
from implicit._checks import check_max_iter
from implicit._problem import TOL_MODES
from implicit._progress import Callback, check_callback
from implicit._results import SolveInfo, check_on_failure
from implicit._tolerance import Tol, check_tol


class SolverLayer(nn.Module):
    """An ``nn.Module`` that calls a front door with settings fixed at construction.

    The options are checked here, once, so that a misspelt option or an unknown solver
    fails when the layer is built rather than at its first forward. The solver and the
    backward mode are resolved to instances (immutable configuration) and reused by
    every forward.

    Args:
        owner: the layer's name, for error messages.
        options: the layer's ``**opts``: the keys of ``defaults`` (layer options) and
            the constructor options of the named solver.
        defaults: the layer options and their default values.
    """

    def __init__(self, owner: str, options: dict[str, Any], defaults: dict[str, Any]):
        super().__init__()
        settings = {**defaults, **{k: options.pop(k) for k in defaults if k in options}}
        solver = settings.pop("solver")
        accepted = _solver_parameters(solver)
        solver_options = {k: options.pop(k) for k in list(options) if k in accepted}
        self.solver = solvers.resolve(solver, solver_options)
        if options:
            raise TypeError(
                f"{owner} got unknown option(s) {sorted(options)}; layer options are "
                f"{sorted(defaults)}, options of solver {solver!r} are {sorted(accepted)}"
            )
        check_tol(settings["tol"])
        check_max_iter(settings["max_iter"])
        check_on_failure(settings["on_failure"])
        check_callback(settings["callback"])
        if settings["tol_mode"] not in TOL_MODES:
            raise ValueError(f"tol_mode must be one of {TOL_MODES}, got {settings['tol_mode']!r}")
        self.backward_mode = linear.resolve(settings.pop("backward"))
        self.tol: Tol = settings.pop("tol")
        self.tol_mode: str = settings.pop("tol_mode")
        self.max_iter: int = settings.pop("max_iter")
        self.on_failure: str = settings.pop("on_failure")
        #: Called after each iteration of every forward's solve, as
        #: ``callback(iteration, residual, z)`` (``None``: not at all); may be replaced.
        self.callback: Callback | None = settings.pop("callback")
        self.layer_options = settings
        #: The [`SolveInfo`][implicit.SolveInfo] of the latest forward (``None`` before it).
        self.last_info: SolveInfo | None = None

    def solve_options(self) -> dict[str, Any]:
        """Keyword arguments for the front door."""
        return {
            "solver": self.solver,
            "backward": self.backward_mode,
            "tol": self.tol,
            "tol_mode": self.tol_mode,
            "max_iter": self.max_iter,
            "on_failure": self.on_failure,
            "return_info": True,
            "callback": self.callback,
        }

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, backward={self.backward_mode!r}, tol={self.tol}, "
            f"max_iter={self.max_iter}"
        )


#: The solve settings every layer takes, as its front door names them.
SOLVE_SETTINGS = ("solver", "backward", "tol", "tol_mode", "max_iter", "on_failure", "callback")


def front_door_defaults(front_door: Callable[..., Any]) -> dict[str, Any]:
    """The front door's defaults for the solve settings: a layer over it defaults as
    the function does, from one place."""
    parameters = inspect.signature(front_door).parameters
    return {name: parameters[name].default for name in SOLVE_SETTINGS}


def _solver_parameters(solver: Any) -> set[str]:
    """The constructor options of a solver given by name (none for an instance)."""
    names = {**solvers.NAMES, **solvers.BRACKETING}
    if isinstance(solver, str) and solver in names:
        return set(inspect.signature(names[solver]).parameters)
    return set()
