"""``bounds=(lower, upper)``: checked, broadcast to the state and packed like it."""

from __future__ import annotations

import math
from typing import Any

import torch

from implicit import _tree
from implicit._problem import State


def prepare(
    bounds: Any, z0: State, batched: bool
) -> tuple[State, tuple[torch.Tensor, torch.Tensor] | None]:
    """``z0`` clipped into the bounds, and the bounds packed as ``(B, n)`` tensors.

    Each bound is ``None`` or a number (the same for every coordinate), or, for a
    tensor ``z0``, a tensor broadcastable to it; for a tree ``z0``, a tree of the same
    structure whose leaves are numbers, ``None`` or tensors broadcastable to the
    matching leaf. ``±inf`` (or ``None``) means no bound. Bound tensors keep their
    graph: gradients flow back to them.

    Raises:
        TypeError: ``bounds`` is not a pair, or a bound has the wrong type or dtype.
        ValueError: a bound does not broadcast, is NaN, or ``lower > upper`` somewhere
            (values batched by ``torch.func.vmap`` are not checked).
    """
    if bounds is None:
        return z0, None
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(
            f"bounds must be a pair (lower, upper), got {_describe(bounds)}: use "
            f"bounds=(lower, upper) with None or ±inf where there is no bound"
        )
    leaves, spec, paths = _tree.flatten(z0, "z0")
    for leaf, path in zip(leaves, paths):
        if isinstance(leaf, torch.Tensor) and leaf.is_complex():
            raise ValueError(
                f"bounds do not apply to complex states, and {path} is {leaf.dtype}: complex "
                f"numbers have no order (to bound the real and imaginary parts, solve for the "
                f"real state torch.view_as_real(z0) and bound that)"
            )
    for leaf, path in zip(leaves, paths):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            raise TypeError(f"{path} must be a floating-point tensor, got {_describe(leaf)}")
    lowers = _leaves(bounds[0], spec, leaves, "lower", -math.inf)
    uppers = _leaves(bounds[1], spec, leaves, "upper", math.inf)
    for lower, upper, path in zip(lowers, uppers, paths):
        crossed = lower.detach() > upper.detach()
        if _any(crossed):
            index = tuple(int(i) for i in crossed.nonzero()[0])
            raise ValueError(
                f"bounds: lower > upper for {path} at index {index} "
                f"({float(lower.detach()[index])} > {float(upper.detach()[index])})"
            )
    clipped = [
        torch.clamp(leaf.detach(), lower.detach(), upper.detach())
        for leaf, lower, upper in zip(leaves, lowers, uppers)
    ]
    batch = leaves[0].shape[0] if batched and leaves[0].dim() > 0 else 1

    def packed(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.reshape(batch, -1) for p in parts], dim=1)

    return _tree.unflatten(spec, clipped), (packed(lowers), packed(uppers))


def _leaves(
    bound: Any, spec: _tree.Spec, leaves: list[torch.Tensor], name: str, default: float
) -> list[torch.Tensor]:
    """One bound as tensors shaped like each leaf of the state."""
    if bound is None or _is_number(bound) or (spec.is_leaf and isinstance(bound, torch.Tensor)):
        parts = [bound] * len(leaves)
    else:
        try:
            parts = _tree.leaves_like(spec, bound, f"bounds ({name})", "z0")
        except ValueError as error:
            raise ValueError(
                f"bounds: {name} must be a number, None, or have the structure of z0: {error}"
            ) from None
    return [_as_leaf(part, leaf, name, default) for part, leaf in zip(parts, leaves)]


def _as_leaf(part: Any, leaf: torch.Tensor, name: str, default: float) -> torch.Tensor:
    if part is None:
        part = default
    if _is_number(part):
        if math.isnan(part):
            raise ValueError(f"bounds: {name} is NaN")
        return torch.full_like(leaf, float(part), requires_grad=False)
    if not isinstance(part, torch.Tensor):
        raise TypeError(
            f"bounds: {name} must be a number, None or a tensor, got {type(part).__name__}"
        )
    if part.is_floating_point() and part.dtype != leaf.dtype:
        raise TypeError(
            f"bounds: {name} has dtype {part.dtype} but z0 has dtype {leaf.dtype}: use one "
            f"floating-point dtype"
        )
    if part.is_complex():
        raise TypeError(f"bounds: {name} must be real, got {part.dtype}")
    if part.device != leaf.device:
        raise ValueError(f"bounds: {name} is on {part.device} but z0 is on {leaf.device}")
    try:
        out = torch.broadcast_to(part.to(leaf.dtype), leaf.shape)
    except RuntimeError:
        raise ValueError(
            f"bounds: {name} has shape {tuple(part.shape)}, which does not broadcast to "
            f"z0's shape {tuple(leaf.shape)}"
        ) from None
    if _any(torch.isnan(out.detach())):
        raise ValueError(f"bounds: {name} has NaN entries")
    return out


def _any(mask: torch.Tensor) -> bool:
    """Whether any entry of ``mask`` is set; ``False`` where its values are not concrete
    (bounds batched by ``torch.func.vmap``, whose slices cannot be read on the host:
    there the bounds are not checked)."""
    try:
        return bool(mask.any())
    except RuntimeError as error:
        if "vmap" not in str(error):
            raise
        return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
