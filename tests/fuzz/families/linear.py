"""Linear roots ``A z − b = 0``: symmetric positive definite and non-symmetric, with
condition numbers up to 1e8, in float32 and float64.

``A`` is captured by the residual (a closure variable), ``b`` is an explicit argument:
both receive gradients. In float32 the oracle solves the float32-rounded system
exactly (in float64), which may have lost definiteness at cond 1e8: that is part of
the test (CG must then say so).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

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


def make(family: str, seed: int, small: bool, *, symmetric: bool) -> Instance:
    rng = rng_for(family, seed)
    n = draw_size(rng, small)
    batch = draw_batch(rng, small)
    dtype = draw_dtype(rng, 0.5)
    cond = float(10 ** rng.uniform(0, 8))
    magnitude = float(10 ** rng.uniform(-1, 1))
    spectrum = np.logspace(0, np.log10(cond), n) * magnitude
    if symmetric:
        q = orthogonal(rng, n)
        a = (q * spectrum) @ q.T
        a = (a + a.T) / 2
    elif rng.uniform() < 0.3:  # well conditioned but far from normal
        a = magnitude * (np.eye(n) + 0.5 * rng.standard_normal((n, n)) / np.sqrt(n))
        cond = float(np.linalg.cond(a))
    else:
        a = (orthogonal(rng, n) * rng.permutation(spectrum)) @ orthogonal(rng, n).T
    rows = batch or 1
    shape = (batch, n) if batch else (n,)
    b = rng.standard_normal((rows, n)) * float(10 ** rng.uniform(-1, 1))
    c = rng.standard_normal((rows, n))
    tol, max_iter, on_failure = draw_settings(rng, dtype, MAX_ITERS)

    A = param("A", a, dtype)
    bt = param("b", b.reshape(shape), dtype)
    a64, b64 = as64(A), as64(bt).reshape(rows, n)
    root = scipy.linalg.solve(a64, b64.T).T
    start = rng.uniform()
    z0 = (
        root
        if start < 0.05
        else np.zeros_like(root)
        if start < 0.7
        else rng.standard_normal(root.shape)
    )

    def g(z, b):
        return z @ A.T - b

    def residual64(z):
        return z @ a64.T - b64

    def jacobian64(z):
        return np.broadcast_to(a64, (z.shape[0], n, n)).copy()

    def vjp64(z, w):
        return {"A": w.T @ z, "b": -w.reshape(shape)}

    def blackbox(b):
        return scipy.linalg.solve(a64, flat(b, batch is not None).T).T.reshape(shape)

    return Instance(
        family=family,
        seed=seed,
        form="root",
        fn=g,
        z0=tensor(z0.reshape(shape), dtype),
        args=(bt,),
        params={"A": A, "b": bt},
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        cotangent=tensor(c.reshape(shape), dtype),
        residual64=residual64,
        jacobian64=jacobian64,
        vjp64=vjp64,
        root64=root,
        blackbox=blackbox,
        symmetric=symmetric,
        note=f"n={n} B={batch} {str(dtype)[6:]} cond={cond:.1e} ‖A‖={np.linalg.norm(a, 2):.1e}",
    )


FAMILIES = {
    "linear_spd": lambda seed, small: make("linear_spd", seed, small, symmetric=True),
    "linear_nonsymmetric": lambda seed, small: make(
        "linear_nonsymmetric", seed, small, symmetric=False
    ),
}

DOORS = {
    "linear_spd": ("root_solve", "custom_root"),
    "linear_nonsymmetric": ("root_solve", "custom_root"),
}
