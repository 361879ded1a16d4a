"""One ``scipy.optimize.root`` solve of some rows of a batch, for
[`Scipy`][implicit.solvers.Scipy]: the numpy side of the bridge (the function, its
Jacobian and callback in scipy's terms, the stopping test, the report)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from implicit._batch import upcast
from implicit.solvers.base import Residual

#: scipy's ``nonlin`` family: stops on a residual norm we set (``tol_norm``), counts
#: iterations (``maxiter``) and calls back after each.
NONLIN = (
    "broyden1",
    "broyden2",
    "anderson",
    "linearmixing",
    "diagbroyden",
    "excitingmixing",
    "krylov",
)


class Run:
    """One scipy solve of the rows ``rows`` of the batch (all of them, or one)."""

    def __init__(
        self,
        solver: Any,
        fn: Residual,
        z: torch.Tensor,
        rows: list[int],
        tol: float | torch.Tensor,
        bound: torch.Tensor,
        max_iter: int,
        callback=None,
        latest: torch.Tensor | None = None,
    ):
        self.solver = solver
        self.fn = fn
        self.z = z
        self.rows = rows
        # hybr's and lm's step test takes one number: the smallest of the rows'.
        self.tol = float(tol[rows].min()) if isinstance(tol, torch.Tensor) else tol
        # The front door's callback, and the norms of every problem that it is given.
        self.user_callback = callback
        self.latest = latest
        self.bound = bound.detach().cpu().double().numpy()
        self.max_iter = max_iter
        self.n = z.shape[1]
        self.np_dtype = np.float64 if z.dtype == torch.float64 else np.float32
        self.blew_up = np.zeros(len(rows), dtype=bool)
        self.success = False
        self.broke_down = False
        self.best: tuple[float, np.ndarray] | None = None
        self.history: list[float] = []
        self.evaluations = 0
        self.user_error: Exception | None = None
        self.iterations = 0
        self.verdict = ""

    # -- between numpy and torch ---------------------------------------------------
    def _state(self, x: np.ndarray) -> torch.Tensor:
        block = torch.tensor(np.asarray(x), dtype=self.z.dtype, device=self.z.device)
        block = block.reshape(len(self.rows), self.n)
        if len(self.rows) == self.z.shape[0]:
            return block
        z = self.z.clone()
        z[self.rows] = block
        return z

    def fun(self, x: np.ndarray) -> np.ndarray:
        self.evaluations += 1
        try:
            r = self.fn(self._state(x))[self.rows].reshape(-1)
        except Exception as error:
            self.user_error = error  # g's own error: raised as is, not a scipy failure
            raise
        out = upcast(r.detach()).cpu().numpy().astype(self.np_dtype)  # (numpy has no bfloat16)
        if not np.isfinite(out).all():
            rows_finite = np.isfinite(out.reshape(len(self.rows), self.n)).all(axis=1)
            self.blew_up = ~rows_finite
            raise _NonFinite
        norm = float(np.linalg.norm(out))
        if self.best is None or norm < self.best[0]:
            self.best = (norm, np.array(x, copy=True))
        return out

    def jac(self, x: np.ndarray) -> np.ndarray:
        try:
            _, blocks = self.fn.jacobian(self._state(x))
        except Exception as error:
            self.user_error = error
            raise
        return torch.block_diag(*blocks[self.rows]).detach().cpu().double().numpy()

    def callback(self, x: np.ndarray, f: np.ndarray) -> None:
        per_row = np.linalg.norm(np.reshape(f, (len(self.rows), self.n)), axis=1)
        self.history.append(float(per_row.max()))
        if self.user_callback is None:
            return
        latest = self.latest.clone()
        latest[self.rows] = torch.as_tensor(per_row, dtype=latest.dtype, device=latest.device)
        self.latest = latest
        try:
            self.user_callback(len(self.history) - 1, latest, self._state(x))
        except Exception as error:
            self.user_error = error  # the callback's own error: raised as is
            raise

    # -- the solve -------------------------------------------------------------------
    def solve(self, r0: torch.Tensor) -> torch.Tensor:
        # Imported here: scipy.optimize takes about a third of a second to load, and most
        # programs never call it.
        import scipy.linalg
        import scipy.optimize

        solver = self.solver
        method = solver.method
        x0 = upcast(self.z[self.rows].reshape(-1).detach()).cpu().numpy().astype(self.np_dtype)
        self.history.append(float(torch.linalg.vector_norm(r0, dim=1).max()))
        unknowns = x0.size
        # Our test as scipy's: a norm that is at most 1 when every row meets its bound.
        options: dict[str, Any] = {}
        kwargs: dict[str, Any] = {}
        if method in NONLIN:
            options.update(maxiter=self.max_iter, fatol=1.0, tol_norm=self._tol_norm)
            kwargs["callback"] = self.callback
        elif method == "df-sane":
            options.update(
                maxfev=self.max_iter * (unknowns + 1), fatol=1.0, ftol=0.0, fnorm=self._tol_norm
            )
            kwargs["callback"] = self.callback
        else:
            key = "maxfev" if method == "hybr" else "maxiter"
            # Their only stopping test is on the step: relative to x, as scipy's root(tol=).
            options.update({key: self.max_iter * (unknowns + 1), "xtol": self.tol})
            if solver.jacobian:
                kwargs["jac"] = self.jac
            elif self.np_dtype == np.float32:
                options["eps"] = float(np.finfo(np.float32).eps)
        options.update(solver.options)
        callbacks = "callback" in kwargs
        try:
            # scipy's arithmetic may divide by zero, or warn of an ill-conditioned
            # history, on the way to a verdict that SolveInfo reports anyway.
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
                result = scipy.optimize.root(self.fun, x0, method=method, options=options, **kwargs)
        except Exception as error:
            if error is self.user_error:
                raise
            # The method broke down (or g turned non-finite): keep the best point seen.
            x = self.best[1] if self.best is not None else x0
            if isinstance(error, _NonFinite):
                self.verdict = "stopped: g returned a non-finite value"
            else:
                self.broke_down = True
                self.verdict = f"scipy raised {type(error).__name__}: {_sentence(str(error))}"
            self.iterations = len(self.history) - 1 if callbacks else self.evaluations
            return self._state(x)
        # The callback count matches the history; hybr and lm only count evaluations.
        self.iterations = len(self.history) - 1 if callbacks else int(result.nfev)
        status = result.get("status")
        self.success = bool(result.success)
        self.verdict = (
            f"success={self.success}"
            + ("" if status is None else f", status={status}")
            + ": "
            + _sentence(str(result.message))
        )
        return self._state(result.x)

    def _tol_norm(self, f: np.ndarray) -> float:
        """``max_b ‖f_b‖₂ / (tol·(1 + scale_b))``: at most 1 when every row has converged."""
        per_row = np.linalg.norm(np.reshape(f, (len(self.rows), -1)), axis=1)
        return float(np.max(per_row / self.bound))


def _sentence(text: str) -> str:
    """scipy's message on one line, without its final period (we add our own)."""
    return " ".join(text.split()).rstrip(".")


class _NonFinite(Exception):
    """Raised through scipy to stop a solve whose residual turned non-finite."""
