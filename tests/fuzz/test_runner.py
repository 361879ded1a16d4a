"""The worker pool: a worker stuck outside Python, or dead, is replaced and its case
counted, and the run goes on."""

from __future__ import annotations

import os
import signal
import time

import runner


def fake_worker(conn, timeout: float) -> None:
    """Answers ``ok:*`` at once, never answers ``hang`` (the alarm blocked, as in native
    code), dies on ``die``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        if case is None:
            return
        if case == "hang":
            time.sleep(3600)
        if case == "die":
            os._exit(3)
        conn.send({"case": case, "outcome": "OK", "reason": ""})


def test_hangs_and_deaths_are_counted_and_the_run_goes_on():
    cases = ["ok:1", "hang", "ok:2", "die", "ok:3"]
    start = time.monotonic()
    results = list(
        runner.run(cases, workers=1, timeout=0.5, grace=0.5, target=fake_worker, preload=())
    )
    outcomes = {r["case"]: r["outcome"] for r in results}
    assert outcomes == {"ok:1": "OK", "hang": "HANG", "ok:2": "OK", "die": "CRASH", "ok:3": "OK"}
    assert time.monotonic() - start < 30


def test_two_workers_share_the_cases():
    cases = [f"ok:{i}" for i in range(6)] + ["hang"]
    results = list(
        runner.run(cases, workers=2, timeout=0.5, grace=0.5, target=fake_worker, preload=())
    )
    assert sorted(r["case"] for r in results) == sorted(cases)
    assert [r["outcome"] for r in results if r["case"] == "hang"] == ["HANG"]


def pid_worker(conn, timeout: float) -> None:
    """Answers each case with its process id; ``alarm:*`` as a case its alarm stopped."""
    while True:
        try:
            case = conn.recv()
        except EOFError:
            return
        if case is None:
            return
        outcome = "HANG" if case.startswith("alarm") else "OK"
        conn.send({"case": case, "outcome": outcome, "reason": str(os.getpid())})


def test_a_worker_whose_alarm_stopped_a_case_is_replaced():
    cases = ["ok:1", "ok:2", "alarm:3", "ok:4"]
    results = list(runner.run(cases, workers=1, timeout=5, target=pid_worker, preload=()))
    pid = {r["case"]: r["reason"] for r in results}
    assert pid["ok:1"] == pid["ok:2"] == pid["alarm:3"] != pid["ok:4"]
