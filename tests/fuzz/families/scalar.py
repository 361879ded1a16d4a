"""Kepler's equation and inverses of monotone maps: diagonal or symmetric Jacobians.

* Kepler: ``E − e sin E − M = 0`` with eccentricity ``e`` up to 0.99, as a 0-d
  scalar, one problem of ``k`` independent equations, or a batch. Analytic
  derivatives: ``dE/dM = 1/(1 − e cos E)``, ``dE/de = sin E/(1 − e cos E)``.
* Monotone inverses ``f(z) = y``: ``sinh(z)``, ``z + a z³`` (``a > 0``), and the coupled
  ``A z + sinh(z)`` with ``A`` symmetric positive definite (the gradient of a strictly
  convex function, so one root and a symmetric Jacobian).
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch

from ._base import (
    Instance,
    as64,
    draw_batch,
    draw_dtype,
    draw_settings,
    draw_size,
    flat,
    orthogonal,
    param,
    rng_for,
    tensor,
)

MAX_ITERS = (20, 50, 100)


def _brentq(fun, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Each scalar root of ``fun(i, x)`` bracketed by ``[lower_i, upper_i]``."""
    return np.array(
        [
            scipy.optimize.brentq(lambda x, i=i: fun(i, x), lo, hi, xtol=1e-15, rtol=1e-15)
            for i, (lo, hi) in enumerate(zip(lower.ravel(), upper.ravel()))
        ]
    ).reshape(lower.shape)


def _shape(rng, small: bool) -> tuple[tuple[int, ...], bool]:
    """``()`` (one scalar), ``(k,)`` unbatched (one problem), or ``(B,)`` batched."""
    u = rng.uniform()
    if u < 0.25:
        return (), False
    if u < 0.45:
        return (draw_size(rng, small),), False
    return (int(rng.integers(1, 4 if small else 65)),), True


def kepler(family: str, seed: int, small: bool) -> Instance:
    rng = rng_for(family, seed)
    shape, batched = _shape(rng, small)
    dtype = draw_dtype(rng)
    e_max = float(rng.choice((0.5, 0.9, 0.99)))
    e = param("e", rng.uniform(0, e_max, shape), dtype)
    M = param("M", rng.uniform(-np.pi, np.pi, shape), dtype)
    c = rng.standard_normal(shape)
    start = rng.choice(("M", "pi", "random"))
    z0 = {"M": as64(M), "pi": np.full(shape, np.pi), "random": rng.uniform(-4, 4, shape)}[start]
    tol, max_iter, on_failure = draw_settings(rng, dtype, MAX_ITERS)
    e64, m64 = as64(e).reshape(1, -1), as64(M).reshape(1, -1)
    if batched:
        e64, m64 = e64.T, m64.T
    root = _brentq(
        lambda i, x: x - e64.flat[i] * np.sin(x) - m64.flat[i], m64 - e64 - 1e-9, m64 + e64 + 1e-9
    )

    def residual64(z):
        return z - e64 * np.sin(z) - m64

    def jacobian64(z):
        return np.stack([np.diag(row) for row in 1 - e64 * np.cos(z)])

    def vjp64(z, w):
        return {"e": (-np.sin(z) * w).reshape(shape), "M": -w.reshape(shape)}

    def blackbox(e, M):
        e_, m_ = e.double().numpy(), M.double().numpy()
        return _brentq(
            lambda i, x: x - e_.flat[i] * np.sin(x) - m_.flat[i], m_ - e_ - 1e-9, m_ + e_ + 1e-9
        )

    return Instance(
        family=family,
        seed=seed,
        form="inverse",
        fn=lambda E, e: E - e * torch.sin(E),
        z0=tensor(z0, dtype),
        args=(e,),
        y=M,
        params={"e": e, "M": M},
        batched=batched,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        cotangent=tensor(c, dtype),
        residual64=residual64,
        jacobian64=jacobian64,
        vjp64=vjp64,
        root64=root,
        blackbox=lambda M, e: blackbox(e, M),
        symmetric=True,
        note=f"shape={shape} batched={batched} {str(dtype)[6:]} e<{e_max} start={start}",
    )


