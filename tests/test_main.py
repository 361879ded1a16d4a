"""The tour, ``python -m implicit``, end to end in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "implicit"]
    if not code:
        command += list(args)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_help_lists_the_options():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--epochs", "--solver", "--backward", "--out", "--seed", "--fast"):
        assert option in result.stdout


def test_tour_trains_the_deq_classifier_in_fast_mode(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    result = run("--fast", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "1. The seed problem" in out and "2. A DEQ classifier" in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("implicit (", "unroll "))
    }
    assert set(rows) == {"implicit", "unroll"}
    accuracy = float(rows["implicit"][2])
    assert 0.0 <= accuracy <= 1.0
    assert rows["unroll"][3] == "-"  # unroll has no backward linear solve
    png = tmp_path / "deq_residuals.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step" in result.stderr  # the tqdm progress bar


def test_tour_without_the_examples_extra_says_what_to_install(tmp_path):
    # Importing a module whose sys.modules entry is None raises ImportError: as if absent.
    code = (
        "import sys; sys.modules.update(dict.fromkeys(['sklearn', 'matplotlib', 'tqdm']));"
        "from implicit.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    result = run("--fast", "--out", str(tmp_path), code=code)
    assert result.returncode == 0, result.stderr
    assert "1. The seed problem" in result.stdout  # the part that needs nothing extra ran
    assert 'pip install ".[examples]"' in result.stdout
    assert "sklearn, matplotlib, tqdm" in result.stdout
    assert not any(tmp_path.iterdir())
