"""Per-problem selection and where loops read the host (implicit/_batch.py)."""

from __future__ import annotations

import pytest
import torch

from implicit._batch import COPY_ROWS_FROM, cheap_host_reads, known_all, select_rows


def test_select_rows():
    new = torch.arange(6.0).reshape(3, 2)
    old = -new
    assert select_rows(torch.tensor([True, True, True]), 1, (new, old))[0] is new
    assert select_rows(torch.tensor([False, False, False]), None, (new, old))[0] is old
    rows = torch.tensor([True, False, True])
    first, second = select_rows(rows, 1, (new, old), (old, new))
    assert torch.equal(first, torch.tensor([[0.0, 1.0], [-2.0, -3.0], [4.0, 5.0]]))
    assert torch.equal(second, torch.tensor([[-0.0, -1.0], [2.0, 3.0], [-4.0, -5.0]]))
    # Reading the host every 4 iterations: one where per pair, even for every row.
    (every,) = select_rows(torch.tensor([True, True, True]), 4, (new, old))
    assert every is not new and torch.equal(every, new)


# Fewer and more than half of 8 rows; a batch below COPY_ROWS_FROM entries (where) and
# one above (the rows copied).
@pytest.mark.parametrize("width", [3, COPY_ROWS_FROM // 4])
@pytest.mark.parametrize("selected", [1, 2, 4, 7])
def test_select_rows_agrees_with_where_and_leaves_its_inputs(selected, width):
    rows = torch.zeros(8, dtype=torch.bool)
    rows[torch.randperm(8, generator=torch.Generator().manual_seed(selected))[:selected]] = True
    new = torch.randn(8, width, dtype=torch.float64)
    old = torch.randn(8, width, dtype=torch.float64)
    new[~rows], old[rows] = float("nan"), float("inf")  # rows not taken may hold anything
    new.requires_grad_(), old.requires_grad_()
    new_before, old_before = new.detach().clone(), old.detach().clone()
    (out,) = select_rows(rows, None, (new, old))
    assert torch.equal(out, torch.where(rows.unsqueeze(1), new, old))
    for tensor, before in ((new, new_before), (old, old_before)):
        torch.testing.assert_close(tensor.detach(), before, rtol=0, atol=0, equal_nan=True)
    # Gradients flow to the rows taken from each (backward="unroll" records the loop).
    grad_new, grad_old = torch.autograd.grad(out.sum(), (new, old))
    assert torch.equal(grad_new, rows.unsqueeze(1).expand(8, width).double())
    assert torch.equal(grad_old, (~rows).unsqueeze(1).expand(8, width).double())


def test_host_reads_are_cheap_on_the_cpu_only():
    # The meta device stands in for an accelerator: it has no data, so any host read
    # of its values raises. Nothing that asks cheap_host_reads first reads it.
    assert cheap_host_reads(torch.ones(2))
    meta = torch.ones(3, dtype=torch.bool, device="meta")
    assert not cheap_host_reads(meta)
    assert known_all(torch.ones(3, dtype=torch.bool)) and not known_all(torch.tensor([True, False]))
    assert not known_all(meta)  # assumes "not all" rather than reading
    pair = (torch.ones(3, 2, device="meta"), torch.zeros(3, 2, device="meta"))
    (selected,) = select_rows(meta, None, pair)  # one where per pair, no host check
    assert selected.is_meta