def monotone(family: str, seed: int, small: bool) -> Instance:
    rng = rng_for(family, seed)
    kind = str(rng.choice(("sinh", "cubic", "coupled")))
    n = draw_size(rng, small, 32)
    batch = draw_batch(rng, small)
    rows = batch or 1
    shape = (batch, n) if batch else (n,)
    dtype = draw_dtype(rng)
    y = param("y", rng.standard_normal(shape) * 10 ** rng.uniform(-1, 1.5), dtype)
    y64 = as64(y).reshape(rows, n)
    c = rng.standard_normal(shape)
    tol, max_iter, on_failure = draw_settings(rng, dtype, MAX_ITERS)
    params, args = {"y": y}, ()
    if kind == "sinh":
        fn = lambda z: torch.sinh(z)  # noqa: E731
        root = np.arcsinh(y64)
        jac_diag, vjp_extra = np.cosh, lambda z, w: {}
        blackbox = lambda y: np.arcsinh(y.double().numpy())  # noqa: E731
    elif kind == "cubic":
        a = param("a", 10 ** rng.uniform(-2, 1), dtype)
        a64 = float(as64(a))
        params, args = {"y": y, "a": a}, (a,)
        fn = lambda z, a: z + a * z**3  # noqa: E731
        bound = np.abs(y64) + 1e-9
        root = _brentq(lambda i, x: x + a64 * x**3 - y64.flat[i], -bound, bound)
        jac_diag = lambda z: 1 + 3 * a64 * z**2  # noqa: E731
        vjp_extra = lambda z, w: {"a": np.array(np.sum(z**3 * w))}  # noqa: E731

        def blackbox(y, a):
            y_, a_ = y.double().numpy(), float(a)
            b = np.abs(y_) + 1e-9
            return _brentq(lambda i, x: x + a_ * x**3 - y_.flat[i], -b, b)

    else:
        q = orthogonal(rng, n)
        a_mat = (q * np.logspace(-1, rng.uniform(0, 3), n)) @ q.T
        A = param("A", (a_mat + a_mat.T) / 2, dtype)
        a64 = as64(A)
        params = {"y": y, "A": A}
        fn = lambda z: z @ A.T + torch.sinh(z)  # noqa: E731
        root = _coupled_root(a64, y64)

        def blackbox(y):
            return _coupled_root(a64, flat(y, batch is not None)).reshape(shape)

        jac_diag, vjp_extra = None, lambda z, w: {"A": w.T @ z}

    def residual64(z):
        linear = z @ a64.T if kind == "coupled" else 0
        return (np.sinh(z) + linear if kind != "cubic" else z + a64 * z**3) - y64

    def jacobian64(z):
        if kind == "coupled":
            return a64[None] + np.stack([np.diag(np.cosh(row)) for row in z])
        return np.stack([np.diag(row) for row in jac_diag(z)])

    def vjp64(z, w):
        return {"y": -w.reshape(shape), **vjp_extra(z, w)}

    return Instance(
        family=family,
        seed=seed,
        form="inverse",
        fn=fn,
        z0=y.detach().clone(),
        args=args,
        y=y,
        params=params,
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        cotangent=tensor(c, dtype),
        residual64=residual64,
        jacobian64=jacobian64,
        vjp64=vjp64,
        root64=root,
        blackbox=blackbox,
        symmetric=True,
        note=f"{kind} n={n} B={batch} {str(dtype)[6:]} ‖y‖={np.linalg.norm(y64):.1e}",
    )


def _coupled_root(a64: np.ndarray, y64: np.ndarray) -> np.ndarray:
    """The root of ``A z + sinh(z) = y`` per row, by scipy at ``xtol=1e-14``."""
    rows = []
    for y in y64:
        sol = scipy.optimize.root(
            lambda z, y=y: a64 @ z + np.sinh(z) - y,
            np.arcsinh(y) / 2,
            jac=lambda z: a64 + np.diag(np.cosh(z)),
            method="hybr",
            options={"xtol": 1e-14},
        )
        rows.append(sol.x)
    return np.array(rows)


FAMILIES = {
    "kepler": lambda seed, small: kepler("kepler", seed, small),
    "monotone_inverse": lambda seed, small: monotone("monotone_inverse", seed, small),
}

DOORS = {
    "kepler": ("root_solve", "invert", "invert_inverse", "custom_root"),
    "monotone_inverse": ("root_solve", "invert", "invert_inverse", "custom_root"),
}
