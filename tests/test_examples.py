"""Every script in examples/ runs and passes its own check (each asserts its error); the
bilevel example's errors and losses meet their bounds."""

from __future__ import annotations

import pathlib
import runpy

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parents[1] / "examples").glob("*.py"))


def test_examples_exist():
    names = {path.name for path in EXAMPLES}
    assert {"inverse_asin.py", "custom_root_scipy_solve.py", "anderson_dzdx.py"} <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs(script, capsys):
    runpy.run_path(str(script), run_name="__main__")
    assert "error" in capsys.readouterr().out


def test_bilevel_example():
    script = pathlib.Path(__file__).parents[1] / "examples" / "bilevel.py"
    results = runpy.run_path(str(script), run_name="bilevel")["main"](verbose=False)
    assert results["hypergradient error"] <= 1e-9
    assert results["hvp error"] <= 1e-9
    assert results["forward-mode error"] <= 1e-9
    assert results["validation loss after"] < results["validation loss, best shared penalty"]
    assert results["validation loss, best shared penalty"] < results["validation loss before"]
