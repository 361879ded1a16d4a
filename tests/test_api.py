"""The front doors (implicit/api.py): every bad input API.md lists gets an error naming
the argument, before any work; what they return (the report, tuple states, the
stopping test's scale)."""

from __future__ import annotations

import math

import pytest
import torch

import implicit

F64 = torch.float64


def contraction(z, x):
    return 0.5 * torch.tanh(z) + x


def contraction_root(z, x):
    return contraction(z, x) - z


FRONT_DOORS = {
    # name: (call, the name the user's function goes by in messages, a solvable default)
    "fixed_point": (implicit.fixed_point, "f", contraction),
    "root_solve": (implicit.root_solve, "g", contraction_root),
}


@pytest.fixture(params=sorted(FRONT_DOORS))
def front_door(request):
    call, function_name, default = FRONT_DOORS[request.param]

    def run(fn=default, z0=None, *args, **kwargs):
        z0 = torch.zeros(3, dtype=F64) if z0 is None else z0
        args = args or (torch.ones(3, dtype=F64),)
        kwargs.setdefault("solver", "fixed_point")
        return call(fn, z0, *args, **kwargs)

    run.function_name = function_name
    return run


class TestBadInputs:
    def test_sparse_and_meta_states_are_refused(self, front_door):
        with pytest.raises(TypeError, match=r"z0 is a torch.sparse_coo tensor.*z0.to_dense\(\)"):
            front_door(z0=torch.zeros(3, dtype=F64).to_sparse())
        with pytest.raises(ValueError, match="z0 is on the meta device, which holds no values"):
            front_door(z0=torch.zeros(3, dtype=F64, device="meta"))
        with pytest.raises(TypeError, match=r"y is a torch.sparse_coo tensor"):
            implicit.invert(torch.sin, torch.ones(3, dtype=F64).to_sparse())
        with pytest.raises(ValueError, match="y is on the meta device"):
            implicit.invert(torch.sin, torch.ones(3, dtype=F64, device="meta"))

    def test_residual_shape_differs_from_z(self, front_door):
        name = front_door.function_name
        with pytest.raises(
            ValueError, match=rf"{name} returned shape \(2,\) but z has shape \(3,\)"
        ):
            front_door(lambda z, x: z[:2])

    def test_residual_structure_differs_from_z(self, front_door):
        name = front_door.function_name
        with pytest.raises(ValueError, match=rf"{name} must return the same structure as z"):
            front_door(lambda z, x: (z, z))
        with pytest.raises(TypeError, match=rf"{name} must return tensors, got float"):
            front_door(lambda z, x: (1.0,), (torch.zeros(3, dtype=F64),))

    def test_function_not_callable(self, front_door):
        with pytest.raises(TypeError, match=rf"{front_door.function_name} must be callable"):
            front_door("tanh")

    @pytest.mark.parametrize("z0", [[0.0, 0.0], 0.0, "z", object()])
    def test_non_tensor_z0(self, front_door, z0):
        with pytest.raises(TypeError, match=r"z0(\[0\])? must be a torch.Tensor"):
            front_door(contraction, z0)

    def test_z0_of_integers_or_empty(self, front_door):
        with pytest.raises(TypeError, match="z0 must be a floating-point or complex tensor"):
            front_door(contraction, torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="z0 is empty"):
            front_door(contraction, torch.zeros(0, dtype=F64))

    def test_mismatched_dtypes(self, front_door):
        with pytest.raises(TypeError, match=r"argument 0 \(after z0\) has dtype torch.float64"):
            front_door(contraction, torch.zeros(3), torch.ones(3, dtype=F64))
        # A captured tensor of another dtype makes the residual's dtype differ from z's.
        captured = torch.ones(3, dtype=F64)
        with pytest.raises(TypeError, match=r"returned dtype torch.float64 but z has dtype"):
            front_door(lambda z, x: z + captured, torch.zeros(3), torch.ones(3))

    def test_mismatched_devices(self, front_door):
        with pytest.raises(
            ValueError, match=r"argument 0 \(after z0\) is on meta but z0 is on cpu"
        ):
            front_door(
                contraction, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64, device="meta")
            )
        with pytest.raises(ValueError, match=r"z0 is on the meta device, which holds no values"):
            front_door(
                contraction, torch.zeros(3, dtype=F64, device="meta"), torch.ones(3, dtype=F64)
            )

    def test_tuple_state_parts_disagree(self, front_door):
        with pytest.raises(TypeError, match=r"z0\[1\] has dtype torch.float32"):
            front_door(lambda z, x: z, (torch.zeros(3, dtype=F64), torch.zeros(3)))
        with pytest.raises(ValueError, match=r"z0\[1\] is on the meta device"):
            front_door(
                lambda z, x: z,
                (torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64, device="meta")),
            )
        with pytest.raises(ValueError, match=r"z0\[1\] has batch size 2"):
            front_door(
                lambda z, x: z,
                (torch.zeros(3, 1, dtype=F64), torch.zeros(2, 1, dtype=F64)),
                batched=True,
            )

    def test_batched_scalar(self, front_door):
        with pytest.raises(ValueError, match="z0 is a scalar but batched=True"):
            front_door(
                contraction,
                torch.tensor(0.0, dtype=F64),
                torch.tensor(1.0, dtype=F64),
                batched=True,
            )

    def test_unknown_solver(self, front_door):
        with pytest.raises(ValueError, match="unknown solver 'fixed-point'"):
            front_door(solver="fixed-point")
        with pytest.raises(ValueError, match="unknown solver"):
            front_door(solver=3)

    def test_unknown_backward(self, front_door):
        with pytest.raises(ValueError, match="unknown backward 'gmress'"):
            front_door(backward="gmress")
        with pytest.raises(ValueError, match="unknown backward"):
            front_door(backward=implicit.solvers.FixedPoint())

    @pytest.mark.parametrize("tol", [0, 0.0, -1e-6, math.nan, math.inf, True, "1e-6", None])
    def test_bad_tol(self, front_door, tol):
        with pytest.raises(ValueError, match=r"^tol must be a positive finite number"):
            front_door(tol=tol)

    @pytest.mark.parametrize("max_iter", [0, -1, 2.0, True, "10", None])
    def test_bad_max_iter(self, front_door, max_iter):
        with pytest.raises(ValueError, match=r"^max_iter must be an integer >= 1"):
            front_door(max_iter=max_iter)

    @pytest.mark.parametrize("on_failure", ["warning", "Raise", None, True])
    def test_bad_on_failure(self, front_door, on_failure):
        with pytest.raises(ValueError, match=r"^on_failure must be one of"):
            front_door(on_failure=on_failure)

    def test_misspelt_solver_option(self, front_door):
        with pytest.raises(
            TypeError, match=r"solver 'fixed_point' got unknown option\(s\) \['dampig'\]"
        ):
            front_door(dampig=0.5)
        with pytest.raises(ValueError, match="damping must be in"):
            front_door(damping=2.0)

    def test_options_with_a_solver_instance(self, front_door):
        with pytest.raises(TypeError, match=r"solver options \['damping'\].*instance"):
            front_door(solver=implicit.solvers.FixedPoint(), damping=0.5)

    def test_errors_come_before_any_work(self, front_door):
        calls = []

        def counted(z, x):
            calls.append(1)
            return contraction(z, x)

        for bad in (
            {"tol": 0},
            {"max_iter": 0},
            {"on_failure": "x"},
            {"solver": "x"},
            {"backward": "x"},
        ):
            with pytest.raises(ValueError):
                front_door(counted, **bad)
        assert calls == []


