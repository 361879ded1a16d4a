"""Half precision (float16, bfloat16): the small linear algebra in float32.

A state in half precision is solved with the user's function evaluated in its dtype,
as written. Everything the solvers and the backward add runs in float32, the
*working* dtype, and the results are cast back: LAPACK has no half precision (torch's
LU, triangular solves and SVD refuse it), and a sum of squares overflows float16 from
a norm of 256 on. So the norms of the stopping tests, the line search's merit, the
dense solves (Anderson's normal equations, Newton's steps, the dense backward) and the
backward's linear solves, whose iterates live in float32 around products evaluated in
half precision.

A residual evaluated in half precision is itself only accurate to a few units of
rounding of the state, so tolerances are floored at ``RESOLUTION`` units of the dtype
(:func:`attainable`): otherwise every solve would run to ``max_iter`` and warn.
"""

from __future__ import annotations

import torch

#: The smallest relative tolerance a half-precision solve is held to, in units of the
#: dtype's machine epsilon (float16: 3.9e-3; bfloat16: 3.1e-2).
RESOLUTION = 4


def is_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16 (by identity: solvers ask every step)."""
    return dtype is torch.float16 or dtype is torch.bfloat16


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the solvers compute in for states of ``dtype``: float32 for half
    precision, the dtype itself otherwise."""
    return torch.float32 if is_half(dtype) else dtype


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its working dtype (itself, unless in half precision)."""
    # (Tested here: a no-op ``Tensor.to`` still costs a dispatch, on every iteration.)
    return tensor.float() if is_half(tensor.dtype) else tensor


def norms(tensor: torch.Tensor) -> torch.Tensor:
    """``‖tensor_b‖₂`` per row of a ``(B, n)`` tensor, in the working dtype."""
    if is_half(tensor.dtype):
        return torch.linalg.vector_norm(tensor, dim=1, dtype=torch.float32)
    return torch.linalg.vector_norm(tensor, dim=1)


def attainable(tol: float, dtype: torch.dtype) -> float:
    """``tol``, at least ``RESOLUTION`` machine epsilons of a half-precision ``dtype``."""
    if not is_half(dtype):
        return tol
    return max(tol, RESOLUTION * torch.finfo(dtype).eps)


class WorkingOperator:
    """An operator whose products are evaluated in half precision, seen in float32.

    A linear solver then keeps its iterates, bases and small systems in float32; each
    product casts its argument down and its result up.

    Args:
        op: the operator (an :class:`~implicit._operators.Operator`).
        dtype: the dtype its products are evaluated in.
    """

    def __init__(self, op, dtype: torch.dtype):
        self.op = op
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.op.shape

    @property
    def products(self) -> int:
        return self.op.products

    @property
    def transpose(self) -> bool:
        return self.op.transpose

    @property
    def shifted(self) -> bool:
        return self.op.shifted

    @property
    def nearby(self):
        return self.op.nearby

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return upcast(self.op.mv(x.to(self.dtype)))

    def shifted_mv(self, x: torch.Tensor) -> torch.Tensor:
        return upcast(self.op.shifted_mv(x.to(self.dtype)))

    def dense(self, chunk_size: int | None = None) -> torch.Tensor:
        return upcast(self.op.dense(chunk_size))

    def nearby_solve(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.nearby_solve(x)
