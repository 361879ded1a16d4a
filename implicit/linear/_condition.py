"""Condition estimates: how much a linear solve may amplify an error.

Every solver reports one per problem (``LinearResult.condition``, then
``BackwardInfo.condition``), and a problem that met its tolerance but whose estimate
exceeds ``condition_limit`` (``1/√eps``) is reported ``"ill_conditioned"``: its
solution, and the derivatives made from it, may have lost half of the dtype's digits
or more, whatever the residual says.

* A direct solve estimates ``κ₁ = ‖A‖₁ ‖A⁻¹‖₁`` from its LU factors
  (:func:`from_factors`);
* an iterative method reports the amplification its solve saw,
  ``‖A p‖/‖p‖ · ‖x‖/‖rhs‖`` for its first product ``A p``
  (:class:`FirstProduct`, :func:`seen`): a lower bound of ``κ₂``, free.
"""

from __future__ import annotations

import math

import torch

from implicit._batch import lu_solve
from implicit._results import CONVERGED, ILL_CONDITIONED, condition_limit

#: A free estimate this far below the limit is not refined: on random matrices (and
#: triangular ones, the hardest), the free estimate was never below 1/2000 of κ₁, and
#: below 1/200 in 1% of them.
_REFINE_BELOW_LIMIT = 100.0


def flag(codes: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """``codes`` with ``ILL_CONDITIONED`` where a problem converged but its
    ``condition`` exceeds the limit of its dtype."""
    limit = condition_limit(condition.dtype)
    return torch.where((codes == CONVERGED) & (condition > limit), ILL_CONDITIONED, codes)


def seen(gain: torch.Tensor, x: torch.Tensor, rhs_norm: torch.Tensor) -> torch.Tensor:
    """``gain · ‖x‖/‖rhs‖`` per row, from ``‖rhs‖`` per row (NaN where ``rhs = 0``:
    nothing was solved)."""
    ratio = torch.linalg.vector_norm(x, dim=1) / torch.where(rhs_norm > 0, rhs_norm, 1)
    return torch.where(rhs_norm > 0, gain * ratio, math.nan)


class FirstProduct:
    """An operator that records ``‖A p‖/‖p‖`` per row at its first product ``A p``: a
    sample of ``‖A‖₂`` (a lower bound) at the cost of two norms.

    Args:
        operator: the [`JacobianOperator`][implicit.linear.JacobianOperator] (every
            other attribute is the operator's).
    """

    def __init__(self, operator):
        self.operator = operator
        #: ``‖A p‖/‖p‖`` per row (0 for ``p = 0``), ``None`` before the first product.
        self.gain: torch.Tensor | None = None

    def __getattr__(self, name: str):
        return getattr(self.operator, name)

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        product = self.operator.mv(x)
        if self.gain is None:
            self.gain = _ratio(product, x)
        return product

    def shifted_mv(self, x: torch.Tensor) -> torch.Tensor:
        product = self.operator.shifted_mv(x)
        if self.gain is None:  # A p = S p − p
            self.gain = _ratio(product - x, x)
        return product


def _ratio(product: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    size = torch.linalg.vector_norm(x, dim=1)
    return torch.linalg.vector_norm(product, dim=1) / torch.where(size > 0, size, 1)


def from_factors(
    matrix: torch.Tensor,
    lu: torch.Tensor,
    pivots: torch.Tensor,
    x: torch.Tensor,
    rhs: torch.Tensor,
    *,
    adjoint: bool,
) -> torch.Tensor:
    """An estimate of ``κ₁(M)`` per block, ``M`` the ``(B, n, n)`` ``matrix`` solved,
    from the LU factors of ``M`` (``adjoint=False``) or of ``Mᵀ`` (``adjoint=True``) and
    a solve ``M x = rhs`` already made (``x``, ``rhs`` of shape ``(B, n, 1)``).

    Free: the larger of the pivot ratio ``max|uᵢᵢ| / min|uᵢᵢ|`` and
    ``‖M‖₁ ‖x‖₁/‖rhs‖₁``. Where that comes within a factor ``_REFINE_BELOW_LIMIT`` of
    the limit, Hager's estimator refines it, as LAPACK's ``?gecon`` does (Higham,
    *Accuracy and Stability of Numerical Algorithms*, §15.3): ``‖M⁻¹ c‖₁`` for the
    probes ``c = 1/n`` and Higham's alternating vector, then one step of the ascent
    ``c = e_j``, ``j = argmax |M⁻ᵀ sign(M⁻¹ 1)|``; three solves with the factors, for
    the blocks that need them only. On random matrices the result was within a factor
    2 of ``κ₁``. A singular block reads ``inf``.
    """
    norm_m = torch.linalg.matrix_norm(matrix, ord=1)
    diagonal = lu.diagonal(dim1=-2, dim2=-1).abs()
    smallest = diagonal.amin(dim=-1)
    ratio = diagonal.amax(dim=-1) / torch.where(smallest > 0, smallest, 0)
    rhs_size = rhs.abs().sum(dim=(1, 2))
    amplified = norm_m * x.abs().sum(dim=(1, 2)) / torch.where(rhs_size > 0, rhs_size, 1)
    # (fmax: a singular block's NaN solution leaves its infinite pivot ratio.)
    estimate = torch.fmax(ratio, amplified).to(matrix.dtype)
    limit = condition_limit(estimate.dtype)
    suspect = torch.isfinite(estimate) & (estimate > limit / _REFINE_BELOW_LIMIT)
    if not bool(suspect.any()):
        return estimate
    rows = suspect.nonzero().squeeze(1)
    inverse_norm = _hager(lu[rows], pivots[rows], adjoint)
    refined = torch.maximum(estimate[rows], norm_m[rows] * inverse_norm)
    return estimate.index_put((rows,), refined)


def _hager(lu: torch.Tensor, pivots: torch.Tensor, adjoint: bool) -> torch.Tensor:
    """A lower estimate of ``‖M⁻¹‖₁`` per block (see :func:`from_factors`)."""
    batch, n = lu.shape[:2]

    def solve(c: torch.Tensor, transposed: bool) -> torch.Tensor:
        return lu_solve(lu, pivots, c, adjoint=adjoint != transposed)

    index = torch.arange(n, dtype=lu.dtype, device=lu.device)
    alternating = (1 - 2 * (index % 2)) * (1 + index / max(n - 1, 1))
    probes = torch.stack((torch.full_like(index, 1 / n), alternating), dim=1)
    solved = solve(probes.expand(batch, n, 2), False)
    sizes = solved.abs().sum(dim=1)  # (B, 2)
    estimate = torch.maximum(sizes[:, 0], 2 * sizes[:, 1] / (3 * n))
    signs = torch.where(solved[:, :, :1] >= 0, 1.0, -1.0).to(lu.dtype)
    ascent = solve(signs, True).abs().argmax(dim=1)  # (B, 1)
    unit = torch.zeros(batch, n, 1, dtype=lu.dtype, device=lu.device)
    unit.scatter_(1, ascent.unsqueeze(-1), 1.0)
    return torch.maximum(estimate, solve(unit, False).abs().sum(dim=(1, 2)))
