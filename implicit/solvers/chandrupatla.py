"""Chandrupatla's method: inverse quadratic interpolation safeguarded by bisection."""

from __future__ import annotations

import dataclasses

import torch

from implicit.solvers._bracket import Bracketing


@dataclasses.dataclass
class _State:
    """``(B, 1)`` points: ``x1`` the newest, ``x2`` the other end of the bracket, ``x3``
    the end dropped last; their residuals; ``t`` the next point's position in the
    bracket, from ``x1`` (0) to ``x2`` (1)."""

    x1: torch.Tensor
    f1: torch.Tensor
    x2: torch.Tensor
    f2: torch.Tensor
    x3: torch.Tensor
    f3: torch.Tensor
    t: torch.Tensor

    @property
    def best(self) -> torch.Tensor:
        return torch.where(self.f1.abs() < self.f2.abs(), self.x1, self.x2)

    @property
    def f_best(self) -> torch.Tensor:
        return torch.where(self.f1.abs() < self.f2.abs(), self.f1, self.f2)

    @property
    def width(self) -> torch.Tensor:
        return (self.x2 - self.x1).abs()


@dataclasses.dataclass(frozen=True)
class Chandrupatla(Bracketing):
    """Chandrupatla's bracketing method, per problem: ``solver="chandrupatla"``.

    For the same problems as [`Bisection`][implicit.solvers.Bisection], with the same
    guarantee (the bracket always contains a sign change), but much faster on smooth
    residuals: each step interpolates the last three points by an inverse quadratic
    where that is safe and bisects otherwise (Chandrupatla, "A new hybrid
    quadratic/bisection algorithm for finding the zero of a nonlinear function without
    using derivatives", Advances in Engineering Software 28, 1997; written after
    ``scipy.optimize.elementwise.find_root``, which uses it). Steps stay at least a
    few units in the last place inside the bracket.

    Args:
        lower: the bracket's lower end (see [`Bracketing`][implicit.solvers.Bracketing]).
        upper: the bracket's upper end.
    """

    name = "chandrupatla"

    def init(self, a, fa, b, fb):
        return _State(x1=a, f1=fa, x2=b, f2=fb, x3=a, f3=fa, t=torch.full_like(a, 0.5))

    def advance(self, state, x, fx):
        if x is not None:
            same = torch.sign(fx) == torch.sign(state.f1)
            # The end x is replaced by; the bracket is then [x, x2].
            state = _State(
                x1=x,
                f1=fx,
                x2=torch.where(same, state.x2, state.x1),
                f2=torch.where(same, state.f2, state.f1),
                x3=torch.where(same, state.x1, state.x2),
                f3=torch.where(same, state.f1, state.f2),
                t=state.t,
            )
            state.t = _next_t(state)
        return state.x1 + state.t * (state.x2 - state.x1), state


def _next_t(s: _State) -> torch.Tensor:
    """Inverse quadratic interpolation where the three points allow it (Chandrupatla's
    test on ``ξ`` and ``φ``), bisection elsewhere; kept a few ulps inside the bracket."""
    xi = (s.x1 - s.x2) / (s.x3 - s.x2)
    phi = (s.f1 - s.f2) / (s.f3 - s.f2)
    alpha = (s.x3 - s.x1) / (s.x2 - s.x1)
    safe = ((1 - (1 - xi).sqrt()) < phi) & (phi < xi.sqrt())
    quadratic = s.f1 / (s.f1 - s.f2) * s.f3 / (s.f3 - s.f2) - alpha * s.f1 / (
        s.f3 - s.f1
    ) * s.f2 / (s.f2 - s.f3)
    t = torch.where(safe & torch.isfinite(quadratic), quadratic, 0.5)
    finfo = torch.finfo(s.x1.dtype)
    resolution = 4 * finfo.eps * s.best.abs() + 4 * finfo.smallest_normal
    limit = (0.5 * resolution / s.width).clamp(max=0.5).nan_to_num(0.5)
    return torch.minimum(torch.maximum(t, limit), 1 - limit)
