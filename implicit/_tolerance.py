"""The ``tol`` and ``tol_mode`` of the front doors: one number or one per problem,
absolute or relative.

A problem ``b`` has converged when ``‖g(z)_b‖₂ ≤ tol_b · (1 + s_b)``. ``tol`` is a
number (every problem alike) or a tensor with one entry per problem; ``tol_mode`` says
what ``s_b`` is: ``"absolute"``, 0; ``"relative"``, the front door's scale, measured
once at the initial guess (:meth:`implicit._problem.Problem.scale`). The solvers see
``tol`` as a number or a ``(rows,)`` tensor in the working dtype, which
``tol · (1 + scale)`` broadcasts over the rows (:func:`implicit._batch.thresholds`).
"""

from __future__ import annotations

import torch

from implicit._batch import RESOLUTION, attainable, is_half, working_dtype
from implicit._checks import check_tol as check_number_tol

Tol = float | torch.Tensor


def check_tol(tol: object) -> None:
    """A front door's ``tol``: a positive finite number, or a real tensor whose entries
    all are (its shape is checked against the batch by :func:`per_problem`)."""
    if not isinstance(tol, torch.Tensor):
        check_number_tol(tol)
        return
    if tol.is_complex() or tol.dtype == torch.bool or tol.layout != torch.strided or tol.is_meta:
        raise TypeError(
            f"tol must be a number or a real dense tensor with values, got a {tol.layout} "
            f"tensor of dtype {tol.dtype} on {tol.device}"
        )
    if tol.numel() == 0:
        raise ValueError("tol is an empty tensor: give one tolerance, or one per problem")
    values = tol.detach()
    bad = ~((values > 0) & torch.isfinite(values))  # NaN fails both tests
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"tol must be positive and finite in every entry, got {float(values[index])} at "
            f"index {index}"
        )


def per_problem(tol: Tol, batch_size: int, dtype: torch.dtype, device: torch.device) -> Tol:
    """``tol`` for a problem of ``batch_size`` rows (1 when not batched), checked.

    A number stays a number; so does a tensor with one entry (the same tolerance for
    every problem, exactly as the number). Otherwise the tensor must broadcast to
    ``(batch_size,)``; it becomes a ``(batch_size,)`` copy in the working dtype of
    ``dtype`` on ``device``, floored as :func:`implicit._batch.attainable` floors a
    number.
    """
    if not isinstance(tol, torch.Tensor):
        return attainable(tol, dtype)
    check_tol(tol)
    if tol.numel() == 1 and tol.dim() <= 1:
        return attainable(float(tol), dtype)
    try:
        fits = torch.broadcast_shapes(tol.shape, (batch_size,)) == (batch_size,)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"tol has shape {tuple(tol.shape)}, but there are {batch_size} problem(s): give a "
            f"number, or a tensor of shape ({batch_size},) with one tolerance per problem "
            f"(dim 0 of z indexes the problems with batched=True)"
        )
    tol = tol.detach().to(device=device, dtype=working_dtype(dtype)).clone()
    return tol.clamp_min(RESOLUTION * torch.finfo(dtype).eps) if is_half(dtype) else tol


def for_rows(tol: Tol, rows: int) -> Tol:
    """``tol`` for ``rows`` rows: the user's ``B`` problems, or blocks of them stacked by
    ``vmap`` (slice-major: the tolerances repeat for each block)."""
    if isinstance(tol, torch.Tensor) and tol.shape[0] != rows:
        return tol.repeat(rows // tol.shape[0])
    return tol


def for_backward(tol: Tol) -> float:
    """The backward linear solve's tolerance: one number, the smallest of the problems'
    (the backward's test ``‖(∂g/∂z)ᵀ w − v‖ ≤ tol · ‖v‖`` is relative in every mode)."""
    return float(tol.min()) if isinstance(tol, torch.Tensor) else tol
