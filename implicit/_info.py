"""The reports of a solve: [`SolveInfo`][implicit.SolveInfo] (the forward) and
[`BackwardInfo`][implicit.BackwardInfo] (the backward's adjoint solve), and the warning
and error that report a failed one; their status codes and the failure policy are in
:mod:`implicit._results`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from implicit.linear import Hint


@dataclasses.dataclass
class BackwardInfo:
    """How the adjoint linear solve ``(∂g/∂z)ᵀ w = v`` of a backward pass ended.

    Attributes:
        converged: bool tensor, shape ``(B,)`` when batched, ``()`` otherwise.
        residual: ``‖(∂g/∂z)ᵀ w − v‖ / ‖v‖`` per problem (NaN where the mode does
            not measure it, e.g. ``one_step``).
        iterations: iterations of the linear solver (the maximum over samples).
        matvecs: vector-Jacobian products the solve used (a dense solve counts the
            ``n`` products that build the Jacobian).
        status: the worst over the batch: ``"converged"``; ``"ill_conditioned"`` (the
            solve met its tolerance but ``condition`` exceeds ``1/√eps`` of the
            dtype, ``6.7e7`` in float64, ``2.9e3`` in float32 and half precision: the
            derivatives may have lost half of their digits or more); ``"stagnated"``
            (the residual stopped decreasing at the rounding level of the dtype,
            above the tolerance: the answer is as good as the dtype allows, a
            tolerance below that cannot be met); ``"max_iter"``;
            ``"breakdown"`` (a singular system, or one the method cannot solve, e.g.
            an indefinite one for ``cg``); ``"diverged"`` (the Neumann series grew
            instead of converging); ``"nonfinite"``. ``converged`` is ``True`` only
            where the status is ``"converged"``.
        method: name of the linear solver, or of how it ran: ``"neumann+gmres"``
            (``auto`` switched), ``"dense+refine"`` (``dense`` refined Newton's last
            factorisation instead of building the Jacobian).
        solution: the adjoint solution ``w`` in the flat ``(rows, n)`` view the solver
            saw (detached): the warm start of a next backward
            (``DEQ(warm_start_backward=True)`` passes it on).
        condition: an estimate of the condition number of ``∂g/∂z`` at the solution,
            per problem (same shape as ``converged``; NaN where the mode does not
            estimate it): the factor by which the derivatives may amplify an error
            of ``z*`` or of rounding. ``dense`` estimates ``κ₁ = ‖A‖₁‖A⁻¹‖₁`` from
            its LU factors (as LAPACK's ``?gecon``, usually within a factor 3); an
            iterative method reports the amplification its solve saw,
            ``‖A p‖/‖p‖ · ‖w‖/‖v‖`` for its first product ``A p``, a lower bound of
            ``κ₂``.
    """

    converged: torch.Tensor
    residual: torch.Tensor
    iterations: int
    matvecs: int
    status: str
    method: str
    solution: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    condition: torch.Tensor | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class SolveInfo:
    """How a forward solve ended.

    The batch summaries (``iterations``, ``status``) sit beside their per-problem
    counterparts (``iterations_per_problem``, ``status_codes`` and ``statuses``); every
    per-problem field has the shape of ``converged``.

    Attributes:
        converged: bool tensor, shape ``(B,)`` when batched, ``()`` otherwise.
        residual: final residual norm ``‖g(z)‖₂`` per problem, same shape.
        iterations: iterations taken: the maximum over the problems.
        iterations_per_problem: int64 tensor shaped like ``converged``: the iterations
            each problem took (a problem stops iterating once it has converged or
            turned non-finite). Their maximum is ``iterations``.
        status_codes: int64 tensor shaped like ``converged``, each problem's status
            as a code ordered by severity: 0 ``"converged"``, 1 ``"max_iter"``, 2
            ``"breakdown"``, 3 ``"failed"``, 4 ``"nonfinite"``. Select problems by it
            on the device without reading it (``z[info.status_codes == 1]``); the
            names are [`statuses`][implicit.SolveInfo.statuses].
        f_evals: evaluations of ``g`` (or ``f``) in the forward; one call on the whole
            batch counts once. Where derivatives may be asked for, this includes the
            evaluations that find the tensors ``g`` captures: at ``z0`` (the solver
            reuses its residual as its first) and, where the solver moved, at the
            solution.
        history: the worst residual norm over the batch after each iteration,
            starting with the initial guess.
        status: ``"converged"``, ``"max_iter"``, ``"nonfinite"``, ``"breakdown"`` or
            ``"failed"``: the worst over the batch (the name of the largest status
            code; the linear solves' statuses ``"ill_conditioned"`` and ``"diverged"``
            are [`BackwardInfo`][implicit.BackwardInfo]'s).
        solver: name of the forward solver.
        message: extra detail from the solver (e.g. scipy's message), or ``""``.
        jac_evals: dense Jacobians built by the solver (Newton).
        backward: filled in by ``backward()``: the adjoint solve's
            [`BackwardInfo`][implicit.BackwardInfo].
        hint: what the solver learned about ``∂g/∂z`` near its solution (Newton: the
            factorisation of its last step), for the backward's linear solver; a solver
            sets it, and the differentiable solve takes it (leaving ``None``) and keeps
            it only where the backward uses it.
    """

    converged: torch.Tensor
    residual: torch.Tensor
    iterations: int
    f_evals: int
    history: list[float]
    status: str
    solver: str
    message: str = ""
    jac_evals: int = 0
    backward: BackwardInfo | None = None
    hint: Hint | None = dataclasses.field(default=None, repr=False, compare=False)
    iterations_per_problem: torch.Tensor | None = None
    status_codes: torch.Tensor | None = None

    @property
    def statuses(self) -> str | list[Any]:
        """Each problem's status name, nested as ``converged.tolist()`` is: a list of
        ``B`` names when batched, one name otherwise. Reading it copies the codes to
        the host."""
        if self.status_codes is None:
            return self.status

        from implicit._results import STATUS_NAMES  # (which imports this module)

        def name(code: Any) -> Any:
            return STATUS_NAMES[code] if isinstance(code, int) else [name(c) for c in code]

        return name(self.status_codes.tolist())

    def __repr__(self) -> str:
        worst = float(self.residual.max()) if self.residual.numel() else 0.0
        return (
            f"SolveInfo(status={self.status!r}, solver={self.solver!r}, "
            f"converged={int(self.converged.sum())}/{self.converged.numel()}, "
            f"worst_residual={worst:.3e}, iterations={self.iterations}, "
            f"f_evals={self.f_evals}, backward={self.backward!r})"
        )


class ConvergenceWarning(RuntimeWarning):
    """A solve did not reach its tolerance, or a black box's answer is not a root.

    Issued with ``on_failure="warn"`` (the default) by the forward solve, the backward
    linear solve and the forward-mode linear solve; the result is returned all the
    same. The message says which solve failed, for how many problems, the worst
    residual, and what to try.
    """


class ConvergenceError(RuntimeError):
    """A solve failed and ``on_failure="raise"`` was requested.

    Raised where [`ConvergenceWarning`][implicit.ConvergenceWarning] would be warned,
    with the same message.

    Attributes:
        info: the [`SolveInfo`][implicit.SolveInfo] (forward) or
            [`BackwardInfo`][implicit.BackwardInfo] (backward) of the failed solve.
    """

    def __init__(self, message: str, info: SolveInfo | BackwardInfo):
        super().__init__(message)
        self.info = info

    def __reduce__(self):
        # Exceptions pickle as ``cls(*args)``, which would drop ``info`` (multiprocessing
        # workers, DistributedDataParallel ranks and test runners pickle them).
        return type(self), (str(self), self.info)
