"""What the optimisation families share: the objective in float64 numpy, the
optimality condition the oracle differentiates, bounds, and the float64 minimiser.

An optimisation problem ``min f(z, θ)`` (``l ≤ z ≤ u``) is, for its oracle, the root
problem of its optimality condition, exactly as the library documents it: the
gradient ``∇f``, or with bounds the projected gradient ``z − clip(z − ∇f, l, u)``.
Its Jacobian has the Hessian's rows on the free coordinates and the identity's on the
coordinates held at a bound, so :func:`~families._base.reference_gradient` applies
unchanged: the implicit function theorem on the free coordinates, derivative 1 of a
held coordinate with respect to its bound. The minimiser itself comes from
``scipy.optimize`` (L-BFGS-B with bounds, a damped float64 Newton otherwise), polished
by Newton steps on the free coordinates to rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

from ._base import Array, Instance, Unchecked, param

#: The fast sample's iteration caps and largest size: its cases cross every solver
#: (scipy's derivative-free methods included) with every backward mode, cheaply.
SMALL_ITERS = (15, 40)
SMALL_SIZE = 4
SMALL_BATCH = 2
#: Newton steps of the polish, at most.
POLISH_STEPS = 60


@dataclasses.dataclass
class Objective64:
    """An objective on the flat ``(B, n)`` view, in float64 numpy.

    Attributes:
        value: ``(B,)`` values.
        grad: ``(B, n)`` gradients.
        hess: ``(B, n, n)`` Hessians.
        grad_vjp: ``(z, w) ↦ {name: (∂∇f/∂θ)ᵀ w}`` for every parameter but the bounds.
    """

    value: Callable[[Array], Array]
    grad: Callable[[Array], Array]
    hess: Callable[[Array], Array]
    grad_vjp: Callable[[Array, Array], dict[str, Array]]


def condition(model: Objective64, lower: Array, upper: Array, bound_shapes: dict):
    """``residual64``, ``jacobian64`` and ``vjp64`` of the optimality condition
    (``bound_shapes``: name ``"lower"``/``"upper"`` → shape of a bound tensor that
    receives gradients)."""

    def held(z: Array) -> tuple[Array, Array]:
        step = z - model.grad(z)
        return step < lower, step > upper

    def residual64(z):
        return z - np.clip(z - model.grad(z), lower, upper)

    def jacobian64(z):
        at_lower, at_upper = held(z)
        fixed = at_lower | at_upper
        eye = np.broadcast_to(np.eye(z.shape[1]), (z.shape[0], z.shape[1], z.shape[1]))
        return np.where(fixed[:, :, None], eye, model.hess(z))

    def vjp64(z, w):
        at_lower, at_upper = held(z)
        out = model.grad_vjp(z, np.where(at_lower | at_upper, 0.0, w))
        for name, mask in (("lower", at_lower), ("upper", at_upper)):
            if name in bound_shapes:
                out[name] = _sum_to(-w * mask, bound_shapes[name])
        return out

    return residual64, jacobian64, vjp64


def _sum_to(array: Array, shape: tuple[int, ...]) -> Array:
    """``array`` (``(B, n)``) summed down to a bound's shape (``(n,)``: over the batch)."""
    if array.size == int(np.prod(shape)):
        return array.reshape(shape)
    return array.sum(axis=0).reshape(shape)


def free_coordinates(z: Array, grad: Array, lower: Array, upper: Array) -> Array:
    """The coordinates not held at a bound by a gradient pushing outwards (the
    library's definition, ``Objective.free``)."""
    return ~(((z <= lower) & (grad > 0)) | ((z >= upper) & (grad < 0)))


