"""Newton's method for minimisation, with a Hessian made positive definite."""

from __future__ import annotations

import dataclasses
import math

import torch

from implicit._batch import check_interval, known_all
from implicit._results import check_number
from implicit.solvers._minimizer import Minimizer, residual_norms
from implicit.solvers._search import Search

#: Inner conjugate-gradient iterations per Newton step when ``cg_max_iter`` is None.
CG_MAX_ITER = 100


@dataclasses.dataclass
class _NewtonState:
    """The line searches; ``(B,)`` rows whose current search follows the steepest
    descent; ``(B,)`` rows whose last Newton search failed (they try the descent)."""

    search: Search
    steepest: torch.Tensor
    retry: torch.Tensor


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModifiedNewton(Minimizer):
    """Newton's method on the objective, globalised so that it always descends:
    ``solver="newton"`` of [`minimize`][implicit.minimize].

    Each step solves ``H̃ d = −∇fun`` with a positive-definite modification ``H̃`` of
    the Hessian (on the free coordinates under bounds) and backtracks along ``d``
    (projected Armijo, one trial per iteration, the full step first):

    * **dense** (at most ``max_dense`` unknowns per problem, or ``linear="dense"``):
      the per-problem Hessian from ``n`` Hessian-vector products and its eigenvalues;
      ``H̃`` replaces each eigenvalue ``λ`` by ``max(|λ|, δ)`` with
      ``δ = √eps · max(1, |λ|max)``. Where the Hessian is positive definite this is
      Newton's step; along negative curvature it goes downhill rather than up (the
      "saddle-free" modification), so it leaves maxima and saddles;
    * **cg** (matrix-free): truncated conjugate gradients on Hessian-vector products
      (Newton–CG), stopped at the relative residual ``min(0.5, √‖∇fun‖)`` or at the
      first direction of non-positive curvature, where it keeps the iterate it has
      (the steepest descent if that is the first).

    Quadratic convergence near a minimum with a positive-definite Hessian. A search
    that fails from a Newton direction retries along the steepest descent; one that
    fails along it ends the problem with status ``"failed"``. Each step also costs one
    evaluation for the Hessian (``SolveInfo.f_evals``; dense Hessians count in
    ``jac_evals``).

    Args:
        linear: ``"auto"`` (dense up to ``max_dense`` unknowns), ``"dense"`` or ``"cg"``.
        cg_max_iter: the inner iterations of ``"cg"`` (default 100).
        curvature_check: see [`Minimizer`][implicit.solvers.Minimizer].
        max_dense: see [`Minimizer`][implicit.solvers.Minimizer].
        check_every: see [`Minimizer`][implicit.solvers.Minimizer].
    """

    name = "newton"

    linear: str = "auto"
    cg_max_iter: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.linear not in ("auto", "dense", "cg"):
            raise ValueError(f"linear must be 'auto', 'dense' or 'cg', got {self.linear!r}")
        if self.cg_max_iter is not None:
            check_number(self.cg_max_iter, "cg_max_iter", "an integer >= 1")

    def init(self, fn, z):
        f, grad = fn.value_and_grad(z)
        no = torch.zeros_like(f, dtype=torch.bool)
        return f, grad, _NewtonState(Search.idle(z), no, no)

    def restart(self, fn, state, rows, z, f, grad):
        return dataclasses.replace(
            state, search=state.search.reset(rows), retry=state.retry & ~rows
        )

    def step(self, fn, z, f, grad, state, running):
        search, steepest, retry = state.search, state.steepest, state.retry
        need = running & ~search.active
        if not known_all(~need, self.check_every):  # (unknown between reads: do it)
            free = fn.free(z, grad).to(z.dtype)
            descent = -free * grad
            direction = self._direction(fn, z, free, descent)
            usable = ((grad * direction).sum(dim=1) < 0) & torch.isfinite(direction).all(dim=1)
            fresh = retry | ~usable
            direction = torch.where(fresh.unsqueeze(1), descent, direction)
            search = search.start(
                need, direction, f, grad, residual_norms(fn, z, grad), torch.ones_like(f)
            )
            steepest = torch.where(need, fresh, steepest)
            retry = retry & ~need
        z_trial = search.trial(z, fn.project)
        f_trial, g_trial = fn.value_and_grad(z_trial)
        trial = (z_trial, f_trial, g_trial, residual_norms(fn, z_trial, g_trial))
        step, search = search.judge(z, f, grad, trial, wolfe=False)
        retry = retry | (step.failed & ~steepest)
        state = _NewtonState(search, steepest, retry)
        return step.z, step.f, step.grad, state, step.failed & steepest

    def _direction(self, fn, z, free, descent):
        hessian = fn.hessian(z)
        dense = self.linear == "dense" or (self.linear == "auto" and z.shape[1] <= self.max_dense)
        if dense:
            fn.jac_evals += 1
            blocks = hessian.dense()
            blocks = 0.5 * (blocks + blocks.transpose(1, 2))
            # Fixed coordinates: an identity block, which leaves them where they are.
            fixed = torch.diag_embed(1 - free)
            blocks = blocks * free.unsqueeze(1) * free.unsqueeze(2) + fixed
            # A non-finite Hessian (eigh raises on it) gives way to steepest descent there.
            finite = torch.isfinite(blocks).flatten(1).all(dim=1)
            identity = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
            values, vectors = torch.linalg.eigh(
                torch.where(finite[:, None, None], blocks, identity)
            )
            floor = math.sqrt(torch.finfo(z.dtype).eps) * values.abs().amax(dim=1).clamp(min=1)
            modified = torch.maximum(values.abs(), floor.unsqueeze(1))
            coefficients = (vectors.transpose(1, 2) @ descent.unsqueeze(2)).squeeze(2)
            return free * (vectors @ (coefficients / modified).unsqueeze(2)).squeeze(2)
        return free * _truncated_cg(
            lambda v: free * hessian.mv(free * v),
            descent,
            self.cg_max_iter or CG_MAX_ITER,
            check_interval(self.check_every, z),
        )


