"""The tour's DEQ section: a small deep equilibrium classifier trained on real data.

scikit-learn's digits (1,797 8×8 images, shipped inside scikit-learn: nothing is
downloaded) are classified by ``head(DEQ(cell)(inject(x)))`` with the cell
``f(z, u) = tanh(W z + u)``. The same model, from the same initialisation, is trained
twice: with the implicit backward and with ``backward="unroll"`` (autograd through
every forward iteration). The section prints test accuracy, mean forward and backward
iterations, time per step and peak memory for both, says what each number means, and
saves a plot of the forward residual against the iteration in ``--out`` (by default a
new temporary folder, whose path it prints).

It needs the ``[examples]`` extra (scikit-learn, matplotlib, tqdm); without it the
section says what to install and the rest of the tour still runs.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

import implicit
from implicit import _tour_deq_report
from implicit._memory import peak_memory

EXTRAS = ("sklearn", "matplotlib", "tqdm")
WIDTH, BATCH_SIZE, LEARNING_RATE, MAX_ITER = 128, 128, 3e-3, 50
#: Weight of the Jacobian penalty (Bai et al., 2021), which keeps the cell contractive.
JAC_WEIGHT = 0.05
INSTALL_HINT = 'pip install ".[examples]"  (or: pip install scikit-learn matplotlib tqdm)'
#: How long the whole tour takes on a laptop-class CPU, with and without ``--fast``.
DURATION, FAST_DURATION = "one to two minutes", "about ten seconds"
PLOT_NAME = "deq_residuals.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The section's command-line options."""
    group = parser.add_argument_group("DEQ classifier on scikit-learn's digits")
    group.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
    group.add_argument(
        "--solver",
        default="anderson",
        choices=sorted(implicit.solvers.NAMES),
        help="forward solver of the DEQ (default: anderson)",
    )
    group.add_argument(
        "--backward",
        default="auto",
        choices=sorted(set(implicit.linear.NAMES) - {"unroll"}),
        help="implicit backward mode, compared against unroll (default: auto)",
    )
    group.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder for the residual plot {PLOT_NAME} (default: a new temporary folder,"
        " printed at the end)",
    )
    group.add_argument(
        "--random-state",
        type=int,
        default=0,
        help="state of the random generators: the data split and the initial weights (default: 0)",
    )
    group.add_argument(
        "--fast",
        action="store_true",
        help=f"a quick run ({FAST_DURATION}): one epoch on 500 of the 1,797 images",
    )


