"""Forward mode and second order through a solve, and their float64 oracles.

* **Forward mode** (``jvp``): ``torch.func.jvp`` of the door as a function of the
  problem's explicit tensors (``args``, ``y``, bound tensors; API.md: tangents on
  captured tensors are not promised), with a random tangent ``t``; the oracle is
  ``dz = −(∂g/∂z)⁻¹ (∂g/∂θ) t`` at its root (:func:`families.reference_tangent`),
  compared in the 2-norm over all problems, relative.
* **Second order** (``hvp``): the Hessian-vector product ``∇²L v`` of the scalar loss
  ``L = Σ c·z + ½‖z‖²`` with respect to every parameter (explicit and captured), by
  double backward (``torch.autograd.grad(..., create_graph=True)`` twice). The oracle
  is a central difference of the oracle's gradient ``∇L = (∂z/∂θ)ᵀ(c + z)`` (exact,
  by the implicit function theorem at the float64 root) along ``v``, at the problems
  drawn with their parameters moved to ``θ ± s v`` (:func:`families.shifted`) for
  ``s = h, 2h, 4h``, each parameter's part of ``v`` random times its magnitude
  ``max(1, ‖θ_p‖∞)`` and ``h`` such that none moves by more than ``H_STEP`` of its
  magnitude per ``h`` (or that divided by ``HVP_SHRINK``, whichever estimate below is
  smallest), Richardson extrapolated:
  ``R(h) = (4 D(h) − D(2h)) / 3``, whose error is ``O(h⁴)``. That error is about
  ``‖R(h) − R(2h)‖ / 15`` (truncation, and the rounding of the oracle's gradients
  divided by ``h``): the tolerance is ``max(1e-6, HVP_SAFETY · ‖R(h) − R(2h)‖)``
  relative to ``‖R(h)‖`` (a margin of 15 over the estimate), and where
  ``‖R(h) − R(2h)‖`` exceeds ``HVP_UNRELIABLE`` the difference says nothing and the
  check is skipped (noted as unchecked).
"""

from __future__ import annotations

import dataclasses
import zlib

import families
import numpy as np
import torch
from doors import DOORS, Later

H_STEP = 1e-4
#: Smaller steps tried, in turn, while the estimate is above 1e-8 (a parameter
#: ill-conditioned problem, e.g. ``A`` with ``λmin ≪ ‖A‖``, needs a step small
#: against its own scale).
HVP_SHRINK = (1, 30, 1000)
HVP_SAFETY = 1.0
HVP_UNRELIABLE = 1e-3


def rng_for(case) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(case.id.encode()))


def explicit_params(inst: families.Instance) -> list[str]:
    """The parameters the door receives explicitly (a tangent there is promised)."""
    inputs = [*inst.root_args(), *(inst.bounds or ())]
    return [name for name, p in inst.params.items() if any(p is x for x in inputs)]


def substitute(inst: families.Instance, values: dict[str, torch.Tensor]) -> families.Instance:
    """The instance with explicit parameters replaced by ``values`` (by name)."""
    by_id = {id(inst.params[name]): value for name, value in values.items()}

    def swap(x):
        return by_id.get(id(x), x)

    bounds = tuple(swap(b) for b in inst.bounds) if inst.bounds is not None else None
    y = swap(inst.y) if inst.y is not None else None
    return dataclasses.replace(inst, args=tuple(swap(a) for a in inst.args), y=y, bounds=bounds)


def _direction(rng: np.random.Generator, p: torch.Tensor, scaled: bool = False) -> np.ndarray:
    """A random direction shaped like ``p``, zero on its infinite entries (a bound's);
    ``scaled``: times ``p``'s magnitude (:func:`_magnitude`)."""
    values = p.detach().double().numpy()
    direction = np.where(np.isfinite(values), rng.standard_normal(values.shape), 0.0)
    return np.asarray(direction * _magnitude(p) if scaled else direction)


def _magnitude(p: torch.Tensor) -> float:
    """``max(1, ‖p‖∞)`` over the finite entries."""
    values = np.abs(p.detach().double().numpy())
    finite = values[np.isfinite(values)]
    return max(1.0, float(finite.max())) if finite.size else 1.0


