"""Objectives where a careless minimiser stops at the wrong point or at NaN.

* ``opt_nonconvex``: a chain of double wells with Rosenbrock's coupling,
  ``f(z) = Σ aᵢ(zᵢ² − βᵢ)² + c Σ (zᵢ₊₁ − zᵢ²)²`` (coercive, many local minima).
  ``z = 0`` is a stationary point whose Hessian ``diag(−4aᵢβᵢ + 2c[i ≥ 1])`` has a
  negative entry (``β₀ > 0``): a maximum or a saddle. Started exactly there (the
  gradient test passes at once), a hair away from it, or at random: the library
  promises a local minimum, never a maximum or a saddle.
* ``opt_nonfinite``: convex objectives with a domain, coupled by ``½μ Σ (zᵢ − zᵢ₊₁)²``:
  ``Σ zᵢ − cᵢ log zᵢ`` and ``Σ zᵢ − 2cᵢ√zᵢ`` from far right (a full Newton step lands at
  ``z < 0``: NaN), ``Σ exp(aᵢzᵢ) − bᵢzᵢ`` from where ``exp`` overflows later, or at once
  (an infinite objective at ``z0``: status ``"nonfinite"``), and
  ``Σ log cosh zᵢ − cᵢzᵢ`` written with ``torch.logaddexp(z, −z)``, whose second
  derivative PyTorch computes as NaN from ``|z| ≈ 44`` in float32 (``≈ 355`` in
  float64): a finite objective and gradient with a NaN Hessian, from far away.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _optim
from ._base import (
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

MAX_ITERS = (50, 100, 300)


def nonconvex(family: str, seed: int, small: bool):
    rng = rng_for(family, seed)
    n = draw_size(rng, small, 16, _optim.SMALL_SIZE)
    batch = draw_batch(rng, small, 16, _optim.SMALL_BATCH)
    rows = batch or 1
    shape = (batch, n) if batch else (n,)
    dtype = draw_dtype(rng, 0.7)
    beta = np.where(rng.uniform(size=n) < 0.8, rng.uniform(0.5, 2, n), rng.uniform(-1, -0.1, n))
    beta[0] = abs(beta[0]) + 0.5
    tol, max_iter, on_failure = draw_settings(
        rng, dtype, _optim.SMALL_ITERS if small else MAX_ITERS
    )
    tol, tol_mode = draw_tolerance(rng, tol, batch)
    a_t = param("a", rng.uniform(0.5, 2, n), dtype)
    beta_t = param("beta", beta, dtype)
    c_t = param("c", rng.uniform(0, 0.5), dtype)
    a, bt, c = as64(a_t), as64(beta_t), float(as64(c_t))
    start = str(rng.choice(("maximum", "near", "random")))
    z0 = {"maximum": np.zeros((rows, n)), "near": 1e-7 * rng.standard_normal((rows, n)),
          "random": rng.uniform(-2, 2, (rows, n))}[start]  # fmt: skip

    def fun(z, beta, c):
        wells = (a_t * (z**2 - beta) ** 2).sum(-1)
        return wells + c * ((z[..., 1:] - z[..., :-1] ** 2) ** 2).sum(-1)

    def value(z):
        return np.sum(a * (z**2 - bt) ** 2, 1) + c * np.sum((z[:, 1:] - z[:, :-1] ** 2) ** 2, 1)

    def coupling_grad(z):  # ∂/∂z of Σ (zᵢ₊₁ − zᵢ²)², without c
        out = np.zeros_like(z)
        link = z[:, 1:] - z[:, :-1] ** 2
        out[:, :-1] += -4 * z[:, :-1] * link
        out[:, 1:] += 2 * link
        return out

    def grad(z):
        return 4 * a * z * (z**2 - bt) + c * coupling_grad(z)

    def hess(z):
        diag = 12 * a * z**2 - 4 * a * bt
        diag[:, :-1] += c * (-4 * z[:, 1:] + 12 * z[:, :-1] ** 2)
        diag[:, 1:] += 2 * c
        out = np.stack([np.diag(d) for d in diag])
        for i in range(n - 1):
            out[:, i, i + 1] = out[:, i + 1, i] = -4 * c * z[:, i]
        return out

    def grad_vjp(z, w):
        return {
            "a": np.sum(4 * z * (z**2 - bt) * w, 0),
            "beta": np.sum(-4 * a * z * w, 0),
            "c": np.array(np.sum(coupling_grad(z) * w)),
        }

    model = _optim.Objective64(value, grad, hess, grad_vjp)
    return _optim.instance(
        model=model,
        bounds=None,
        bounds64=None,
        bound_shapes={},
        minimum=None,  # many minima: the oracle polishes the library's answer
        flat_z0=z0,
        family=family,
        seed=seed,
        form="minimize",
        fn=fun,
        z0=tensor(z0.reshape(shape), dtype),
        args=(beta_t, c_t),
        params={"a": a_t, "beta": beta_t, "c": c_t},
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        tol_mode=tol_mode,
        cotangent=tensor(rng.standard_normal(shape), dtype),
        symmetric=True,  # the Hessian at a minimum is positive semi-definite
        note=f"n={n} B={batch} {str(dtype)[6:]} c={c:.2f} start={start}",
    )


def nonfinite(family: str, seed: int, small: bool):
    rng = rng_for(family, seed)
    kind = str(rng.choice(("log", "sqrt", "exp", "logcosh")))
    n = draw_size(rng, small, 16, _optim.SMALL_SIZE)
    batch = draw_batch(rng, small, 16, _optim.SMALL_BATCH)
    rows = batch or 1
    shape = (batch, n) if batch else (n,)
    dtype = draw_dtype(rng, 0.7)
    tol, max_iter, on_failure = draw_settings(
        rng, dtype, _optim.SMALL_ITERS if small else MAX_ITERS
    )
    tol, tol_mode = draw_tolerance(rng, tol, batch)
    low, high = (-0.9, 0.9) if kind == "logcosh" else (0.5, 3)
    c_t = param("c", rng.uniform(low, high, shape), dtype)
    mu_t = param("mu", rng.uniform(0, 1) if rng.uniform() < 0.7 else 0.0, dtype)
    c, mu = as64(c_t).reshape(rows, n), float(as64(mu_t))
    if kind == "exp":
        a_t = param("a", rng.uniform(0.5, 2, shape), dtype)
        a = as64(a_t).reshape(rows, n)
        z0 = rng.uniform(5, 30, (rows, n)) / a
        if rng.uniform() < 0.3:
            z0.flat[int(rng.integers(z0.size))] = 1000.0  # exp(1000 a) = inf in any dtype
        separable = np.log(c / a) / a
    elif kind == "logcosh":
        a_t, a = None, None
        z0 = rng.choice((-1, 1), (rows, n)) * rng.uniform(20, 1000, (rows, n))
        separable = np.arctanh(c)
    else:
        a_t, a = None, None
        z0 = rng.uniform(20, 200, (rows, n))
        separable = c if kind == "log" else c**2

    def chain(z):  # ∇ of ½ Σ (zᵢ − zᵢ₊₁)²: the path graph's Laplacian times z
        out = np.zeros_like(z)
        diff = z[:, :-1] - z[:, 1:]
        out[:, :-1] += diff
        out[:, 1:] -= diff
        return out

    laplacian = np.zeros((n, n))
    for i in range(n - 1):
        laplacian[np.ix_([i, i + 1], [i, i + 1])] += np.array([[1, -1], [-1, 1]])

    def torch_chain(z):
        return 0.5 * ((z[..., :-1] - z[..., 1:]) ** 2).sum(-1)

    if kind == "log":

        def fun(z, c, mu):
            return (z - c * torch.log(z)).sum(-1) + mu * torch_chain(z)

        terms = (lambda z: z - c * np.log(z), lambda z: 1 - c / z, lambda z: c / z**2)
        dgrad_dc = lambda z: -1 / z  # noqa: E731
    elif kind == "sqrt":

        def fun(z, c, mu):
            return (z - 2 * c * torch.sqrt(z)).sum(-1) + mu * torch_chain(z)

        terms = (
            lambda z: z - 2 * c * np.sqrt(z),
            lambda z: 1 - c / np.sqrt(z),
            lambda z: 0.5 * c / z**1.5,
        )
        dgrad_dc = lambda z: -1 / np.sqrt(z)  # noqa: E731
    elif kind == "logcosh":

        def fun(z, c, mu):
            return (torch.logaddexp(z, -z) - c * z).sum(-1) + mu * torch_chain(z)

        terms = (
            lambda z: np.logaddexp(z, -z) - c * z,
            lambda z: np.tanh(z) - c,
            lambda z: 1 - np.tanh(z) ** 2,
        )
        dgrad_dc = lambda z: -np.ones_like(z)  # noqa: E731
    else:

        def fun(z, c, mu, a):
            return (torch.exp(a * z) - c * z).sum(-1) + mu * torch_chain(z)

        terms = (
            lambda z: np.exp(a * z) - c * z,
            lambda z: a * np.exp(a * z) - c,
            lambda z: a**2 * np.exp(a * z),
        )
        dgrad_dc = lambda z: -np.ones_like(z)  # noqa: E731

    def value(z):
        with np.errstate(all="ignore"):
            return np.sum(terms[0](z), 1) + mu * 0.5 * np.sum((z[:, :-1] - z[:, 1:]) ** 2, 1)

    def grad(z):
        with np.errstate(all="ignore"):
            return terms[1](z) + mu * chain(z)

    def hess(z):
        with np.errstate(all="ignore"):
            return np.stack([np.diag(d) for d in terms[2](z)]) + mu * laplacian

    def grad_vjp(z, w):
        with np.errstate(all="ignore"):
            out = {"c": (dgrad_dc(z) * w).reshape(shape), "mu": np.array(np.sum(chain(z) * w))}
            if kind == "exp":
                out["a"] = ((1 + a * z) * np.exp(a * z) * w).reshape(shape)
        return out

    model = _optim.Objective64(value, grad, hess, grad_vjp)
    params = {"c": c_t, "mu": mu_t, **({"a": a_t} if a_t is not None else {})}
    return _optim.instance(
        model=model,
        bounds=None,
        bounds64=None,
        bound_shapes={},
        minimum=lambda: _optim.newton64(model, separable),
        flat_z0=z0,
        family=family,
        seed=seed,
        form="minimize",
        fn=fun,
        z0=tensor(z0.reshape(shape), dtype),
        args=tuple(params.values()),
        params=params,
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        tol_mode=tol_mode,
        cotangent=tensor(rng.standard_normal(shape), dtype),
        symmetric=True,
        note=f"{kind} n={n} B={batch} {str(dtype)[6:]} mu={mu:.2f} ‖z0‖∞={np.abs(z0).max():.3g}",
    )


FAMILIES = {
    "opt_nonconvex": lambda seed, small: nonconvex("opt_nonconvex", seed, small),
    "opt_nonfinite": lambda seed, small: nonfinite("opt_nonfinite", seed, small),
}

DOORS = {name: ("minimize",) for name in FAMILIES}
