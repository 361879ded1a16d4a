"""The documented stopping tests, recomputed from the returned ``z`` alone.

Problem ``b`` has converged when ``‖g(z)_b‖₂ ≤ tol_b · (1 + s_b)`` (``docs/concepts.md``,
"Stopping: tol and tol_mode"; ``implicit/api.py``, ``implicit/_optimize.py``), with
``s = 0`` under ``tol_mode="absolute"`` and under ``"relative"`` the front door's scale
at the initial guess:

* ``fixed_point`` and ``DEQ`` (default relative): ``g = f(z) − z``,
  ``s = max(‖z0‖, ‖f(z0)‖)``;
* ``root_solve`` and ``custom_root`` (default absolute): ``s = ‖g(z0)‖``, for a
  bracketing solver ``|g(lower)|``;
* ``invert`` (default relative): ``g = f(z) − y``, ``s = ‖y‖``;
* ``minimize`` (default relative): ``g = ∇f``, with bounds the projected gradient
  ``z − clip(z − ∇f, l, u)``, ``s = min(|f(z0)|, |f(z)|)`` with ``z0`` clipped into
  the bounds;
* ``least_squares`` (default relative): the same with ``f = ½‖r‖²``.

Residuals are recomputed with the user's function in the problem's dtype (what the
library's test computes; gradients by plain ``torch.autograd``). A minimiser's answer
must also pass the second-order test: the Hessian on the free coordinates (the
oracle's, float64) has no eigenvalue below ``−SECOND_ORDER·√eps·max(1, |λ|max)``
(``eps`` of the problem's dtype): the library promises a local minimum, and its own
test is the same with the factor 1.
"""

from __future__ import annotations

import families
import numpy as np
import torch
from families._optim import free_coordinates

#: The slack of the second-order test over the library's own (rounding of ``z``).
SECOND_ORDER = 4.0


#: Each front door's mode when ``tol_mode`` is not given.
DEFAULT_MODE = {"root_solve": "absolute", "custom_root": "absolute"}


def test(door: str, inst: families.Instance, z) -> tuple[np.ndarray, np.ndarray]:
    """Per problem: the recomputed residual norm and the threshold of ``door``'s test
    (its tolerance at least 4 machine epsilons of a half-precision dtype, as documented)."""
    eps = torch.finfo(inst.dtype).eps
    half = inst.dtype in (torch.float16, torch.bfloat16)
    tol = np.broadcast_to(np.asarray(inst.tol, dtype=float), (rows(inst),))
    tol = np.maximum(tol, 4 * eps) if half else tol
    relative = (inst.tol_mode or DEFAULT_MODE.get(door, "relative")) == "relative"
    if door in ("minimize", "least_squares"):
        residual, scale = _optimality(inst, z)
    else:
        residual, scale = _root_like(door, inst, z, relative)
    return residual, tol * (1 + (scale if relative else 0.0))


def _root_like(door: str, inst: families.Instance, z, relative: bool):
    """The residual norms at ``z`` and (when ``relative``) the scale, for the root-type
    doors."""
    with torch.no_grad():
        if door in ("fixed_point", "deq"):
            norm = lambda s: norms(s, inst.batched)  # noqa: E731
            f0 = inst.fn(inst.z0, *inst.args)
            scale = np.maximum(norm(inst.z0), norm(f0))
            return norms(_sub(inst.fn(z, *inst.args), z), inst.batched), scale
        if door in ("root_solve", "custom_root"):
            g = inst.residual_fn()
            scale = None
            if relative:
                start = inst.solver_options.get("lower", inst.z0)
                if not torch.is_tensor(start):  # a bracket's end given as a number
                    start = torch.full_like(inst.z0, float(start))
                scale = norms(g(start, *inst.root_args()), inst.batched)
            return norms(g(z, *inst.root_args()), inst.batched), scale
        residual = inst.fn(z, *inst.args) - inst.y
        return norms(residual, inst.batched), norms(inst.y, inst.batched)


