"""Argument checks shared by the front doors, solvers and linear solvers."""

from __future__ import annotations

import math

ON_FAILURE_CHOICES = ("warn", "raise", "ignore")


def check_tol(tol: object, name: str = "tol") -> None:
    if (
        isinstance(tol, bool)
        or not isinstance(tol, (int, float))
        or not (tol > 0 and math.isfinite(tol))
    ):
        raise ValueError(f"{name} must be a positive finite number, got {tol!r}")


def check_max_iter(max_iter: object, name: str = "max_iter") -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {max_iter!r}")


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
