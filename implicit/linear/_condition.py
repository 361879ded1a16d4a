"""The iterative methods' condition estimates: how much a solve may amplify an error.

Every solver reports one per problem (``LinearResult.condition``, then
``BackwardInfo.condition``), and a problem that met its tolerance but whose estimate
exceeds ``1/√eps`` is reported ``"ill_conditioned"``
(:func:`implicit._results.flag_ill_conditioned`): its solution, and the derivatives
made from it, may have lost half of the dtype's digits or more, whatever the residual
says. A direct solve estimates ``κ₁ = ‖A‖₁ ‖A⁻¹‖₁`` from its LU factors
(:func:`implicit.linear.dense.condition_from_factors`); an iterative method reports
the amplification its solve saw, ``‖A p‖/‖p‖ · ‖x‖/‖rhs‖`` for its first product
``A p`` (:class:`FirstProduct`, :func:`seen`): a lower bound of ``κ₂``, free.
"""

from __future__ import annotations

import math

import torch

from implicit._batch import cheap_host_reads


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
        # (Read by every shifted method's solve: set here, where __getattr__ would
        # take a failed lookup first.)
        self.shifted: bool = operator.shifted
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
    gain = torch.linalg.vector_norm(product, dim=1)
    if cheap_host_reads(size):  # a read, not a pass (one problem: no operation)
        if size.shape[0] == 1:
            return gain / size if size.item() > 0 else gain
        if size.min().item() > 0:
            return gain / size
    return gain / torch.where(size > 0, size, 1)
