"""The documentation runs: every code block of the site and the README, and every
example in a docstring of the API reference.

* Each page's ```python blocks run in order, in one namespace, as a script would
  (``__name__ == "__main__"``), from a temporary working directory. A line
  ``--8<-- "path"`` (a pymdownx snippet) is replaced by the file it names, so the
  example scripts embedded in the site run as they are shown. A block that must not
  run (a shell command, output) carries another language: ```bash, ```text, ...; a
  python block cannot be skipped, and a python block under another name (```py,
  ```pycon, ...) fails the fence test instead of being skipped silently.
* Docstring examples (``>>>``) run as doctests.
* The API reference documents every public name.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import json
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import implicit

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]

#: Fence languages that are not run. Anything else (python under another name) fails.
NOT_RUN = {"bash", "console", "text", "toml", "yaml"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
SNIPPET = re.compile(r'^--8<--\s+"(?P<path>[^"]+)"\s*$')
SPHINX_ROLE = re.compile(r":(class|func|meth|mod|data|attr|exc|obj):`")


@dataclasses.dataclass
class Block:
    language: str
    line: int  # the 1-based line of the block's first code line in the page
    code: str


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, dedented to their fence."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = opening["info"].strip().split(" ")[0].lower()
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        if i == len(lines):
            raise AssertionError(f"a code fence {fence!r} is never closed")
        blocks.append(Block(language, i - len(body) + 1, "\n".join(body)))
        i += 1
    return blocks


def expand_snippets(code: str) -> str:
    """Replace each ``--8<-- "path"`` line by the file it names (relative to the root)."""
    out = []
    for line in code.splitlines():
        match = SNIPPET.match(line.strip())
        out.append((ROOT / match["path"]).read_text() if match else line)
    return "\n".join(out)


def page_id(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_pages_are_found():
    names = {page_id(page) for page in PAGES}
    assert {"README.md", "docs/index.md", "docs/getting_started.md", "docs/concepts.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_fence_names_a_language_that_is_run_or_plainly_not_code(page):
    for block in code_blocks(page.read_text()):
        assert block.language, f"{page_id(page)}:{block.line}: a code fence without a language"
        assert block.language == "python" or block.language in NOT_RUN, (
            f"{page_id(page)}:{block.line}: fence language {block.language!r}: use ```python "
            f"(run by this test) or one of {sorted(NOT_RUN)} for what must not run"
        )


RUNNABLE = [
    page for page in PAGES if any(b.language == "python" for b in code_blocks(page.read_text()))
]


def run_blocks(sources: list[str], filename: str) -> None:
    """Run a page's python blocks in order, in one namespace, as a script would
    (``__name__ == "__main__"``)."""
    torch.manual_seed(0)
    namespace = {"__name__": "__main__"}
    for source in sources:
        exec(compile(source, filename, "exec"), namespace)


#: A page that starts a process group (torch.distributed) runs in a fresh interpreter,
#: stopped with every thread's traceback if it outlives this many seconds: a stuck
#: collective then fails the test instead of hanging the suite.
SEPARATE_PROCESS_TIMEOUT = 240

#: :func:`run_blocks` in that interpreter (a ConvergenceWarning an error, as in this
#: suite), on the sources in a JSON file.
IN_ITS_OWN_PROCESS = (
    "import faulthandler, json, sys, warnings, implicit, test_docs; "
    f"faulthandler.dump_traceback_later({SEPARATE_PROCESS_TIMEOUT}, exit=True); "
    "warnings.simplefilter('error', implicit.ConvergenceWarning); "
    "test_docs.run_blocks(json.load(open(sys.argv[1])), sys.argv[2])"
)


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Padding with empty lines makes tracebacks point at the page's own lines.
    sources = [
        "\n" * (block.line - 1) + expand_snippets(block.code)
        for block in code_blocks(page.read_text())
        if block.language == "python"
    ]
    if not any("init_process_group" in source for source in sources):
        run_blocks(sources, str(page))
        return
    blocks = tmp_path / "blocks.json"
    blocks.write_text(json.dumps(sources))
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    done = subprocess.run(
        [sys.executable, "-c", IN_ITS_OWN_PROCESS, str(blocks), str(page)],
        capture_output=True,
        text=True,
        timeout=SEPARATE_PROCESS_TIMEOUT + 60,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_shows_exactly_the_two_commands_ci_runs():
    """README's commands (the tour, the tests) are the lines .ci/run executes: change
    both together."""
    blocks = code_blocks((ROOT / "README.md").read_text())
    commands = [block.code.strip() for block in blocks if block.language != "python"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert len(commands) == 2, commands
    for command in commands:
        assert command in ci, f"README command not run by .ci/run: {command}"


GUIDES = ["index", "getting_started", "concepts", "choosing", "deq", "blackbox", "inverting"]
GUIDES += ["higher_order", "troubleshooting", "distributed", "examples", "optimisation"]


def test_every_guide_shows_code_that_runs():
    """The API pages' code is in the docstrings (run below); every guide has its own."""
    runnable = {page_id(page) for page in RUNNABLE}
    without = [name for name in GUIDES if f"docs/{name}.md" not in runnable]
    assert not without, f"guides without a python block: {without}"


