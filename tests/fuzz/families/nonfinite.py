"""Problems whose iterates leave the domain: NaN or inf mid-iteration.

* ``nan_root``: ``sqrt(z) − c`` (root ``c²``) or ``log(z) − c`` (root ``eᶜ``) from a
  large ``z0``: a full Newton step lands at ``z < 0``, where ``g`` is NaN. Its black
  box sometimes answers NaN for one problem.
* ``exp_overflow``: the fixed points of ``z = exp(a z) − 2`` (two per entry), from a
  start where ``exp`` overflows at once (``f(z0) = inf``) or after a few steps.
"""

from __future__ import annotations

import numpy as np
import torch

from ._base import (
    Instance,
    as64,
    draw_batch,
    draw_dtype,
    draw_settings,
    draw_size,
    param,
    rng_for,
    tensor,
)

MAX_ITERS = (20, 50, 100)


def nan_root(family: str, seed: int, small: bool) -> Instance:
    rng = rng_for(family, seed)
    kind = str(rng.choice(("sqrt", "log")))
    n = draw_size(rng, small, 16)
    batch = draw_batch(rng, small)
    rows = batch or 1
    shape = (batch, n) if batch else (n,)
    dtype = draw_dtype(rng)
    tol, max_iter, on_failure = draw_settings(rng, dtype, MAX_ITERS)
    if kind == "sqrt":
        c = param("c", rng.uniform(0.2, 2.0, shape), dtype)
        z0 = rng.uniform(5, 100, shape)
        fn = lambda z, c: torch.sqrt(z) - c  # noqa: E731
        inverse, _d_inverse = np.square, lambda c: 2 * c
        forward, d_forward = np.sqrt, lambda z: 0.5 / np.sqrt(z)
    else:
        c = param("c", rng.uniform(-1.0, 1.0, shape), dtype)
        z0 = rng.uniform(3, 50, shape)
        fn = lambda z, c: torch.log(z) - c  # noqa: E731
        inverse, _d_inverse = np.exp, np.exp
        forward, d_forward = np.log, lambda z: 1 / z
    c64 = as64(c).reshape(rows, n)
    # The black box fails on one problem, sometimes.
    poisoned = int(rng.integers(rows)) if rng.uniform() < 0.3 else None

    def residual64(z):
        with np.errstate(invalid="ignore", divide="ignore"):
            return forward(z) - c64

    def jacobian64(z):
        return np.stack([np.diag(row) for row in d_forward(z)])

    def vjp64(z, w):
        return {"c": -w.reshape(shape)}

    def blackbox(c):
        z = inverse(c.double().numpy()).reshape(rows, n)
        if poisoned is not None:
            z[poisoned] = np.nan
        return z.reshape(shape)

    return Instance(
        family=family,
        seed=seed,
        form="root",
        fn=fn,
        z0=tensor(z0, dtype),
        args=(c,),
        params={"c": c},
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        cotangent=tensor(rng.standard_normal(shape), dtype),
        residual64=residual64,
        jacobian64=jacobian64,
        vjp64=vjp64,
        root64=inverse(c64),
        blackbox=blackbox,
        symmetric=True,
        note=f"{kind} n={n} B={batch} {str(dtype)[6:]} blackbox_nan_row={poisoned}",
    )


def exp_overflow(family: str, seed: int, small: bool) -> Instance:
    rng = rng_for(family, seed)
    n = draw_size(rng, small, 16)
    batch = draw_batch(rng, small)
    rows = batch or 1
    shape = (batch, n) if batch else (n,)
    dtype = draw_dtype(rng)
    tol, max_iter, on_failure = draw_settings(rng, dtype, (30, 100))
    a = param("a", rng.uniform(0.5, 1.5, shape), dtype)
    start = str(rng.choice(("near", "overflow_later", "overflow_now")))
    if start == "near":
        z0 = rng.uniform(-3, 1, shape)
    elif start == "overflow_later":
        z0 = rng.uniform(2, 5, shape)
    else:
        z0 = rng.uniform(1, 5, shape)
        z0.flat[int(rng.integers(z0.size))] = 1000.0  # exp(a·1000) = inf in any dtype
    a64 = as64(a).reshape(rows, n)

    def residual64(z):
        with np.errstate(over="ignore"):
            return np.exp(a64 * z) - 2 - z

    def jacobian64(z):
        with np.errstate(over="ignore"):
            return np.stack([np.diag(row) for row in a64 * np.exp(a64 * z) - 1])

    def vjp64(z, w):
        with np.errstate(over="ignore", invalid="ignore"):
            return {"a": (z * np.exp(a64 * z) * w).reshape(shape)}

    return Instance(
        family=family,
        seed=seed,
        form="fixed_point",
        fn=lambda z, a: torch.exp(a * z) - 2,
        z0=tensor(z0, dtype),
        args=(a,),
        params={"a": a},
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        cotangent=tensor(rng.standard_normal(shape), dtype),
        residual64=residual64,
        jacobian64=jacobian64,
        vjp64=vjp64,
        root64=None,  # two fixed points per entry: the oracle refines the answer
        symmetric=True,
        note=f"n={n} B={batch} {str(dtype)[6:]} start={start}",
    )


FAMILIES = {
    "nan_root": lambda seed, small: nan_root("nan_root", seed, small),
    "exp_overflow": lambda seed, small: exp_overflow("exp_overflow", seed, small),
}

DOORS = {"nan_root": ("root_solve", "custom_root"), "exp_overflow": ("fixed_point", "root_solve")}
