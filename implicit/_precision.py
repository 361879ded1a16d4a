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
