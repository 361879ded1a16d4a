"""What every family shares: the drawn problem (:class:`Instance`) and its float64 oracle.

A family draws one problem from ``(family, seed)`` alone (numpy's ``default_rng``
seeded by both), so a run is reproducible from those two numbers. The oracle never
calls ``implicit``: each family gives its residual and Jacobians in numpy float64, the
reference root comes from a closed form, a long float64 iteration, ``scipy.optimize``
at ``xtol=1e-14`` (``brentq`` for scalars), and the reference gradient of the fixed
linear functional ``L(z) = Σ c·z`` is the implicit function theorem computed densely:
``dL/dθ = −(∂g/∂θ)ᵀ w`` with ``(∂g/∂z)ᵀ w = c``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import scipy.optimize
import torch

State = torch.Tensor | tuple[torch.Tensor, ...]
Array = np.ndarray


class Unchecked(Exception):
    """The oracle declines to give a derivative (e.g. a degenerate active set, where
    the derivative jumps); the message says why."""


@dataclasses.dataclass
class Instance:
    """One random problem ``g(z, θ) = 0`` with its oracle.

    Attributes:
        family, seed: where it was drawn from.
        form: ``"fixed_point"`` (``fn(z, *args) = z``), ``"root"`` (``fn(z, *args) = 0``),
            ``"inverse"`` (``fn(z, *args) = y``), ``"minimize"`` (``fn`` the objective) or
            ``"least_squares"`` (``fn`` the residual vector): the problem the oracle knows.
            For the last two, the residual of the oracle is the optimality condition
            (the gradient, projected with bounds) and its Jacobian the Hessian's rows.
        fn: the user's function (an ``nn.Module`` where the DEQ door may use it).
        z0: the initial state (a tensor or a tuple of tensors).
        args: explicit arguments after ``z0`` (after ``y`` in the inverse form).
        params: every tensor whose gradient is checked, by name (explicit or captured).
        batched: dim 0 indexes independent problems.
        tol, max_iter, on_failure: the solve settings this problem is run with
            (``tol`` a number, or an array of one per problem).
        tol_mode: ``"absolute"``, ``"relative"`` or ``None`` (the front door's default).
        cotangent: ``c`` of ``L(z) = Σ c·z``, shaped like ``z``.
        residual64: ``g`` on the flat ``(B, n)`` view in float64 numpy.
        jacobian64: ``∂g/∂z`` at a flat point, ``(B, n, n)``.
        vjp64: ``(z, w) ↦ {name: (∂g/∂θ)ᵀ w}`` for every parameter, shaped like it.
        root64: the reference root ``(B, n)`` when it is unique (``None``: several roots;
            the oracle then refines the library's answer by scipy).
        y: the inverse form's target.
        blackbox: ``h(*detached_args) -> ndarray``: an independent solver for the
            ``custom_root`` and ``invert(inverse=)`` doors (``args`` of the root form:
            see :meth:`root_args`).
        symmetric: ``∂g/∂z`` is symmetric (CG may apply).
        may_refuse: a clear error (``ValueError``/``TypeError`` raised by ``implicit``)
            is an acceptable answer: the input is one the library may reject.
        check_gradient: whether the gradient has a reference at all.
        note: what was drawn, for reports.
        bounds: ``(lower, upper)`` as given to ``minimize``/``least_squares`` (numbers,
            ``None`` or tensors; tensors that require grad are among ``params``).
        bounds64: the bounds as float64 ``(B, n)`` arrays (``±inf`` for none).
        gradient64, hessian64: the objective's gradient ``(B, n)`` and Hessian
            ``(B, n, n)`` (optimisation forms), for the second-order test.
        solver_options: extra keyword arguments of the front door (the bracket of a
            bracketing solver: ``lower=``, ``upper=``).
        refiner: replaces :func:`refine` (optimisation forms: the minimum near ``z``,
            computed when first needed; it may raise :class:`Unchecked`).
    """

    family: str
    seed: int
    form: str
    fn: Callable[..., Any]
    z0: State
    args: tuple
    params: dict[str, torch.Tensor]
    batched: bool
    tol: float | Array
    max_iter: int
    on_failure: str
    cotangent: State
    residual64: Callable[[Array], Array]
    jacobian64: Callable[[Array], Array]
    vjp64: Callable[[Array, Array], dict[str, Array]]
    root64: Array | None = None
    y: torch.Tensor | None = None
    blackbox: Callable[..., Array] | None = None
    symmetric: bool = False
    may_refuse: bool = False
    check_gradient: bool = True
    note: str = ""
    bounds: tuple | None = None
    bounds64: tuple[Array, Array] | None = None
    gradient64: Callable[[Array], Array] | None = None
    hessian64: Callable[[Array], Array] | None = None
    solver_options: dict = dataclasses.field(default_factory=dict)
    refiner: Callable[[Instance, Array], Array | None] | None = None
    tol_mode: str | None = None

    @property
    def tol_max(self) -> float:
        """The loosest of the problems' tolerances."""
        return float(np.max(self.tol))

    def tol_argument(self) -> float | torch.Tensor:
        """``tol`` as the front door takes it: a number, or a float64 tensor ``(B,)``."""
        if np.ndim(self.tol) == 0:
            return float(self.tol)
        return torch.from_numpy(np.asarray(self.tol, dtype=np.float64))

    @property
    def dtype(self) -> torch.dtype:
        return (self.z0[0] if isinstance(self.z0, tuple) else self.z0).dtype

    def root_args(self) -> tuple:
        """The arguments of the residual as a root problem ``g(z, *root_args)``."""
        return (self.y, *self.args) if self.form == "inverse" else self.args

    def residual_fn(self) -> Callable[..., Any]:
        """``g`` for ``root_solve`` / ``custom_root``: ``f − z``, ``f − y`` or ``fn``."""
        fn = self.fn
        if self.form == "fixed_point":

            def g(z, *args):
                out = fn(z, *args)
                if isinstance(z, tuple):
                    return tuple(o - p for o, p in zip(out, z))
                return out - z

            return g
        if self.form == "inverse":
            return lambda z, y, *args: fn(z, *args) - y
        return fn


#: Shifts added to the drawn parameters (by name), for the oracle at ``θ + h v``.
_SHIFT: contextvars.ContextVar[dict[str, Array] | None] = contextvars.ContextVar(
    "shift", default=None
)


@contextlib.contextmanager
def shifted(shift: dict[str, Array]) -> Iterator[None]:
    """Draw problems whose parameters are moved by ``shift`` (name → array shaped like
    the parameter), everything else drawn alike: the oracle's root and gradient at
    ``θ + shift``, for central differences."""
    token = _SHIFT.set(shift)
    try:
        yield
    finally:
        _SHIFT.reset(token)


def param(name: str, array: Array, dtype: torch.dtype) -> torch.Tensor:
    """The parameter ``name`` (a tensor that requires grad) with values ``array``, moved
    by the shift of :func:`shifted` if one is set. What a family derives from its
    draws (data, boxes, brackets) must come from ``array``, not from this tensor, so
    that it stays put when the oracle moves the parameters."""
    array = np.array(array, dtype=np.float64)
    shift = (_SHIFT.get() or {}).get(name)
    if shift is not None:
        array = array + np.asarray(shift, dtype=np.float64).reshape(array.shape)
    return tensor(array, dtype, grad=True)


def rng_for(family: str, seed: int) -> np.random.Generator:
    """The generator a family draws ``(family, seed)`` from."""
    return np.random.default_rng([zlib.crc32(family.encode()), seed])


def flat(state: Any, batched: bool) -> Array:
    """A state (tensor, tuple or array) as a float64 ``(B, n)`` array, parts concatenated."""
    parts = state if isinstance(state, (tuple, list)) else (state,)
    arrays = [
        np.asarray(p.detach().double() if torch.is_tensor(p) else p, dtype=float) for p in parts
    ]
    rows = arrays[0].shape[0] if batched else 1
    return np.concatenate([a.reshape(rows, -1) for a in arrays], axis=1)


def tensor(array: Array, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    """``array`` as a tensor of ``dtype`` (from float64, so float32 rounds once)."""
    t = torch.from_numpy(np.array(array, dtype=np.float64)).to(dtype)
    return t.requires_grad_(grad)


def as64(t: torch.Tensor) -> Array:
    """The exact float64 values of a tensor (the oracle sees what the library sees)."""
    return t.detach().double().numpy().copy()


def draw_size(
    rng: np.random.Generator, small: bool, largest: int = 64, small_largest: int = 6
) -> int:
    """Log-uniform in ``[1, largest]`` (``[1, small_largest]`` for the fast sample)."""
    if small:
        return int(rng.integers(1, small_largest + 1))
    return int(np.clip(round(float(np.exp(rng.uniform(0, np.log(largest))))), 1, largest))


def draw_batch(
    rng: np.random.Generator, small: bool, largest: int = 16, small_largest: int = 3
) -> int | None:
    """``None`` (unbatched) with probability 0.3, else a batch size."""
    if rng.uniform() < 0.3:
        return None
    return int(rng.integers(1, (small_largest if small else largest) + 1))


def draw_settings(rng: np.random.Generator, dtype: torch.dtype, door_max_iter: tuple[int, ...]):
    """``tol``, ``max_iter`` and ``on_failure``: tight for float64, so that a gradient
    is accurate to 1e-6 where the problem is not ill-conditioned."""
    tols = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5, 1e-6)
    tol = float(rng.choice(tols))
    max_iter = int(rng.choice(door_max_iter))
    on_failure = "raise" if rng.uniform() < 0.3 else "warn"
    return tol, max_iter, on_failure


def draw_tolerance(rng: np.random.Generator, tol: float, batch: int | None):
    """``(tol, tol_mode)`` for the optimisation and bracketing families: the front
    door's default mode mostly, else ``"absolute"`` or ``"relative"``; for some
    batches one tolerance per problem (``tol`` or ten times it)."""
    mode = rng.choice(["default", "default", "default", "absolute", "relative"])
    if batch is not None and rng.uniform() < 0.25:
        tol = tol * 10.0 ** rng.integers(0, 2, batch)
    return tol, (None if mode == "default" else str(mode))


def draw_dtype(rng: np.random.Generator, p64: float = 0.6) -> torch.dtype:
    return torch.float64 if rng.uniform() < p64 else torch.float32


def orthogonal(rng: np.random.Generator, n: int) -> Array:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def with_norm(rng: np.random.Generator, n: int, norm: float) -> Array:
    """A random ``n × n`` matrix with spectral norm ``norm``."""
    w = rng.standard_normal((n, n))
    return w * (norm / np.linalg.norm(w, 2))


def refine(inst: Instance, z: Array) -> Array | None:
    """The root nearest the library's answer ``z`` (``(B, n)``), by scipy at
    ``xtol=1e-14`` per problem with the exact Jacobian; ``None`` when scipy fails."""
    out = np.empty_like(z)
    for b in range(z.shape[0]):

        def residual(v, b=b):
            point = z.copy()
            point[b] = v
            return inst.residual64(point)[b]

        def jac(v, b=b):
            point = z.copy()
            point[b] = v
            return inst.jacobian64(point)[b]

        if not np.all(np.isfinite(z[b])):
            return None
        sol = scipy.optimize.root(residual, z[b], jac=jac, method="hybr", options={"xtol": 1e-14})
        res = residual(sol.x)
        if not np.all(np.isfinite(res)) or np.linalg.norm(res) > 1e-11 * (
            1 + np.linalg.norm(sol.x)
        ):
            return None
        out[b] = sol.x
    return out


def reference_root(inst: Instance, z: Array) -> Array | None:
    """The oracle's root: the unique one, else the one nearest the answer ``z``."""
    if inst.root64 is not None:
        return inst.root64
    return (inst.refiner or refine)(inst, z)


def reference_gradient(
    inst: Instance, root: Array, cotangent: Array | None = None
) -> tuple[dict[str, Array], float]:
    """``dL/dθ`` at ``root`` by the implicit function theorem, and the worst condition
    number of ``∂g/∂z`` over the problems. ``L = Σ c·z`` with ``c`` the instance's
    cotangent, or ``cotangent`` (a flat ``(B, n)`` array)."""
    jac = inst.jacobian64(root)
    c = flat(inst.cotangent, inst.batched) if cotangent is None else cotangent
    w = np.linalg.solve(np.swapaxes(jac, 1, 2), c[..., None])[..., 0]
    cond = float(np.max(np.linalg.cond(jac)))
    return {k: -v for k, v in inst.vjp64(root, w).items()}, cond


def reference_tangent(inst: Instance, root: Array, tangents: dict[str, Array]) -> Array:
    """``dz = −(∂g/∂z)⁻¹ (∂g/∂θ) t`` at ``root`` (flat ``(B, n)``) for the tangents ``t``
    of some parameters (by name, shaped like them); ``(∂g/∂θ) t`` from the oracle's
    vector-Jacobian products with the unit vectors, one entry of ``g`` at a time."""
    rows, n = root.shape
    dg = np.zeros((rows, n))
    for b in range(rows):
        for k in range(n):
            unit = np.zeros((rows, n))
            unit[b, k] = 1.0
            parts = inst.vjp64(root, unit)
            dg[b, k] = sum(
                float(np.sum(np.broadcast_to(parts[name], np.shape(t)) * t))
                for name, t in tangents.items()
            )
    return -np.linalg.solve(inst.jacobian64(root), dg[..., None])[..., 0]
