"""Complex states in the optimisation front doors, complex dtypes, and what refuses them.

``minimize`` finds the minimiser of a real function of complex ``z`` (the gradient
convention is PyTorch's: ``∂fun/∂Re z + i ∂fun/∂Im z``); ``least_squares`` minimises
``½Σ|rᵢ|²`` for complex residuals. References: closed forms (a Hermitian quadratic,
``torch.linalg.lstsq``) and ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from test_complex import TIGHT, A, B, C, H, N, forward_gradcheck, leaf, randn
from torch.autograd import gradcheck, gradgradcheck

import implicit

TALL = randn(5, N, seed=10)  # an overdetermined complex system
Y = randn(5, seed=11)


def quadratic(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Re(zᴴHz) − 2 Re(cᴴz): minimised at Hz = c."""
    return (z.conj() @ H @ z).real - 2 * (c.conj() @ z).real


def quartic(z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return quadratic(z, c) + 0.05 * z.abs().pow(4).sum()


def minimiser(backward: str):
    return lambda c: implicit.minimize(
        quartic, torch.zeros(N, dtype=C), c, backward=backward, **TIGHT
    )


def fit(backward: str):
    """A non-zero residual that is not linear in z: the exact Hessian has Σ rᵢ∇²rᵢ."""
    return lambda y: implicit.least_squares(
        lambda z, y: TALL @ (z + 0.2 * z**2) - y,
        torch.zeros(N, dtype=C),
        y,
        backward=backward,
        **TIGHT,
    )


class TestMinimize:
    # scipy's L-BFGS-B stops where f no longer decreases: float64 resolves that down to
    # gradients of about √eps (1.4e-8 here), above a tol of 1e-9 on some CPUs.
    @pytest.mark.parametrize(
        ("solver", "tol"), [("lbfgs", 1e-9), ("newton", 1e-9), ("scipy", 1e-7)]
    )
    def test_hermitian_quadratic_closed_form(self, solver, tol):
        c = leaf(B)
        z = implicit.minimize(quadratic, torch.zeros(N, dtype=C), c, solver=solver, tol=tol)
        assert z.dtype == C
        assert rel_err(z, torch.linalg.solve(H, B)) <= tol
        # L = ‖z‖² with z = H⁻¹c: PyTorch's gradient is 2H⁻ᴴz = 2H⁻¹z.
        (grad,) = torch.autograd.grad(z.abs().pow(2).sum(), c)
        assert rel_err(grad, 2 * torch.linalg.solve(H, z.detach())) <= 1e-8

    @pytest.mark.parametrize("backward", ["auto", "dense", "cg", "gmres", "bicgstab"])
    def test_gradcheck(self, backward):
        assert gradcheck(minimiser(backward), (leaf(B),))

    @pytest.mark.parametrize("backward", ["auto", "cg"])
    def test_forward_mode_and_double_backward(self, backward):
        assert forward_gradcheck(minimiser(backward), (leaf(B),))
        assert gradgradcheck(minimiser(backward), (leaf(B),))

    def test_complex_parameter_of_a_real_state(self):
        def solve(c):
            fun = lambda z, c: ((z - c.real) ** 2 + z * c.imag + z**4).sum()  # noqa: E731
            return implicit.minimize(fun, torch.zeros(N, dtype=torch.float64), c, **TIGHT)

        assert gradcheck(solve, (leaf(B),)) and gradgradcheck(solve, (leaf(B),))

    def test_transforms(self):
        solve = lambda c: implicit.minimize(quadratic, torch.zeros(N, dtype=C), c, **TIGHT)  # noqa: E731
        grad = torch.func.grad(lambda c: solve(c).abs().pow(2).sum())(B)
        z = torch.linalg.solve(H, B)
        assert rel_err(grad, 2 * torch.linalg.solve(H, z)) <= 1e-8
        many = randn(3, N, seed=12)
        assert rel_err(torch.func.vmap(solve)(many), torch.linalg.solve(H, many.T).T) <= 1e-9
        _, dz = torch.func.jvp(solve, (B,), (1j * B,))
        assert rel_err(dz, 1j * z) <= 1e-8


class TestLeastSquares:
    @pytest.mark.parametrize(
        "solver", ["levenberg_marquardt", "gauss_newton", "scipy", "lbfgs", "newton"]
    )
    def test_linear_fit_against_lstsq(self, solver):
        y = leaf(Y)
        z = implicit.least_squares(
            lambda z, y: TALL @ z - y, torch.zeros(N, dtype=C), y, solver=solver, tol=1e-11
        )
        expected = torch.linalg.lstsq(TALL, Y.unsqueeze(1)).solution.squeeze(1)
        assert rel_err(z, expected) <= 1e-9
        # z = (AᴴA)⁻¹Aᴴy: the gradient of ‖z‖² with respect to y is 2A(AᴴA)⁻¹z.
        (grad,) = torch.autograd.grad(z.abs().pow(2).sum(), y)
        normal = TALL.conj().T @ TALL
        assert rel_err(grad, 2 * TALL @ torch.linalg.solve(normal, z.detach())) <= 1e-8

    @pytest.mark.parametrize("backward", ["auto", "dense", "cg", "gmres"])
    def test_gradcheck_with_the_exact_hessian(self, backward):
        assert gradcheck(fit(backward), (leaf(Y),))

    def test_forward_mode_and_double_backward(self):
        assert forward_gradcheck(fit("auto"), (leaf(Y),))
        assert gradgradcheck(fit("auto"), (leaf(Y),))

    def test_complex_residual_of_a_real_state(self):
        t = torch.linspace(0, 1, 6, dtype=torch.float64)

        def solve(data):  # amplitude and frequency of a·exp(iωt), both real
            return implicit.least_squares(
                lambda p, d: p[0] * torch.exp(1j * p[1] * t) - d,
                torch.tensor([1.0, 1.0], dtype=torch.float64),
                data,
                **TIGHT,
            )

        data = 2.0 * torch.exp(1.5j * t) + 0.01 * randn(6, seed=13)
        p = solve(data)
        assert p.dtype == torch.float64 and rel_err(p, torch.tensor([2.0, 1.5])) <= 1e-2
        assert gradcheck(solve, (leaf(data),))


class TestDtypes:
    def test_complex64_in_complex64_out(self):
        c64 = torch.complex64
        a, b = A.to(c64), B.to(c64)
        z, info = implicit.root_solve(
            lambda z: a @ z - b, torch.zeros(N, dtype=c64), return_info=True
        )
        assert z.dtype == c64 and info.status == "converged"
        assert info.residual.dtype == torch.float32 and rel_err(z, torch.linalg.solve(a, b)) < 1e-5
        z = implicit.fixed_point(lambda z: 0.5 * z + b, torch.zeros(N, dtype=c64))
        assert z.dtype == c64
        h = H.to(c64)
        fun = lambda z: (z.conj() @ h @ z).real - 2 * (b.conj() @ z).real  # noqa: E731
        z, info = implicit.minimize(fun, torch.zeros(N, dtype=c64), return_info=True)
        assert z.dtype == c64 and info.status == "converged"
        assert rel_err(z, torch.linalg.solve(h, b)) < 1e-4
        z = implicit.least_squares(lambda z: a @ z - b, torch.zeros(N, dtype=c64))
        assert z.dtype == c64 and rel_err(z, torch.linalg.solve(a, b)) < 1e-4

    def test_failures_are_reported(self):
        nan = torch.complex(torch.tensor(float("nan")), torch.tensor(0.0)).to(C)
        _, info = implicit.root_solve(
            lambda z: z - nan, torch.zeros(N, dtype=C), return_info=True, on_failure="ignore"
        )
        assert info.status == "nonfinite"
        with pytest.raises(implicit.ConvergenceError, match="max_iter"):
            implicit.fixed_point(
                lambda z: 2 * z + 1j,
                torch.zeros(N, dtype=C),
                solver="fixed_point",
                max_iter=5,
                on_failure="raise",
            )


class TestRefusals:
    def test_bounds_and_bracketing_name_the_argument(self):
        with pytest.raises(ValueError, match="bounds do not apply to complex states"):
            implicit.minimize(quadratic, torch.zeros(N, dtype=C), B, bounds=(0.0, 1.0))
        with pytest.raises(ValueError, match=r"bounds .* z0\['a'\] is torch.complex128"):
            implicit.least_squares(
                lambda z: z["a"], {"a": torch.zeros(N, dtype=C)}, bounds=(None, None)
            )
        for solver in ("bisection", "chandrupatla"):
            with pytest.raises(ValueError, match=rf"solver='{solver}' brackets a real root"):
                implicit.root_solve(
                    lambda z: z - 0.5, torch.zeros((), dtype=C), solver=solver, lower=0, upper=1
                )

    def test_complex_objective(self):
        with pytest.raises(TypeError, match=r"fun must return a real .* complex objective"):
            implicit.minimize(lambda z: (z**2).sum(), torch.zeros(N, dtype=C))

    @pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
    def test_mixed_dtypes(self):
        zeros = torch.zeros(N, dtype=C)
        with pytest.raises(TypeError, match="complex32 is not supported"):
            implicit.root_solve(lambda z: z, torch.zeros(N, dtype=torch.complex32))
        with pytest.raises(TypeError, match=r"argument 0 \(after z0\) .* one precision"):
            implicit.root_solve(lambda z, b: z - b, zeros.to(torch.complex64), B)
        with pytest.raises(TypeError, match="one precision"):
            implicit.root_solve(lambda z, b: z - b, zeros, B.real.float())
        with pytest.raises(TypeError, match=r"g returned dtype torch\.float64 but z has dtype"):
            implicit.root_solve(lambda z: z.abs(), zeros)
        with pytest.raises(TypeError, match=r"f returned dtype torch\.complex128 but z has dtype"):
            implicit.fixed_point(lambda z: 0.5 * z + B, torch.zeros(N, dtype=torch.float64))
        with pytest.raises(TypeError, match=r"z0\[1\] has dtype torch.complex128"):
            implicit.root_solve(lambda z: z, (torch.zeros(N, dtype=torch.float64), zeros))
        with pytest.raises(TypeError, match=r"y has dtype torch\.float64 but z0 has dtype"):
            implicit.invert(lambda z: z, B.real, z0=zeros)
