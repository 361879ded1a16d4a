"""The peak-memory measure used by the tour and the benchmarks."""

from __future__ import annotations

import pytest
import torch

from implicit._memory import peak_memory

MIB = 2**20


def test_peak_memory_replays_allocations_and_frees():
    def work():
        a = torch.empty(MIB // 4)  # 1 MiB of float32
        b = torch.empty(MIB // 2)  # 2 MiB: 3 MiB held
        del a  # 2 MiB held
        c = torch.empty(MIB // 2)  # 4 MiB held: the peak
        del b, c
        return "done"

    result, peak = peak_memory(work)
    assert result == "done"
    assert peak == 4 * MIB


def test_peak_memory_counts_only_what_the_call_allocates():
    held = [torch.empty(MIB)]  # allocated before the call: not counted
    _, peak = peak_memory(lambda: held[0].add_(1.0))
    assert peak < 1024  # the scalar 1.0 becomes a tiny tensor
    _, peak = peak_memory(held.clear)  # freeing what was there before is no negative peak
    assert peak == 0


def test_unsupported_device():
    with pytest.raises(ValueError, match="cpu"):
        peak_memory(lambda: None, "meta")
