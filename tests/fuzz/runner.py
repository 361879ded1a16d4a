"""Run many cases in worker processes, each under a time limit that a hang cannot block.

Each worker classifies one case at a time under an in-process alarm
(:func:`classify.run_with_alarm`), which turns a hang in Python code into ``HANG``
and says where it was stuck; the worker is then replaced, as the interrupted case may
have left state behind (a torch function mode on its stack). A worker that does not
answer ``grace`` seconds after that (stuck in native code, or dead) is killed and
replaced, and its case counted as ``HANG`` (or ``CRASH`` when the process died).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import warnings
from collections.abc import Iterable, Iterator
from multiprocessing.connection import wait

#: Cases a worker runs before it is replaced (memory a long run may accumulate).
TASKS_PER_WORKER = 500
#: Modules the fork server imports once, so that a replaced worker starts at once.
PRELOAD = ("torch", "implicit", "classify", "matrix", "families")


def _worker(conn, timeout: float) -> None:
    import classify
    import matrix
    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # numpy's overflow notes; convergence warnings are caught
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        conn.send(classify.run_with_alarm(matrix.Case.parse(item), timeout).as_dict())


class _Slot:
    """One worker process and the case it is running."""

    def __init__(self, context, timeout: float, target):
        self.context, self.timeout, self.target = context, timeout, target
        self.case: str | None = None
        self.started = 0.0
        self.tasks = 0
        self._start()

    def _start(self) -> None:
        self.conn, child = self.context.Pipe()
        self.process = self.context.Process(
            target=self.target, args=(child, self.timeout), daemon=True
        )
        self.process.start()
        child.close()
        self.tasks = 0

    def submit(self, case: str) -> None:
        if self.tasks >= TASKS_PER_WORKER:
            self.close()
            self._start()
        self.case, self.started, self.tasks = case, time.monotonic(), self.tasks + 1
        self.conn.send(case)

    def restart(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()
        self._start()
        self.case = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def run(
    cases: Iterable[str],
    *,
    workers: int,
    timeout: float,
    grace: float = 10.0,
    target=_worker,
    preload: tuple[str, ...] = PRELOAD,
) -> Iterator[dict]:
    """Yield the classification (a ``Result.as_dict()``) of every case id, in the order
    they finish.

    Args:
        cases: case ids (``matrix.Case.id``).
        workers: worker processes.
        timeout: the time limit of one case, in seconds.
        grace: how much longer a worker may take to answer before it is killed.
        target: the worker's main function, ``target(conn, timeout)``.
        preload: modules the fork server imports once for every worker.
    """
    try:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
    except ValueError:
        context = multiprocessing.get_context("spawn")
    pending = iter(cases)
    slots = [_Slot(context, timeout, target) for _ in range(workers)]
    try:
        while True:
            for slot in slots:
                if slot.case is None:
                    case = next(pending, None)
                    if case is not None:
                        slot.submit(case)
            busy = [slot for slot in slots if slot.case is not None]
            if not busy:
                return
            deadline = min(slot.started for slot in busy) + timeout + grace
            ready = wait(
                [slot.conn for slot in busy], timeout=max(0.0, deadline - time.monotonic())
            )
            for slot in busy:
                if slot.conn in ready:
                    try:
                        result = slot.conn.recv()
                    except (EOFError, OSError):
                        result = _lost(slot.case, "CRASH", "the worker process died")
                        slot.restart()
                    slot.case = None
                    if result["outcome"] == "HANG":
                        # The alarm stopped the case anywhere, e.g. inside a torch function
                        # mode, whose stack it leaves behind: the next case needs a fresh
                        # process.
                        slot.restart()
                    yield result
                elif time.monotonic() - slot.started > timeout + grace:
                    case = slot.case
                    slot.restart()
                    yield _lost(
                        case, "HANG", f"killed after {timeout + grace:g} s (stuck outside Python)"
                    )
    finally:
        for slot in slots:
            slot.close()


def _lost(case: str, outcome: str, reason: str) -> dict:
    return {"case": case, "outcome": outcome, "reason": reason, "status": None,
            "backward_status": None, "residual_ratio": None, "grad_error": None,
            "cond": None, "seconds": None, "note": ""}  # fmt: skip
