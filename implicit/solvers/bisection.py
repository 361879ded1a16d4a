"""Bisection: the bracket halves at every step."""

from __future__ import annotations

import dataclasses

import torch

from implicit.solvers._bracket import Bracketing


@dataclasses.dataclass
class _Bracket:
    """``(B, 1)`` ends ``a``, ``b`` and their residuals (``fa`` has ``a``'s sign)."""

    a: torch.Tensor
    fa: torch.Tensor
    b: torch.Tensor
    fb: torch.Tensor

    @property
    def best(self) -> torch.Tensor:
        return torch.where(self.fa.abs() <= self.fb.abs(), self.a, self.b)

    @property
    def f_best(self) -> torch.Tensor:
        return torch.where(self.fa.abs() <= self.fb.abs(), self.fa, self.fb)

    @property
    def width(self) -> torch.Tensor:
        return (self.b - self.a).abs()


@dataclasses.dataclass(frozen=True)
class Bisection(Bracketing):
    """Bisection on a bracket ``[lower, upper]``, per problem: ``solver="bisection"``.

    For problems of one unknown each (``z0`` 0-d, or ``(B,)`` with ``batched=True``)
    whose residual changes sign between ``lower`` and ``upper``. Each iteration
    evaluates ``g`` at the midpoints (one call for the batch) and keeps the half whose
    ends differ in sign: the bracket halves, whatever ``g`` does, and converges to a
    root (or a sign change) of any continuous ``g``. About ``log₂(width / accuracy)``
    iterations; [`Chandrupatla`][implicit.solvers.Chandrupatla] usually needs far
    fewer. The answer is the end of the bracket with the smaller ``|g|``; it has
    converged when ``|g| ≤ tol``.

    Args:
        lower: the bracket's lower end (see [`Bracketing`][implicit.solvers.Bracketing]).
        upper: the bracket's upper end.

    Example:
        >>> theta = torch.tensor(2.0, requires_grad=True)
        >>> z = implicit.root_solve(lambda z, t: z**3 + z - t, torch.tensor(0.0), theta,
        ...                         solver="bisection", lower=-5.0, upper=5.0)
        >>> z.backward()
        >>> z.detach(), theta.grad  # z = 1, dz/dθ = 1 / (3z² + 1)
        (tensor(1.0000), tensor(0.2500))
    """

    name = "bisection"

    def init(self, a, fa, b, fb):
        return _Bracket(a, fa, b, fb)

    def advance(self, state, x, fx):
        if x is not None:
            same = torch.sign(fx) == torch.sign(state.fa)
            state = _Bracket(
                a=torch.where(same, x, state.a),
                fa=torch.where(same, fx, state.fa),
                b=torch.where(same, state.b, x),
                fb=torch.where(same, state.fb, fx),
            )
        return state.a + 0.5 * (state.b - state.a), state
