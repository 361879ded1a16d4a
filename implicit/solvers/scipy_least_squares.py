"""``scipy.optimize.least_squares`` as the forward solver of ``least_squares``."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import numpy as np

from implicit.solvers._scipy_base import Rows, ScipyBase, sentence

LEAST_SQUARES_METHODS = ("trf", "dogbox", "lm")
"""The ``scipy.optimize.least_squares`` methods of
[`ScipyLeastSquares`][implicit.solvers.ScipyLeastSquares]."""


@dataclasses.dataclass(frozen=True)
class ScipyLeastSquares(ScipyBase):
    """``scipy.optimize.least_squares(method=...)``: ``solver="scipy"`` of
    [`least_squares`][implicit.least_squares].

    Given the residual and its exact Jacobian (block diagonal for a block of
    problems). ``"trf"`` and ``"dogbox"`` take ``bounds``; ``"lm"`` (MINPACK) does not,
    and needs at least as many residuals as unknowns. ``max_nfev = max_iter``, and the
    tolerances: ``gtol`` such that scipy's test implies ours (``trf``, ``dogbox``),
    ``ftol = xtol = eps`` (iterate until no further progress); ``options`` (keyword
    arguments of ``scipy.optimize.least_squares``: ``x_scale``, ``loss``, ...) override
    them. A robust ``loss`` changes the objective: the answer then fails our test on
    ``½‖r‖²``.

    Args:
        method: ``"trf"`` (default), ``"dogbox"`` or ``"lm"``.
        options: keyword arguments of ``scipy.optimize.least_squares``.
        strategy: as for [`ScipyMinimize`][implicit.solvers.ScipyMinimize]
            (``"auto"``: block up to
            [`MAX_BLOCK_UNKNOWNS`][implicit.solvers.scipy_minimize.MAX_BLOCK_UNKNOWNS]).
    """

    name = "scipy"
    least_squares_only = True
    methods = LEAST_SQUARES_METHODS
    front = "least_squares"

    method: str = "trf"
    options: dict[str, Any] | None = None
    strategy: str = dataclasses.field(default="auto", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        import scipy.optimize

        allowed = set(inspect.signature(scipy.optimize.least_squares).parameters)
        unknown = sorted(set(self.options) - (allowed - {"fun", "x0", "jac", "bounds", "method"}))
        if unknown:
            raise TypeError(
                f"ScipyLeastSquares got unknown or reserved option(s) {unknown}: options are "
                f"keyword arguments of scipy.optimize.least_squares other than fun, x0, jac, "
                f"bounds and method"
            )

    def _bounded(self, bounds) -> bool:
        return self.method != "lm"

    def _with_bounds(self) -> list[str]:
        return ["trf", "dogbox"]

    def _run(self, fn, z, rows, threshold, tol, max_iter):
        import scipy.optimize

        view = Rows(z, rows)

        def fun(x):
            r = fn.residuals(view.state(x))
            return np.nan_to_num(view.vector(r), nan=np.inf)

        def jac(x):
            fn.jac_evals += 1
            return view.blocks(fn.residuals_linearization(view.state(x)).dense())

        eps = float(np.finfo(np.float64).eps)
        gtol = eps if self.method == "lm" else float(threshold.min()) / math.sqrt(z.shape[1])
        kwargs: dict[str, Any] = {"ftol": eps, "xtol": eps, "gtol": max(gtol, eps)}
        kwargs["max_nfev"] = max_iter
        bounds = fn.bounds(z)
        if bounds is not None:
            kwargs["bounds"] = (view.vector(bounds[0]), view.vector(bounds[1]))
        kwargs.update(self.options)
        with np.errstate(all="ignore"):
            result = scipy.optimize.least_squares(
                fun, view.vector(z), jac=jac, method=self.method, **kwargs
            )
        verdict = f"status={result.status}: {sentence(result.message)}"
        return view.state(result.x), int(result.nfev), verdict
