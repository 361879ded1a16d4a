"""Strongly convex objectives for ``minimize``: quadratics and smooth perturbations.

``f(z) = ½ zᵀAz − bᵀz + p·φ(z)`` with ``A`` symmetric positive definite (captured by
the objective), ``b`` and ``p ≥ 0`` explicit arguments, and ``φ`` none,
``Σ log cosh zᵢ`` or ``Σ zᵢ⁴/4`` (convex, so the minimiser is unique):

* ``opt_quadratic``: condition numbers up to 1e3, every perturbation;
* ``opt_illcond``: condition numbers up to 1e8, a pure or mildly perturbed quadratic;
* ``opt_bounded``: a random box (:func:`~families._optim.draw_bounds`) with some
  coordinates held at the minimum; with a diagonal ``A`` (a clipped separable
  problem) the oracle is the closed form: each coordinate's 1-d minimiser (``b/a``,
  or a scalar root by ``brentq``) clipped into its interval.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch

from . import _optim
from ._base import (
    as64,
    draw_batch,
    draw_dtype,
    draw_settings,
    draw_size,
    draw_tolerance,
    orthogonal,
    param,
    rng_for,
    tensor,
)

MAX_ITERS = (50, 100, 300)
PERTURBATIONS = {
    # name: (φ, φ', φ'') in numpy, φ in torch
    "none": (lambda z: 0 * z, lambda z: 0 * z, lambda z: 0 * z, lambda z: 0 * z),
    "logcosh": (
        lambda z: np.logaddexp(z, -z) - np.log(2),
        np.tanh,
        lambda z: 1 - np.tanh(z) ** 2,
        # |z| + log1p(e^{−2|z|}): torch's logaddexp(z, −z) has a NaN second derivative
        # from |z| ≈ 44 in float32 (opt_nonfinite draws that one on purpose).
        lambda z: z.abs() + torch.log1p(torch.exp(-2 * z.abs())) - np.log(2),
    ),
    "quartic": (lambda z: z**4 / 4, lambda z: z**3, lambda z: 3 * z**2, lambda z: z**4 / 4),
}


def make(family: str, seed: int, small: bool, *, conds: tuple[float, float], bounded: bool):
    rng = rng_for(family, seed)
    n = draw_size(rng, small, 32, _optim.SMALL_SIZE)
    batch = draw_batch(rng, small, 16, _optim.SMALL_BATCH)
    rows = batch or 1
    shape = (batch, n) if batch else (n,)
    dtype = draw_dtype(rng, 0.6)
    kind = str(rng.choice(list(PERTURBATIONS) if conds[1] <= 3 else ["none", "none", "logcosh"]))
    separable = bounded and rng.uniform() < 0.4
    cond = float(10 ** rng.uniform(*conds))
    magnitude = float(10 ** rng.uniform(-1, 1))
    spectrum = np.logspace(0, np.log10(cond), n) * magnitude
    if separable:
        a = np.diag(rng.permutation(spectrum))
    else:
        q = orthogonal(rng, n)
        a = (q * spectrum) @ q.T
        a = (a + a.T) / 2
    b = rng.standard_normal((rows, n)) * float(10 ** rng.uniform(-1, 1))
    p = 0.0 if kind == "none" else float(rng.uniform(0, 2) * magnitude)
    tol, max_iter, on_failure = draw_settings(
        rng, dtype, _optim.SMALL_ITERS if small else MAX_ITERS
    )
    tol, tol_mode = draw_tolerance(rng, tol, batch)
    _, dphi, _, phi_t = PERTURBATIONS[kind]

    A = param("A", a, dtype)
    bt = param("b", b.reshape(shape), dtype)
    pt = param("p", p, dtype)
    a64, b64, p64 = as64(A), as64(bt).reshape(rows, n), float(as64(pt))

    def fun(z, b, p):
        return 0.5 * ((z @ A) * z).sum(-1) - (b * z).sum(-1) + p * phi_t(z).sum(-1)

    model = _model(a64, b64, p64, kind, shape)
    params = {"A": A, "b": bt, "p": pt}
    bounds = bounds64 = None
    shapes: dict = {}

    def unconstrained(model=model, a64=a64, b64=b64):
        return _optim.newton64(model, np.linalg.solve((a64 + a64.T) / 2, b64.T).T)

    minimum = unconstrained
    if bounded:
        # The box is drawn around the minimiser of the drawn (unshifted) problem, so
        # that it stays put when the oracle moves the parameters.
        center = unconstrained(_model(a, b, p, kind, shape), a, b)
        drawn = _optim.draw_bounds(rng, center, shape, dtype)
        bounds, bounds64, shapes, bound_params = drawn
        params.update(bound_params)
        if separable and np.count_nonzero(a64 - np.diag(np.diag(a64))) == 0:

            def minimum():
                return _separable_minimum(np.diag(a64), b64, p64, dphi, *bounds64)

        else:

            def minimum():
                return _optim.bounded_minimum(model, unconstrained(), *bounds64)

    start = str(rng.choice(("zeros", "random", "far")))
    z0 = {"zeros": np.zeros((rows, n)), "random": rng.standard_normal((rows, n)),
          "far": 100 * rng.standard_normal((rows, n))}[start]  # fmt: skip
    return _optim.instance(
        model=model,
        bounds=bounds,
        bounds64=bounds64,
        bound_shapes=shapes,
        minimum=minimum,
        flat_z0=z0,
        family=family,
        seed=seed,
        form="minimize",
        fn=fun,
        z0=tensor(z0.reshape(shape), dtype),
        args=(bt, pt),
        params=params,
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        tol_mode=tol_mode,
        cotangent=tensor(rng.standard_normal(shape), dtype),
        symmetric=not bounded,
        note=f"{kind} n={n} B={batch} {str(dtype)[6:]} cond={cond:.1e} p={p:.2g} "
        f"start={start}" + (f" separable={separable}" if bounded else ""),
    )


def _model(a64, b64, p64: float, kind: str, shape) -> _optim.Objective64:
    """``½ zᵀAz − bᵀz + p·φ(z)`` in float64 (``A`` through its symmetric part, as the
    user's ``½ zᵀAz`` sees it)."""
    phi, dphi, ddphi, _ = PERTURBATIONS[kind]
    sym = (a64 + a64.T) / 2

    def value(z):
        return 0.5 * np.einsum("bi,ij,bj->b", z, a64, z) - np.sum(b64 * z, 1) + p64 * phi(z).sum(1)

    def grad(z):
        return z @ sym - b64 + p64 * dphi(z)

    def hess(z):
        return sym[None] + p64 * np.stack([np.diag(d) for d in ddphi(z)])

    def grad_vjp(z, w):
        return {
            "A": 0.5 * (w.T @ z + z.T @ w),
            "b": -w.reshape(shape),
            "p": np.array(np.sum(dphi(z) * w)),
        }

    return _optim.Objective64(value, grad, hess, grad_vjp)


def _separable_minimum(diag, b64, p64, dphi, lower, upper):
    """Each coordinate's minimiser of ``½ aᵢzᵢ² − bᵢzᵢ + p φ(zᵢ)`` clipped into
    ``[lᵢ, uᵢ]`` (a convex function of one variable: its constrained minimiser is the
    clipped unconstrained one), the root of ``aᵢz + p φ'(z) − bᵢ`` by ``brentq``."""
    out = np.empty_like(b64)
    for index in np.ndindex(*b64.shape):
        a_i, b_i = diag[index[1]], b64[index]

        def slope(x, a_i=a_i, b_i=b_i):
            return a_i * x + p64 * dphi(np.array(x)) - b_i

        reach = abs(b_i) / a_i + 1
        root = scipy.optimize.brentq(slope, -reach, reach, xtol=1e-300, rtol=1e-15)
        out[index] = np.clip(root, lower[index], upper[index])
    return out


FAMILIES = {
    "opt_quadratic": lambda seed, small: make(
        "opt_quadratic", seed, small, conds=(0, 3), bounded=False
    ),
    "opt_illcond": lambda seed, small: make(
        "opt_illcond", seed, small, conds=(3, 8), bounded=False
    ),
    "opt_bounded": lambda seed, small: make("opt_bounded", seed, small, conds=(0, 3), bounded=True),
}

DOORS = {name: ("minimize",) for name in FAMILIES}
