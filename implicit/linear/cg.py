"""Preconditioned conjugate gradients, for symmetric definite systems."""

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
class CG(IterativeSolver):
    """Preconditioned conjugate gradients, for symmetric definite ``A``.

    Right for ``∂g/∂z`` that is the Hessian of a convex energy (``g = ∇E``), and for
    the adjoint of a fixed point ``z = f(z)`` whose ``∂f/∂z`` is symmetric with norm
    below 1: ``A = ∂f/∂z − I`` is then negative definite. CG's iterates are the same
    for ``A x = b`` and ``−A x = −b``, so a negative definite ``A`` is solved as
    ``−A``: what must not change is the sign of the curvature ``pᵀAp`` (and of
    ``rᵀMr`` for the preconditioner ``M``), which the first iteration fixes per
    problem. A problem whose curvature vanishes or changes sign, so that ``A`` (or
    ``M``) is indefinite, stops with status ``"breakdown"`` instead of returning a
    silently wrong answer; a non-symmetric ``A`` that escapes this test is caught by
    the true-residual check (status ``"max_iter"``).

    Takes the options of every [`IterativeSolver`][implicit.linear.IterativeSolver]
    (``tol``, ``max_iter``, ``x0``, ``preconditioner``).
    """

    name = "cg"

    def iterate(self, operator, rhs, x, *, target, max_iter, allowed, preconditioner):
        precondition = identity if preconditioner is None else preconditioner
        x, r = start(operator, rhs, x)
        active = allowed & (norm(r) > target)
        codes = where_codes(active, MAX_ITER, CONVERGED)
        z = precondition(r)
        p = z
        rz = dot(r, z)
        # The signs of A and M, per problem (CG is invariant under A → −A and M → −M).
        sign_m = torch.sign(rz)
        sign_a = None
        check_every = check_interval(self.check_every, rhs)
        iterations = 0
        # (Finished problems stop changing at once; the host learns of it every
        # check_every iterations.)
        while iterations < max_iter and (iterations % check_every or bool(active.any())):
            ap = operator.mv(p)
            iterations += 1
            curvature = dot(p, ap)
            if sign_a is None:
                sign_a = torch.sign(curvature)
            broken = active & ~((sign_a * curvature > 0) & (sign_m * rz > 0))
            codes = torch.where(broken, BREAKDOWN, codes)
            active = active & ~broken
            alpha = row_mask(safe_div(rz, curvature))
            x = torch.where(row_mask(active), x + alpha * p, x)
            r = torch.where(row_mask(active), r - alpha * ap, r)
            done = active & (norm(r) <= target)
            codes = torch.where(done, CONVERGED, codes)
            active = active & ~done
            z = precondition(r)
            rz_new = dot(r, z)
            p = torch.where(row_mask(active), z + row_mask(safe_div(rz_new, rz)) * p, p)
            rz = torch.where(active, rz_new, rz)
        return Progress(x, codes, iterations)
