"""How the tour's DEQ section reports: its plot, its table's legend, its notes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Residual against iteration, for the first batch of every epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True)
    for ax, result in zip(axes, results):
        curves = result["curves"]
        colours = plt.cm.viridis(torch.linspace(0, 0.9, len(curves)).tolist())
        for colour, (label, history) in zip(colours, curves):
            ax.semilogy(range(len(history)), history, color=colour, label=label)
        ax.set_title(f"forward solve, {result['model']}")
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("worst residual ‖f(z) − z‖ in the batch")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def unconverged_note(result: dict[str, Any], max_iter: int) -> str:
    """What it means that some training steps' forward solves stopped at ``max_iter``."""
    return (
        f"   {result['model']}: in {result['unconverged steps']} of {result['steps']}"
        " training steps, the forward solve of at least"
        f"\n     one image stopped at max_iter = {max_iter} without reaching tol. The"
        " layer was built\n     with on_failure='ignore', so training went on from"
        " that last iterate, unwarned."
    )


def legend(backward: str) -> str:
    """What each column of the section's table means (``backward``: the implicit mode)."""
    neumann = backward in ("auto", "neumann")
    how = {
        "auto": "by plain fixed-point iteration (Neumann), then GMRES where that slows down",
        "neumann": "by plain fixed-point iteration (Neumann)",
    }.get(backward, f"by {backward!r}")
    more = (
        "\n     It may take more iterations than the forward: it stops at tol relative to"
        "\n     ‖v‖, and Neumann's plain iteration is not accelerated the way Anderson's"
        "\n     or Newton's steps are."
        if neumann
        else ""
    )
    return f"""\
   test accuracy: the share of the held-out images classified correctly.
   fwd iters: forward solver iterations per training step (the mean over the steps;
     within a step, the most that any image of the batch needed to reach tol).
   bwd iters: iterations of the backward's linear solve per step. The implicit
     backward solves the adjoint system (∂g/∂z)ᵀ w = v instead of back-propagating
     through the forward iterations,
     here {how}.{more}
     Both counts grow as training makes the cell less contractive. unroll has no
     such solve ('-'): autograd goes back through every forward iteration.
   ms/step: wall time of one training step (forward, backward, optimiser).
   peak MiB: the most memory torch's CPU allocator held during one training step,
     above the level at its start (torch.profiler memory events). The implicit
     backward keeps no graph of the forward iterations; unroll keeps all of them.
   Unroll's gradient is that of the solver's truncated iterations, not the fixed
   point's: the two models train differently, and their accuracies may differ."""
