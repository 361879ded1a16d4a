"""Per-problem selection on flat ``(B, n)`` batches, without needless passes over the data."""

from __future__ import annotations

from collections.abc import Callable

import torch


def row_selector(rows: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``select(new, old)``: ``new`` in the rows that ``rows`` (shape ``(B,)``) selects,
    ``old`` elsewhere, for as many ``(B, n)`` pairs as an iteration updates.

    On the CPU a host check costs less than a pass over the data, so the common cases
    (every row, no row) hand back ``new`` or ``old`` as they are; the check is made once
    for all the pairs. Elsewhere a host check would stall the device: one
    ``torch.where`` per pair.
    """
    if rows.device.type == "cpu":
        if bool(rows.all()):
            return lambda new, old: new
        if not bool(rows.any()):
            return lambda new, old: old
    mask = rows.unsqueeze(1)
    return lambda new, old: torch.where(mask, new, old)
