"""The base of the bracketing solvers (one unknown per problem), and their loop.

A bracketing method keeps, for each problem, an interval whose ends have residuals of
opposite signs, and shrinks it. It needs no derivative and cannot diverge. The loop
is shared: the bracket check at the start, the stopping test ``|g(z)| ≤ tol`` (at the
end of the bracket with the smaller ``|g|``), the end of a problem whose bracket can
shrink no further in the working precision (status ``"failed"`` unless it meets the
test: ``g`` jumps across zero, or ``tol`` is below what the precision allows), and the
report. A method implements ``init`` (its state from the bracket) and ``advance``
(the next point to evaluate, and the state once its residual is known).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from implicit._batch import thresholds
from implicit._results import CONVERGED, FAILED, MAX_ITER, NONFINITE, SolveInfo, status_name
from implicit.solvers.base import Solver

Bound = float | torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class Bracketing(Solver):
    """A method for problems of one unknown each, given a bracket ``[lower, upper]``.

    Args:
        lower: the bracket's lower end: a number, or a tensor shaped like ``z0`` (one
            end per problem).
        upper: its upper end, likewise. ``g(lower)`` and ``g(upper)`` must have
            opposite signs (or one be zero); a problem whose ends do not ends at once
            with status ``"failed"``, and ``info.message`` names ``lower`` and
            ``upper``.
    """

    lower: Bound = dataclasses.field(default=None, compare=False)
    upper: Bound = dataclasses.field(default=None, compare=False)
    # The bracket's loop tests every iteration: its host reads are cheap beside g.
    check_every: int | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, end in (("lower", self.lower), ("upper", self.upper)):
            if end is None:
                raise TypeError(
                    f"{type(self).__name__} needs a bracket: pass lower= and upper= (numbers, "
                    f"or tensors shaped like z0) with g(lower) and g(upper) of opposite signs"
                )
            is_number = isinstance(end, (int, float)) and not isinstance(end, bool)
            if not is_number and not isinstance(end, torch.Tensor):
                raise TypeError(f"{name} must be a number or a tensor, got {type(end).__name__}")

    def init(self, a, fa, b, fb) -> Any:
        raise NotImplementedError

    def advance(self, state: Any, x: torch.Tensor | None, fx: torch.Tensor | None):
        """``(next point, state)``: with ``x, fx`` the last point and its residual
        (``None`` at the start), update the state and propose the next point. The
        state exposes ``best``, ``f_best`` (the end with the smaller ``|g|``) and
        ``width`` (the bracket's length)."""
        raise NotImplementedError

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        """Shrink the brackets (the arguments are those of
        [`Solver.solve`][implicit.solvers.Solver.solve]; the iterate a callback
        receives is each problem's end with the smaller ``|g|``)."""
        if z0.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__} solves problems of one unknown each (z0 0-d, or of "
                f"shape (B,) with batched=True), but each problem here has {z0.shape[1]}"
            )
        a, b = self._end(self.lower, "lower", z0), self._end(self.upper, "upper", z0)
        if bool((a > b).any()):
            raise ValueError("lower > upper: the bracket [lower, upper] is empty")
        fa, fb = fn(a), fn(b)
        if fa.requires_grad or fb.requires_grad:
            raise ValueError(
                f"backward='unroll' differentiates through a solver's iterations, but "
                f"{type(self).__name__}'s choices of points are not differentiable: use an "
                f"implicit backward ('auto', 'dense', ...)"
            )
        threshold = thresholds(tol, fn.scale(a, fa))
        finite = torch.isfinite(fa).all(dim=1) & torch.isfinite(fb).all(dim=1)
        brackets = (torch.sign(fa) * torch.sign(fb) <= 0).squeeze(1)
        codes = torch.where(finite, torch.where(brackets, MAX_ITER, FAILED), NONFINITE)
        state = self.init(a, fa, b, fb)
        x, fx = None, None
        running = codes == MAX_ITER
        notes = []
        if bool((codes == FAILED).any()):
            notes.append(_not_bracketing(codes == FAILED, a, fa, b, fb))
        history = [float(torch.where(running, state.f_best.abs().squeeze(1), 0).max())]
        iterations = torch.zeros_like(codes)
        k = 0
        while True:
            x, state = self.advance(state, x, fx)
            best_residual = state.f_best.abs().squeeze(1)
            if callback is not None and k > 0:  # the state now holds iteration k's point
                callback(k, best_residual, state.best)
            met = running & (best_residual <= threshold)
            codes = torch.where(met, CONVERGED, codes)
            stalled = running & ~met & (state.width.squeeze(1) <= _resolution(state.best))
            if bool(stalled.any()):
                codes = torch.where(stalled, FAILED, codes)
                notes.append(_STALLED)
            running = running & ~met & ~stalled
            if k >= max_iter or not bool(running.any()):
                break
            x = torch.where(running.unsqueeze(1), x, state.best)
            fx = fn(x)
            k += 1
            iterations = torch.where(running, k, iterations)
            history.append(float(torch.where(running, fx.abs().squeeze(1), 0).max()))
        residual = torch.linalg.vector_norm(state.f_best, dim=1)
        info = SolveInfo(
            converged=codes == CONVERGED,
            residual=residual,
            iterations=k,
            f_evals=fn.f_evals,
            history=history,
            status=status_name(codes),
            solver=self.name,
            message=" ".join(dict.fromkeys(notes)),
            iterations_per_problem=iterations,
            status_codes=codes,
        )
        return state.best, info

    def _end(self, end: Bound, name: str, z0: torch.Tensor) -> torch.Tensor:
        """A bracket end as a ``(B, 1)`` tensor like ``z0``."""
        if not isinstance(end, torch.Tensor):
            return torch.full_like(z0, float(end))
        if end.is_complex() or not (end.is_floating_point() or end.dtype in _INTEGERS):
            raise TypeError(f"{name} must be a real tensor, got {end.dtype}")
        flat = end.detach().to(dtype=z0.dtype, device=z0.device).reshape(-1, 1)
        rows = z0.shape[0]
        if flat.shape[0] == 1 or rows % flat.shape[0] == 0:
            # One end for all, or one per problem (repeated for the slices of a vmap).
            return flat.expand(rows, 1) if flat.shape[0] == 1 else flat.repeat(rows // len(flat), 1)
        raise ValueError(
            f"{name} has {flat.shape[0]} entries but there are {rows} problems: give a number "
            f"or a tensor shaped like z0"
        )


_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_STALLED = (
    "The bracket shrank to the resolution of the working precision before |g| met tol: "
    "g may jump across zero (a discontinuity), or tol is below what the precision allows."
)


def _resolution(x: torch.Tensor) -> torch.Tensor:
    """The shortest bracket worth splitting around ``x``: a few units in the last place."""
    finfo = torch.finfo(x.dtype)
    return (4 * finfo.eps * x.abs() + 4 * finfo.smallest_normal).squeeze(1)


def _not_bracketing(rows, a, fa, b, fb) -> str:
    index = int(rows.nonzero()[0])
    return (
        f"g(lower) and g(upper) must have opposite signs, but for {int(rows.sum())} "
        f"problem(s) they do not (problem {index}: g({float(a[index])}) = {float(fa[index])}, "
        f"g({float(b[index])}) = {float(fb[index])}): choose lower and upper that bracket a "
        f"root."
    )
