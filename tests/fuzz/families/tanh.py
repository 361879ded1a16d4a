"""Fixed points of ``z = tanh(W z + x)`` (the seed's DEQ cell) and ``z = W z + x``.

Families: contractive (``‖W‖₂`` in [0.3, 0.95], one fixed point), divergent (``‖W‖₂``
in [1.05, 4]: several fixed points, Picard may oscillate), started at the fixed point
(nothing to do), started from infinite entries, in half precision, and the linear map
with a symmetric contraction ``W`` (``∂g/∂z = W − I`` is symmetric negative definite).
States are ``(n,)`` or ``(B, n)``, occasionally a tuple of two parts.
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
import torch
from torch import nn

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
    with_norm,
)

MAX_ITERS = (30, 100, 300)


class Cell(nn.Module):
    """``z ↦ act(z Wᵀ + x)``; a tuple state is two slices of the same vector."""

    def __init__(self, weight: torch.Tensor, split: int | None, linear: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.split = split
        self.linear = linear

    def forward(self, z, x):
        if self.split is not None:
            z = torch.cat(z, dim=-1)
        pre = z @ self.weight.T + x
        out = pre if self.linear else torch.tanh(pre)
        if self.split is not None:
            return out[..., : self.split], out[..., self.split :]
        return out


def _picard64(w: np.ndarray, x: np.ndarray, linear: bool) -> np.ndarray:
    """The unique fixed point of a contraction, by float64 Picard to machine precision
    (``linear``: by a direct solve, which the contraction makes well conditioned)."""
    if linear:
        return np.linalg.solve(np.eye(len(w)) - w, x.T).T
    z = np.zeros_like(x)
    for _ in range(100_000):
        z_new = np.tanh(z @ w.T + x)
        # To rounding: further steps only move the last bits back and forth.
        if np.max(np.abs(z_new - z)) <= 4e-16:
            break
        z = z_new
    for _ in range(3):
        z_new = np.tanh(z_new @ w.T + x)
    return z_new


def make(
    family: str,
    seed: int,
    small: bool,
    *,
    norms: tuple[float, float],
    start: str = "zeros",
    linear: bool = False,
    dtype: torch.dtype | None = None,
) -> Instance:
    """Draw ``z = tanh(W z + x)`` (or ``W z + x`` when ``linear``) with ``‖W‖₂`` in ``norms``.

    Args:
        start: ``"zeros"`` / ``"random"`` (drawn), ``"root"`` (the fixed point itself),
            ``"infinite"`` (some entries ±inf).
        dtype: forced dtype (half precision); drawn otherwise.
    """
    rng = rng_for(family, seed)
    n = draw_size(rng, small)
    batch = draw_batch(rng, small)
    dtype = dtype or draw_dtype(rng)
    norm = float(rng.uniform(*norms))
    if linear:  # symmetric, eigenvalues in (−norm, norm)
        q = orthogonal(rng, n)
        w = (q * rng.uniform(-norm, norm, n)) @ q.T
        w = (w + w.T) / 2
    else:
        w = with_norm(rng, n, norm)
    rows = batch or 1
    x = rng.standard_normal((rows, n)) * rng.uniform(0.2, 2.0)
    c = rng.standard_normal((rows, n))
    shape = (batch, n) if batch else (n,)
    split = int(rng.integers(1, n)) if n >= 2 and rng.uniform() < 0.15 else None
    tol, max_iter, on_failure = draw_settings(rng, dtype, MAX_ITERS)
    if dtype in (torch.float16, torch.bfloat16):
        tol = float(rng.choice((1e-2, 3e-2)))

    W = param("weight", w, dtype)
    xt = param("x", x.reshape(shape), dtype)
    w64, x64 = as64(W), as64(xt).reshape(rows, n)
    contractive = norms[1] < 1
    root = _picard64(w64, x64, linear) if contractive else None
    if start == "root":
        z0 = root.copy()
    elif start == "random":
        z0 = rng.standard_normal((rows, n))
    else:
        z0 = np.zeros((rows, n))
    if start == "infinite":
        mask = rng.uniform(size=(rows, n)) < 0.3
        mask.flat[int(rng.integers(mask.size))] = True
        z0 = np.where(mask, np.where(rng.uniform(size=(rows, n)) < 0.5, np.inf, -np.inf), z0)
    z0t = tensor(z0.reshape(shape), dtype)
    ct = tensor(c.reshape(shape), dtype)
    if split is not None:
        z0t = (z0t[..., :split].clone(), z0t[..., split:].clone())
        ct = (ct[..., :split].clone(), ct[..., split:].clone())

    cell = Cell(W, split, linear)
    act, dact = (lambda p: p, lambda p: np.ones_like(p)) if linear else (np.tanh, _dtanh)

    def residual64(z):
        return act(z @ w64.T + x64) - z

    def jacobian64(z):
        d = dact(z @ w64.T + x64)
        return d[:, :, None] * w64[None] - np.eye(n)

    def vjp64(z, wv):
        dw = dact(z @ w64.T + x64) * wv  # (∂g/∂pre)ᵀ w
        return {"weight": dw.T @ z, "x": dw.reshape(shape)}

    half = dtype in (torch.float16, torch.bfloat16)
    return Instance(
        family=family,
        seed=seed,
        form="fixed_point",
        fn=cell,
        z0=z0t,
        args=(xt,),
        params={"weight": cell.weight, "x": xt},
        batched=batch is not None,
        tol=tol,
        max_iter=max_iter,
        on_failure=on_failure,
        cotangent=ct,
        residual64=residual64,
        jacobian64=jacobian64,
        vjp64=vjp64,
        root64=root,
        blackbox=_blackbox(w64, n, batch, linear, contractive, shape, split),
        symmetric=linear,
        may_refuse=half or start == "infinite",
        check_gradient=not half,
        note=f"n={n} B={batch} {str(dtype)[6:]} ‖W‖={norm:.2f} split={split} start={start}",
    )


def _dtanh(pre: np.ndarray) -> np.ndarray:
    return 1 - np.tanh(pre) ** 2


def _root_near_zero(w64: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A fixed point of ``tanh(W z + x)`` by ``scipy.optimize.root`` from zero."""
    eye = np.eye(len(w64))
    return scipy.optimize.root(
        lambda v: np.tanh(w64 @ v + x) - v,
        np.zeros_like(x),
        jac=lambda v: _dtanh(w64 @ v + x)[:, None] * w64 - eye,
        method="hybr",
        options={"xtol": 1e-14},
    ).x


