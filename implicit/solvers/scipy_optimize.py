"""``scipy.optimize.minimize`` and ``scipy.optimize.least_squares`` as forward solvers.

They run in numpy inside the differentiable core's forward and only find ``z*``; the
derivatives come from the implicit backward as for every solver. The objective, its
gradient and Hessian products (and the residual vector and its Jacobian) are
evaluated by torch on the problem's device. Whatever scipy reports, the front door's
test decides: a problem has converged when ``‖g(z)_b‖₂ ≤ tol · (1 + |fun(z0)_b|)``
(``g`` the gradient, projected with bounds), else its status is ``"failed"``; and a
converged problem must pass the second-order test of
[`Minimizer`][implicit.solvers.Minimizer] (a saddle is left once and scipy run again
from there).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from implicit._results import CONVERGED, FAILED, NONFINITE, SolveInfo, status_name
from implicit.solvers._minimizer import Minimizer, check_objective

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
_BOUNDED = ("Nelder-Mead", "Powell", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP", "trust-constr")
LEAST_SQUARES_METHODS = ("trf", "dogbox", "lm")
"""The ``scipy.optimize.least_squares`` methods of
[`ScipyLeastSquares`][implicit.solvers.ScipyLeastSquares]."""
#: Above this many unknowns in all, a batch is solved problem by problem (scipy's dense
#: linear algebra on the whole batch costs the cube of it).
MAX_BLOCK_UNKNOWNS = 256


class _ScipyBase(Minimizer):
    """What the two wrappers share: the batch strategy, the runs and the report."""

    methods: tuple[str, ...]
    front: str

    def __init__(self, method: str, options: dict[str, Any] | None, strategy: str):
        super().__init__()
        if method not in self.methods:
            raise ValueError(f"unknown scipy method {method!r}: use one of {list(self.methods)}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict, got {type(options).__name__}")
        if strategy not in ("auto", "block", "per_sample"):
            raise ValueError(f"strategy must be 'auto', 'block' or 'per_sample', got {strategy!r}")
        self.method = method
        self.options = dict(options or {})
        self.strategy = strategy

    def solve(self, fn, z0, r0, *, tol, max_iter):
        check_objective(fn, self)
        z = fn.project(z0)
        f, grad = fn.value_and_grad(z)
        if f.requires_grad:
            raise ValueError(
                "backward='unroll' differentiates through the solver's iterations, but scipy "
                "runs in numpy: use an implicit backward ('auto', 'dense', 'cg', ...)"
            )
        bounds = fn.bounds(z)
        if bounds is not None and not self._bounded(bounds):
            raise ValueError(
                f"bounds: method {self.method!r} takes no bounds; use one of {self._with_bounds()}"
            )
        threshold = tol * (1 + f.abs())
        verdicts: list[str] = []
        iterations = 0
        rows = torch.ones_like(f, dtype=torch.bool)
        for attempt in range(2):  # a second run for the problems that left a saddle
            z, its = self._run_all(fn, z, rows, threshold, tol, max_iter, verdicts)
            iterations += its
            f, grad = fn.value_and_grad(z)
            norms = torch.linalg.vector_norm(fn.optimality(z, grad), dim=1)
            passed = norms <= threshold
            saddle, leave = self._saddles(fn, z, grad, passed)
            if attempt == 1 or not bool(saddle.any()):
                break
            z, f, grad, rows, used = self._escape(fn, z, f, grad, saddle, leave, max_iter)
            iterations += used
        codes = torch.where(passed & ~saddle, CONVERGED, FAILED)
        codes = torch.where(torch.isfinite(norms), codes, NONFINITE)
        message = f"scipy.optimize.{self.front}(method={self.method!r}): " + "; ".join(
            dict.fromkeys(verdicts)
        )
        if bool(saddle.any()):
            message += ". A stationary point with negative curvature (a saddle or maximum)"
        info = SolveInfo(
            converged=codes == CONVERGED,
            residual=norms.detach(),
            iterations=iterations,
            f_evals=fn.f_evals,
            history=[float(norms.max())],
            status=status_name(codes),
            solver=self.name,
            message=message + ".",
            jac_evals=fn.jac_evals,
        )
        return z, info

    def _run_all(self, fn, z, rows, threshold, tol, max_iter, verdicts):
        batch, n = z.shape
        chosen = [int(b) for b in rows.nonzero().squeeze(1)]
        if not chosen:
            return z, 0
        block = self.strategy == "block" or (
            self.strategy == "auto" and self._blocks() and batch * n <= MAX_BLOCK_UNKNOWNS
        )
        groups = [chosen] if block else [[b] for b in chosen]
        iterations = 0
        for group in groups:
            z, its, verdict = self._run(fn, z, group, threshold[group], tol, max_iter)
            iterations = max(iterations, its)
            verdicts.append(verdict)
        return z, iterations

    def _blocks(self) -> bool:
        return True

    def _bounded(self, bounds) -> bool:
        return True

    def _with_bounds(self) -> list[str]:
        return list(self.methods)


class _Rows:
    """Rows ``rows`` of the batch as one numpy vector, the other rows held fixed."""

    def __init__(self, z: torch.Tensor, rows: list[int]):
        self.z, self.rows = z, rows
        self.n = z.shape[1]

    def state(self, x: np.ndarray) -> torch.Tensor:
        block = torch.as_tensor(np.asarray(x), dtype=self.z.dtype, device=self.z.device)
        block = block.reshape(len(self.rows), self.n)
        if len(self.rows) == self.z.shape[0]:
            return block
        z = self.z.clone()
        z[self.rows] = block
        return z

    def vector(self, tensor: torch.Tensor) -> np.ndarray:
        return tensor[self.rows].detach().reshape(-1).cpu().double().numpy()

    def blocks(self, tensor: torch.Tensor) -> np.ndarray:
        """``(B, a, b)`` per-row blocks of the rows, as one block-diagonal matrix."""
        return torch.block_diag(*tensor[self.rows].detach()).cpu().double().numpy()


class ScipyMinimize(_ScipyBase):
    """``scipy.optimize.minimize(method=...)``: ``solver="scipy"`` of
    [`minimize`][implicit.minimize].

    The gradient-based methods get the exact gradient; ``Newton-CG``, ``trust-ncg``,
    ``trust-krylov`` and ``trust-constr`` exact Hessian-vector products (``hessp``);
    ``dogleg`` and ``trust-exact`` the dense Hessian. ``bounds`` go to the methods
    that take them (``L-BFGS-B``, ``TNC``, ``SLSQP``, ``trust-constr``, ``Powell``,
    ``Nelder-Mead``, ``COBYLA``, ``COBYQA``); another method with bounds raises.
    Defaults derived from ``tol`` and ``max_iter`` (``maxiter``, or ``maxfun`` for
    TNC; a gradient tolerance ``gtol`` such that scipy's test implies ours where the
    method has one; step tolerances ``tol`` for the derivative-free methods) are
    overridden by ``options``; an option scipy does not know raises.

    Args:
        method: one of [`MINIMIZE_METHODS`][implicit.solvers.scipy_optimize.MINIMIZE_METHODS].
        options: scipy's ``options`` dict for the method.
        strategy: ``"block"``: one scipy solve of the whole batch (the sum of the
            objectives; the problems share scipy's steps and stop together);
            ``"per_sample"``: one solve per problem (each evaluation evaluates the whole
            batch, the other rows held fixed); ``"auto"``: per sample for the
            derivative-free methods (their cost grows fast with the unknowns) and above
            [`MAX_BLOCK_UNKNOWNS`][implicit.solvers.scipy_optimize.MAX_BLOCK_UNKNOWNS],
            block otherwise.
    """

    name = "scipy"
    methods = MINIMIZE_METHODS
    front = "minimize"

    def __init__(
        self,
        method: str = "L-BFGS-B",
        options: dict[str, Any] | None = None,
        *,
        strategy: str = "auto",
    ):
        super().__init__(method, options, strategy)

    def _blocks(self) -> bool:
        return self.method not in _DERIVATIVE_FREE

    def _bounded(self, bounds) -> bool:
        return self.method in _BOUNDED

    def _with_bounds(self) -> list[str]:
        return list(_BOUNDED)

    def _run(self, fn, z, rows, threshold, tol, max_iter):
        import scipy.optimize

        view = _Rows(z, rows)
        method = self.method
        gradient = method not in _DERIVATIVE_FREE

        def fun(x):
            f, grad = fn.value_and_grad(view.state(x))
            value = float(f[rows].sum())
            value = value if math.isfinite(value) else math.inf
            return (value, view.vector(grad)) if gradient else value

        kwargs: dict[str, Any] = {"jac": True} if gradient else {}
        if method in _HESSP:

            def hessp(x, p):
                full = torch.zeros_like(z)
                block = torch.as_tensor(p, dtype=z.dtype, device=z.device)
                full[rows] = block.reshape(-1, z.shape[1])
                return view.vector(fn.gradient_linearization(view.state(x)).rmatvec(full))

            kwargs["hessp"] = hessp
        if method in _HESS:
            kwargs["hess"] = lambda x: view.blocks(fn.gradient_linearization(view.state(x)).dense())
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
        verdict = f"success={bool(result.success)}: {_sentence(result.message)}"
        return view.state(result.x), int(result.get("nit", result.get("nfev", 0))), verdict


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
    options.update(table[method])
    return options


class ScipyLeastSquares(_ScipyBase):
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
            [`MAX_BLOCK_UNKNOWNS`][implicit.solvers.scipy_optimize.MAX_BLOCK_UNKNOWNS]).
    """

    name = "scipy"
    least_squares_only = True
    methods = LEAST_SQUARES_METHODS
    front = "least_squares"

    def __init__(
        self,
        method: str = "trf",
        options: dict[str, Any] | None = None,
        *,
        strategy: str = "auto",
    ):
        super().__init__(method, options, strategy)
        import inspect

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

        view = _Rows(z, rows)

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
        verdict = f"status={result.status}: {_sentence(result.message)}"
        return view.state(result.x), int(result.nfev), verdict


def _sentence(message: Any) -> str:
    """scipy's message on one line, without its final period (the report adds one)."""
    return " ".join(str(message).split()).rstrip(".")
