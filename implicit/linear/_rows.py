"""Helpers for iterative methods on batches of rows ``(B, n)``, one row per problem:
per-row norms and dot products, guarded divisions, masks and status codes, the start of
a solve. ``implicit.linear.iterative`` exports them for methods written outside the
package."""

from __future__ import annotations

import torch

from implicit.linear.base import JacobianOperator


def norm(x: torch.Tensor) -> torch.Tensor:
    """``‖x_b‖₂`` per row, shape ``(B,)``."""
    return torch.linalg.vector_norm(x, dim=1)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a_b · b_b`` per row, shape ``(B,)``."""
    return (a * b).sum(dim=1)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (frozen or broken-down problems).

    The division by zero in the rows not taken is harmless: linear solves run where
    nothing records a graph (inside the implicit function's forward, or a first-order
    backward), so no gradient flows through it.
    """
    return torch.where(den != 0, num / den, 0)


def row_mask(mask: torch.Tensor) -> torch.Tensor:
    """A per-problem mask ``(B,)`` as a mask over rows ``(B, 1)``."""
    return mask.unsqueeze(1)


def where_codes(mask: torch.Tensor, if_true: int, if_false: int) -> torch.Tensor:
    """Status codes per problem: ``if_true`` where ``mask``, else ``if_false``."""
    return torch.where(mask, if_true, if_false)  # int64, as Python integers give


def start(
    operator: JacobianOperator, rhs: torch.Tensor, x: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The iterate to start from and its residual ``rhs − A x``: zero and ``rhs``, without
    a product, for ``x = None``."""
    return (torch.zeros_like(rhs), rhs) if x is None else (x, rhs - operator.mv(x))


def identity(r: torch.Tensor) -> torch.Tensor:
    """The preconditioner of no preconditioning."""
    return r
