"""The second-order test at a stationary point: the Hessian's most negative direction.

A gradient that vanishes does not make a minimum: a maximum or a saddle has one too.
Where a minimisation solver finds ``‖∇fun‖`` small enough, it asks for the smallest
eigenvalue of the Hessian (restricted to the free coordinates under bounds): from the
dense per-problem Hessian (``n`` vector-Hessian products, ``eigh``) for small problems,
and from a few Lanczos steps (one product each) otherwise. A clearly negative one
(below ``−√eps · max(1, |λ|max)``) marks a saddle or a maximum, and its eigenvector is
the direction to leave along.
"""

from __future__ import annotations

import math

import torch

from implicit.solvers._objective import Objective

#: Lanczos steps for problems with more unknowns than the dense limit.
LANCZOS_STEPS = 20


def negative_curvature(
    fn: Objective, z: torch.Tensor, grad: torch.Tensor, max_dense: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(negative, direction, curvature, positive, newton)`` for every row of ``z``.

    ``negative`` ``(B,)``: the Hessian has a clearly negative eigenvalue on the free
    coordinates; ``direction`` ``(B, n)``: its unit eigenvector (zero on the fixed
    coordinates); ``curvature`` ``(B,)``: that eigenvalue; ``positive`` ``(B,)``: it is
    clearly positive (a strict minimum, by the same margin). Each row is tested; the
    caller picks the rows it needs. Above ``max_dense`` unknowns the smallest eigenvalue
    is Lanczos' estimate (an upper bound of it), so ``positive`` is a strong indication,
    not a proof: whoever relies on it must detect a wrong claim (CG does, by its
    breakdown). A row whose Hessian is not finite has ``curvature`` NaN and is neither
    ``negative`` nor ``positive``. ``newton`` ``(B,)``: the length of the Newton step
    ``‖H⁺ g‖`` on the free coordinates (``g`` the stopping test's residual: the
    projected gradient under bounds), over the Hessian's positive eigenvalues above
    its rounding (NaN above ``max_dense`` unknowns: not estimated).
    """
    free = fn.free(z, grad).to(z.dtype)
    hessian = fn.hessian(z)
    if z.shape[1] <= max_dense:
        blocks = hessian.dense()
        blocks = 0.5 * (blocks + blocks.transpose(1, 2))
        blocks = blocks * free.unsqueeze(1) * free.unsqueeze(2)
        # eigh raises on a NaN or infinite entry: such a row's curvature is unknown (NaN).
        finite = torch.isfinite(blocks).flatten(1).all(dim=1)
        values, vectors = torch.linalg.eigh(torch.where(finite[:, None, None], blocks, 0))
        smallest = torch.where(finite, values[:, 0], math.nan)
        direction = vectors[:, :, 0]
        largest = values.abs().amax(dim=1)
        resolved = values > z.shape[1] * torch.finfo(z.dtype).eps * largest.unsqueeze(1)
        optimality = free * fn.optimality(z, grad)  # the projected gradient under bounds
        coefficients = (vectors.transpose(1, 2) @ optimality.unsqueeze(2)).squeeze(2)
        step = torch.where(resolved, coefficients / torch.where(resolved, values, 1), 0)
        newton = torch.where(finite, torch.linalg.vector_norm(step, dim=1), math.nan)
    else:
        smallest, direction, largest = _lanczos(
            lambda v: free * hessian.mv(free * v), free, min(LANCZOS_STEPS, z.shape[1])
        )
        newton = torch.full_like(smallest, math.nan)
    margin = math.sqrt(torch.finfo(z.dtype).eps) * torch.clamp(largest, min=1.0)
    return smallest < -margin, direction * free, smallest, smallest > margin, newton


def _lanczos(product, free: torch.Tensor, steps: int):
    """The smallest Ritz pair of a symmetric operator (per row) after ``steps`` Lanczos
    steps with full reorthogonalisation, from a fixed pseudo-random start."""
    batch, n = free.shape
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(batch, n, generator=generator, dtype=free.dtype).to(free.device) * free
    q = start / torch.linalg.vector_norm(start, dim=1, keepdim=True).clamp(min=1e-300)
    basis, alphas, betas = [q], [], []
    for _ in range(steps):
        w = product(q)
        alphas.append((w * q).sum(dim=1))
        stacked = torch.stack(basis, dim=1)
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            w = w - torch.einsum("bk,bkn->bn", torch.einsum("bkn,bn->bk", stacked, w), stacked)
        beta = torch.linalg.vector_norm(w, dim=1)
        # An invariant subspace ends the row's sequence (what is left of w is rounding):
        # zero vectors then add zero rows to T.
        magnitude = torch.stack([a.abs() for a in alphas] + [b for b in betas], dim=1)
        magnitude = torch.maximum(magnitude.amax(dim=1), beta)
        alive = beta > 100 * torch.finfo(free.dtype).eps * magnitude
        q = torch.where(alive.unsqueeze(1), w / beta.clamp(min=1e-300).unsqueeze(1), 0)
        betas.append(torch.where(alive, beta, 0))
        basis.append(q)
    k = len(alphas)
    tridiagonal = torch.diag_embed(torch.stack(alphas, dim=1))
    off = torch.stack(betas[: k - 1], dim=1) if k > 1 else None
    if off is not None:
        tridiagonal = tridiagonal + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    values, vectors = torch.linalg.eigh(tridiagonal)
    direction = torch.einsum("bk,bkn->bn", vectors[:, :, 0], torch.stack(basis[:k], dim=1))
    direction = direction / torch.linalg.vector_norm(direction, dim=1, keepdim=True).clamp(
        min=1e-300
    )
    return values[:, 0], direction, values.abs().amax(dim=1)