def forward_mode(case, inst: families.Instance, solver, backward):
    """``(z, info, dz, tangents)``: the door under ``torch.func.jvp`` with a random
    tangent on every explicit parameter (a dict of float64 arrays)."""
    names = explicit_params(inst)
    rng = rng_for(case)
    tangents = {name: _direction(rng, inst.params[name]) for name in names}
    primals = tuple(inst.params[name].detach() for name in names)
    dtype = inst.dtype
    tangent_tensors = tuple(torch.from_numpy(tangents[name]).to(dtype) for name in names)
    holder = {}

    def solve(*values):
        z, info = DOORS[case.door](substitute(inst, dict(zip(names, values))), solver, backward)
        holder["info"] = info
        return z

    z, dz = torch.func.jvp(solve, primals, tangent_tensors)
    info = holder["info"]
    return z, info.get() if isinstance(info, Later) else info, dz, tangents


def loss(inst: families.Instance, z) -> torch.Tensor:
    """``L = Σ c·z + ½‖z‖²`` (its gradient's Hessian has both of the solution's orders)."""
    zs = z if isinstance(z, tuple) else (z,)
    cs = inst.cotangent if isinstance(inst.cotangent, tuple) else (inst.cotangent,)
    return sum((c * part).sum() + 0.5 * (part**2).sum() for c, part in zip(cs, zs))


def hessian_vector(case, inst: families.Instance, z):
    """``(∇L, ∇²L v, v)`` by double backward, ``v`` random over every parameter."""
    params = list(inst.params.values())
    rng = rng_for(case)
    direction = {name: _direction(rng, p, scaled=True) for name, p in inst.params.items()}
    first = torch.autograd.grad(loss(inst, z), params, create_graph=True, allow_unused=True)
    first = [torch.zeros_like(p) if g is None else g for g, p in zip(first, params)]
    product = sum(
        (g * torch.from_numpy(direction[name]).to(g.dtype)).sum()
        for g, name in zip(first, inst.params)
    )
    if not product.requires_grad:  # ∇L does not depend on θ through any graph
        second = [torch.zeros_like(p) for p in params]
    else:
        second = torch.autograd.grad(product, params, allow_unused=True)
        second = [torch.zeros_like(p) if g is None else g for g, p in zip(second, params)]
    return _cat(first), _cat(second), direction


def _cat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().double().numpy().ravel() for t in tensors])


def oracle_loss_gradient(inst: families.Instance, root: np.ndarray) -> np.ndarray:
    """``∇L`` at the oracle's root, all parameters flattened in order."""
    grads, _ = families.reference_gradient(inst, root, flat_cotangent(inst) + root)
    return np.concatenate(
        [np.broadcast_to(grads[n], inst.params[n].shape).ravel() for n in inst.params]
    )


def flat_cotangent(inst: families.Instance) -> np.ndarray:
    return families.flat(inst.cotangent, inst.batched)


def oracle_hvp(case, inst: families.Instance, root: np.ndarray, direction: dict):
    """``(∇²L v, ‖R(h) − R(2h)‖ relative)`` by the extrapolated central difference (see
    the module) with the smallest error estimate over the steps tried, or ``None``
    where, at every step, a moved problem has no root near ``root``."""
    # Each parameter moves by at most 4·H_STEP of its own magnitude (the largest step).
    largest = max(
        float(np.abs(direction[name]).max()) / _magnitude(p) if p.numel() else 0.0
        for name, p in inst.params.items()
    )
    if largest == 0:
        return np.zeros(sum(p.numel() for p in inst.params.values())), 0.0
    best = None
    for shrink in HVP_SHRINK:
        found = _extrapolated(case, inst, root, direction, H_STEP / largest / shrink)
        if found is not None and (best is None or found[1] < best[1]):
            best = found
        if best is not None and best[1] <= 1e-8:
            break
    return best


def _extrapolated(case, inst, root, direction, h):
    differences = []
    for step in (h, 2 * h, 4 * h):
        sides = []
        for sign in (1, -1):
            try:
                with families.shifted({n: sign * step * d for n, d in direction.items()}):
                    moved = families.make(case.family, case.seed, case.small)
                moved_root = families.reference_root(moved, root)
            except ValueError:  # the move crossed a tight box: a smaller step may not
                return None
            if moved_root is None:
                return None
            sides.append(oracle_loss_gradient(moved, moved_root))
        differences.append((sides[0] - sides[1]) / (2 * step))
    near = (4 * differences[0] - differences[1]) / 3
    far = (4 * differences[1] - differences[2]) / 3
    scale = float(np.linalg.norm(near)) or 1.0
    return near, float(np.linalg.norm(near - far)) / scale
