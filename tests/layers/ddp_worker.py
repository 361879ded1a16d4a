"""One rank of the DistributedDataParallel test (run by test_distributed.py).

Usage: ``python ddp_worker.py RANK WORLD_SIZE PORT OUT`` trains the model of
:func:`build` for :data:`STEPS` steps on this rank's share of :func:`data` and, on rank
0, saves every step's gradients (after DDP's all-reduce) and the final parameters.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import implicit

STEPS = 2
SAMPLES = 8


class Model(nn.Module):
    """``head(DEQ(cell)(inject(x)))`` with the cell ``tanh(W z + u)``, in float64."""

    def __init__(self):
        super().__init__()
        self.inject = nn.Linear(3, 6, dtype=torch.float64)
        self.cell = nn.Linear(6, 6, dtype=torch.float64)
        with torch.no_grad():
            self.cell.weight.mul_(0.3 / torch.linalg.matrix_norm(self.cell.weight, ord=2))
        self.deq = implicit.DEQ(
            lambda z, u: torch.tanh(self.cell(z) + u),
            solver="fixed_point",
            backward="gmres",
            tol=1e-13,
            max_iter=500,
        )
        self.head = nn.Linear(6, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.inject(x)))


def build() -> Model:
    torch.manual_seed(0)
    return Model()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 3, generator=generator, dtype=torch.float64)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    """SGD steps on the mean squared error; the gradients seen at every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return grads


def main(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    x, y = data()
    share = slice(rank * SAMPLES // world_size, (rank + 1) * SAMPLES // world_size)
    results = {}
    for find_unused in (False, True):
        model = build()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
        grads = train(ddp, x[share], y[share])
        results[find_unused] = {
            "grads": grads,
            "params": [p.detach().clone() for p in model.parameters()],
            "converged": bool(model.deq.last_info.converged.all()),
            "backward_converged": bool(model.deq.last_info.backward.converged.all()),
        }
        del ddp  # release DDP's reducer (and its hooks) while the process group lives
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's threads can abort it ("terminate called
    # without an active exception") after the work is done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
