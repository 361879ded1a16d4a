"""Run one case and classify how it ended, as issue 18 demands.

Acceptable outcomes:

* ``OK``: status ``"converged"``, the residual recomputed here from the returned ``z``
  meets the documented test of its door (below), the gradient is finite, the backward
  solve says converged, and (float64, exact backward mode) the gradient of
  ``L(z) = Σ c·z`` is within ``GRADIENT_TOL`` of the oracle in the 2-norm of all
  parameters' gradients together, relative to the oracle's. ``backward="unroll"``
  differentiates the iterations, whose derivatives converge to the implicit gradient
  more slowly than the iterates to the root (Broyden's lagged by 6e-4 at tol 1e-12 on
  one problem, 6e-8 at tol 1e-14): it is checked to ``UNROLL_TOL``, which still catches
  a missing or wrong graph. ``one_step`` and ``phantom`` are inexact by design and
  only checked for finiteness;
* ``OK-NONCONVERGED``: a non-converged status (forward or backward) that was reported
  by ``on_failure``: a ``ConvergenceWarning`` under ``"warn"``, a ``ConvergenceError``
  under ``"raise"``. Any status but ``"converged"`` is one, the backward's
  ``"ill_conditioned"`` (solved, but the condition estimate exceeds ``1/√eps``) and
  ``"diverged"`` (Neumann's series grew) included;
* ``OK-REFUSED``: a clear error (``ValueError`` / ``TypeError`` /
  ``NotImplementedError`` raised by ``implicit`` itself), only for inputs the library
  may reject: half precision, an infinite ``z0``, one unbatched sample given to a
  layer that is batched by default.

Failures: ``HANG`` (time limit), ``FALSE-CONVERGENCE`` (converged, but the residual
fails the test, the gradient is wrong, or ``z`` has no graph to the parameters),
``SILENT-NAN`` (NaN/inf in ``z`` or a gradient with no non-converged status),
``UNREPORTED`` (a non-converged status that ``on_failure`` did not report), ``CRASH``
(any other exception). ``HARNESS-ERROR`` is a bug of this harness, not the library's.

The documented tests (``implicit/api.py``, ``implicit/_problem.py``), per problem:
``fixed_point`` and ``DEQ``: ``‖f(z) − z‖ ≤ tol·(1 + max(‖z0‖, ‖f(z0)‖))``;
``root_solve`` and ``custom_root``: ``‖g(z)‖ ≤ tol``; ``invert``: ``‖f(z) − y‖ ≤
tol·(1 + ‖y‖)``. The residual is recomputed with the user's function in the problem's
dtype (what the library's test computes); it may differ from the library's by rounding
(another memory layout of a tuple state), hence the slack of ``RESIDUAL_SLACK``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import traceback
import warnings

import families
import matrix
import numpy as np
import torch

import implicit

GRADIENT_TOL = 1e-6
UNROLL_TOL = 1e-3
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

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Verdict(Exception):
    """Ends a classification early with an outcome."""

    def __init__(self, outcome: str, reason: str = ""):
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason


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
        solver = solver if solver is not None else matrix.make_solver(case.solver)
        backward = backward if backward is not None else matrix.make_backward(case.backward)
        _classify(case, inst, solver, backward, result)
        result.outcome = "OK"
    except _Verdict as verdict:
        result.outcome, result.reason = verdict.outcome, verdict.reason
    result.seconds = time.perf_counter() - start
    return result


def run_with_alarm(case: matrix.Case, seconds: float, **overrides) -> Result:
    """:func:`run` under a SIGALRM time limit (Linux): a hang becomes ``HANG``."""

    def alarm(signum, frame):
        raise Timeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return run(case, **overrides)
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
    may_refuse = inst.may_refuse or (case.door == "deq" and not inst.batched)
    # -- forward --------------------------------------------------------------------
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            z, info = matrix.DOORS[case.door](inst, solver, backward)
            raised = None
        except implicit.ConvergenceError as error:
            z, info, raised = None, error.info, error
        except Exception as error:
            if may_refuse and _clear_error(error):
                raise _Verdict("OK-REFUSED", _describe(error)) from None
            raise _Verdict("CRASH", "forward: " + _describe(error)) from None
    warned = _convergence_warnings(caught)
    info = info.get() if isinstance(info, matrix.Later) else info
    result.status = info.status if info is not None else None
    if raised is not None:
        if inst.on_failure != "raise":
            raise _Verdict("CRASH", f"ConvergenceError under on_failure={inst.on_failure!r}")
        if info.status == "converged":
            raise _Verdict("CRASH", "ConvergenceError whose info says converged")
        raise _Verdict("OK-NONCONVERGED", f"forward {info.status}, raised")
    converged = info.status == "converged"
    if converged != bool(info.converged.all()):
        raise _Verdict("FALSE-CONVERGENCE", f"status {info.status!r} but info.converged disagrees")
    if not converged and not (warned and inst.on_failure == "warn"):
        raise _Verdict("UNREPORTED", f"forward {info.status} without a warning or an error")
    if converged:
        _check_forward(case, inst, z, result)
    # -- backward -------------------------------------------------------------------
    grads, no_graph, bwd_raised, bwd_warned = _backward(inst, z)
    bwd = bwd_raised.info if bwd_raised is not None else info.backward
    result.backward_status = bwd.status if bwd is not None else None
    bwd_failed = bwd is not None and bwd.status != "converged"
    if bwd_raised is not None and (not bwd_failed or inst.on_failure != "raise"):
        raise _Verdict(
            "CRASH",
            f"backward ConvergenceError (status {bwd.status!r}) under "
            f"on_failure={inst.on_failure!r}",
        )
    if not converged:
        raise _Verdict("OK-NONCONVERGED", f"forward {info.status}, reported")
    bwd_reported = bwd_raised is not None or (bwd_warned and inst.on_failure == "warn")
    if bwd_failed and not bwd_reported:
        raise _Verdict("UNREPORTED", f"backward {bwd.status} without a warning or an error")
    if bwd_failed:
        raise _Verdict("OK-NONCONVERGED", f"backward {bwd.status}, reported")
    if no_graph:
        raise _Verdict("FALSE-CONVERGENCE", "z has no graph: the parameters get no gradient")
    flat_grad = torch.cat([g.detach().double().flatten() for g in grads])
    if not bool(torch.isfinite(flat_grad).all()):
        raise _Verdict("SILENT-NAN", "non-finite gradient, every status converged")
    _check_gradient(case, inst, z, flat_grad, result)


def _check_forward(case, inst: families.Instance, z, result: Result) -> None:
    """The documented stopping test, recomputed from ``z``."""
    flat_z = _flat_torch(z, inst.batched)
    if not bool(torch.isfinite(flat_z).all()):
        raise _Verdict("SILENT-NAN", "non-finite z with status converged")
    residual, threshold = _test(case.door, inst, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = residual / threshold
    worst = float(np.max(np.where(np.isfinite(ratio), ratio, np.inf)))
    result.residual_ratio = worst
    if not np.all(np.isfinite(threshold)):
        raise _Verdict("FALSE-CONVERGENCE", "converged, but the test's scale is not finite")
    if not worst <= RESIDUAL_SLACK[inst.dtype]:
        raise _Verdict("FALSE-CONVERGENCE", f"residual {worst:.3g}× the documented test")


def _test(door: str, inst: families.Instance, z) -> tuple[np.ndarray, np.ndarray]:
    """Per problem: the recomputed residual norm and the threshold of ``door``'s test
    (its tolerance at least 4 machine epsilons of a half-precision dtype, as documented)."""
    eps = torch.finfo(inst.dtype).eps
    half = inst.dtype in (torch.float16, torch.bfloat16)
    inst = dataclasses.replace(inst, tol=max(inst.tol, 4 * eps) if half else inst.tol)
    with torch.no_grad():
        if door in ("fixed_point", "deq"):
            norm = lambda s: _norms(s, inst.batched)  # noqa: E731
            f0 = inst.fn(inst.z0, *inst.args)
            scale = np.maximum(norm(inst.z0), norm(f0))
            return _norms(_sub(inst.fn(z, *inst.args), z), inst.batched), inst.tol * (1 + scale)
        if door in ("root_solve", "custom_root"):
            residual = inst.residual_fn()(z, *inst.root_args())
            return _norms(residual, inst.batched), np.full(_rows(inst), inst.tol)
        residual = inst.fn(z, *inst.args) - inst.y
        return _norms(residual, inst.batched), inst.tol * (1 + _norms(inst.y, inst.batched))


def _backward(inst: families.Instance, z):
    """Gradients of ``L = Σ c·z``: (grads, no_graph, raised ConvergenceError, warned)."""
    params = list(inst.params.values())
    zs = z if isinstance(z, tuple) else (z,)
    cs = inst.cotangent if isinstance(inst.cotangent, tuple) else (inst.cotangent,)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            loss = sum((c * part).sum() for c, part in zip(cs, zs))
            if not loss.requires_grad:
                return [torch.zeros_like(p) for p in params], True, None, False
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        except implicit.ConvergenceError as error:
            return None, False, error, True
        except Exception as error:
            raise _Verdict("CRASH", "backward: " + _describe(error)) from None
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return grads, False, None, _convergence_warnings(caught)


def _check_gradient(case, inst: families.Instance, z, grad: torch.Tensor, result: Result) -> None:
    checked = case.backward in (*matrix.EXACT, "unroll")
    if inst.dtype != torch.float64 or not inst.check_gradient or not checked:
        return
    root = (
        inst.root64
        if inst.root64 is not None
        else families.refine(inst, families.flat(z, inst.batched))
    )
    if root is None:
        result.reason = "gradient unchecked: scipy found no root near z"
        return
    try:
        reference, cond = families.reference_gradient(inst, root)
    except np.linalg.LinAlgError:
        result.reason = "gradient unchecked: singular Jacobian at the root"
        return
    ref = np.concatenate([np.asarray(reference[name], dtype=float).ravel() for name in inst.params])
    scale = float(np.linalg.norm(ref))
    error = float(np.linalg.norm(grad.numpy() - ref)) / (scale if scale > 0 else 1.0)
    result.grad_error, result.cond = error, cond
    limit = UNROLL_TOL if case.backward == "unroll" else GRADIENT_TOL
    if not error <= limit:
        # Where the documented tolerances allow it (an error up to about κ·tol), the
        # fault is a missing warning about the conditioning rather than a wrong solve.
        bound = cond * inst.tol
        explained = " [ill-conditioned: within 10·κ·tol]" if error <= 10 * bound else ""
        raise _Verdict(
            "FALSE-CONVERGENCE",
            f"gradient error {error:.2e} > {limit:g} (κ={cond:.1e}, κ·tol={bound:.1e})" + explained,
        )


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


def _flat_torch(state, batched: bool) -> torch.Tensor:
    parts = state if isinstance(state, tuple) else (state,)
    rows = parts[0].shape[0] if batched else 1
    return torch.cat([p.detach().reshape(rows, -1) for p in parts], dim=1)


def _norms(state, batched: bool) -> np.ndarray:
    return np.linalg.norm(_flat_torch(state, batched).double().numpy(), axis=1)


def _sub(a, b):
    return tuple(x - y for x, y in zip(a, b)) if isinstance(a, tuple) else a - b


def _rows(inst: families.Instance) -> int:
    z0 = inst.z0[0] if isinstance(inst.z0, tuple) else inst.z0
    return z0.shape[0] if inst.batched else 1


__all__ = ["FAILURES", "OK_OUTCOMES", "Result", "Timeout", "run", "run_with_alarm"]
