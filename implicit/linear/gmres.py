"""Restarted GMRES with right preconditioning: the default Krylov method."""

from __future__ import annotations

import dataclasses

import torch

from implicit._batch import check_interval, combine, known_all, project
from implicit._results import check_number
from implicit.linear.base import BREAKDOWN, CONVERGED, MAX_ITER
from implicit.linear.iterative import IterativeSolver, Progress, identity, norm, row_mask, start

#: Orthogonalise again when a Gram-Schmidt pass leaves less than this fraction of ‖w‖.
_REORTHOGONALIZE = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class GMRES(IterativeSolver):
    """Restarted GMRES with right preconditioning, for any non-singular ``A``.

    The default Krylov method: it needs only products with ``A`` and minimises the
    residual over the Krylov space, so it handles the non-symmetric Jacobians of
    fixed-point and root problems. Each problem stops extending its Krylov space as
    soon as it has converged. A problem whose (preconditioned) operator turns out
    singular on its Krylov space stops with status ``"breakdown"``. Memory is
    ``restart + 1`` vectors per problem.

    Takes the options of every [`IterativeSolver`][implicit.linear.IterativeSolver]
    (``tol``, ``max_iter``, ``x0``, ``preconditioner``).

    Args:
        restart: Krylov space dimension before a restart (capped at ``n``).
    """

    name = "gmres"
    any_preconditioner = True

    restart: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.restart, "restart", "an integer >= 1")

    def iterate(self, operator, rhs, x, *, target, max_iter, allowed, preconditioner):
        precondition = identity if preconditioner is None else preconditioner
        codes = torch.full_like(target, MAX_ITER, dtype=torch.long)
        check_every = check_interval(self.check_every, rhs)
        active = allowed
        iterations = 0
        while True:
            x, r = start(operator, rhs, x)  # a product: exact, and handed back at the end
            solved = norm(r) <= target
            codes = torch.where(active & solved, CONVERGED, codes)
            active = active & ~solved
            if iterations >= max_iter or not bool(active.any()):
                return Progress(x, codes, iterations, r)
            steps = min(self.restart, rhs.shape[1], max_iter - iterations)
            x, broken, used = _cycle(
                operator, precondition, r, x, active, target, steps, check_every
            )
            codes = torch.where(broken, BREAKDOWN, codes)
            active = active & ~broken
            iterations += used


def _cycle(operator, precondition, r, x, active, target, steps, check_every):
    """One Arnoldi cycle of at most ``steps`` products, testing on the host every
    ``check_every`` of them; returns ``x``, breakdowns, steps."""
    batch, n = r.shape
    eps = torch.finfo(r.dtype).eps
    beta = norm(r)
    # Rows are basis vectors: products with a row vector on the left are the fast layout
    # of batched matrix products on the CPU (einsum / matrix-vector are not).
    basis = r.new_empty(batch, steps + 1, n)  # every slot read is written first
    basis[:, 0] = r / row_mask(torch.where(beta > 0, beta, 1))
    # The QR factorisation of the Hessenberg matrix by Givens rotations: R in ``upper``
    # (an identity diagonal in the columns of problems that have stopped extending), the
    # product Q of the rotations kept as a matrix, so that a new column is rotated by one
    # small product rather than a loop over the rotations.
    upper = r.new_zeros(batch, steps, steps)
    rotations = torch.eye(steps + 1, dtype=r.dtype, device=r.device).repeat(batch, 1, 1)
    sizes = torch.zeros_like(beta, dtype=torch.long)  # Krylov dimension per problem
    broken = torch.zeros_like(active)
    alive = active
    used = 0
    # On the CPU the host checks whether every problem still extends its space: then a
    # step needs no per-problem selection (the common case).
    every = known_all(alive, check_every)
    for j in range(steps):
        w = operator.mv(precondition(basis[:, j]))
        used += 1
        known = basis[:, : j + 1]
        # Classical Gram-Schmidt, batched; repeated ("twice is enough") when it cancelled
        # more than 90% of w, the only case in which one pass loses orthogonality (about
        # eps·‖w‖/‖w − Vh‖) beyond a few rounding errors. (The classic DGKS threshold
        # 1/√2 would repeat every step of a fixed point's adjoint, whose A ≈ −I cancels
        # half of w by design.) A loop that does not read the host every step
        # orthogonalises twice at every step (CGS2) rather than ask.
        before = norm(w)
        h = project(known, w)
        w = w - combine(known, h)
        h_next = norm(w)
        cancelled = h_next < _REORTHOGONALIZE * before
        if check_every > 1 or bool((cancelled if every else alive & cancelled).any()):
            again = project(known, w)
            w = w - combine(known, again)
            h = h + again
            h_next = norm(w)
        scale = torch.sqrt(norm(h) ** 2 + h_next**2)
        column = torch.bmm(rotations[:, : j + 1, : j + 1], h.unsqueeze(2)).squeeze(2)
        pivot = column[:, j]
        radius = torch.hypot(pivot, h_next)
        # A vanishing pivot: A M is singular on this Krylov space; keep the previous x.
        singular = ~(radius > eps * scale)
        unit = row_mask(torch.where(h_next > 0, h_next, 1))
        if every and not bool(singular.any()):
            cos, sin = row_mask(pivot / radius), row_mask(h_next / radius)
            upper[:, :j, j] = column[:, :j]
            upper[:, j, j] = radius
            basis[:, j + 1] = w / unit
            sizes = sizes + 1
        else:
            every = False
            singular = alive & singular
            broken = broken | singular
            alive = alive & ~singular
            safe = torch.where(alive, radius, 1)
            cos = row_mask(torch.where(alive, pivot / safe, 1))
            sin = row_mask(torch.where(alive, h_next / safe, 0))
            upper[:, :j, j] = torch.where(row_mask(alive), column[:, :j], 0)
            upper[:, j, j] = safe
            basis[:, j + 1] = torch.where(row_mask(alive), w / unit, 0)
            sizes = sizes + alive.long()
        # The new rotation acts on rows j and j + 1 of Q (row j + 1 is still e_{j+1}): one
        # 2 × 2 product per problem (five slice updates cost twice the calls).
        givens = torch.cat((cos, sin, -sin, cos), dim=1).view(batch, 2, 2)
        pair = torch.bmm(givens, rotations[:, j : j + 2, : j + 2])
        rotations[:, j : j + 2, : j + 2] = pair
        # |(Q β e₁)[j + 1]|: the residual norm of the least-squares solution so far.
        alive = alive & (beta * pair[:, 1, 0].abs() > target)
        every = every and bool(alive.all())
        # (The cycle's end needs no test: the caller's follows.)
        last = j + 1 == steps
        if not (every or last) and (j + 1) % check_every == 0 and not bool(alive.any()):
            break
    k = used
    g = beta.unsqueeze(1) * rotations[:, :k, 0]  # Q β e₁
    # Coefficients beyond a problem's own Krylov dimension are zero.
    g = torch.where(torch.arange(k, device=r.device) < sizes.unsqueeze(1), g, 0)
    y = torch.linalg.solve_triangular(upper[:, :k, :k], g.unsqueeze(-1), upper=True)
    step = precondition(combine(basis[:, :k], y.squeeze(-1)))
    return torch.where(row_mask(active), x + step, x), broken, used
