"""benchmarks/fuzz.py end to end: a tiny run through the worker pool, then its merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matrix

ROOT = Path(__file__).resolve().parents[2]


def _script(*args: str) -> str:
    command = [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return done.stdout


def test_a_small_run_and_its_merge(tmp_path):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    count = len(matrix.ROOT_FAMILIES)
    _script("--problems", str(count), "--timeout", "20", "--out", str(first))
    _script("--problems", "2", "--suite", "extended", "--timeout", "20", "--out", str(second))
    merged = tmp_path / "merged.json"
    text = _script("--merge", str(first), str(second), "--out", str(merged))
    document = json.loads(merged.read_text())
    assert document["summary"]["problems"] == count + 2
    assert document["meta"]["chunks"] == [[0, count], [0, 2]]
    rows = [dict(zip(document["columns"], row)) for row in document["results"]]
    assert {row["case"].split(":")[0] for row in rows} == {
        *matrix.ROOT_FAMILIES,
        *matrix.NEW_FAMILIES[:2],
    }
    assert all(row["outcome"] != "HARNESS-ERROR" for row in rows)
    assert f"{count + 2} problems" in text and "tanh_contractive" in text


def test_one_case_in_process():
    out = json.loads(_script("--case", "tanh_contractive:2:anderson:dense:fixed_point:small"))
    assert out["outcome"] == "OK" and out["grad_error"] < 1e-9


def test_one_second_order_case_of_a_bounded_minimum():
    out = json.loads(_script("--case", "opt_bounded:1006:newton_min:dense:minimize:hvp:small"))
    assert out["outcome"] == "OK" and out["grad_error"] < 1e-6, out
