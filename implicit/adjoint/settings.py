"""What the solves of one problem share (tolerances, failure policy and the linear
solver, with the per-call data of the linear solves fitted to their rows), and the
forward of a solve whose answer is known (:class:`Given`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from implicit import _progress, _tolerance
from implicit._results import SolveInfo
from implicit.linear import IterativeSolver, LinearSolver
from implicit.solvers.base import Solver


@dataclasses.dataclass
class Settings:
    """Tolerances, failure policy and linear solver shared by a solve and its linear solves.

    Attributes:
        tol: a number, or a ``(B,)`` tensor of per-problem tolerances (see
            :mod:`implicit._tolerance`).
        rows: the number of rows ``B`` of the user's problem. The systems of ``vmap``,
            ``jacrev``, ... stack several blocks of ``B`` rows; an initial guess and a
            preconditioner are written for one block.
        backward_x0: the initial guess of the backward's adjoint solve (a layer's warm
            start), or ``None``.
        callback: the user's per-iteration callback of the forward solve, or ``None``.
    """

    tol: _tolerance.Tol
    max_iter: int
    on_failure: str
    linear: LinearSolver
    rows: int
    backward_x0: torch.Tensor | None = None
    callback: _progress.Callback | None = None

    def per_call(self, shape: torch.Size, x0: torch.Tensor | None) -> dict[str, Any]:
        """The initial guess and preconditioner of one linear solve, fitted to its rows:
        the options to pass, only those that are set (a method that takes neither may
        leave them out).

        The one place where they meet ``vmap``: the user wrote them for one block of
        ``B`` rows, a system of ``jacrev``, ``vmap``, ... stacks several blocks, so a
        one-block guess is repeated for each block and the preconditioner is applied
        block by block. ``x0`` (a layer's warm start, the solution of an earlier
        system) takes precedence over the solver's own and is dropped (a cold start)
        where it fits neither the system nor one block; the solver's own must fit.
        """
        linear = self.linear
        own = isinstance(linear, IterativeSolver)
        preconditioner = linear.preconditioner if own else None
        blocks = shape[0] // self.rows
        block = self.rows * shape[1]
        if x0 is not None and x0.numel() not in (block, blocks * block):
            x0 = None
        if x0 is None and own:
            x0 = linear.x0
        if blocks > 1 and x0 is not None and x0.numel() == block:
            x0 = x0.reshape(self.rows, shape[1]).repeat(blocks, 1)
        if blocks > 1 and preconditioner is not None:
            one_block = preconditioner

            def preconditioner(r: torch.Tensor) -> torch.Tensor:
                return torch.cat([one_block(part) for part in r.chunk(blocks)])

        options: dict[str, Any] = {"x0": x0} if x0 is not None else {}
        if preconditioner is not None:
            options["preconditioner"] = preconditioner
        return options


@dataclasses.dataclass(frozen=True)
class Given(Solver):
    """The forward of a solve whose answer is known: its start, without an evaluation.

    Args:
        info: the report of the solve that found it (already reported), or ``None``
            for a report of convergence.
    """

    name = "given"

    info: SolveInfo | None = None

    def solve(self, fn, z0, r0, *, tol, max_iter, callback=None):
        if self.info is not None:
            return z0, self.info
        converged = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
        residual = torch.zeros(z0.shape[0], dtype=z0.dtype, device=z0.device)
        info = SolveInfo(converged, residual, 0, 0, [], "converged", self.name)
        return z0, info
