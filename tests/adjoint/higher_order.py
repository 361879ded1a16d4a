"""Problems, references and checks shared by the higher-order tests in this folder.

References: closed forms (a linear system, the cubic ``z³ + a z = y``), plain autograd
through long unrolled float64 iterations, central finite differences, and the
reverse-mode Jacobian.

``IMPLICIT_WORST_ERRORS=path.json pytest tests/adjoint`` writes the worst relative error
of every check made by ``assert_close`` to ``path.json``.
"""

from __future__ import annotations

import json
import os
import pathlib

import scipy.linalg
import torch
import torch.autograd.forward_ad as forward_ad
from conftest import TIGHT, TanhProblem, contractive_matrix, rel_err, unrolled_fixed_point

import implicit

F64 = torch.float64

WORST: dict[str, float] = {}


def assert_close(check: str, got: torch.Tensor, want: torch.Tensor, bound: float) -> None:
    """``rel_err(got, want) <= bound``, remembering the worst error of each check."""
    error = rel_err(got, want)
    WORST[check] = max(WORST.get(check, 0.0), error)
    assert error <= bound, f"{check}: relative error {error:.2e} > {bound:.0e}"


def write_worst_errors() -> None:
    """Write ``WORST`` (every check's so far, across modules) where
    ``IMPLICIT_WORST_ERRORS`` says; each test module calls it from its teardown."""
    path = os.environ.get("IMPLICIT_WORST_ERRORS")
    if path:
        pathlib.Path(path).write_text(json.dumps(WORST, indent=1, sort_keys=True))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- problems with closed forms ---------------------------------------------------------


class Cubic:
    """``z³ + a z = y`` elementwise, ``a > 0``: one real root with closed-form derivatives.

    With ``p = 1 / (3z² + a)``: ``z' = p``, ``z'' = −6 z p³``, ``z''' = −6 p⁴ + 108 z² p⁵``
    (derivatives in ``y``), and ``∂z/∂a = −z p``.
    """

    def __init__(self, n: int = 3):
        self.y = torch.linspace(-0.8, 1.3, n, dtype=F64)
        self.a = torch.tensor(1.5, dtype=F64)

    @staticmethod
    def f(z, a):
        return z**3 + a * z

    def root(self, y=None, a=None):
        y = self.y if y is None else y
        a = self.a if a is None else a
        return implicit.invert(self.f, y.detach(), a.detach(), **TIGHT)

    def derivatives(self):
        z = self.root()
        p = 1 / (3 * z**2 + self.a)
        return z, p, -6 * z * p**3, -6 * p**4 + 108 * z**2 * p**5


class Linear:
    """``A z = b`` with a well-conditioned ``A``; the reference is ``torch.linalg.solve``."""

    def __init__(self, n: int = 4, seed: int = 0):
        m = torch.randn(n, n, generator=generator(seed), dtype=F64)
        self.A = m + n * torch.eye(n, dtype=F64)
        self.b = torch.randn(n, generator=generator(seed + 1), dtype=F64)

    @staticmethod
    def g(z, A, b):
        return A @ z - b


def spd_energy(n: int = 4, seed: int = 0):
    """``g = ∇E`` for the convex ``E(z) = ½ zᵀQz − bᵀz + λ Σ softplus(z)``: ∂g/∂z is SPD."""
    m = torch.randn(n, n, generator=generator(seed), dtype=F64)
    q = m @ m.T + n * torch.eye(n, dtype=F64)
    b = torch.randn(n, generator=generator(seed + 1), dtype=F64)
    lam = torch.tensor(0.7, dtype=F64)

    def energy(z, b, lam):
        return 0.5 * z @ q @ z - b @ z + lam * torch.nn.functional.softplus(z).sum()

    def hessian(z, lam):
        s = torch.sigmoid(z)
        return q + lam * torch.diag(s * (1 - s))

    return torch.func.grad(energy), b, lam, hessian


# -- the four front doors, each with its reference ---------------------------------------


def front_door_cases():
    """``(name, solve(*params), reference(*params), params)``: ``solve`` goes through the
    front door, ``reference`` is plain autograd on a closed form or unrolled iterations."""
    p = TanhProblem(n=4, batch=1)
    w, x = p.W.detach(), p.x.detach()[0]
    lin = Linear()
    cubic = Cubic()

    def fixed_point(x, w):
        z0 = torch.zeros(x.shape, dtype=F64)
        return implicit.fixed_point(lambda z, x, w: torch.tanh(w @ z + x), z0, x, w, **TIGHT)

    def fixed_point_ref(x, w):
        return unrolled_fixed_point(
            lambda z: torch.tanh(w @ z + x), torch.zeros(x.shape, dtype=F64)
        )

    def root_solve(A, b):
        return implicit.root_solve(Linear.g, torch.zeros_like(b), A, b, **TIGHT)

    def invert(y, a):
        return implicit.invert(Cubic.f, y, a, **TIGHT)

    def invert_ref(y, a):
        # Newton on the cubic, unrolled (converged to machine precision well before 60).
        z = y.detach().clone()
        for _ in range(60):
            z = z - (z**3 + a * z - y) / (3 * z**2 + a)
        return z

    solve_scipy = implicit.custom_root(Linear.g, tol=1e-12)(
        lambda A, b: scipy.linalg.solve(A.numpy(), b.numpy())
    )
    return [
        ("fixed_point", fixed_point, fixed_point_ref, (x, w)),
        ("root_solve", root_solve, torch.linalg.solve, (lin.A, lin.b)),
        ("invert", invert, invert_ref, (cubic.y, cubic.a)),
        ("custom_root", solve_scipy, torch.linalg.solve, (lin.A, lin.b)),
    ]


CASES = {case[0]: case for case in front_door_cases()}


# -- a tanh fixed point, unbatched and batched, with its unrolled reference --------------


def tanh_fixed_point(backward="dense", captured=False, n=4, solver="fixed_point"):
    """``x ↦ z*`` for ``z = tanh(W z + x)`` and its unrolled reference."""
    w = contractive_matrix(n, 0.5)
    z0 = torch.zeros(n, dtype=F64)
    if captured:

        def solve(x):
            return implicit.fixed_point(
                lambda z: torch.tanh(w @ z + x), z0, solver=solver, backward=backward, **TIGHT
            )

    else:

        def solve(x):
            return implicit.fixed_point(
                lambda z, x: torch.tanh(w @ z + x), z0, x, solver=solver, backward=backward, **TIGHT
            )

    def reference(x):
        return unrolled_fixed_point(lambda z: torch.tanh(w @ z + x), z0)

    x = torch.randn(n, generator=generator(5), dtype=F64)
    return solve, reference, x, w


def dual_jvp(fn, x, tangent):
    with forward_ad.dual_level():
        out = fn(forward_ad.make_dual(x, tangent))
        return forward_ad.unpack_dual(out).tangent


def batched_problem(batch=2, n=3):
    w = contractive_matrix(n, 0.6)
    x = torch.randn(batch, n, generator=generator(21), dtype=F64)
    return w, x


def tanh_map(z, x, w):
    return torch.tanh(z @ w.T + x)


def batched_solve(**options):
    """``(x, w) ↦ z*`` with ``z* = tanh_map(z*, x, w)``, by implicit (batched, tight)."""

    def solve(x, w):
        return implicit.fixed_point(
            tanh_map, torch.zeros_like(x), x, w, batched=True, **options, **TIGHT
        )

    return solve


def batched_reference(x, w):
    """The same fixed point by unrolled float64 autograd."""
    return unrolled_fixed_point(tanh_map, torch.zeros_like(x), x, w)
