"""What the benchmark sections share: timing, per-operation floors, tables."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Row:
    """One line of a results table.

    Attributes:
        name: what was run.
        group: the family it belongs to (``implicit``, ``TorchDEQ``, ...), for plots.
        tol: the tolerance it was run with.
        times: CPU seconds per call, one per timed call.
        f_evals: evaluations of ``f`` per call (``None`` when not counted).
        vjps: vector-Jacobian products per call.
        floor: ``f_evals · t_f + vjps · t_vjp`` in seconds (the arithmetic the call needs).
        error: relative error of the result against the reference.
        note: anything the reader must know to compare this row.
    """

    name: str
    group: str = ""
    tol: float | None = None
    times: list[float] = field(default_factory=list)
    f_evals: float | None = None
    vjps: float | None = None
    floor: float | None = None
    error: float | None = None
    note: str = ""
    #: The median over rounds of each round's ratio, when the floor was probed in rounds.
    overhead_median: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else math.nan

    @property
    def overhead(self) -> float:
        if self.overhead_median is not None:
            return self.overhead_median
        return self.median / self.floor if self.floor else math.nan

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "group": self.group,
            "tol": self.tol,
            "median_s": self.median,
            "times_s": self.times,
            "f_evals": self.f_evals,
            "vjps": self.vjps,
            "floor_s": self.floor,
            "overhead": self.overhead,
            "error": self.error,
            "note": self.note,
        }


def clock() -> float:
    """CPU seconds of the whole process, which ``run.py`` pins to one core.

    With one compute thread per framework, CPU time is what a call takes on a quiet
    core; on a machine shared with other jobs, wall time also counts the waits for one.
    """
    return time.process_time()


def timed_blocks(
    calls: dict[str, Callable[[], object]], rounds: int, block: int = 3
) -> dict[str, list[float]]:
    """CPU seconds per call of each callable, measured in rounds of warm blocks.

    A round runs every callable in turn: one untimed call (caches warm for it, as at
    any step of a training loop), then ``block`` timed calls. Rounds spread the noise
    of a shared machine over every contender alike; the reader takes medians.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    # Once, not before every call: a collection evicts the caches, and the call after
    # it pays milliseconds that no training loop pays at every step.
    gc.collect()
    for _ in range(rounds):
        for name, call in calls.items():
            call()
            for _ in range(block):
                start = clock()
                call()
                times[name].append(clock() - start)
    return times


def per_call(call: Callable[[], object], number: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean CPU time of ``number`` back-to-back calls."""
    call()
    samples = []
    for _ in range(repeats):
        start = clock()
        for _ in range(number):
            call()
        samples.append((clock() - start) / number)
    return statistics.median(samples)


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-2):
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