def _optimality(inst: families.Instance, z) -> tuple[np.ndarray, np.ndarray]:
    batch = rows(inst)
    z = z.detach()
    lower, upper = (
        (torch.from_numpy(b).to(inst.dtype) for b in inst.bounds64)
        if inst.bounds64 is not None
        else (torch.full((batch, z[0].numel() if inst.batched else z.numel()), v,
                         dtype=inst.dtype) for v in (-np.inf, np.inf))
    )  # fmt: skip
    z0 = torch.clamp(inst.z0.detach().reshape(batch, -1), lower, upper).reshape(inst.z0.shape)
    values0, _ = _value_and_grad(inst, z0, batch)
    values, grad = _value_and_grad(inst, z, batch)
    flat_z = z.reshape(batch, -1)
    residual = flat_z - torch.clamp(flat_z - grad, lower, upper)
    scale = torch.minimum(values0.abs(), values.abs())
    return row_norms(residual.double().numpy()), scale.double().numpy()


def _value_and_grad(inst: families.Instance, z: torch.Tensor, batch: int):
    """The objective per problem and its gradient ``(B, n)``, in the problem's dtype."""
    with torch.enable_grad():
        point = z.detach().clone().requires_grad_()
        out = inst.fn(point, *[a.detach() for a in inst.args])
        if inst.form == "least_squares":
            values = 0.5 * out.reshape(batch, -1).pow(2).sum(1)
        else:
            values = out.reshape(batch)
        (grad,) = torch.autograd.grad(values.sum(), point)
    return values.detach(), grad.reshape(batch, -1)


def saddle(inst: families.Instance, z) -> str | None:
    """Why ``z`` is not a local minimum (a clearly negative eigenvalue of the Hessian on
    the free coordinates), or ``None``."""
    flat = flat_torch(z, inst.batched).double().numpy()
    if inst.hessian64 is None or not np.all(np.isfinite(flat)):
        return None
    lower, upper = inst.bounds64 if inst.bounds64 is not None else (-np.inf, np.inf)
    with np.errstate(all="ignore"):
        grad, hess = inst.gradient64(flat), inst.hessian64(flat)
    free = free_coordinates(flat, grad, lower, upper)
    limit = SECOND_ORDER * float(np.sqrt(torch.finfo(inst.dtype).eps))
    for b in range(flat.shape[0]):
        block = hess[b][np.ix_(free[b], free[b])]
        if block.size == 0 or not np.all(np.isfinite(block)):
            continue
        values = np.linalg.eigvalsh(0.5 * (block + block.T))
        if values[0] < -limit * max(1.0, float(np.abs(values).max())):
            return (
                f"a saddle or maximum: Hessian eigenvalue {values[0]:.3g} on the free "
                f"coordinates of problem {b} (largest |λ| {np.abs(values).max():.3g})"
            )
    return None


def flat_torch(state, batched: bool) -> torch.Tensor:
    parts = state if isinstance(state, tuple) else (state,)
    rows = parts[0].shape[0] if batched else 1
    return torch.cat([p.detach().reshape(rows, -1) for p in parts], dim=1)


def norms(state, batched: bool) -> np.ndarray:
    return row_norms(flat_torch(state, batched).double().numpy())


def row_norms(rows: np.ndarray) -> np.ndarray:
    """The 2-norm of each row, without the overflow of squaring entries above 1e154: a
    norm the library computes as finite must not come out infinite here."""
    with np.errstate(all="ignore"):
        top = np.abs(rows).max(axis=1, initial=0.0)
        safe = np.where(np.isfinite(top) & (top > 0), top, 1.0)
        scaled = safe * np.linalg.norm(rows / safe[:, None], axis=1)
    return np.where(np.isnan(top), np.nan, np.where(np.isinf(top), np.inf, scaled))


def _sub(a, b):
    return tuple(x - y for x, y in zip(a, b)) if isinstance(a, tuple) else a - b


def rows(inst: families.Instance) -> int:
    z0 = inst.z0[0] if isinstance(inst.z0, tuple) else inst.z0
    return z0.shape[0] if inst.batched else 1
