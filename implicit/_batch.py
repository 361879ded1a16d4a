"""Per-problem selection on flat ``(B, n)`` batches, without needless passes over the data."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cheap_host_reads(tensor: torch.Tensor) -> bool:
    """Whether reading a value of ``tensor`` on the host costs less than a pass over the
    data: on the CPU it does; on an accelerator (CUDA, MPS, XPU, ...) a read stalls the
    device until its queue has run. The one place that decides where loops test their
    data on the host."""
    return tensor.device.type == "cpu"


def known_all(mask: torch.Tensor) -> bool:
    """Whether every entry of ``mask`` is True, where the host reads it cheaply
    (:func:`cheap_host_reads`); elsewhere ``False``: assume not, and take the general
    path, rather than stall the device."""
    return cheap_host_reads(mask) and bool(mask.all())


def row_selector(rows: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``select(new, old)``: ``new`` in the rows that ``rows`` (shape ``(B,)``) selects,
    ``old`` elsewhere, for as many ``(B, n)`` pairs as an iteration updates.

    On the CPU a host check costs less than a pass over the data, so the common cases
    (every row, no row) hand back ``new`` or ``old`` as they are, and otherwise the
    fewer rows are copied into a copy of the other tensor (``torch.where`` over the
    whole batch costs several copies there: 1.5× the time at 64 × 256, 2–4× at
    256 × 512); the check is made once for all the pairs. Elsewhere a host check would
    stall the device: one ``torch.where`` per pair.
    """
    if not cheap_host_reads(rows):
        mask = rows.unsqueeze(1)
        return lambda new, old: torch.where(mask, new, old)
    selected = int(rows.sum())
    if selected == rows.shape[0]:
        return lambda new, old: new
    if selected == 0:
        return lambda new, old: old
    if 2 * selected <= rows.shape[0]:
        index = rows.nonzero().squeeze(1)
        return lambda new, old: old.index_copy(0, index, new.index_select(0, index))
    index = (~rows).nonzero().squeeze(1)
    return lambda new, old: new.index_copy(0, index, old.index_select(0, index))
