"""Anderson acceleration (type II) of the fixed-point map ``z ↦ z + g(z)``."""

from __future__ import annotations

import dataclasses
import math

import torch

from implicit.solvers.base import Solver


@dataclasses.dataclass
class _History:
    """The last ``m`` steps of every problem, oldest first.

    ``dz[:, j]`` / ``dr[:, j]`` are differences of consecutive iterates / residuals;
    ``valid[:, j]`` is False for empty slots and for slots cleared by a restart.
    """

    z: torch.Tensor
    r: torch.Tensor
    dz: torch.Tensor
    dr: torch.Tensor
    valid: torch.Tensor


class Anderson(Solver):
    """Anderson acceleration: the default solver of [`fixed_point`][implicit.fixed_point].

    Type-II Anderson mixing on ``G(z) = z + g(z)`` (for a fixed point ``g = f(z) − z``,
    ``G = f``). Each iteration combines the last ``m`` steps: with the differences of
    iterates ``ΔZ`` and residuals ``ΔR``,

    ``γ = argmin ‖g(z) − ΔR γ‖``,  ``z ← z + β g(z) − (ΔZ + β ΔR) γ``.

    One evaluation of ``g`` per iteration. The small least-squares problems of all
    samples are solved at once, through their normal equations, with the columns of
    ``ΔR`` scaled to unit norm (so the method does not care about the scale of
    ``g``) and a ridge ``regularization · I`` added (at least the dtype's machine
    epsilon, below which it vanishes in rounding). A sample falls back to the plain
    mixing step ``z + β g(z)`` and starts a new history when its solve is not finite
    or its coefficients exceed ``max_coefficient`` (the history is nearly
    degenerate and the extrapolation would amplify noise); steps whose residual
    difference is zero or not finite never enter the history. Differentiable
    (``backward="unroll"`` works through it).

    On a root problem this accelerates ``z ← z + β g(z)``, which needs ``∂g/∂z``
    close to ``−I`` (as for ``g = f(z) − z`` with a contractive ``f``); for other root
    problems use [`Newton`][implicit.solvers.Newton] or
    [`Broyden`][implicit.solvers.Broyden].

    Args:
        m: history size, the number of past steps combined with the current one.
            ``m`` larger than the number of unknowns is allowed (the ridge handles
            the rank deficiency).
        mixing: ``β`` in ``(0, 1]``, the weight of the residual in each step.
        regularization: ridge added to the normalised Gram matrix ``ΔRᵀΔR``.
        max_coefficient: largest allowed ``‖γ‖₁`` (the weights of the combination
            of past iterates are bounded by ``1 + 2‖γ‖₁``); ``math.inf`` turns the
            check off.
        check_every: see [`Solver`][implicit.solvers.Solver].
    """

    name = "anderson"

    def __init__(
        self,
        *,
        m: int = 5,
        mixing: float = 1.0,
        regularization: float = 1e-8,
        max_coefficient: float = 1e4,
        check_every: int | None = None,
    ):
        super().__init__(check_every=check_every)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m must be an integer >= 1, got {m!r}")
        if not (isinstance(mixing, (int, float)) and 0 < mixing <= 1):
            raise ValueError(f"mixing must be in (0, 1], got {mixing!r}")
        if not (
            isinstance(regularization, (int, float))
            and regularization >= 0
            and math.isfinite(regularization)
        ):
            raise ValueError(f"regularization must be a finite number >= 0, got {regularization!r}")
        if not (isinstance(max_coefficient, (int, float)) and max_coefficient > 0):
            raise ValueError(f"max_coefficient must be a number > 0, got {max_coefficient!r}")
        self.m = m
        self.mixing = float(mixing)
        self.regularization = float(regularization)
        self.max_coefficient = float(max_coefficient)

    def init(self, fn, z, r):
        batch, n = z.shape
        return _History(
            z=z,
            r=r,
            dz=z.new_zeros(batch, self.m, n),
            dr=z.new_zeros(batch, self.m, n),
            valid=torch.zeros(batch, self.m, dtype=torch.bool, device=z.device),
        )

    def step(self, fn, z, r, state):
        dz, dr, valid = self._remember(z, r, state)
        norms = torch.linalg.vector_norm(dr, dim=2)
        safe_norms = torch.where(valid, norms, 1)
        columns = torch.where(valid.unsqueeze(2), dr / safe_norms.unsqueeze(2), 0)
        ridge = max(self.regularization, torch.finfo(z.dtype).eps)
        # Empty slots get a unit diagonal, so their coefficient solves to exactly zero.
        diagonal = torch.where(valid, ridge, 1.0).to(z.dtype)
        gram = columns @ columns.transpose(1, 2) + torch.diag_embed(diagonal)
        rhs = (columns @ r.unsqueeze(2)).squeeze(2)
        scaled, _ = torch.linalg.solve_ex(gram, rhs)
        gamma = scaled / safe_norms
        size = gamma.abs().sum(dim=1)
        accept = torch.isfinite(size) & (size <= self.max_coefficient)
        gamma = torch.where(accept.unsqueeze(1), gamma, 0)
        correction = ((dz + self.mixing * dr) * gamma.unsqueeze(2)).sum(dim=1)
        z_next = z + self.mixing * r - correction
        state = _History(z=z, r=r, dz=dz, dr=dr, valid=valid & accept.unsqueeze(1))
        return z_next, fn(z_next), state

    def _remember(self, z, r, state):
        """The history with the step that led to ``z`` appended (the oldest dropped)."""
        dz_new = z - state.z
        dr_new = r - state.r
        size = torch.linalg.vector_norm(dr_new, dim=1)
        usable = torch.isfinite(size) & (size > 0) & torch.isfinite(dz_new).all(dim=1)
        # A first step (no previous iterate) has dz_new = dr_new = 0 and is not usable;
        # unusable slots hold zeros so that they add nothing (not NaN) to the step.
        dz_new = torch.where(usable.unsqueeze(1), dz_new, 0)
        dr_new = torch.where(usable.unsqueeze(1), dr_new, 0)
        dz = torch.cat([state.dz[:, 1:], dz_new.unsqueeze(1)], dim=1)
        dr = torch.cat([state.dr[:, 1:], dr_new.unsqueeze(1)], dim=1)
        valid = torch.cat([state.valid[:, 1:], usable.unsqueeze(1)], dim=1)
        return dz, dr, valid
