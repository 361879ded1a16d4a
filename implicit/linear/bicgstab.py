"""Preconditioned BiCGStab, for non-symmetric systems with short recurrences."""

from __future__ import annotations

import dataclasses

import torch

from implicit._batch import check_interval
from implicit.linear.base import BREAKDOWN, CONVERGED, MAX_ITER
from implicit.linear.iterative import (
    IterativeSolver,
    Progress,
    dot,
    identity,
    norm,
    row_mask,
    safe_div,
    start,
    where_codes,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BiCGStab(IterativeSolver):
    """Preconditioned BiCGStab, for non-symmetric ``A`` with short recurrences.

    Two products per iteration and constant memory, against GMRES's growing basis;
    convergence is less smooth. A breakdown (the shadow residual orthogonal to the
    residual or to ``A p``, or a vanishing stabilisation step ``ω``) stops that problem
    with status ``"breakdown"`` at its last valid iterate.

    Takes the options of every [`IterativeSolver`][implicit.linear.IterativeSolver]
    (``tol``, ``max_iter``, ``x0``, ``preconditioner``).
    """

    name = "bicgstab"
    any_preconditioner = True

    def iterate(self, operator, rhs, x, *, target, max_iter, allowed, preconditioner):
        precondition = identity if preconditioner is None else preconditioner
        eps = torch.finfo(rhs.dtype).eps
        x, r = start(operator, rhs, x)
        active = allowed & (norm(r) > target)
        codes = where_codes(active, MAX_ITER, CONVERGED)
        shadow = r
        shadow_norm = norm(shadow)
        rho = alpha = omega = torch.ones_like(shadow_norm)
        v = p = torch.zeros_like(r)
        check_every = check_interval(self.check_every, rhs)
        iterations = 0
        # (Finished problems stop changing at once; the host learns of it every
        # check_every iterations.)
        while iterations < max_iter and (iterations % check_every or bool(active.any())):
            iterations += 1
            rho_new = dot(shadow, r)
            beta = safe_div(rho_new, rho) * safe_div(alpha, omega)
            p = torch.where(row_mask(active), r + row_mask(beta) * (p - row_mask(omega) * v), p)
            p_hat = precondition(p)
            v = operator.mv(p_hat)
            shadow_v = dot(shadow, v)
            # Near-orthogonality, relative to the vectors' sizes: the method cannot go on.
            broken = active & ~(
                (rho_new.abs() > eps * shadow_norm * norm(r))
                & (shadow_v.abs() > eps * shadow_norm * norm(v))
            )
            go = active & ~broken
            alpha = safe_div(rho_new, shadow_v)
            s = r - row_mask(alpha) * v
            x = torch.where(row_mask(go), x + row_mask(alpha) * p_hat, x)
            r = torch.where(row_mask(go), s, r)
            half_done = go & (norm(s) <= target)
            go = go & ~half_done
            s_hat = precondition(s)
            t = operator.mv(s_hat)
            omega = safe_div(dot(t, s), dot(t, t))
            x = torch.where(row_mask(go), x + row_mask(omega) * s_hat, x)
            r = torch.where(row_mask(go), s - row_mask(omega) * t, r)
            broken = broken | (go & (omega == 0))
            done = half_done | (go & (norm(r) <= target))
            codes = torch.where(done, CONVERGED, torch.where(broken, BREAKDOWN, codes))
            active = active & ~done & ~broken
            rho = rho_new
        return Progress(x, codes, iterations)