class TestReturns:
    def test_return_info(self, front_door):
        z = front_door(tol=1e-10)
        z2, info = front_door(tol=1e-10, return_info=True)
        assert torch.equal(z, z2) and isinstance(info, implicit.SolveInfo)
        assert info.solver == "fixed_point" and info.status == "converged"
        assert info.converged.shape == () and bool(info.converged)

    def test_tuple_state_round_trip(self):
        def f(state, x):
            a, b = state
            return 0.5 * torch.tanh(b) + x, 0.5 * torch.tanh(a)

        x = torch.ones(2, 3, dtype=F64)
        z0 = (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64))
        a, b = implicit.fixed_point(f, z0, x, solver="fixed_point", tol=1e-12, batched=True)
        assert a.shape == b.shape == (2, 3)
        fa, fb = f((a, b), x)
        assert torch.allclose(fa, a, atol=1e-10) and torch.allclose(fb, b, atol=1e-10)

    def test_tolerance_scaling(self):
        # fixed_point: ‖f(z) − z‖ ≤ tol (1 + max(‖z0‖, ‖f(z0)‖)); root_solve: ‖g(z)‖ ≤ tol.
        # Picard on f(z) = 0.9 z + 100 shrinks the residual by 0.9 a step, so each
        # stops just below its own threshold.
        def f(z):
            return 0.9 * z + 100

        _, info = implicit.fixed_point(
            f,
            torch.zeros(4, dtype=F64),
            solver="fixed_point",
            tol=1e-6,
            max_iter=500,
            return_info=True,
        )
        threshold = 1e-6 * (1 + float(f(torch.zeros(4, dtype=F64)).norm()))
        assert 0.9 * threshold < float(info.residual) <= threshold
        _, info = implicit.root_solve(
            lambda z: f(z) - z,
            torch.zeros(4, dtype=F64),
            solver="fixed_point",
            tol=1e-6,
            max_iter=500,
            return_info=True,
        )
        assert 0.9e-6 < float(info.residual) <= 1e-6