def test_code_blocks_parser():
    text = "a\n```python\nx = 1\n```\n- item\n  ```bash\n  ls\n  ```\n  ```python\n  y = 2\n  ```\n"
    blocks = code_blocks(text)
    assert [(b.language, b.line, b.code) for b in blocks] == [
        ("python", 3, "x = 1"),
        ("bash", 7, "ls"),
        ("python", 10, "y = 2"),
    ]


# -- the API reference -----------------------------------------------------------------


DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", flags=re.M)


def api_pages() -> dict[pathlib.Path, list[str]]:
    """The API reference's pages and the objects each renders (its ``::: path``
    directives), in order."""
    return {
        page: DIRECTIVE.findall(page.read_text()) for page in sorted((DOCS / "api").rglob("*.md"))
    }


def reference_paths() -> list[str]:
    """The objects the API reference renders."""
    return [path for paths in api_pages().values() for path in paths]


def resolve(path: str) -> object:
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def public_names() -> list[str]:
    return [
        *(f"implicit.{name}" for name in implicit.__all__),
        *(f"implicit.solvers.{name}" for name in implicit.solvers.__all__),
        *(f"implicit.linear.{name}" for name in implicit.linear.__all__),
        *(f"implicit.layers.{name}" for name in implicit.layers.__all__),
    ]


def test_the_api_reference_documents_every_public_name():
    documented = {id(resolve(path)) for path in reference_paths()}
    missing = [name for name in public_names() if id(resolve(name)) not in documented]
    assert not missing, f"not in docs/api/*.md: {missing}"


#: Public names documented on their package's page rather than on their own.
ON_THE_PACKAGE_PAGE = {"NAMES", "resolve", "BRACKETING", "MINIMIZERS", "LEAST_SQUARES"}


def test_every_public_name_has_its_own_page_with_an_example():
    home: dict[int, tuple[pathlib.Path, int]] = {}
    for page, paths in api_pages().items():
        for position, path in enumerate(paths):
            home.setdefault(id(resolve(path)), (page, position))
    for name in public_names():
        page, position = home[id(resolve(name))]
        where = page_id(page)
        if name.rsplit(".", 1)[1] not in ON_THE_PACKAGE_PAGE:
            assert position == 0, f"{name} shares {where} with another name: give it its own"
        examples = [b for b in code_blocks(page.read_text()) if b.language == "python"]
        assert examples, f"{where} ({name}) has no ```python example"


def documented_objects() -> list[tuple[str, object]]:
    """Every documented object and, for classes, their public members defined there."""
    objects = []
    for path in reference_paths():
        obj = resolve(path)
        objects.append((path, obj))
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if not name.startswith("_") and (inspect.isfunction(member) or callable(member)):
                    objects.append((f"{path}.{name}", member))
    return objects


def test_public_docstrings_use_markdown_cross_references():
    """mkdocstrings renders ``[`Name`][implicit.Name]``; a Sphinx role shows as raw text."""
    offenders = [
        path for path, obj in documented_objects() if SPHINX_ROLE.search(inspect.getdoc(obj) or "")
    ]
    assert not offenders, f"Sphinx roles in rendered docstrings: {offenders}"


def docstring_examples() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder()
    tests = []
    modules = [implicit] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(implicit.__path__, "implicit.")
        if info.name != "implicit.__main__"
    ]
    for module in modules:
        for test in finder.find(module, module.__name__):
            if test.examples and test.name not in {t.name for t in tests}:
                tests.append(test)
    return sorted(tests, key=lambda test: test.name)


EXAMPLES = docstring_examples()


def test_the_docstring_examples_are_found():
    names = {test.name.rsplit(".", 1)[-1] for test in EXAMPLES}
    assert {"fixed_point", "root_solve", "invert", "custom_root", "DEQ"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda test: test.name)
def test_docstring_examples_run(example):
    torch.manual_seed(0)
    example.globs.update(torch=torch, np=np, implicit=implicit)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    report: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", implicit.ConvergenceWarning)
        runner.run(example, out=report.append)
    assert runner.failures == 0, "".join(report)
