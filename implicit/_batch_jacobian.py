"""``batch_jacobian``: per-sample Jacobians of a batch-first function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit.linear.operator import Jacobian


def batch_jacobian(func: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians of a batch-first function: ``(B, out, in)``.

    ``func`` maps ``x`` of shape ``(B, *in)`` to ``(B, *out)`` with sample ``b`` of the
    output depending only on sample ``b`` of the input (no batch statistics, e.g.
    batch norm in training mode). Then the full ``(B·out) × (B·in)`` Jacobian is block
    diagonal, and its blocks come from ``out`` vector-Jacobian products (vectorised
    with ``vmap``) whose cotangent is the same unit vector in every sample.

    Args:
        func: the batch-first function.
        x: the point, shape ``(B, *in)``.

    Returns:
        ``J`` of shape ``(B, prod(out), prod(in))`` with
        ``J[b, i, j] = ∂func(x)[b].flatten()[i] / ∂x[b].flatten()[j]``. It is
        differentiable (``create_graph`` is implied): second derivatives flow through.

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``func`` returns no tensor.
        ValueError: ``x`` has no batch dimension, or ``func``'s output batch size
            differs from ``x``'s.
    """
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {_describe_value(x)}")
    if x.dim() == 0:
        raise ValueError("x is a scalar: batch_jacobian needs a batch dimension first")
    batch = x.shape[0]

    def flat_func(flat: torch.Tensor) -> torch.Tensor:
        out = func(flat.reshape(x.shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"func must return a tensor, got {type(out).__name__}")
        if out.dim() == 0 or out.shape[0] != batch:
            raise ValueError(
                f"func returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}: "
                f"its output must keep the batch size {batch} in dim 0"
            )
        return out.reshape(batch, -1)

    return Jacobian(flat_func, x.reshape(batch, -1)).dense()


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {value.dtype}"
    return f"a {type(value).__name__}"
