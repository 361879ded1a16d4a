"""Scalar monotone roots for the bracketing solvers (``solver="bisection"`` and
``"chandrupatla"`` with ``lower=``, ``upper=``), batched or one 0-d problem.

``g(z) = z + a z³ − y``, ``sinh z − y``, ``tanh z − y`` (flat tails) or Kepler's
``z − e sin z − y``, all increasing in ``z``. The bracket around each root is drawn
at random; some draws do not bracket the root of one problem (status ``"failed"``
with ``on_failure``) or cross their ends (``lower > upper``: a clear error). The
oracle is ``brentq`` and the derivative ``−(∂g/∂θ)/(∂g/∂z)``.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch

from ._base import Instance, as64, draw_dtype, draw_settings, draw_tolerance, param, rng_for, tensor

MAX_ITERS = (30, 60, 200)
KINDS = {
    # name: (g in torch, g in numpy, ∂g/∂z, {parameter: ∂g/∂parameter})
    "cubic": (
        lambda z, y, a: z + a * z**3 - y,
        lambda z, y, a: z + a * z**3 - y,
        lambda z, y, a: 1 + 3 * a * z**2,
        {"a": lambda z, y, a: z**3},
    ),
    "sinh": (
        lambda z, y, a: torch.sinh(z) - y,
        lambda z, y, a: np.sinh(z) - y,
        lambda z, y, a: np.cosh(z),
        {},
    ),
    "tanh": (
        lambda z, y, a: torch.tanh(z) - y,
        lambda z, y, a: np.tanh(z) - y,
        lambda z, y, a: 1 - np.tanh(z) ** 2,
        {},
    ),
    "kepler": (
        lambda z, y, a: z - a * torch.sin(z) - y,
        lambda z, y, a: z - a * np.sin(z) - y,
        lambda z, y, a: 1 - a * np.cos(z),
        {"a": lambda z, y, a: -np.sin(z)},
    ),
}


def make(family: str, seed: int, small: bool) -> Instance:
    rng = rng_for(family, seed)
    kind = str(rng.choice(list(KINDS)))
    batched = rng.uniform() < 0.7
    shape = (int(rng.integers(1, 4 if small else 65)),) if batched else ()
    rows = shape[0] if batched else 1
    dtype = draw_dtype(rng, 0.6)
    tol, max_iter, on_failure = draw_settings(rng, dtype, MAX_ITERS)
    tol, tol_mode = draw_tolerance(rng, tol, (shape[0] if batched else None))
    g_t, g64, dg_dz, dg_dp = KINDS[kind]
    if kind == "tanh":
        y = param("y", rng.uniform(-0.99, 0.99, shape), dtype)
    else:
        y = param("y", rng.standard_normal(shape) * 10 ** rng.uniform(-1, 1.5), dtype)
    a_value = {"cubic": 10 ** rng.uniform(-2, 1), "kepler": rng.uniform(0, 0.99)}.get(kind, 0.0)
    a_t = param("a", a_value, dtype)
    y64, a64 = as64(y).reshape(rows), float(as64(a_t))
    roots = np.array([_root(g64, yi, a64) for yi in y64])
    width = 1 + np.abs(roots)
    lower = roots - rng.uniform(0.01, 3, rows) * width
    upper = roots + rng.uniform(0.01, 3, rows) * width
    bracket = str(rng.choice(("brackets",) * 6 + ("misses", "crossed")))
    if bracket == "misses":  # one problem's bracket lies right of its root
        i = int(rng.integers(rows))
        lower[i] = roots[i] + 0.5 * width[i]
        upper[i] = lower[i] + rng.uniform(0.01, 3) * width[i]
    elif bracket == "crossed":
        i = int(rng.integers(rows))
        lower[i], upper[i] = upper[i], lower[i]
    if batched and rng.uniform() < 0.6:
        lo, hi = tensor(lower.reshape(shape), dtype), tensor(upper.reshape(shape), dtype)
    elif bracket == "brackets":  # one pair of numbers for every problem
        lo, hi = float(lower.min()), float(upper.max())
    else:
        lo, hi = float(lower[0]), float(upper[0])
    c = rng.standard_normal(shape)

    def residual64(z):
        return g64(z, y64[:, None], a64)

    def jacobian64(z):
        return dg_dz(z, y64[:, None], a64)[:, :, None]

    def vjp64(z, w):
        out = {"y": (-w).reshape(shape)}
        for name, derivative in dg_dp.items():
            out[name] = np.array(np.sum(derivative(z, y64[:, None], a64) * w))
        return {**{"a": np.array(0.0)}, **out}

    return Instance(
        family=family,
        seed=seed,
        form="root",
        fn=lambda z, y, a: g_t(z, y, a),
        z0=torch.zeros(shape, dtype=dtype),
        args=(y, a_t),
        params={"y": y, "a": a_t},
        batched=batched,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        tol_mode=tol_mode,
        cotangent=tensor(c, dtype),
        residual64=residual64,
        jacobian64=jacobian64,
        vjp64=vjp64,
        root64=roots[:, None],
        symmetric=True,
        may_refuse=bracket == "crossed",
        solver_options={"lower": lo, "upper": hi},
        note=f"{kind} shape={shape} {str(dtype)[6:]} bracket={bracket}",
    )


def _root(g64, y: float, a: float) -> float:
    """The root of the increasing ``g`` by ``brentq``, its bracket grown until it holds."""
    reach = 1.0
    while g64(-reach, y, a) > 0 or g64(reach, y, a) < 0:
        reach *= 2
    return scipy.optimize.brentq(lambda x: g64(x, y, a), -reach, reach, xtol=1e-300, rtol=1e-15)


FAMILIES = {"bracket_monotone": lambda seed, small: make("bracket_monotone", seed, small)}
DOORS = {"bracket_monotone": ("root_solve",)}
