"""Result codes, solve reports and what happens when a solve fails.

Everything that says how a solve ended lives here: the status codes, the
``SolveInfo`` / ``BackwardInfo`` reports, and the ``on_failure`` policy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from implicit.linear import Hint

# Frames in these directories are the library's, not the caller's.
_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)

OnFailure = Literal["warn", "raise", "ignore"]

# Per-sample status codes. Those of a forward solve (SolveInfo.status_codes) are ordered by
# severity; the linear solves' own statuses (BackwardInfo) come after them, and rank as
# SEVERITY says: the status of a batch is its worst sample's.
CONVERGED = 0
MAX_ITER = 1
BREAKDOWN = 2
FAILED = 3
NONFINITE = 4
ILL_CONDITIONED = 5
DIVERGED = 6
STAGNATED = 7
STATUS_NAMES = {
    CONVERGED: "converged",
    MAX_ITER: "max_iter",
    BREAKDOWN: "breakdown",
    FAILED: "failed",
    NONFINITE: "nonfinite",
    ILL_CONDITIONED: "ill_conditioned",
    DIVERGED: "diverged",
    STAGNATED: "stagnated",
}
#: The statuses from the mildest to the worst.
SEVERITY = (
    "converged",
    "ill_conditioned",
    "stagnated",
    "max_iter",
    "breakdown",
    "diverged",
    "failed",
    "nonfinite",
)
_RANK = torch.tensor([SEVERITY.index(STATUS_NAMES[code]) for code in sorted(STATUS_NAMES)])
STATUS_CODES = {name: code for code, name in STATUS_NAMES.items()}

# What to do about a linear solve (the backward's, or forward mode's) that ended so.
_LINEAR_ADVICE = {
    "ill_conditioned": (
        "The solve met its tolerance, but an error of the solution z* or of rounding is "
        "amplified up to that much in the derivatives: check that the root is isolated "
        "(a nearly singular Jacobian means a nearly non-unique solution), rescale the "
        "unknowns or the equations, or damp the solve with implicit.linear.Dense(ridge=...)."
    ),
    "stagnated": (
        "The residual stopped decreasing at the level of the rounding errors of the "
        "dtype's products, above the tolerance: no iteration can do better in this "
        "dtype. Loosen the backward's tol, or compute in a wider dtype (float64)."
    ),
    "max_iter": (
        "Raise the backward's max_iter, use backward='dense' or 'gmres', or pass a preconditioner."
    ),
    "breakdown": (
        "The system is singular, or not what the method needs (cg: a symmetric definite "
        "Jacobian and preconditioner): use backward='gmres' or 'dense', check the "
        "preconditioner, or damp a nearly singular Jacobian with "
        "implicit.linear.Dense(ridge=...)."
    ),
    "diverged": (
        "The Neumann series diverges: ∂f/∂z is not contractive at the solution (spectral "
        "radius at least 1). Use backward='auto' or 'gmres', which need no contraction."
    ),
    "nonfinite": (
        "The Jacobian's products overflowed or are NaN at the solution: check the inputs "
        "and that g is differentiable there."
    ),
}


def condition_limit(dtype: torch.dtype) -> float:
    """The condition estimate above which a converged linear solve in ``dtype`` is
    reported ``"ill_conditioned"``: ``1/√eps`` (``6.7e7`` in float64, ``2.9e3`` in
    float32, and in half precision, whose linear algebra runs in float32). The
    derivative then has about half of the dtype's digits left at best."""
    return 1 / math.sqrt(torch.finfo(dtype).eps)


def flag_ill_conditioned(codes: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """``codes`` with ``ILL_CONDITIONED`` where a problem converged but its
    ``condition`` exceeds :func:`condition_limit` of its dtype."""
    limit = condition_limit(condition.dtype)
    return torch.where((codes == CONVERGED) & (condition > limit), ILL_CONDITIONED, codes)


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


def status_name(codes: torch.Tensor) -> str:
    """The name of the worst status (by ``SEVERITY``) in a tensor of per-sample codes."""
    if not codes.numel():
        return "converged"
    top = int(codes.max())
    if top < ILL_CONDITIONED:  # a forward's codes, ordered by severity
        return STATUS_NAMES[top]
    return SEVERITY[int(_RANK.to(codes.device)[codes].max())]


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


def report_failure(info: SolveInfo | BackwardInfo, on_failure: str, what: str) -> None:
    """Warn, raise or stay silent when ``info`` says the solve did not converge."""
    if on_failure == "ignore" or bool(info.converged.all()):
        return
    failed = int((~info.converged).sum())
    total = info.converged.numel()
    # NaN is the worst (and prints as nan; inf as inf).
    residual = info.residual
    worst = math.nan if bool(residual.isnan().any()) else float(residual.max())
    if info.status == "ill_conditioned":
        condition = info.condition
        message = (
            f"{what} is ill-conditioned: condition estimate {float(condition.max()):.1e} "
            f"for {failed} of {total} problem(s), above {condition_limit(condition.dtype):.1e} "
            f"(1/√eps of {str(condition.dtype).removeprefix('torch.')})."
        )
    else:
        message = (
            f"{what} did not converge: status {info.status!r} for {failed} of {total} "
            f"problem(s), worst residual {worst:.3e} after {info.iterations} iteration(s)."
        )
    if isinstance(info, SolveInfo):
        # A solver that explains its failure (scipy, a black box) also says what to do.
        message += (
            f" {info.message}"
            if info.message
            else " Raise max_iter, loosen tol, or try another solver."
        )
    else:
        message += " " + _LINEAR_ADVICE.get(info.status, _LINEAR_ADVICE["max_iter"])
    if on_failure == "raise":
        raise ConvergenceError(message, info)
    warnings.warn(message, ConvergenceWarning, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning to the user's line.

    That is the first frame outside ``implicit`` and ``torch`` (the front door's caller,
    or the ``backward()`` call); a fixed level cannot work, since the forward and the
    backward reach ``report_failure`` through stacks of different depths.
    """
    level, frame = 2, sys._getframe(2)  # 1 is report_failure itself
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        level, frame = level + 1, frame.f_back
    return level
