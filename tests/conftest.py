"""Shared problems and references for the test suite."""

from __future__ import annotations

import contextlib
import signal

import pytest
import torch

from implicit import linear

torch.set_num_threads(1)

#: The backward modes that give exact gradients, as the suite checks them.
EXACT_MODES = [
    "dense",
    "gmres",
    "bicgstab",
    "neumann",
    "auto",
    # auto above max_dense: Neumann, then GMRES where it stalls.
    pytest.param(linear.Auto(max_dense=0), id="auto-iterative"),
]

#: Options for a solve converged to near machine precision, for gradient checks.
TIGHT = {"tol": 1e-13, "max_iter": 500}


def loss_of(z: torch.Tensor) -> torch.Tensor:
    """The loss the gradient checks differentiate: its first three derivatives in ``z``
    are all non-trivial."""
    return (z**3).sum() + z.sin().sum()


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail the enclosed block with ``TimeoutError`` after ``seconds`` of wall time, so
    that a loop that never ends fails its test instead of hanging the run."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a loop that does not end?")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (absolute when b = 0)."""
    a, b = a.detach(), b.detach()
    scale = float(torch.linalg.vector_norm(b))
    diff = float(torch.linalg.vector_norm(a - b))
    return diff / scale if scale > 0 else diff


def contractive_matrix(n: int, norm: float, *, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A random n×n matrix with spectral norm ``norm``."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=generator, dtype=dtype)
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


def unrolled_fixed_point(f, z0, *args, iterations: int = 400):
    """The reference: plain autograd through many fixed-point iterations."""
    z = z0
    for _ in range(iterations):
        z = f(z, *args)
    return z


def fixed_point_residuals(f, z: torch.Tensor, *args) -> torch.Tensor:
    """``‖f(z) − z‖`` per sample, recomputed from the returned ``z`` alone."""
    with torch.no_grad():
        return torch.linalg.vector_norm(f(z, *args) - z, dim=1)


def assert_fixed_point(f, z: torch.Tensor, *args, z0: torch.Tensor, tol: float) -> None:
    """The documented stopping test: ``‖f(z) − z‖ ≤ tol·(1 + max(‖z0‖, ‖f(z0)‖))``."""
    with torch.no_grad():
        scale = 1 + torch.maximum(
            torch.linalg.vector_norm(z0, dim=1), torch.linalg.vector_norm(f(z0, *args), dim=1)
        )
    assert bool((fixed_point_residuals(f, z, *args) <= tol * scale).all())


class TanhProblem:
    """The seed notebook's problem ``z = tanh(W z + x)``, batched over rows."""

    def __init__(
        self, n: int = 6, batch: int = 3, norm: float = 0.5, seed: int = 0, dtype=torch.float64
    ):
        generator = torch.Generator().manual_seed(seed + 1)
        self.W = contractive_matrix(n, norm, seed=seed, dtype=dtype).requires_grad_()
        self.x = torch.randn(batch, n, generator=generator, dtype=dtype).requires_grad_()
        self.z0 = torch.zeros(batch, n, dtype=dtype)

    def f(self, z, x):
        return torch.tanh(z @ self.W.T + x)

    def g(self, z, x):
        return self.f(z, x) - z

    def closed_form_dzdx(self, z):
        """dz*/dx per sample: (I − D W)⁻¹ D with D = diag(1 − z²)."""
        d = 1 - z.detach() ** 2
        eye = torch.eye(z.shape[1], dtype=z.dtype)
        jac_f = d.unsqueeze(2) * self.W.detach()
        return torch.linalg.solve(eye - jac_f, torch.diag_embed(d))


@pytest.fixture
def tanh_problem():
    return TanhProblem()
