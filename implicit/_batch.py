"""Per-problem selection on flat ``(B, n)`` batches, without needless passes over the data,
and products with a set of rows per problem (``(B, k, n)``: histories, Krylov bases)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from implicit._torch import transforms_active


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


def all_running(norms: torch.Tensor, thresholds: torch.Tensor, worst: torch.Tensor) -> bool:
    """Whether every problem goes on after an iteration: each residual norm above its
    threshold, and finite (an infinite or NaN ``worst``, the largest norm, fails; NaN
    also fails the comparison). Two host reads: for loops that test on the host
    (:func:`cheap_host_reads`)."""
    return math.isfinite(worst.item()) and bool((norms > thresholds).all())


#: From this many entries per tensor on, copying the selected rows beats ``torch.where``
#: on the CPU (measured for two pairs: 4 × 8, 5.7 µs against 17.9 for the copies;
#: 8 × 1024, 17 against 22; 64 × 256, 30 against 25).
COPY_ROWS_FROM = 12_000


def row_selector(
    rows: torch.Tensor, width: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``select(new, old)``: ``new`` in the rows that ``rows`` (shape ``(B,)``) selects,
    ``old`` elsewhere, for as many ``(B, width)`` pairs as an iteration updates.

    On the CPU a host check costs less than a pass over the data, so the common cases
    (every row, no row) hand back ``new`` or ``old`` as they are, and otherwise, in a
    batch of at least ``COPY_ROWS_FROM`` entries, the fewer rows are copied into a copy
    of the other tensor (``torch.where`` over the whole batch costs several copies
    there: 1.5× the time at 64 × 256, 2–4× at 256 × 512); the check is made once for all
    the pairs. Smaller batches take one ``torch.where`` per pair (one call against
    two), and so does every batch where a host check would stall the device.
    """
    if not cheap_host_reads(rows):
        return _where(rows)
    selected = int(rows.sum())
    if selected == rows.shape[0]:
        return lambda new, old: new
    if selected == 0:
        return lambda new, old: old
    if rows.shape[0] * width < COPY_ROWS_FROM:
        return _where(rows)
    if 2 * selected <= rows.shape[0]:
        index = rows.nonzero().squeeze(1)
        return lambda new, old: old.index_copy(0, index, new.index_select(0, index))
    index = (~rows).nonzero().squeeze(1)
    return lambda new, old: new.index_copy(0, index, old.index_select(0, index))


def _where(rows: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``torch.where(mask, new, old)`` bound to the rows' mask (no Python call per pair)."""
    return functools.partial(torch.where, rows.unsqueeze(1))


def project(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, k)`` inner products of ``v`` ``(B, n)`` with the ``k`` rows of ``rows``
    ``(B, k, n)``.

    Row vectors times matrices, by ``bmm``: on the CPU the fast layout of these
    products (the matrix-vector layouts that ``einsum`` picks are about ten times
    slower), and one call where ``@`` dispatches nine.
    """
    return torch.bmm(v.unsqueeze(1), rows.transpose(1, 2)).squeeze(1)


def combine(rows: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``Σ_k coefficients[:, k] · rows[:, k]``, shape ``(B, n)``, by ``bmm`` as in
    :func:`project`."""
    # Contiguous: a batch of row vectors with strides across the batch (as LAPACK
    # solves return them) sends the product down a path ten times slower.
    return torch.bmm(coefficients.contiguous().unsqueeze(1), rows).squeeze(1)


def store(buffer: torch.Tensor, slot: int, value: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``buffer`` with index ``slot`` of dimension ``dim`` set to ``value``.

    In place when the solve runs on plain tensors with no graph recorded (the implicit
    forward); into a copy when the solver's operations are :func:`traced`
    (``backward="unroll"``), whose graph needs the old values.
    """
    if traced(buffer, value):
        buffer = buffer.clone()
    buffer.select(dim, slot).copy_(value)
    return buffer


def traced(*tensors: torch.Tensor) -> bool:
    """Whether autograd records the solver's operations (grad mode on, as under
    ``backward="unroll"``) or a ``torch.func`` transform sees them (the solver's
    ``tensors``, see :func:`implicit._torch.transforms_active`): then nothing may be
    updated in place and products must themselves be differentiable. Otherwise (the
    implicit forward) the solve runs on plain tensors."""
    return torch.is_grad_enabled() or transforms_active(*tensors)