def output_dir(out: Path | None) -> Path:
    """The folder the plot goes to: ``out``, created if needed, or a new temporary one.

    Checked before training, so that an unwritable folder is reported at once rather
    than after a minute of training.
    """
    if out is None:
        return Path(tempfile.mkdtemp(prefix="implicit-tour-"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"--out {out}: cannot create the folder ({error.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SystemExit(f"--out {out}: the folder is not writable; choose another with --out")
    return out


def missing_extras() -> list[str]:
    """The packages of the ``[examples]`` extra that cannot be imported."""
    missing = []
    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class Cell(nn.Module):
    """``f(z, u) = tanh(W z + u)``, with ``W`` initialised at spectral norm 0.5."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.linear.weight.mul_(0.5 / torch.linalg.matrix_norm(self.linear.weight, ord=2))

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(z) + u)


class Classifier(nn.Module):
    """``head(DEQ(cell)(inject(x)))``: 64 pixels in, 10 class scores out."""

    def __init__(self, width: int, solver: str, backward: str, max_iter: int):
        super().__init__()
        self.inject = nn.Linear(64, width)
        self.deq = implicit.DEQ(
            Cell(width),
            solver=solver,
            backward=backward,
            max_iter=max_iter,
            on_failure="ignore",
            jac_reg=1,
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.inject(x)))


def load_digits(random_state: int, fast: bool) -> tuple[torch.Tensor, ...]:
    """Standardised train and test tensors (a stratified 75/25 split)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    images, labels = sklearn_digits(return_X_y=True)
    if fast:
        images, labels = images[:500], labels[:500]
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=random_state, stratify=labels
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1.0
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def train(
    name: str,
    backward: str,
    data: tuple[torch.Tensor, ...],
    options: argparse.Namespace,
    tqdm: ModuleType,
) -> dict[str, Any]:
    """Train one model; return its statistics and residual histories."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(options.random_state)  # the same initialisation and batches for both models
    model = Classifier(WIDTH, options.solver, backward, MAX_ITER)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    epochs = 1 if options.fast else options.epochs
    steps_per_epoch = math.ceil(len(x_train) / BATCH_SIZE)
    forward_iters, backward_iters, step_times, unconverged = [], [], [], 0
    curves: list[tuple[str, list[float]]] = []
    # A progress bar only where someone watches it: redirected to a file or a pipe, its
    # redraws would pile up into one long line.
    show_bar = sys.stderr.isatty()
    if not show_bar:
        print(f"   training {name}: {epochs} epoch(s) of {steps_per_epoch} steps ...", flush=True)
    bar = tqdm.tqdm(
        total=epochs * steps_per_epoch,
        desc=f"{name:>8}",
        unit="step",
        leave=True,
        disable=not show_bar,
    )

    def step(xb: torch.Tensor, yb: torch.Tensor) -> float:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        (loss + JAC_WEIGHT * model.deq.last_jac_loss).backward()
        optimizer.step()
        return loss.item()

    for epoch in range(epochs):
        order = torch.randperm(len(x_train))
        for first in range(0, len(x_train), BATCH_SIZE):
            batch = order[first : first + BATCH_SIZE]
            start = time.perf_counter()
            loss = step(x_train[batch], y_train[batch])
            step_times.append(time.perf_counter() - start)
            info = model.deq.last_info
            forward_iters.append(info.iterations)
            unconverged += int(not bool(info.converged.all()))
            if info.backward is not None:
                backward_iters.append(info.backward.iterations)
            if first == 0:
                curves.append((f"epoch {epoch + 1}", info.history))
            bar.set_postfix(loss=f"{loss:.3f}", fwd_iters=info.iterations)
            bar.update()
    bar.close()
    # One more step under the memory profiler (kept apart: profiling slows it down). The
    # gradients go first, so that the step frees nothing allocated before the profiler.
    batch = torch.arange(min(BATCH_SIZE, len(x_train)))
    xb, yb = x_train[batch], y_train[batch]
    optimizer.zero_grad()
    _, peak = peak_memory(lambda: step(xb, yb))
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    return {
        "model": name,
        "test accuracy": accuracy,
        "fwd iters": sum(forward_iters) / len(forward_iters),
        "bwd iters": sum(backward_iters) / len(backward_iters) if backward_iters else "-",
        "ms/step": 1e3 * sum(step_times) / len(step_times),
        "peak MiB": peak / 2**20,
        "unconverged steps": unconverged,
        "steps": len(step_times),
        "curves": curves,
    }


def run(options: argparse.Namespace, format_table) -> None:
    """Train the implicit and the unrolled model and report both."""
    missing = missing_extras()
    if missing:
        print(f"   Skipped: this section needs {', '.join(missing)}. Install them with")
        print(f"   {INSTALL_HINT}")
        return
    import tqdm

    out = output_dir(options.out)
    data = load_digits(options.random_state, options.fast)
    print(
        f"   {len(data[0])} training and {len(data[2])} test images, width {WIDTH}, batch "
        f"{BATCH_SIZE}, solver {options.solver!r}, tol 1e-4, max_iter {MAX_ITER}\n"
    )
    results = [
        train(f"implicit ({options.backward})", options.backward, data, options, tqdm),
        train("unroll", "unroll", data, options, tqdm),
    ]
    columns = ["model", "test accuracy", "fwd iters", "bwd iters", "ms/step", "peak MiB"]
    print()
    table = format_table([{key: result[key] for key in columns} for result in results])
    print("\n".join("   " + line for line in table.splitlines()))
    print(_tour_deq_report.legend(options.backward))
    for result in results:
        if result["unconverged steps"]:
            print(_tour_deq_report.unconverged_note(result, MAX_ITER))
    path = out / PLOT_NAME
    _tour_deq_report.plot(results, path)
    print(f"\n   The forward residual against the iteration, per epoch: {path}")
