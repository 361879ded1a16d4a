"""Bad black boxes get a clear error naming them, or a documented conversion; an answer
that is not a root is reported through on_failure. Never a silently wrong gradient."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import rel_err

import implicit

F64 = torch.float64


def y_target() -> torch.Tensor:
    return torch.tensor([0.1, -0.5, 0.7, 0.2], dtype=F64, requires_grad=True)


def arcsin(y):
    return np.arcsin(y.numpy())


def linear_g(z, b):
    return 2 * z - b


class TestAnswers:
    def test_wrong_shape_names_the_inverse(self):
        def short(y):
            return arcsin(y)[:3]

        with pytest.raises(ValueError, match=r"inverse '.*short' returned shape \(3,\), expected"):
            implicit.invert(torch.sin, y_target(), inverse=short)

    def test_wrong_shape_names_the_custom_root_solver(self):
        b = torch.ones(3, dtype=F64, requires_grad=True)

        @implicit.custom_root(linear_g)
        def broadcast_fails(b):
            return b.numpy()[:2] / 2

        with pytest.raises(RuntimeError, match=r"at the answer of custom_root solver .*\(2,\)"):
            broadcast_fails(b)

        @implicit.custom_root(lambda z, b: z.sum() * b - b)
        def shape_differs(b):
            return b.numpy()[:2]

        with pytest.raises(ValueError, match=r"answer of custom_root solver '.*shape_differs'"):
            shape_differs(b)

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_non_finite_answer_follows_on_failure(self, bad):
        def broken(y):
            out = arcsin(y)
            out[1] = bad
            return out

        with pytest.warns(implicit.ConvergenceWarning, match="'nonfinite'") as caught:
            _, info = implicit.invert(torch.sin, y_target(), inverse=broken, return_info=True)
        assert "is not finite" in str(caught[0].message)
        assert info.status == "nonfinite" and not bool(info.converged)
        with pytest.raises(implicit.ConvergenceError) as raised:
            implicit.invert(torch.sin, y_target(), inverse=broken, on_failure="raise")
        assert raised.value.info.status == "nonfinite"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            implicit.invert(torch.sin, y_target(), inverse=broken, on_failure="ignore")

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_one_non_finite_sample_leaves_the_others_alone(self, bad):
        # A batch of linear systems 2 z = b solved by a black box that fails sample 1.
        b = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=F64, requires_grad=True)

        @implicit.custom_root(linear_g, batched=True)
        def solve(b):
            out = b.numpy() / 2
            out[1, 0] = bad
            return out

        with pytest.warns(implicit.ConvergenceWarning, match="'nonfinite' for 1 of 3"):
            z = solve(b)
        assert solve.last_info.converged.tolist() == [True, False, True]
        assert torch.equal(z[[0, 2]], b.detach()[[0, 2]] / 2)
        (grad,) = torch.autograd.grad(z[[0, 2]].sum(), b)
        assert torch.equal(grad[[0, 2]], torch.full((2, 2), 0.5, dtype=F64))

    def test_an_infinite_answer_with_a_finite_residual_is_not_a_root(self):
        # g(z) = 1 − tanh(z) vanishes at z = ∞.
        @implicit.custom_root(lambda z, b: b - torch.tanh(z), batched=True)
        def solve(b):
            with np.errstate(divide="ignore"):
                return np.arctanh(b.numpy())

        b = torch.tensor([[0.5], [1.0]], dtype=F64)
        with pytest.warns(implicit.ConvergenceWarning, match="'nonfinite' for 1 of 2"):
            solve(b)
        assert solve.last_info.converged.tolist() == [True, False]

    def test_other_dtypes_are_converted(self):
        y = y_target().detach().float().requires_grad_()
        z = implicit.invert(torch.sin, y, inverse=lambda y: np.arcsin(y.numpy().astype("f8")))
        assert z.dtype == torch.float32 and z.device == y.device
        (grad,) = torch.autograd.grad(z.sum(), y)
        assert grad.dtype == torch.float32
        assert rel_err(grad, 1 / torch.sqrt(1 - y.detach() ** 2)) <= 1e-5
        b = torch.tensor([2.0, 4.0], dtype=F64, requires_grad=True)
        integer = implicit.custom_root(linear_g)(lambda b: (b.numpy() // 2).astype(np.int64))
        z = integer(b)
        assert z.dtype == F64 and torch.equal(z.detach(), torch.tensor([1.0, 2.0], dtype=F64))
        (grad,) = torch.autograd.grad(z.sum(), b)
        assert torch.equal(grad, torch.full_like(b, 0.5))

    @pytest.mark.parametrize(
        ("answer", "match"),
        [
            (lambda y: arcsin(y).astype(complex), "complex"),
            (lambda y: arcsin(y).tolist(), "must return a torch.Tensor or a numpy array"),
            (lambda y: np.array(["a"] * 4), "expected real or complex numbers"),
        ],
        ids=["complex", "list", "strings"],
    )
    def test_unusable_answers(self, answer, match):
        with pytest.raises(TypeError, match=match):
            implicit.invert(torch.sin, y_target(), inverse=answer)

    def test_raising_black_box_is_named_and_chained(self):
        def singular(a, b):
            raise np.linalg.LinAlgError("Singular matrix")

        solve = implicit.custom_root(lambda z, a, b: a @ z - b)(singular)
        with pytest.raises(RuntimeError, match=r"custom_root solver '.*singular' raised") as info:
            solve(torch.zeros(2, 2, dtype=F64), torch.ones(2, dtype=F64))
        assert isinstance(info.value.__cause__, np.linalg.LinAlgError)

    def test_empty_answer(self):
        solve = implicit.custom_root(linear_g)(lambda b: np.zeros(0))
        with pytest.raises(ValueError, match=r"the answer of custom_root solver .* is empty"):
            solve(torch.ones(2, dtype=F64))

    def test_black_box_writing_into_its_inputs_changes_nothing(self):
        a = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=F64, requires_grad=True)
        b = torch.tensor([1.0, -1.0], dtype=F64, requires_grad=True)
        before = a.detach().clone(), b.detach().clone()

        @implicit.custom_root(lambda z, a, b: a @ z - b)
        def vandal(a, b):
            z = np.linalg.solve(a.numpy(), b.numpy())
            a.numpy()[:] = 0  # as scipy.linalg.solve(..., overwrite_a=True) may
            return z

        z = vandal(a, b)
        grads = torch.autograd.grad(z.sum(), [a, b])
        assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
        z_ref = torch.linalg.solve(a, b)
        for got, want in zip(grads, torch.autograd.grad(z_ref.sum(), [a, b])):
            assert rel_err(got, want) <= 1e-13


class TestNotARoot:
    """The residual at the answer above tol: on_failure says the answer is not a root."""

    @staticmethod
    def sloppy(y):
        return np.arcsin(y.numpy()) + 1e-3

    def test_warn(self):
        with pytest.warns(implicit.ConvergenceWarning, match=r"'.*sloppy' is not a root"):
            _, info = implicit.invert(torch.sin, y_target(), inverse=self.sloppy, return_info=True)
        assert info.status == "failed" and info.iterations == 0
        assert float(info.residual) > 1e-6 * (
            1 + float(torch.linalg.vector_norm(y_target().detach()))
        )

    def test_raise(self):
        with pytest.raises(implicit.ConvergenceError, match="is not a root") as caught:
            implicit.invert(torch.sin, y_target(), inverse=self.sloppy, on_failure="raise")
        assert caught.value.info.status == "failed"

    def test_ignore(self):
        _, info = implicit.invert(
            torch.sin, y_target(), inverse=self.sloppy, on_failure="ignore", return_info=True
        )
        assert info.status == "failed" and "is not a root" in info.message

    def test_custom_root_and_loosened_tol(self):
        b = torch.ones(2, dtype=F64)
        approximate = implicit.custom_root(linear_g, on_failure="raise")(
            lambda b: b.numpy() / 2 + 1e-4
        )
        with pytest.raises(implicit.ConvergenceError):
            approximate(b)
        assert approximate.last_info is None
        tolerant = implicit.custom_root(linear_g, tol=1e-3, on_failure="raise")(
            lambda b: b.numpy() / 2 + 1e-4
        )
        tolerant(b)
        assert tolerant.last_info.status == "converged"

    def test_non_finite_residual_at_the_answer(self):
        y = torch.tensor([0.5, 2.0], dtype=F64)
        with pytest.warns(implicit.ConvergenceWarning, match="nonfinite"):
            _, info = implicit.invert(torch.log, y, inverse=lambda y: -np.ones(2), return_info=True)
        assert info.status == "nonfinite"

    def test_batched_reports_per_problem(self):
        y = torch.tensor([[0.1], [0.2], [0.3]], dtype=F64)

        def wrong_second(y):
            out = np.arcsin(y.numpy())
            out[1] += 0.1
            return out

        _, info = implicit.invert(
            torch.sin,
            y,
            inverse=wrong_second,
            batched=True,
            on_failure="ignore",
            return_info=True,
        )
        assert info.converged.tolist() == [True, False, True]


class TestDecoratorInput:
    def test_keyword_arguments_are_refused(self):
        solve = implicit.custom_root(linear_g)(lambda b: b.numpy() / 2)
        with pytest.raises(TypeError, match="positional arguments only"):
            solve(b=torch.ones(2))

    def test_bad_decorator_arguments(self):
        with pytest.raises(ValueError, match="unroll"):
            implicit.custom_root(linear_g, backward="unroll")(lambda b: b)
        with pytest.raises(ValueError, match="unknown backward"):
            implicit.custom_root(linear_g, backward="lu")
        with pytest.raises(ValueError, match="tol"):
            implicit.custom_root(linear_g, tol=0)
        with pytest.raises(ValueError, match="on_failure"):
            implicit.custom_root(linear_g, on_failure="shout")
        with pytest.raises(TypeError, match="g must be callable"):
            implicit.custom_root(None)
        with pytest.raises(TypeError, match="decorates a function"):
            implicit.custom_root(linear_g)(3)
        with pytest.raises(TypeError, match="inverse must be callable"):
            implicit.invert(torch.sin, torch.ones(1), inverse="arcsin")


@pytest.mark.parametrize("grad", [False, True])
def test_f_evals_counts_the_one_evaluation_at_the_answer(grad):
    # With grad, the capture discovery's evaluation is the check of the answer.
    calls = []

    def g(z, b):
        calls.append(1)
        return linear_g(z, b)

    solve = implicit.custom_root(g)(lambda b: b.numpy() / 2)
    b = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=grad)
    solve(b)
    assert solve.last_info.f_evals == len(calls) == 1