def polish(model: Objective64, z: Array, lower: Array, upper: Array) -> Array | None:
    """The minimum near ``z``: Newton steps on the free coordinates (the held ones stay
    at their bound) until they no longer move ``z``; ``None`` where they fail or end at
    a point that is not a strict local minimum (a saddle, a maximum)."""
    z = np.clip(np.array(z, dtype=float), lower, upper)
    if not np.all(np.isfinite(z)):
        return None
    for _ in range(POLISH_STEPS):
        grad, hess = model.grad(z), model.hess(z)
        free = free_coordinates(z, grad, lower, upper)
        step = np.zeros_like(z)
        for b in range(z.shape[0]):
            f = free[b]
            if f.any():
                try:
                    step[b, f] = -np.linalg.solve(hess[b][np.ix_(f, f)], grad[b, f])
                except np.linalg.LinAlgError:
                    return None
        new = np.clip(z + step, lower, upper)
        if not np.all(np.isfinite(new)):
            return None
        moved = np.abs(new - z).max(axis=1)
        z = new
        if np.all(moved <= 4 * np.finfo(float).eps * (1 + np.abs(z).max(axis=1))):
            break
    grad, hess = model.grad(z), model.hess(z)
    free = free_coordinates(z, grad, lower, upper)
    scale = 1 + np.abs(hess).max(axis=(1, 2)) * (1 + np.abs(z).max(axis=1))
    if np.any(np.linalg.norm(z - np.clip(z - grad, lower, upper), axis=1) > 1e-9 * scale):
        return None
    for b in range(z.shape[0]):
        f = free[b]
        if f.any() and np.linalg.eigvalsh(hess[b][np.ix_(f, f)])[0] <= 0:
            return None
    return z


def newton64(model: Objective64, z: Array, iterations: int = 200) -> Array:
    """Damped Newton in float64 (backtracking on ``f``, non-finite trials rejected):
    the unique minimiser of a strictly convex objective from any point of its domain,
    to rounding (until the steps stop shrinking). Near the minimiser (a Newton
    decrement ``−∇fᵀΔ`` below ``1e-8·(1 + |f|)``) the decrease the backtracking asks
    for can be below ``f``'s rounding, where it rejects good steps at random (it left
    a root of opt_quadratic:158 off by 3e-10): there a step that reduces ``‖∇f‖`` is
    taken too."""
    z = np.array(z, dtype=float)
    previous = np.inf
    for _ in range(iterations):
        f, grad, hess = model.value(z), model.grad(z), model.hess(z)
        step = -np.linalg.solve(hess, grad[..., None])[..., 0]
        slope = np.sum(grad * step, axis=1)
        near = -slope <= 1e-8 * (1 + np.abs(f))
        grad_norm = np.linalg.norm(grad, axis=1)
        t = np.ones(z.shape[0])
        for _ in range(60):
            with np.errstate(all="ignore"):
                moved = z + t[:, None] * step
                trial = model.value(moved)
                ok = trial <= f + 1e-4 * t * slope
                if near.any():  # (the gradient at the trials only where it is asked)
                    ok |= near & (np.linalg.norm(model.grad(moved), axis=1) < grad_norm)
                ok &= np.isfinite(trial)
            if ok.all():
                break
            t = np.where(ok, t, t / 2)
        z = z + t[:, None] * step
        size = float(np.max(np.abs(step) / (1 + np.abs(z))))
        if size <= 1e-15 or (size < 1e-9 and size > 0.5 * previous):
            break
        previous = size
    return z


def bounded_minimum(model: Objective64, start: Array, lower: Array, upper: Array) -> Array | None:
    """The minimiser of a convex objective in the box: scipy's L-BFGS-B per problem at
    tight tolerances, then :func:`polish`."""
    rows = []
    for b in range(start.shape[0]):

        def fun(v, b=b):
            point = start.copy()
            point[b] = v
            return float(model.value(point)[b]), model.grad(point)[b]

        sol = scipy.optimize.minimize(
            fun, np.clip(start[b], lower[b], upper[b]), jac=True, method="L-BFGS-B",
            bounds=list(zip(lower[b], upper[b])),
            options={"ftol": 1e-16, "gtol": 1e-14, "maxiter": 20_000, "maxfun": 40_000},
        )  # fmt: skip
        rows.append(sol.x)
    return polish(model, np.array(rows), lower, upper)


def refiner(model: Objective64, lower: Array, upper: Array, unique: Callable | None):
    """The instance's ``refiner``: the minimum (``unique()``, computed once when first
    needed, for a convex problem; else the strict local minimum near the library's
    answer), refused where its active set is degenerate."""
    cache: dict[str, Array | None] = {}

    def refine(inst: Instance, z: Array) -> Array | None:
        if unique is None:
            root = polish(model, z, lower, upper)
        else:
            if "root" not in cache:
                cache["root"] = unique()
            root = cache["root"]
        if root is not None and degenerate(model, root, lower, upper):
            raise Unchecked("degenerate active set at the minimum (the derivative jumps)")
        return root

    return refine


