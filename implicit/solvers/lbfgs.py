"""L-BFGS: limited-memory quasi-Newton minimisation with a strong-Wolfe line search."""

from __future__ import annotations

import dataclasses

import torch

from implicit._batch import known_all
from implicit._results import check_number
from implicit.solvers._minimizer import Minimizer, residual_norms
from implicit.solvers._search import Search


@dataclasses.dataclass
class _LBFGSState:
    """Each row's curvature pairs and line search.

    Attributes:
        s, y: ``(B, m, n)`` steps and gradient changes, oldest first (slot ``m − 1``
            holds the newest pair).
        rho: ``(B, m)`` ``1 / yᵀs`` of each pair; 0 marks an empty slot, which the
            two-loop recursion then skips.
        search: the line searches.
        steepest: ``(B,)`` rows whose current search follows the steepest descent.
    """

    s: torch.Tensor
    y: torch.Tensor
    rho: torch.Tensor
    search: Search
    steepest: torch.Tensor


@dataclasses.dataclass(frozen=True, kw_only=True)
class LBFGS(Minimizer):
    """L-BFGS with a strong-Wolfe line search, per problem: the default of
    [`minimize`][implicit.minimize].

    Each problem keeps its last ``memory`` curvature pairs ``(s, y)`` (a pair is kept
    only when ``yᵀs > 0``, which the curvature condition of the Wolfe search
    guarantees without bounds) and searches along ``d = −H∇fun`` by the two-loop
    recursion, with the initial inverse Hessian ``γI``, ``γ = sᵀy / yᵀy`` of the newest
    pair. The first step follows the steepest descent with length
    ``min(1, 1/‖∇fun‖)``; later searches try the full step first. Each trial is one
    iteration (one evaluation of the objective and its gradient).

    With bounds, the directions are restricted to the free coordinates (those not
    held at a bound by a gradient pushing outwards) and searched along the projected
    path with a projected Armijo test (a projected quasi-Newton method, as in Kim,
    Sra & Dhillon 2010) rather than L-BFGS-B's Cauchy point and subspace minimisation.

    A search that fails from a quasi-Newton direction drops the history and starts
    again along the steepest descent; one that fails along the steepest descent ends
    the problem with status ``"failed"``.

    Args:
        memory: the number of curvature pairs kept per problem.
        curvature_check: see [`Minimizer`][implicit.solvers.Minimizer].
        max_dense: see [`Minimizer`][implicit.solvers.Minimizer].
        check_every: see [`Minimizer`][implicit.solvers.Minimizer].
    """

    name = "lbfgs"

    memory: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.memory, "memory", "an integer >= 1")

    def init(self, fn, z):
        f, grad = fn.value_and_grad(z)
        batch, n = z.shape
        pairs = z.new_zeros(batch, self.memory, n)
        state = _LBFGSState(
            s=pairs,
            y=pairs,
            rho=z.new_zeros(batch, self.memory),
            search=Search.idle(z),
            steepest=torch.ones(batch, dtype=torch.bool, device=z.device),
        )
        return f, grad, state

    def restart(self, fn, state, rows, z, f, grad):
        return dataclasses.replace(
            state,
            rho=torch.where(rows.unsqueeze(1), 0, state.rho),
            search=state.search.reset(rows),
        )

    def step(self, fn, z, f, grad, state, running):
        search, steepest = state.search, state.steepest
        need = running & ~search.active
        if not known_all(~need, self.check_every):  # (unknown between reads: do it)
            free = fn.free(z, grad).to(z.dtype)
            descent = -free * grad
            pairs_s, pairs_y, rho = state.s, state.y, state.rho
            if fn.bounded:
                # The pairs restricted to the free coordinates: a model of the reduced
                # Hessian (held coordinates would skew γ and the recursion).
                pairs_s, pairs_y = pairs_s * free.unsqueeze(1), pairs_y * free.unsqueeze(1)
                sy = (pairs_s * pairs_y).sum(dim=2)
                rho = torch.where((rho != 0) & (sy > 0), 1 / sy, 0)
            direction = free * _two_loop(descent, pairs_s, pairs_y, rho)
            slope = (grad * direction).sum(dim=1)
            usable = (slope < 0) & torch.isfinite(direction).all(dim=1)
            fresh = (state.rho == 0).all(dim=1) | ~usable
            direction = torch.where(fresh.unsqueeze(1), descent, direction)
            length = torch.linalg.vector_norm(direction, dim=1)
            t0 = torch.where(fresh, torch.clamp(1 / length, max=1.0), 1.0)
            search = search.start(need, direction, f, grad, residual_norms(fn, z, grad), t0)
            steepest = torch.where(need, fresh, steepest)
        z_trial = search.trial(z, fn.project)
        f_trial, g_trial = fn.value_and_grad(z_trial)
        trial = (z_trial, f_trial, g_trial, residual_norms(fn, z_trial, g_trial))
        step, search = search.judge(z, f, grad, trial, wolfe=not fn.bounded)
        s, y = step.z - z, step.grad - grad
        sy = (s * y).sum(dim=1)
        scale = torch.linalg.vector_norm(s, dim=1) * torch.linalg.vector_norm(y, dim=1)
        keep = step.moved & (sy > torch.finfo(z.dtype).eps * scale)
        # Rows whose quasi-Newton search failed try the steepest descent; failing that,
        # they cannot make progress.
        retry = step.failed & ~steepest
        rho = _roll(state.rho, keep, torch.where(keep, 1 / sy, 0))
        rho = torch.where(retry.unsqueeze(1), 0, rho)
        state = _LBFGSState(
            s=_roll(state.s, keep, s),
            y=_roll(state.y, keep, y),
            rho=rho,
            search=search,
            steepest=steepest,
        )
        return step.z, step.f, step.grad, state, step.failed & steepest


def _two_loop(
    descent: torch.Tensor, s: torch.Tensor, y: torch.Tensor, rho: torch.Tensor
) -> torch.Tensor:
    """``H d`` for the L-BFGS inverse Hessian ``H`` of each row (empty slots skipped)."""
    q = descent
    alphas = []
    for i in reversed(range(s.shape[1])):
        alpha = rho[:, i] * (s[:, i] * q).sum(dim=1)
        q = q - alpha.unsqueeze(1) * y[:, i]
        alphas.append(alpha)
    newest_s, newest_y = s[:, -1], y[:, -1]
    yy = (newest_y * newest_y).sum(dim=1)
    gamma = torch.where(rho[:, -1] != 0, (newest_s * newest_y).sum(dim=1) / yy, 1.0)
    r = gamma.unsqueeze(1) * q
    for i, alpha in zip(range(s.shape[1]), reversed(alphas)):
        beta = rho[:, i] * (y[:, i] * r).sum(dim=1)
        r = r + (alpha - beta).unsqueeze(1) * s[:, i]
    return r


def _roll(buffer: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``buffer`` with ``new`` appended as the newest slot (the oldest dropped) in ``rows``."""
    rolled = torch.cat([buffer[:, 1:], new.unsqueeze(1)], dim=1)
    mask = rows.reshape(-1, *([1] * (buffer.dim() - 1)))
    return torch.where(mask, rolled, buffer)