def _truncated_cg(product, rhs: torch.Tensor, max_iter: int, check_every: int) -> torch.Tensor:
    """Conjugate gradients on ``H d = rhs`` per row, from ``d = 0``, stopped at the relative
    residual ``min(0.5, √‖rhs‖)`` or before a direction of non-positive curvature (at
    the first iteration the answer is then ``rhs`` itself, the steepest descent)."""
    norm = torch.linalg.vector_norm(rhs, dim=1)
    target = torch.minimum(torch.full_like(norm, 0.5), norm.sqrt()) * norm
    d = torch.zeros_like(rhs)
    r, p = rhs, rhs
    rr = (r * r).sum(dim=1)
    running = rr.sqrt() > target
    first = torch.ones_like(running)
    for k in range(max_iter):
        # Reading every iteration, the test comes before the first product; otherwise
        # after every check_every products.
        if k % check_every == check_every - 1 and not bool(running.any()):
            break
        hp = product(p)
        curvature = (p * hp).sum(dim=1)
        positive = curvature > 0
        # Non-positive curvature at the first step: the steepest descent.
        d = torch.where((running & ~positive & first).unsqueeze(1), rhs, d)
        running = running & positive
        alpha = torch.where(running, rr / torch.where(positive, curvature, 1), 0)
        d = d + alpha.unsqueeze(1) * p
        r = r - alpha.unsqueeze(1) * hp
        rr_new = (r * r).sum(dim=1)
        beta = torch.where(running, rr_new / torch.where(rr > 0, rr, 1), 0)
        p = r + beta.unsqueeze(1) * p
        rr = rr_new
        running = running & (rr.sqrt() > target)
        first = torch.zeros_like(first)
    return d
