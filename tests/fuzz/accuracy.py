"""The derivatives a case computed, against the oracle's (float64 only).

A derivative is accurate when its relative error (2-norm over every problem and
parameter) is at most ``GRADIENT_TOL``; ``backward="unroll"`` differentiates the
iterations, whose derivatives converge to the implicit one more slowly than the
iterates to the root (Broyden's lagged by 6e-4 at tol 1e-12 on one problem, 6e-8 at tol
1e-14): it is held to ``UNROLL_TOL``, which still catches a missing or wrong graph. A
Hessian-vector product is held to the larger of that and the tolerance of its central
difference (:mod:`derivatives`). An inaccurate derivative is a ``FALSE-CONVERGENCE``; its reason
says when the documented tolerances explain it (an ill-conditioned Jacobian, or a test
whose scale let a poor ``z`` pass).
"""

from __future__ import annotations

import derivatives
import families
import matrix
import numpy as np
import stopping
import torch

GRADIENT_TOL = 1e-6
UNROLL_TOL = 1e-3


class Verdict(Exception):
    """Ends a classification early with an outcome."""

    def __init__(self, outcome: str, reason: str = ""):
        super().__init__(reason)
        self.outcome, self.reason = outcome, reason


def _oracle_root(inst: families.Instance, z, result) -> np.ndarray | None:
    """The oracle's root for ``z`` (``None``, with the reason noted, where the
    derivative is not checked: not float64, no reference, no root near ``z``)."""
    if inst.dtype != torch.float64 or not inst.check_gradient:
        return None
    try:
        root = families.reference_root(inst, families.flat(z, inst.batched))
    except families.Unchecked as why:
        result.reason = f"derivative unchecked: {why}"
        return None
    if root is None:
        result.reason = "derivative unchecked: the oracle found no root (or minimum) near z"
    return root


def _compare(case, inst, error: float, root, z, result, what: str, limit=None):
    """Fail unless ``error`` (relative) is within the mode's tolerance (``root`` the
    oracle's, ``z`` the answer, flat)."""
    jacobians = inst.jacobian64(root)
    cond = float(np.max(np.linalg.cond(jacobians)))
    result.grad_error, result.cond = error, cond
    if limit is None:
        limit = UNROLL_TOL if case.backward == "unroll" else GRADIENT_TOL
    if error <= limit:
        return
    # Where the documented tolerances allow it, the fault is a missing warning about
    # the conditioning (an error up to about κ·tol), or a test so loosely scaled
    # (tol·(1 + s) with a large scale s) that z passed it only thanks to the scale.
    bound = cond * inst.tol_max
    explained = " [ill-conditioned: within 10·κ·tol]" if error <= 10 * bound else ""
    if result.residuals is not None and not explained:
        tol = np.broadcast_to(np.asarray(inst.tol, dtype=float), result.residuals.shape)
        needed = float(np.max(result.residuals / tol))
        if needed > 1:
            explained = (
                f" [loose test: ‖g(z)‖ up to {needed:.1e}·tol passed a threshold of "
                f"{float(np.max(result.thresholds / tol)):.1e}·tol]"
            )
    raise Verdict(
        "FALSE-CONVERGENCE",
        f"{what} error {error:.2e} > {limit:.2g} (κ={cond:.1e}, κ·tol={bound:.1e})" + explained,
    )


def _flat(z, inst: families.Instance) -> np.ndarray:
    return families.flat(z, inst.batched)


def _relative(value: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.linalg.norm(reference))
    return float(np.linalg.norm(value - reference)) / (scale if scale > 0 else 1.0)


def check_gradient(case, inst: families.Instance, z, grad: torch.Tensor, result) -> None:
    if case.backward not in (*matrix.EXACT, "unroll"):
        return
    root = _oracle_root(inst, z, result)
    if root is None:
        return
    try:
        reference, _ = families.reference_gradient(inst, root)
    except np.linalg.LinAlgError:
        result.reason = "gradient unchecked: singular Jacobian at the root"
        return
    ref = np.concatenate([np.asarray(reference[name], dtype=float).ravel() for name in inst.params])
    _compare(case, inst, _relative(grad.numpy(), ref), root, _flat(z, inst), result, "gradient")


def check_tangent(case, inst: families.Instance, z, dz, tangents, result) -> None:
    flat_dz = stopping.flat_torch(dz, inst.batched).double().numpy()
    if not np.all(np.isfinite(flat_dz)):
        raise Verdict("SILENT-NAN", "non-finite forward-mode derivative, every status converged")
    root = _oracle_root(inst, z, result)
    if root is None:
        return
    try:
        reference = families.reference_tangent(inst, root, tangents)
    except np.linalg.LinAlgError:
        result.reason = "tangent unchecked: singular Jacobian at the root"
        return
    _compare(
        case, inst, _relative(flat_dz, reference), root, _flat(z, inst), result,
        "forward-mode derivative",
    )  # fmt: skip


def check_hvp(case, inst: families.Instance, z, first, second, direction, result) -> None:
    root = _oracle_root(inst, z, result)
    if root is None:
        return
    try:
        gradient = derivatives.oracle_loss_gradient(inst, root)
        found = derivatives.oracle_hvp(case, inst, root, direction)
    except np.linalg.LinAlgError:
        result.reason = "second order unchecked: singular Jacobian at a root"
        return
    except families.Unchecked as why:
        result.reason = f"second order unchecked: {why}"
        return
    _compare(
        case, inst, _relative(first, gradient), root, _flat(z, inst), result,
        "gradient of Σc·z + ½‖z‖²",
    )  # fmt: skip
    if found is None:
        result.reason = "second order unchecked: no oracle root near z at θ ± h v"
        return
    reference, estimate = found
    if estimate > derivatives.HVP_UNRELIABLE:
        result.reason = f"second order unchecked: central difference unreliable ({estimate:.1e})"
        return
    exact = UNROLL_TOL if case.backward == "unroll" else GRADIENT_TOL
    limit = max(exact, derivatives.HVP_SAFETY * estimate)
    error = _relative(second, reference)
    _compare(case, inst, error, root, _flat(z, inst), result, "Hessian-vector product", limit)
