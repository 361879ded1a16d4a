"""The cells the DEQ layer's tests solve, their inputs and the unrolled reference."""

from __future__ import annotations

import torch
from conftest import loss_of, unrolled_fixed_point
from torch import nn


class Cell(nn.Module):
    """``f(z, x) = tanh(s · W z + b + x)`` with ``‖W‖₂ = 0.6``; ``s`` depends on the mode.

    The mode dependence makes the fixed point differ between ``train()`` and
    ``eval()``, so a test can see that the layer calls ``f`` in the right mode.
    """

    def __init__(self, n: int = 5, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(n, n, generator=generator, dtype=torch.float64)
        self.linear = nn.Linear(n, n, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(0.6 * weight / torch.linalg.matrix_norm(weight, ord=2))
            self.linear.bias.copy_(0.1 * torch.randn(n, generator=generator, dtype=torch.float64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 if self.training else 0.8
        return torch.tanh(scale * self.linear(z) + x)


def make_input(batch: int = 3, n: int = 5, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=generator, dtype=torch.float64).requires_grad_()


def grads_of(z: torch.Tensor, x: torch.Tensor, cell: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_of(z), [x, *cell.parameters()]))


def reference(cell: Cell, x: torch.Tensor) -> list[torch.Tensor]:
    z = unrolled_fixed_point(cell, torch.zeros_like(x), x)
    return grads_of(z, x, cell)


class TwoScaleCell(nn.Module):
    """A multi-resolution cell: a fine state (B, 2, 4) and a coarse one (B, 3)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(3)

        def weight(*shape, norm):
            w = torch.randn(*shape, generator=generator, dtype=torch.float64)
            return nn.Parameter(norm * w / torch.linalg.matrix_norm(w, ord=2))

        self.fine = weight(8, 8, norm=0.4)
        self.down = weight(3, 8, norm=0.3)
        self.up = weight(8, 3, norm=0.3)
        self.coarse = weight(3, 3, norm=0.4)

    def forward(self, state, x):
        fine, coarse = state
        flat = fine.flatten(1)
        new_fine = torch.tanh(flat @ self.fine.T + coarse @ self.up.T + x.flatten(1))
        new_coarse = torch.tanh(coarse @ self.coarse.T + flat @ self.down.T)
        return new_fine.view_as(fine), new_coarse
