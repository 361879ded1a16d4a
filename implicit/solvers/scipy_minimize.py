"""Any ``scipy.optimize.minimize`` method as the forward solver of ``minimize``."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import torch

from implicit.solvers._scipy_base import MAX_BLOCK_UNKNOWNS, Rows, ScipyBase, sentence

__all__ = ["MAX_BLOCK_UNKNOWNS", "MINIMIZE_METHODS", "ScipyMinimize"]

MINIMIZE_METHODS = (
    "Nelder-Mead",
    "Powell",
    "CG",
    "BFGS",
    "Newton-CG",
    "L-BFGS-B",
    "TNC",
    "COBYLA",
    "COBYQA",
    "SLSQP",
    "trust-constr",
    "dogleg",
    "trust-ncg",
    "trust-exact",
    "trust-krylov",
)
"""The ``scipy.optimize.minimize`` methods [`ScipyMinimize`][implicit.solvers.ScipyMinimize]
accepts."""
_DERIVATIVE_FREE = ("Nelder-Mead", "Powell", "COBYLA", "COBYQA")
_HESSP = ("Newton-CG", "trust-ncg", "trust-krylov", "trust-constr")
_HESS = ("dogleg", "trust-exact")
_TRUST_REGION = ("dogleg", "trust-ncg", "trust-exact", "trust-krylov")
_BOUNDED = ("Nelder-Mead", "Powell", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr")


@dataclasses.dataclass(frozen=True)
class ScipyMinimize(ScipyBase):
    """``scipy.optimize.minimize(method=...)``: ``solver="scipy"`` of
    [`minimize`][implicit.minimize].

    The gradient-based methods get the exact gradient; ``Newton-CG``, ``trust-ncg``,
    ``trust-krylov`` and ``trust-constr`` exact Hessian-vector products (``hessp``);
    ``dogleg`` and ``trust-exact`` the dense Hessian. ``bounds`` go to the methods
    that take them (``L-BFGS-B``, ``TNC``, ``SLSQP``, ``trust-constr``, ``Powell``,
    ``Nelder-Mead``, ``COBYLA``, ``COBYQA``); another method with bounds raises.
    Defaults derived from ``tol`` and ``max_iter`` (``maxiter``, or ``maxfun`` for
    TNC; for Nelder-Mead, Powell and COBYQA, whose iterations may each evaluate ``fun``
    dozens of times, also ``maxfev = max_iter·(n + 1)``, so that ``max_iter`` bounds
    the cost; a gradient tolerance ``gtol`` such that scipy's test implies ours where the
    method has one; step tolerances ``tol`` for the derivative-free methods) are
    overridden by ``options``; an option scipy does not know raises.

    Args:
        method: one of [`MINIMIZE_METHODS`][implicit.solvers.scipy_minimize.MINIMIZE_METHODS].
        options: scipy's ``options`` dict for the method.
        strategy: ``"block"``: one scipy solve of the whole batch (the sum of the
            objectives; the problems share scipy's steps and stop together);
            ``"per_sample"``: one solve per problem (each evaluation evaluates the whole
            batch, the other rows held fixed); ``"auto"``: per sample for the
            derivative-free methods (their cost grows fast with the unknowns) and above
            [`MAX_BLOCK_UNKNOWNS`][implicit.solvers.scipy_minimize.MAX_BLOCK_UNKNOWNS],
            block otherwise.
    """

    name = "scipy"
    methods = MINIMIZE_METHODS
    front = "minimize"

    method: str = "L-BFGS-B"
    options: dict[str, Any] | None = None
    strategy: str = dataclasses.field(default="auto", kw_only=True)

    def _blocks(self) -> bool:
        return self.method not in _DERIVATIVE_FREE

    def _bounded(self, bounds) -> bool:
        return self.method in _BOUNDED

    def _with_bounds(self) -> list[str]:
        return list(_BOUNDED)

    def _run(self, fn, z, rows, threshold, tol, max_iter):
        import scipy.optimize

        view = Rows(z, rows)
        method = self.method
        gradient = method not in _DERIVATIVE_FREE

        # scipy's trust-region methods hand the gradient and Hessian to scipy.linalg, which
        # raises on a non-finite entry: there the run stops at the last point instead.
        checked = method in _TRUST_REGION
        evaluations = [0]

        def fun(x):
            evaluations[0] += 1
            if not gradient:
                return _value(fn.value(view.state(x))[rows])
            f, grad = fn.value_and_grad(view.state(x))
            value = _value(f[rows])
            return value, _finite(view.vector(grad), x) if checked else view.vector(grad)

        kwargs: dict[str, Any] = {"jac": True} if gradient else {}
        if method in _HESSP:

            def hessp(x, p):
                full = torch.zeros_like(z)
                block = torch.as_tensor(p, dtype=z.dtype, device=z.device)
                full[rows] = block.reshape(-1, z.shape[1])
                product = view.vector(fn.hessian(view.state(x)).mv(full))
                return _finite(product, x) if checked else product

            kwargs["hessp"] = hessp
        if method in _HESS:
            kwargs["hess"] = lambda x: _finite(view.blocks(fn.hessian(view.state(x)).dense()), x)
        bounds = fn.bounds(z)
        if bounds is not None:
            kwargs["bounds"] = scipy.optimize.Bounds(view.vector(bounds[0]), view.vector(bounds[1]))
        options = _defaults(method, max_iter, tol, float(threshold.min()), z.shape[1])
        options.update(self.options)
        x0 = view.vector(z)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("error", scipy.optimize.OptimizeWarning)
            try:
                result = scipy.optimize.minimize(fun, x0, method=method, options=options, **kwargs)
            except scipy.optimize.OptimizeWarning as warning:
                raise TypeError(f"ScipyMinimize(method={method!r}): {warning}") from None
            except _NonFinite as stop:
                verdict = "stopped: the gradient or Hessian is not finite"
                # (Its iterations unknown, the evaluations bound them.)
                return view.state(stop.x), evaluations[0], verdict
        verdict = f"success={bool(result.success)}: {sentence(result.message)}"
        return view.state(result.x), int(result.get("nit", result.get("nfev", 0))), verdict


def _value(f: torch.Tensor) -> float:
    """The objective scipy sees: the sum over the rows solved, ``inf`` where it is not
    finite."""
    value = float(f.sum())
    return value if math.isfinite(value) else math.inf


def _defaults(method: str, max_iter: int, tol: float, threshold: float, n: int) -> dict[str, Any]:
    """scipy's options for ``tol`` and ``max_iter``: where the method tests a gradient,
    a bound under which its test implies ours (``‖g‖∞ ≤ threshold/√n`` gives
    ``‖g‖₂ ≤ threshold``)."""
    gtol_inf = threshold / math.sqrt(n)
    eps = float(np.finfo(np.float64).eps)
    table: dict[str, dict[str, Any]] = {
        "BFGS": {"gtol": gtol_inf},
        "CG": {"gtol": gtol_inf},
        "L-BFGS-B": {"gtol": gtol_inf, "ftol": 0.0},
        "TNC": {"gtol": gtol_inf, "ftol": 0.0, "xtol": 0.0, "maxfun": max_iter},
        "Newton-CG": {"xtol": tol},
        "trust-constr": {"gtol": gtol_inf},
        "dogleg": {"gtol": threshold},
        "trust-ncg": {"gtol": threshold},
        "trust-exact": {"gtol": threshold},
        "trust-krylov": {"gtol": threshold},
        "SLSQP": {"ftol": eps},
        "Nelder-Mead": {"xatol": tol, "fatol": threshold**2},
        "Powell": {"xtol": tol, "ftol": eps},
        "COBYLA": {"tol": tol},
        "COBYQA": {"final_tr_radius": tol},
    }
    options = {} if method == "TNC" else {"maxiter": max_iter}
    if method in ("Nelder-Mead", "Powell", "COBYQA"):
        options["maxfev"] = max_iter * (n + 1)
    options.update(table[method])
    return options


class _NonFinite(Exception):
    """Raised through scipy to stop a run at ``x``, where a derivative is not finite."""

    def __init__(self, x: np.ndarray):
        super().__init__("a non-finite gradient or Hessian")
        self.x = np.array(x, copy=True)


def _finite(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``values``, or a stop at ``x`` where one of them is not finite."""
    if not np.isfinite(values).all():
        raise _NonFinite(x)
    return values
