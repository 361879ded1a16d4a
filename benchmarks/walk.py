"""How much of the library one default solve walks: functions and files.

The default ``fixed_point`` (Anderson forward, ``backward="auto"``) on a batched
``4 × 8`` tanh map, then its backward, after one warm-up call. Every Python function
(code object) of the package that runs is counted once, by ``sys.setprofile``; so is
every file they live in. The count is how much a reader must follow to understand one
solve, and a proxy for the per-call overhead of small problems.

Run from the repository root: ``python benchmarks/walk.py`` (``--list`` prints the
functions). ``tests/test_benchmarks.py`` holds the bound.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]  # the checkout this file is in

import implicit  # noqa: E402

PACKAGE = os.path.dirname(os.path.abspath(implicit.__file__)) + os.sep
COMPREHENSIONS = {"<listcomp>", "<dictcomp>", "<setcomp>", "<genexpr>"}


def default_step(batch: int = 4, width: int = 8) -> None:
    """One default fixed-point solve of ``z = tanh(W z + x)`` and its backward."""
    gen = torch.Generator().manual_seed(0)
    W = (0.5 * torch.randn(width, width, generator=gen) / width**0.5).requires_grad_()
    x = torch.randn(batch, width, generator=gen).requires_grad_()
    z = implicit.fixed_point(
        lambda z, x: torch.tanh(z @ W.T + x), torch.zeros_like(x), x, batched=True
    )
    z.square().sum().backward()


def walk(step=default_step) -> list[tuple[str, int, str]]:
    """The package functions ``step()`` runs (after a warm-up call), as ``(file, first
    line, name)`` sorted by file and line.

    Comprehensions are not functions here: Python 3.11 compiles each into a code object
    of its own, 3.12 inlines them, and the count should not depend on the version.
    """
    step()
    seen: set = set()

    def profile(frame, event, arg):
        code = frame.f_code
        inside = code.co_filename.startswith(PACKAGE)
        if event == "call" and inside and code.co_name not in COMPREHENSIONS:
            seen.add(code)

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return sorted(
        (os.path.relpath(code.co_filename, PACKAGE), code.co_firstlineno, code.co_qualname)
        for code in seen
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every function walked")
    options = parser.parse_args()
    functions = walk()
    files = sorted({path for path, _, _ in functions})
    print(f"{len(functions)} functions in {len(files)} files")
    if options.list:
        for path, line, name in functions:
            print(f"  {path}:{line}  {name}")


if __name__ == "__main__":
    main()
