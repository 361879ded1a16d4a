"""What the scipy minimisation wrappers share: batch strategies, runs and the report.

The solve runs in numpy inside the differentiable core's forward and only finds ``z*``;
the derivatives come from the implicit backward as for every solver. The objective, its
gradient and Hessian products (and the residual vector and its Jacobian) are evaluated
by torch on the problem's device. Whatever scipy reports, the front door's test
decides: a problem has converged when
``‖g(z)_b‖₂ ≤ tol · (1 + min(|fun(z0)_b|, |fun(z)_b|))`` (``g`` the gradient, projected
with bounds), else its status is ``"failed"``; and a converged
problem must pass the second-order test of [`Minimizer`][implicit.solvers.Minimizer] (a
saddle is left once and scipy run again from there). A front door's ``callback`` is
called once, at the end: scipy's own callbacks give no gradient, which the residual of
the test needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch

from implicit._batch import thresholds
from implicit._results import CONVERGED, FAILED, NONFINITE, SolveInfo, status_name
from implicit.solvers._minimizer import Minimizer, check_objective, residual_norms
from implicit.solvers._saddle import (
    FAR_FROM_MINIMUM,
    UNKNOWN_CURVATURE,
    escape,
    unknown_curvature,
    verified_minimum,
)

#: Above this many unknowns in all, a batch is solved problem by problem (scipy's dense
#: linear algebra on the whole batch costs the cube of it).
MAX_BLOCK_UNKNOWNS = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScipyBase(Minimizer):
    """What the two wrappers share: the batch strategy, the runs and the report."""

    methods: ClassVar[tuple[str, ...]]
    front: ClassVar[str]

    method: str
    options: dict[str, Any] | None = None
    strategy: str = "auto"
    # scipy runs its own loop; the curvature test runs with its defaults.
    curvature_check: bool = dataclasses.field(default=True, init=False, repr=False)
    max_dense: int = dataclasses.field(default=64, init=False, repr=False)
    check_every: int | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in self.methods:
            raise ValueError(
                f"unknown scipy method {self.method!r}: use one of {list(self.methods)}"
            )
        if self.options is not None and not isinstance(self.options, dict):
            raise TypeError(f"options must be a dict, got {type(self.options).__name__}")
        if self.strategy not in ("auto", "block", "per_sample"):
            raise ValueError(
                f"strategy must be 'auto', 'block' or 'per_sample', got {self.strategy!r}"
            )
        object.__setattr__(self, "options", dict(self.options or {}))

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
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
        initial_scale = fn.scale_of_value(f)
        # scipy's own gradient test aims at the threshold of scale 0, which implies the
        # front door's test whatever |fun| is where scipy stops.
        aim = thresholds(tol, torch.zeros_like(initial_scale))
        verdicts: list[str] = []
        iterations = torch.zeros_like(f, dtype=torch.long)
        rows = torch.ones_like(f, dtype=torch.bool)
        for attempt in range(2):  # a second run for the problems that left a saddle
            z, its = self._run_all(fn, z, rows, aim, tol, max_iter, verdicts)
            iterations += its
            f, grad = fn.value_and_grad(z)
            norms = residual_norms(fn, z, grad)
            # The scale of the test at the answer: the smaller of |fun| there and at the
            # start (as the library's own minimisers).
            threshold = thresholds(tol, torch.minimum(initial_scale, fn.scale_of_value(f)))
            passed = norms <= threshold
            saddle, leave, strict, far = self._saddles(fn, z, grad, passed)
            if attempt == 1 or not bool(saddle.any()):
                break
            z, f, grad, rows, used = escape(fn, z, f, grad, saddle, leave, max_iter)
            iterations += torch.where(saddle, used, 0)
        codes = torch.where(passed & ~saddle & ~far, CONVERGED, FAILED)
        unknown = passed & unknown_curvature(leave)
        finite = torch.isfinite(norms) & torch.isfinite(threshold)
        codes = torch.where(finite & ~unknown, codes, NONFINITE)
        message = f"scipy.optimize.{self.front}(method={self.method!r}): " + "; ".join(
            dict.fromkeys(verdicts)
        )
        if bool(saddle.any()):
            message += ". A stationary point with negative curvature (a saddle or maximum)"
        if bool(far.any()):
            message += ". " + FAR_FROM_MINIMUM.rstrip(".")
        if bool(torch.as_tensor(unknown).any()):
            message += ". " + UNKNOWN_CURVATURE.rstrip(".")
        iterations_taken = int(iterations.max())
        if callback is not None and iterations_taken:
            callback(iterations_taken, norms, z)
        info = SolveInfo(
            converged=codes == CONVERGED,
            residual=norms.detach(),
            iterations=iterations_taken,
            f_evals=fn.f_evals,
            history=[float(norms.max())],
            status=status_name(codes),
            solver=self.name,
            message=message + ".",
            jac_evals=fn.jac_evals,
            iterations_per_problem=iterations,
            status_codes=codes,
            hint=verified_minimum(codes, strict),
        )
        return z, info

    def _run_all(self, fn, z, rows, threshold, tol, max_iter, verdicts):
        """Run scipy on the ``rows``; the iterate and each problem's iterations."""
        batch, n = z.shape
        iterations = torch.zeros(batch, dtype=torch.long, device=z.device)
        chosen = [int(b) for b in rows.nonzero().squeeze(1)]
        if not chosen:
            return z, iterations
        block = self.strategy == "block" or (
            self.strategy == "auto" and self._blocks() and batch * n <= MAX_BLOCK_UNKNOWNS
        )
        groups = [chosen] if block else [[b] for b in chosen]
        for group in groups:
            # scipy's step tolerances take one number: the smallest of the group's.
            group_tol = float(tol[group].min()) if isinstance(tol, torch.Tensor) else tol
            z, its, verdict = self._run(fn, z, group, threshold[group], group_tol, max_iter)
            iterations[group] = its
            verdicts.append(verdict)
        return z, iterations

    def _blocks(self) -> bool:
        return True

    def _bounded(self, bounds) -> bool:
        return True

    def _with_bounds(self) -> list[str]:
        return list(self.methods)


class Rows:
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


def sentence(message: Any) -> str:
    """scipy's message on one line, without its final period (the report adds one)."""
    return " ".join(str(message).split()).rstrip(".")
