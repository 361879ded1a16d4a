"""The tour, ``python -m implicit``: sections 2-5 check what they print; the whole tour
runs end to end in a subprocess, from a read-only working directory."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from implicit import __main__ as tour
from implicit import _tour_deq, _tour_deq_report

ROOT = Path(__file__).resolve().parents[1]


def run(
    *args: str, code: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "implicit"]
    if not code:
        command += list(args)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_inverse_layer_section():
    assert tour.tour_inverse_layer() <= 1e-4  # float32, GMRES backward to tol 1e-6


def test_custom_root_section():
    assert tour.tour_custom_root() <= 1e-12


def test_anderson_section():
    assert tour.tour_anderson() <= 1e-9


def test_tour_section():
    errors = tour.tour_bilevel()
    assert errors["hypergradient"] <= 1e-10 and errors["hvp"] <= 1e-10


def test_help_lists_the_options_and_says_how_long_the_tour_takes():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--epochs", "--solver", "--backward", "--out", "--random-state", "--fast"):
        assert option in result.stdout
    assert _tour_deq.DURATION in result.stdout and _tour_deq.FAST_DURATION in result.stdout
    assert "``" not in result.stdout  # the module docstring's markup stays out of --help


def rows_of(out: str) -> dict[str, list[str]]:
    """The DEQ section's table rows, by model."""
    lines = [line.strip() for line in out.splitlines()]
    return {
        line.split()[0]: line.split()
        for line in lines
        if line.startswith(("implicit (", "unroll "))
    }


def test_tour_runs_from_a_read_only_directory_and_writes_its_plot_elsewhere(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    cwd = tmp_path / "read-only"
    cwd.mkdir()
    cwd.chmod(0o555)
    try:
        result = run("--fast", cwd=cwd)
        written = list(cwd.iterdir())
    finally:
        cwd.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert not written  # nothing relative to the working directory (root may write here)
    out = result.stdout
    assert _tour_deq.FAST_DURATION in out
    headings = ("1. z = tanh(W z + x)", "2. implicit_inverse_layer", "3. scipy", "4. dz*/dx")
    for heading in (*headings, "5. Bilevel", "6. Optimisation layers", "7. A DEQ classifier"):
        assert heading in out
    assert "seed" not in out
    rows = rows_of(out)
    assert set(rows) == {"implicit", "unroll"}
    accuracy = float(rows["implicit"][2])
    assert 0.0 <= accuracy <= 1.0
    assert rows["unroll"][3] == "-"  # unroll has no backward linear solve
    for column in ("test accuracy:", "fwd iters:", "bwd iters:", "ms/step:", "peak MiB:"):
        assert column in out  # every number the section prints is explained
    plot = re.search(r"per epoch: (\S+)$", out, flags=re.M)
    assert plot, out
    png = Path(plot[1])
    try:
        assert png.name == _tour_deq.PLOT_NAME and png.parent.name.startswith("implicit-tour-")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        shutil.rmtree(png.parent, ignore_errors=True)
    # stderr is a pipe here, not a terminal: no progress bars (their redraws would pile
    # up into one long line), a line of stdout per model instead.
    assert "step/s" not in result.stderr and "\r" not in result.stderr
    assert "training implicit (auto): 1 epoch(s)" in out


def test_output_dir_creates_the_folder_or_says_why_it_cannot(tmp_path):
    nested = tmp_path / "a" / "b"
    assert _tour_deq.output_dir(nested) == nested and nested.is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="--out"):
        _tour_deq.output_dir(blocker / "plots")
    temporary = _tour_deq.output_dir(None)
    try:
        assert temporary.is_dir() and temporary.name.startswith("implicit-tour-")
    finally:
        temporary.rmdir()


def test_the_section_explains_its_numbers():
    for backward in ("auto", "neumann", "gmres"):
        text = _tour_deq_report.legend(backward)
        for column in ("test accuracy:", "fwd iters:", "bwd iters:", "ms/step:", "peak MiB:"):
            assert column in text
        assert ("Neumann" in text) == (backward != "gmres")
        assert all(len(line) <= 88 for line in text.splitlines())
    note = _tour_deq_report.unconverged_note(
        {"model": "unroll", "unconverged steps": 7, "steps": 88}, _tour_deq.MAX_ITER
    )
    assert "in 7 of 88 training steps" in note and f"max_iter = {_tour_deq.MAX_ITER}" in note
    assert "on_failure='ignore'" in note
    assert all(len(line) <= 88 for line in note.splitlines())


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_only_on_a_terminal(terminal, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, **options):
            bars.append(options)

        def set_postfix(self, **values):
            pass

        def update(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(20, 64, generator=generator)
    labels = torch.randint(0, 10, (20,), generator=generator)
    options = argparse.Namespace(
        random_state=0, fast=True, epochs=1, solver="anderson", backward="auto"
    )
    fake_tqdm = types.SimpleNamespace(tqdm=lambda **options: Bar(**options))
    result = _tour_deq.train("implicit", "auto", (images, labels) * 2, options, fake_tqdm)
    assert [bar["disable"] for bar in bars] == [not terminal]
    assert result["steps"] == 1


def test_tour_without_the_examples_extra_says_what_to_install(tmp_path):
    # Importing a module whose sys.modules entry is None raises ImportError: as if absent.
    code = (
        "import sys; sys.modules.update(dict.fromkeys(['sklearn', 'matplotlib', 'tqdm']));"
        "from implicit.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    result = run("--fast", "--out", str(tmp_path), code=code)
    assert result.returncode == 0, result.stderr
    assert "1. z = tanh(W z + x)" in result.stdout  # the part that needs nothing extra ran
    assert 'pip install ".[examples]"' in result.stdout
    assert "sklearn, matplotlib, tqdm" in result.stdout
    assert not any(tmp_path.iterdir())