def _blackbox(w64, n, batch, linear, contractive, shape, split):
    """An independent solver of the fixed point for ``custom_root``: float64 Picard for
    a contraction, ``scipy.optimize.root`` per problem otherwise."""

    def solve(x):
        x64 = flat(x, batch is not None)
        if contractive:
            z = _picard64(w64, x64, linear)
        else:
            z = np.stack([_root_near_zero(w64, row) for row in x64])
        z = z.reshape(shape)
        return (z[..., :split], z[..., split:]) if split is not None else z

    return solve


FAMILIES = {
    "tanh_contractive": lambda seed, small: make(
        "tanh_contractive", seed, small, norms=(0.3, 0.95)
    ),
    "tanh_divergent": lambda seed, small: make("tanh_divergent", seed, small, norms=(1.05, 4.0)),
    "tanh_at_root": lambda seed, small: make(
        "tanh_at_root", seed, small, norms=(0.3, 0.95), start="root"
    ),
    "tanh_infinite_start": lambda seed, small: make(
        "tanh_infinite_start", seed, small, norms=(0.3, 0.95), start="infinite"
    ),
    "tanh_half": lambda seed, small: make(
        "tanh_half",
        seed,
        True,
        norms=(0.3, 0.8),
        dtype=(torch.float16, torch.bfloat16)[seed % 2],
    ),
    "linear_fixed_point": lambda seed, small: make(
        "linear_fixed_point", seed, small, norms=(0.3, 0.95), linear=True
    ),
}

#: The doors each family can be entered by.
DOORS = {
    "tanh_contractive": ("fixed_point", "root_solve", "deq", "custom_root"),
    "tanh_divergent": ("fixed_point", "root_solve", "deq", "custom_root"),
    "tanh_at_root": ("fixed_point", "root_solve", "deq"),
    "tanh_infinite_start": ("fixed_point", "root_solve", "deq"),
    "tanh_half": ("fixed_point", "deq"),
    "linear_fixed_point": ("fixed_point", "root_solve", "deq", "custom_root"),
}
