"""The tour, ``python -m implicit``: sections 2-4 check what they print (section 5 in
test_higher_order.py); the whole tour runs end to end in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from implicit import __main__ as tour

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "implicit"]
    if not code:
        command += list(args)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_inverse_layer_section():
    assert tour.tour_inverse_layer() <= 1e-4  # float32, GMRES backward to tol 1e-6


def test_custom_root_section():
    assert tour.tour_custom_root() <= 1e-12


def test_anderson_section():
    assert tour.tour_anderson() <= 1e-9


def test_help_lists_the_options():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--epochs", "--solver", "--backward", "--out", "--seed", "--fast"):
        assert option in result.stdout


def test_tour_prints_every_section_and_trains_the_deq_classifier_in_fast_mode(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    result = run("--fast", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    headings = ("1. The seed problem", "2. The seed's inverse layer", "3. scipy", "4. The")
    for heading in (*headings, "5. Bilevel", "6. A DEQ classifier"):
        assert heading in out
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
