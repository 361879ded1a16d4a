"""Run one case and classify how it ended, as issue 18 demands.

Acceptable outcomes:

* ``OK``: status ``"converged"``, the residual recomputed here from the returned ``z``
  meets the documented test of its door (:mod:`stopping`), the derivative is finite,
  the backward solve says converged, and (float64, an exact backward mode or
  ``unroll``) the derivative matches the oracle's (:mod:`accuracy`). ``one_step`` and
  ``phantom`` are inexact by design and only checked for finiteness;
* ``OK-NONCONVERGED``: a non-converged status (forward or backward) that was reported
  by ``on_failure``: a ``ConvergenceWarning`` under ``"warn"``, a ``ConvergenceError``
  under ``"raise"``. Any status but ``"converged"`` is one, the backward's
  ``"ill_conditioned"`` (solved, but the condition estimate exceeds ``1/√eps``) and
  ``"diverged"`` (Neumann's series grew) included;
* ``OK-REFUSED``: a clear error (``ValueError`` / ``TypeError`` /
  ``NotImplementedError`` raised by ``implicit`` itself), only for inputs the library
  may reject: half precision, an infinite ``z0``, one unbatched sample given to a
  layer that is batched by default.

The derivative a case checks (``matrix.Case.derivative``): ``grad`` the gradient of
``L(z) = Σ c·z`` by ``backward()``; ``jvp`` the forward-mode derivative along a random
tangent on the explicit parameters; ``hvp`` a Hessian-vector product of
``Σ c·z + ½‖z‖²`` by double backward (:mod:`derivatives`). A forward-mode linear solve
that does not converge must be reported by ``on_failure`` and is then
``OK-NONCONVERGED``. A minimiser's or a least-squares solver's ``z`` must also be a
local minimum: converged at a saddle or a maximum is a ``FALSE-CONVERGENCE``
(:func:`stopping.saddle`). Solvers that cannot be unrolled by design (minimisers,
bracketing) under ``backward="unroll"`` may refuse (``OK-REFUSED``), as may a crossed
bracket (``lower > upper``).

Failures: ``HANG`` (time limit), ``FALSE-CONVERGENCE`` (converged, but the residual
fails the test, the answer is a saddle, the derivative is wrong, or ``z`` has no graph
to the parameters),
``SILENT-NAN`` (NaN/inf in ``z`` or a gradient with no non-converged status),
``UNREPORTED`` (a non-converged status that ``on_failure`` did not report), ``CRASH``
(any other exception). ``HARNESS-ERROR`` is a bug of this harness, not the library's.

The documented tests are recomputed from ``z`` (:mod:`stopping`); they may differ from
the library's by rounding (another memory layout of a tuple state), hence the slack of
``RESIDUAL_SLACK``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import traceback
import warnings

import accuracy
import derivatives
import families
import matrix
import numpy as np
import stopping
import torch
from accuracy import Verdict

import implicit

RESIDUAL_SLACK = {torch.float64: 1.01, torch.float32: 1.01, torch.float16: 1.1, torch.bfloat16: 1.1}
OK_OUTCOMES = ("OK", "OK-NONCONVERGED", "OK-REFUSED")
FAILURES = ("HANG", "FALSE-CONVERGENCE", "SILENT-NAN", "UNREPORTED", "CRASH")
_PACKAGE = os.path.dirname(os.path.abspath(implicit.__file__)) + os.sep


@dataclasses.dataclass
class Result:
    case: str
    outcome: str
    reason: str = ""
    status: str | None = None
    backward_status: str | None = None
    residual_ratio: float | None = None  # worst recomputed residual / its threshold
    grad_error: float | None = None
    cond: float | None = None  # κ(∂g/∂z) at the reference root, worst problem
    seconds: float = 0.0
    note: str = ""
    # The documented test's residual and threshold per problem (not stored).
    residuals: np.ndarray | None = dataclasses.field(default=None, repr=False)
    thresholds: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out["residuals"], out["thresholds"]
        return out


class Timeout(BaseException):
    """Raised by the alarm: a BaseException, so that no ``except Exception`` swallows it."""


def run(case: matrix.Case, *, solver=None, backward=None, instance=None) -> Result:
    """Run and classify ``case``; a ``solver`` or ``backward`` instance overrides its
    name, an ``instance`` the problem drawn from ``(family, seed)``."""
    start = time.perf_counter()
    result = Result(case.id, "?")
    try:
        inst = instance or families.make(case.family, case.seed, case.small)
        result.note = inst.note
    except Exception as error:
        result.outcome, result.reason = "HARNESS-ERROR", _describe(error)
        return result
    try:
        solver = solver if solver is not None else matrix.make_solver(case, inst)
        backward = backward if backward is not None else matrix.make_backward(case.backward)
        _classify(case, inst, solver, backward, result)
        result.outcome = "OK"
    except Verdict as verdict:
        result.outcome, result.reason = verdict.outcome, verdict.reason
    except Exception as error:  # the library's own errors are caught where it is called
        result.outcome, result.reason = "HARNESS-ERROR", _describe(error)
    result.seconds = time.perf_counter() - start
    return result


def run_with_alarm(case: matrix.Case, seconds: float, **overrides) -> Result:
    """:func:`run` under a SIGALRM time limit (Linux): a hang becomes ``HANG``."""

    fired = []

    def alarm(signum, frame):
        fired.append(True)
        raise Timeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        result = run(case, **overrides)
        if fired:  # the Timeout surfaced as another error (e.g. torch's mode stack's)
            raise Timeout
        return result
    except Timeout as stop:
        frames = [
            f for f in traceback.extract_tb(stop.__traceback__) if f.filename.startswith(_PACKAGE)
        ]
        # The loop that never ended: the innermost frame of a solver, else of the library.
        loops = [f for f in frames if os.sep + "solvers" + os.sep in f.filename]
        where = f" (interrupted in {_frame((loops or frames)[-1])})" if frames else ""
        note = (overrides.get("instance") or families.make(case.family, case.seed, case.small)).note
        reason = f"no answer within {seconds:g} s{where}"
        return Result(case.id, "HANG", reason, seconds=seconds, note=note)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _classify(case, inst: families.Instance, solver, backward, result: Result) -> None:
    may_refuse = (
        inst.may_refuse
        or (case.door == "deq" and not inst.batched)
        or matrix.refused_by_design(case.solver, case.backward)
    )
    # -- forward (under torch.func.jvp for a forward-mode case) ----------------------
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if case.derivative == "jvp":
                z, info, dz, tangents = derivatives.forward_mode(case, inst, solver, backward)
            else:
                z, info = matrix.DOORS[case.door](inst, solver, backward)
            raised = None
        except implicit.ConvergenceError as error:
            z, info, raised = None, error.info, error
        except Exception as error:
            if may_refuse and _clear_error(error):
                raise Verdict("OK-REFUSED", _describe(error)) from None
            raise Verdict("CRASH", "forward: " + _describe(error)) from None
    warned = _convergence_warnings(caught)
    info = info.get() if isinstance(info, matrix.Later) else info
    result.status = info.status if info is not None else None
    if raised is not None:
        if inst.on_failure != "raise":
            raise Verdict("CRASH", f"ConvergenceError under on_failure={inst.on_failure!r}")
        if info.status == "converged" and not _tangent_failure([raised]):
            raise Verdict("CRASH", "ConvergenceError whose info says converged")
        raise Verdict("OK-NONCONVERGED", f"forward {info.status}, raised")
    converged = info.status == "converged"
    if converged != bool(info.converged.all()):
        raise Verdict("FALSE-CONVERGENCE", f"status {info.status!r} but info.converged disagrees")
    if not converged and not (warned and inst.on_failure == "warn"):
        raise Verdict("UNREPORTED", f"forward {info.status} without a warning or an error")
    if converged:
        _check_forward(case, inst, z, result)
    if case.derivative == "jvp":
        if not converged:
            raise Verdict("OK-NONCONVERGED", f"forward {info.status}, reported")
        if _tangent_failure(w.message for w in caught):
            raise Verdict("OK-NONCONVERGED", "forward-mode linear solve, reported")
        accuracy.check_tangent(case, inst, z, dz, tangents, result)
        return
    # -- backward (first or second order) -------------------------------------------
    compute = (
        (lambda: derivatives.hessian_vector(case, inst, z))
        if case.derivative == "hvp"
        else (lambda: _gradients(inst, z))
    )
    grads, no_graph, bwd_raised, bwd_warned = _backward(compute)
    bwd = bwd_raised.info if bwd_raised is not None else info.backward
    result.backward_status = bwd.status if bwd is not None else None
    bwd_failed = bwd is not None and bwd.status != "converged"
    if case.derivative == "hvp" and bwd_warned and bwd_raised is None:
        # Several adjoint solves ran: info.backward holds the last one's report, and a
        # ConvergenceWarning an earlier one's.
        bwd_failed = True
    if bwd_raised is not None and (not bwd_failed or inst.on_failure != "raise"):
        raise Verdict(
            "CRASH",
            f"backward ConvergenceError (status {bwd.status!r}) under "
            f"on_failure={inst.on_failure!r}",
        )
    if not converged:
        raise Verdict("OK-NONCONVERGED", f"forward {info.status}, reported")
    bwd_reported = bwd_raised is not None or (bwd_warned and inst.on_failure == "warn")
    if bwd_failed and not bwd_reported:
        raise Verdict("UNREPORTED", f"backward {bwd.status} without a warning or an error")
    if bwd_failed:
        status = bwd.status if bwd is not None else "?"
        raise Verdict("OK-NONCONVERGED", f"backward {status}, reported")
    if no_graph:
        raise Verdict("FALSE-CONVERGENCE", "z has no graph: the parameters get no gradient")
    if case.derivative == "hvp":
        first, second, direction = grads
        if not (np.all(np.isfinite(first)) and np.all(np.isfinite(second))):
            raise Verdict("SILENT-NAN", "non-finite first or second derivative, all converged")
        accuracy.check_hvp(case, inst, z, first, second, direction, result)
        return
    flat_grad = torch.cat([g.detach().double().flatten() for g in grads])
    if not bool(torch.isfinite(flat_grad).all()):
        raise Verdict("SILENT-NAN", "non-finite gradient, every status converged")
    accuracy.check_gradient(case, inst, z, flat_grad, result)


def _check_forward(case, inst: families.Instance, z, result: Result) -> None:
    """The documented stopping test, recomputed from ``z``; for a minimiser, the
    second-order test too."""
    flat_z = stopping.flat_torch(z, inst.batched)
    if not bool(torch.isfinite(flat_z).all()):
        raise Verdict("SILENT-NAN", "non-finite z with status converged")
    residual, threshold = stopping.test(case.door, inst, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = residual / threshold
    worst = float(np.max(np.where(np.isfinite(ratio), ratio, np.inf)))
    result.residual_ratio, result.residuals, result.thresholds = worst, residual, threshold
    if not np.all(np.isfinite(threshold)):
        raise Verdict("FALSE-CONVERGENCE", "converged, but the test's scale is not finite")
    if not worst <= RESIDUAL_SLACK[inst.dtype]:
        raise Verdict("FALSE-CONVERGENCE", f"residual {worst:.3g}× the documented test")
    why = stopping.saddle(inst, z)
    if why is not None:
        raise Verdict("FALSE-CONVERGENCE", "converged at " + why)


def _gradients(inst: families.Instance, z):
    """The gradients of ``L = Σ c·z`` (``None`` when ``z`` has no graph)."""
    params = list(inst.params.values())
    zs = z if isinstance(z, tuple) else (z,)
    cs = inst.cotangent if isinstance(inst.cotangent, tuple) else (inst.cotangent,)
    loss = sum((c * part).sum() for c, part in zip(cs, zs))
    if not loss.requires_grad:
        return None
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _backward(compute):
    """Run a backward computation: (its result, no_graph, raised ConvergenceError, warned)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = compute()
            if out is None:
                return None, True, None, False
        except implicit.ConvergenceError as error:
            return None, False, error, True
        except RuntimeError as error:
            if "does not require grad" in str(error):  # z has no graph at all
                return None, True, None, False
            raise Verdict("CRASH", "backward: " + _describe(error)) from None
        except Exception as error:
            raise Verdict("CRASH", "backward: " + _describe(error)) from None
    return out, False, None, _convergence_warnings(caught)


# -- helpers ----------------------------------------------------------------------------
def _convergence_warnings(caught) -> bool:
    return any(issubclass(w.category, implicit.ConvergenceWarning) for w in caught)


def _clear_error(error: BaseException) -> bool:
    """A deliberate error of the library: of a user-error type, raised by a ``raise``
    statement of its own code (not by a torch operation it called)."""
    if not isinstance(error, (ValueError, TypeError, NotImplementedError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames or not frames[-1].filename.startswith(_PACKAGE):
        return False
    return (frames[-1].line or "").lstrip().startswith("raise")


def _frame(frame: traceback.FrameSummary) -> str:
    return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"


def _describe(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {_frame(frames[-1])}" if frames else ""
    message = str(error).split("\n")[0][:200]
    return f"{type(error).__name__}{where}: {message}"


def _tangent_failure(messages) -> bool:
    """Whether one of the warnings (or errors) reports a forward-mode linear solve."""
    return any("forward-mode" in str(m) for m in messages)


__all__ = ["FAILURES", "OK_OUTCOMES", "Result", "Timeout", "run", "run_with_alarm"]
