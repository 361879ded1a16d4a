"""Nonlinear least squares for ``least_squares``: overdetermined, zero and nonzero
residual, with and without bounds.

* ``lsq_random``: ``r(z) = A z + α sin(B z + d) − y`` with ``m > n`` residuals (``A``
  captured, ``α`` and the data ``y`` explicit), data from a true ``z`` with or without
  noise;
* ``lsq_curve``: curve fits of ``m`` points: ``α exp(β t)`` and Michaelis–Menten's
  ``V s / (K + s)`` (whose pole at ``K = −s`` gives NaN and inf when an iterate
  wanders), the abscissae captured (they receive gradients), the data explicit;
* ``lsq_bounded``: ``lsq_random`` in a random box around the true ``z``.

The oracle's objective is ``½‖r‖²`` with the exact Hessian ``JᵀJ + Σ rₖ∇²rₖ``; the
minimum is the strict local minimum nearest the library's answer (several may exist).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from . import _optim
from ._base import (
    Array,
    as64,
    draw_batch,
    draw_dtype,
    draw_settings,
    draw_size,
    draw_tolerance,
    param,
    rng_for,
    tensor,
)

MAX_ITERS = (30, 100, 300)


@dataclasses.dataclass
class Residual64:
    """A residual vector in float64 numpy: ``r`` ``(B, m)``, ``J`` ``(B, m, n)``,
    ``curvature(z, u) = Σₖ uₖ∇²rₖ`` ``(B, n, n)``, and ``vjp(z, u, W)`` the derivative
    of ``θ ↦ (r, J)`` transposed, applied to the cotangents ``(u, W)``."""

    r: Callable[[Array], Array]
    jac: Callable[[Array], Array]
    curvature: Callable[[Array, Array], Array]
    vjp: Callable[[Array, Array, Array], dict[str, Array]]

    def objective(self) -> _optim.Objective64:
        """``½‖r‖²``: gradient ``Jᵀr``, Hessian ``JᵀJ + Σ rₖ∇²rₖ``; its gradient's
        parameter derivative ``(∂(Jᵀr)/∂θ)ᵀ w`` is the ``(r, J)`` one at ``(Jw, r wᵀ)``."""

        def grad_vjp(z, w):
            jac = self.jac(z)
            return self.vjp(z, np.einsum("bmn,bn->bm", jac, w), self.r(z)[:, :, None] * w[:, None])

        def hess(z):
            jac = self.jac(z)
            return np.einsum("bmi,bmj->bij", jac, jac) + self.curvature(z, self.r(z))

        return _optim.Objective64(
            value=lambda z: 0.5 * np.sum(self.r(z) ** 2, 1),
            grad=lambda z: np.einsum("bmn,bm->bn", self.jac(z), self.r(z)),
            hess=hess,
            grad_vjp=grad_vjp,
        )


def random_fit(family: str, seed: int, small: bool, *, bounded: bool):
    rng = rng_for(family, seed)
    n = draw_size(rng, small, 16, _optim.SMALL_SIZE)
    m = n + int(rng.integers(1, n + 6))
    batch = draw_batch(rng, small, 16, _optim.SMALL_BATCH)
    rows = batch or 1
    zshape, yshape = ((batch, n), (batch, m)) if batch else ((n,), (m,))
    dtype = draw_dtype(rng, 0.7)
    tol, max_iter, on_failure = draw_settings(
        rng, dtype, _optim.SMALL_ITERS if small else MAX_ITERS
    )
    tol, tol_mode = draw_tolerance(rng, tol, batch)
    a = rng.standard_normal((m, n)) / np.sqrt(m) * float(10 ** rng.uniform(-0.5, 1))
    b = rng.standard_normal((m, n))
    d = rng.uniform(-np.pi, np.pi, m)
    truth = rng.standard_normal((rows, n))
    noise = float(rng.choice((0.0, 0.0, 0.05, 0.5)))
    alpha_value = rng.uniform(0, 1.5)
    A = param("A", a, dtype)
    alpha_t = param("alpha", alpha_value, dtype)
    a64, alpha = as64(A), float(as64(alpha_t))
    # The data come from the drawn (unshifted) model: they stay put when the oracle
    # moves the parameters.
    data = truth @ a.T + alpha_value * np.sin(truth @ b.T + d)
    data = data + noise * rng.standard_normal((rows, m))
    y = param("y", data.reshape(yshape), dtype)
    y64 = as64(y).reshape(rows, m)
    bt, dt = torch.from_numpy(b).to(dtype), torch.from_numpy(d).to(dtype)

    def fun(z, alpha, y):
        return z @ A.T + alpha * torch.sin(z @ bt.T + dt) - y

    def vjp(z, u, W):
        u_ = z @ b.T + d
        return {
            "A": np.einsum("bm,bn->mn", u, z) + W.sum(0),
            "alpha": np.array(np.sum(u * np.sin(u_)) + np.sum(W * np.cos(u_)[:, :, None] * b)),
            "y": (-u).reshape(yshape),
        }

    model = Residual64(
        r=lambda z: z @ a64.T + alpha * np.sin(z @ b.T + d) - y64,
        jac=lambda z: a64[None] + alpha * np.cos(z @ b.T + d)[:, :, None] * b[None],
        curvature=lambda z, u: -alpha * np.einsum("mi,bm,mj->bij", b, u * np.sin(z @ b.T + d), b),
        vjp=vjp,
    ).objective()
    params = {"A": A, "alpha": alpha_t, "y": y}
    bounds = bounds64 = None
    shapes: dict = {}
    if bounded:
        bounds, bounds64, shapes, bound_params = _optim.draw_bounds(rng, truth, zshape, dtype)
        params.update(bound_params)
    spread = float(rng.choice((0.1, 1.0, 3.0)))
    z0 = truth + spread * rng.standard_normal((rows, n))
    return _optim.instance(
        model=model,
        bounds=bounds,
        bounds64=bounds64,
        bound_shapes=shapes,
        minimum=None,
        flat_z0=z0,
        family=family,
        seed=seed,
        form="least_squares",
        fn=fun,
        z0=tensor(z0.reshape(zshape), dtype),
        args=(alpha_t, y),
        params=params,
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        tol_mode=tol_mode,
        cotangent=tensor(rng.standard_normal(zshape), dtype),
        symmetric=not bounded,
        note=f"n={n} m={m} B={batch} {str(dtype)[6:]} alpha={alpha:.2f} noise={noise} "
        f"spread={spread}",
    )


def curve_fit(family: str, seed: int, small: bool):
    rng = rng_for(family, seed)
    kind = str(rng.choice(("exponential", "michaelis_menten")))
    m = int(rng.integers(4, 12 if small else 40))
    batch = draw_batch(rng, small, 16, _optim.SMALL_BATCH)
    rows = batch or 1
    zshape, yshape = ((batch, 2), (batch, m)) if batch else ((2,), (m,))
    dtype = draw_dtype(rng, 0.7)
    tol, max_iter, on_failure = draw_settings(
        rng, dtype, _optim.SMALL_ITERS if small else MAX_ITERS
    )
    tol, tol_mode = draw_tolerance(rng, tol, batch)
    if kind == "exponential":
        t_drawn = np.sort(rng.uniform(0, 2, m))
        truth = np.stack([rng.uniform(0.5, 3, rows), rng.uniform(-2, 1.5, rows)], 1)
    else:
        t_drawn = np.sort(rng.uniform(0.1, 5, m))
        truth = np.stack([rng.uniform(0.5, 3, rows), rng.uniform(0.2, 3, rows)], 1)
    t_t = param("t", t_drawn, dtype)
    curve = _exponential if kind == "exponential" else _michaelis_menten
    model_fn = curve(as64(t_t))
    clean = curve(t_drawn).values(truth)  # from the drawn abscissae (see random_fit)
    noise = float(rng.choice((0.0, 0.0, 0.02, 0.2)))
    y = param("y", (clean + noise * np.abs(clean) * rng.standard_normal((rows, m))).reshape(yshape),
              dtype)  # fmt: skip
    y64 = as64(y).reshape(rows, m)
    start = str(rng.choice(("ones", "near", "far")))
    z0 = {"ones": np.ones((rows, 2)), "near": truth * rng.uniform(0.8, 1.2, (rows, 2)),
          "far": truth * rng.uniform(0.1, 10, (rows, 2))}[start]  # fmt: skip

    def fun(z, y):
        return model_fn.torch(z, t_t) - y

    def vjp(z, u, W):
        dr, dj0, dj1 = model_fn.dt(z)
        out = np.sum(u * dr + W[:, :, 0] * dj0 + W[:, :, 1] * dj1, 0)
        return {"t": out, "y": (-u).reshape(yshape)}

    model = Residual64(
        r=lambda z: model_fn.values(z) - y64,
        jac=model_fn.jac,
        curvature=model_fn.curvature,
        vjp=vjp,
    ).objective()
    return _optim.instance(
        model=model,
        bounds=None,
        bounds64=None,
        bound_shapes={},
        minimum=None,
        flat_z0=z0,
        family=family,
        seed=seed,
        form="least_squares",
        fn=fun,
        z0=tensor(z0.reshape(zshape), dtype),
        args=(y,),
        params={"t": t_t, "y": y},
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        tol_mode=tol_mode,
        cotangent=tensor(rng.standard_normal(zshape), dtype),
        symmetric=True,
        note=f"{kind} m={m} B={batch} {str(dtype)[6:]} noise={noise} start={start}",
    )


@dataclasses.dataclass
class _Curve:
    """A model ``φ(z, t)`` of two parameters: values ``(B, m)``, Jacobian, curvature
    ``Σ uₖ∇²φₖ`` and ``dt(z)``: ``∂φₖ/∂tₖ`` and ``∂(∂φₖ/∂zⱼ)/∂tₖ`` for ``j = 0, 1``."""

    values: Callable
    jac: Callable
    curvature: Callable
    dt: Callable
    torch: Callable


def _symmetric2(off: Array, corner: Array) -> Array:
    """``(B, 2, 2)`` matrices ``[[0, off], [off, corner]]`` (the models are linear in
    their first parameter)."""
    return np.stack([np.stack([0 * off, off], 1), np.stack([off, corner], 1)], 1)


def _exponential(t: Array) -> _Curve:
    def parts(z):
        return z[:, :1], z[:, 1:], np.exp(z[:, 1:] * t)

    def jac(z):
        a, _, e = parts(z)
        return np.stack([e, a * t * e], 2)

    def curvature(z, u):
        a, _, e = parts(z)
        off = np.sum(u * t * e, 1)
        return np.stack(
            [np.stack([0 * off, off], 1), np.stack([off, np.sum(u * a * t**2 * e, 1)], 1)], 1
        )

    def dt(z):
        a, k, e = parts(z)
        return a * k * e, k * e, a * e * (1 + k * t)

    return _Curve(
        values=lambda z: z[:, :1] * np.exp(z[:, 1:] * t),
        jac=jac,
        curvature=curvature,
        dt=dt,
        torch=lambda z, tt: z[..., :1] * torch.exp(z[..., 1:] * tt),
    )


def _michaelis_menten(s: Array) -> _Curve:
    def parts(z):
        return z[:, :1], z[:, 1:], 1 / (z[:, 1:] + s)

    def jac(z):
        v, _, q = parts(z)
        return np.stack([s * q, -v * s * q**2], 2)

    def curvature(z, u):
        v, _, q = parts(z)
        off = np.sum(-u * s * q**2, 1)
        return np.stack(
            [np.stack([0 * off, off], 1), np.stack([off, np.sum(2 * u * v * s * q**3, 1)], 1)], 1
        )

    def dt(z):
        v, k, q = parts(z)
        return v * k * q**2, k * q**2, -v * (k - s) * q**3

    return _Curve(
        values=lambda z: z[:, :1] * s / (z[:, 1:] + s),
        jac=jac,
        curvature=curvature,
        dt=dt,
        torch=lambda z, ss: z[..., :1] * ss / (z[..., 1:] + ss),
    )


FAMILIES = {
    "lsq_random": lambda seed, small: random_fit("lsq_random", seed, small, bounded=False),
    "lsq_curve": lambda seed, small: curve_fit("lsq_curve", seed, small),
    "lsq_bounded": lambda seed, small: random_fit("lsq_bounded", seed, small, bounded=True),
}

DOORS = {name: ("least_squares",) for name in FAMILIES}