def degenerate(model: Objective64, z: Array, lower: Array, upper: Array) -> bool:
    """Whether the active set at the minimum ``z`` is degenerate (a held coordinate with
    a vanishing multiplier, or a free one on its bound): there the derivative jumps."""
    grad = model.grad(z)
    size = 1 + np.abs(model.hess(z)).max(axis=(1, 2))[:, None] * (1 + np.abs(z))
    on_bound = (z <= lower) | (z >= upper)
    return bool(np.any(on_bound & (np.abs(grad) <= 1e-7 * size)))


def draw_bounds(rng: np.random.Generator, center: Array, shape: tuple[int, ...], dtype):
    """A random box around ``center`` (``(B, n)``, the unconstrained minimiser): each
    coordinate free (``±inf`` or a wide bound), cut from below or above (the bound
    passes inside, so it is held at the minimum unless the coupling frees it), or
    boxed tightly. Returns the bounds for the front door (numbers, ``None`` or
    tensors, maybe requiring grad), as float64 ``(B, n)`` arrays, the shapes of the
    bound tensors that require grad, and the bound tensors by name."""
    rows, n = center.shape
    spread = 0.1 + np.abs(center)
    kind = rng.integers(0, 4, size=(rows, n))  # 0 free, 1 cut below, 2 cut above, 3 box
    lower = np.where(kind == 1, center + rng.uniform(0.05, 1, (rows, n)) * spread, -np.inf)
    upper = np.where(kind == 2, center - rng.uniform(0.05, 1, (rows, n)) * spread, np.inf)
    box = kind == 3
    width = rng.uniform(0.05, 0.5, (rows, n)) * spread
    shift = rng.uniform(-1, 1, (rows, n)) * spread
    lower = np.where(box, center + shift - width, lower)
    upper = np.where(box, center + shift + width, upper)
    wide = (kind == 0) & (rng.uniform(size=(rows, n)) < 0.3)
    lower = np.where(wide, center - 10 * spread, lower)
    style = str(rng.choice(("tensor_grad", "tensor", "number")))
    if style == "number":  # one number for all: the first problem's first finite bound
        lo = float(np.min(lower)) if np.isfinite(lower).any() else None
        hi = float(np.max(upper)) if np.isfinite(upper).any() else None
        lower64 = np.full((rows, n), -np.inf if lo is None else lo)
        upper64 = np.full((rows, n), np.inf if hi is None else hi)
        if lo is not None and hi is not None and lo > hi:
            lower64[:], lo = -np.inf, None
        return (lo, hi), (lower64, upper64), {}, {}
    grad = style == "tensor_grad"
    tensors, shapes = {}, {}
    for name, values in (("lower", lower), ("upper", upper)):
        t = param(name, values.reshape(shape), dtype) if grad else _plain(values, shape, dtype)
        tensors[name] = t
        if grad:
            shapes[name] = tuple(t.shape)
    lower64 = tensors["lower"].detach().double().numpy().reshape(rows, n)
    upper64 = tensors["upper"].detach().double().numpy().reshape(rows, n)
    params = tensors if grad else {}
    return (tensors["lower"], tensors["upper"]), (lower64, upper64), shapes, params


def _plain(values: Array, shape, dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.float64).reshape(shape)).to(dtype)


def instance(
    *,
    model: Objective64,
    bounds: tuple | None,
    bounds64: tuple[Array, Array] | None,
    bound_shapes: dict,
    minimum: Callable[[], Array | None] | None,
    **fields,
) -> Instance:
    """An :class:`Instance` of an optimisation form from its float64 objective;
    ``minimum()`` computes the unique minimiser (``None``: several minima)."""
    rows, n = np.shape(fields.pop("flat_z0"))
    lower, upper = bounds64 if bounds64 is not None else (
        np.full((rows, n), -np.inf), np.full((rows, n), np.inf),
    )  # fmt: skip
    residual64, jacobian64, vjp64 = condition(model, lower, upper, bound_shapes)
    return Instance(
        residual64=residual64,
        jacobian64=jacobian64,
        vjp64=vjp64,
        bounds=bounds,
        bounds64=(lower, upper) if bounds is not None else None,
        gradient64=model.grad,
        hessian64=model.hess,
        refiner=refiner(model, lower, upper, minimum),
        **fields,
    )
