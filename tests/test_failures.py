"""Solves that fail, end to end: per-sample status, the on_failure policy in the forward
and the backward, non-finite iterates, a diverging iteration never called converged."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TIGHT, TanhProblem

import implicit


def test_diverging_fixed_point_is_not_reported_converged():
    # f(z) = z + 0.1 has no fixed point: the iterate runs away while its residual stays 0.1.
    # A test relative to the current ‖z‖ would call it converged once ‖z‖ ≥ 0.1 / tol.
    _, info = implicit.fixed_point(
        lambda z: z + 0.1,
        torch.zeros(3, dtype=torch.float64),
        solver="fixed_point",
        tol=1e-2,
        max_iter=200,
        on_failure="ignore",
        return_info=True,
    )
    assert info.status == "max_iter" and not bool(info.converged)


# -- failures, per-sample status and the on_failure policy ------------------------------


def per_sample_map(z, a, c):
    """``f(z) = a_b · tanh(z) + c_b`` per sample: contractive for ``|a_b| < 1``."""
    return a.unsqueeze(1) * torch.tanh(z) + c


def one_sample_cannot_converge(**kwargs):
    # Sample 1 oscillates for ever: f(z) = −z + c has the fixed point c/2, but Picard
    # iteration jumps between z0 and c − z0.
    a = torch.tensor([0.5, 1.0, 0.3], dtype=torch.float64)
    c = torch.tensor([[0.3, -0.2], [1.0, 2.0], [-0.4, 0.1]], dtype=torch.float64)

    oscillates = (torch.arange(3) == 1).unsqueeze(1)

    def f(z, c):
        return torch.where(oscillates, c - z, per_sample_map(z, a, c))

    return implicit.fixed_point(
        f,
        torch.zeros(3, 2, dtype=torch.float64),
        c,
        solver="fixed_point",
        batched=True,
        return_info=True,
        tol=1e-10,
        max_iter=60,
        **kwargs,
    )


class TestFailures:
    def test_one_sample_that_cannot_converge(self):
        z, info = one_sample_cannot_converge(on_failure="ignore")
        assert info.converged.tolist() == [True, False, True]
        assert info.status == "max_iter"
        assert info.iterations == 60  # the maximum over samples
        assert info.residual.shape == (3,) and float(info.residual[1]) > 1
        assert len(info.history) == 61
        # The others converged, each to its own tolerance.
        for b in (0, 2):
            assert float(info.residual[b]) <= 1e-10 * (1 + float(z[b].norm()))

    def test_the_others_are_frozen_when_converged(self):
        # Sample 0 alone stops after k iterations; in the batch it must not move after k.
        z, _ = one_sample_cannot_converge(on_failure="ignore")
        a = torch.tensor([0.5], dtype=torch.float64)
        c = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
        alone = implicit.fixed_point(
            lambda z: per_sample_map(z, a, c),
            torch.zeros(1, 2, dtype=torch.float64),
            solver="fixed_point",
            batched=True,
            tol=1e-10,
            max_iter=60,
        )
        assert torch.equal(z[0], alone[0])

    def test_forward_warn(self):
        with pytest.warns(implicit.ConvergenceWarning, match=r"forward solve.*1 of 3") as record:
            z, info = one_sample_cannot_converge()
        assert record[0].filename == __file__  # points at the caller
        assert z.shape == (3, 2) and info.status == "max_iter"

    def test_forward_raise(self):
        with pytest.raises(implicit.ConvergenceError, match="max_iter") as caught:
            one_sample_cannot_converge(on_failure="raise")
        info = caught.value.info
        assert isinstance(info, implicit.SolveInfo)
        assert info.converged.tolist() == [True, False, True] and info.iterations == 60

    def test_forward_ignore(self):
        # pytest turns ConvergenceWarning into an error: silence is checked by running.
        _, info = one_sample_cannot_converge(on_failure="ignore")
        assert info.status == "max_iter"

    def backward_that_cannot_converge(self, on_failure):
        p = TanhProblem(n=6, batch=3, norm=0.9)
        z, info = implicit.fixed_point(
            p.f,
            p.z0,
            p.x,
            solver="fixed_point",
            backward=implicit.linear.Neumann(max_iter=2),
            batched=True,
            on_failure=on_failure,
            return_info=True,
            **TIGHT,
        )
        return p, z, info

    def test_backward_warn(self):
        p, z, info = self.backward_that_cannot_converge("warn")
        with pytest.warns(implicit.ConvergenceWarning, match="backward linear solve") as record:
            z.sum().backward()
        assert record[0].filename == __file__
        assert info.backward.status == "max_iter" and info.backward.iterations == 2
        assert not bool(info.backward.converged.any())
        assert bool(torch.isfinite(p.x.grad).all())  # the result is returned

    def test_backward_raise(self):
        _, z, _ = self.backward_that_cannot_converge("raise")
        with pytest.raises(implicit.ConvergenceError, match="backward linear solve") as caught:
            z.sum().backward()
        assert isinstance(caught.value.info, implicit.BackwardInfo)
        assert caught.value.info.status == "max_iter" and caught.value.info.method == "neumann"
        assert caught.value.info.converged.shape == (3,)

    def test_backward_ignore(self):
        _, z, info = self.backward_that_cannot_converge("ignore")
        z.sum().backward()
        assert info.backward.status == "max_iter"

    def test_unbatched_info_is_per_problem_scalar(self):
        x = torch.ones(3, dtype=torch.float64, requires_grad=True)
        z, info = implicit.fixed_point(
            lambda z, x: 0.5 * torch.tanh(z) + x,
            torch.zeros(3, dtype=torch.float64),
            x,
            solver="fixed_point",
            return_info=True,
        )
        z.sum().backward()
        assert info.converged.shape == () and info.residual.shape == ()
        assert info.backward.converged.shape == () and info.backward.residual.shape == ()


class TestNonFinite:
    @staticmethod
    def f(z):
        # Sample 0 converges; sample 1 squares its way to inf; sample 2 takes the square
        # root of a negative number (NaN) at its third iterate.
        rows = [
            0.5 * torch.tanh(z[0]) + 1,
            z[1] ** 2 + 2,
            torch.sqrt(z[2]) - 1,
        ]
        return torch.stack(rows)

    def run(self, **kwargs):
        z0 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 4.0]], dtype=torch.float64)
        return implicit.fixed_point(
            self.f,
            z0,
            solver="fixed_point",
            batched=True,
            tol=1e-12,
            max_iter=500,
            on_failure="ignore",
            return_info=True,
            **kwargs,
        )

    def test_nonfinite_samples_stop_at_once(self):
        _, info = self.run()
        assert info.status == "nonfinite"
        assert info.converged.tolist() == [True, False, False]
        # Sample 0 needs a few dozen iterations; nobody ran to max_iter.
        assert 10 < info.iterations < 100
        assert not math.isfinite(max(info.history))  # the blow-up is in the history
        assert bool(torch.isfinite(info.residual).all())  # the kept iterates' residuals

    @pytest.mark.parametrize("sample", [1, 2])
    def test_the_returned_iterate_is_the_last_finite_one(self, sample):
        z, _ = self.run()
        # Replay Picard: stop before the residual's norm turns non-finite.
        current = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 4.0]], dtype=torch.float64)
        while True:
            nxt = self.f(current)
            if not math.isfinite(torch.linalg.vector_norm(self.f(nxt)[sample] - nxt[sample])):
                break
            current = nxt
        assert torch.equal(z[sample], current[sample])

    def test_nonfinite_at_the_initial_guess(self):
        x = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
        _, info = implicit.root_solve(
            lambda z, x: torch.sqrt(x) - z,
            torch.zeros(2, dtype=torch.float64),
            x,
            solver="fixed_point",
            on_failure="ignore",
            return_info=True,
        )
        assert info.status == "nonfinite" and info.iterations == 0
        with pytest.raises(implicit.ConvergenceError, match="nonfinite"):
            implicit.root_solve(
                lambda z, x: torch.sqrt(x) - z,
                torch.zeros(2, dtype=torch.float64),
                x,
                solver="fixed_point",
                on_failure="raise",
            )
