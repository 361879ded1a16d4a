"""DistributedDataParallel: two CPU processes (gloo) give the single-process gradients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import rel_err
from ddp_worker import build, data, train

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_gradients_equal_a_single_process_run(tmp_path):
    assert dist.is_available() and dist.is_gloo_available()
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", port, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), "\n".join(logs)
    results = torch.load(out)

    # The reference: one process, all the data, the same initialisation. The mean loss
    # over the whole batch has the average of the two ranks' gradients.
    x, y = data()
    model = build()
    want = train(model, x, y)
    want_params = list(model.parameters())
    for find_unused, result in results.items():
        assert result["converged"] and result["backward_converged"]
        for step, (got_step, want_step) in enumerate(zip(result["grads"], want)):
            for got, ref in zip(got_step, want_step):
                assert rel_err(got, ref) <= 1e-10, (find_unused, step)
        for got, ref in zip(result["params"], want_params):
            assert rel_err(got, ref) <= 1e-10
