"""The per-iteration callback of every front door, layer and forward solver."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

import implicit
from implicit import _progress
from implicit._problem import Problem

D = torch.float64
RATES = torch.tensor([[0.2], [0.6], [0.9]], dtype=D)  # three problems, three speeds
CUBES = torch.tensor([2.0, 5.0, 30.0], dtype=D)


def contraction(z):
    return RATES * torch.tanh(z) + 1


def fixed_point(solver, **options):
    def run(callback=None, **extra):
        return implicit.fixed_point(
            contraction,
            torch.zeros(3, 1, dtype=D),
            solver=solver,
            batched=True,
            tol=1e-10,
            max_iter=300,
            return_info=True,
            callback=callback,
            **options,
            **extra,
        )

    return run


def root(solver, **options):
    def run(callback=None, **extra):
        return implicit.root_solve(
            lambda z, a: z**3 - a,
            torch.ones(3, dtype=D),
            CUBES,
            solver=solver,
            batched=True,
            tol=1e-10,
            max_iter=200,
            return_info=True,
            callback=callback,
            **options,
            **extra,
        )

    return run


def inverse(callback=None, **extra):
    y = torch.tensor([[0.5, 2.0], [10.0, -3.0]], dtype=D)
    return implicit.invert(
        lambda z: z + z**3, y, batched=True, return_info=True, callback=callback, **extra
    )


def minimum(solver, **options):
    centres = torch.tensor([[1.0, -1.0], [3.0, 2.0], [-4.0, 0.5]], dtype=D)

    def run(callback=None, **extra):
        return implicit.minimize(
            lambda z: ((z - centres) ** 4).sum(1) + ((z - centres) ** 2).sum(1),
            torch.zeros(3, 2, dtype=D),
            solver=solver,
            batched=True,
            tol=1e-10,
            return_info=True,
            callback=callback,
            **options,
            **extra,
        )

    return run


def saddle(callback=None, **extra):
    """Starts at a saddle (z₀² − z₁² + z₁⁴/4 at 0): the escape's trials are iterations."""
    return implicit.minimize(
        lambda z: z[0] ** 2 - z[1] ** 2 + z[1] ** 4 / 4,
        torch.zeros(2, dtype=D),
        tol=1e-10,
        return_info=True,
        callback=callback,
        **extra,
    )


def fit(solver, **options):
    t = torch.linspace(0, 1, 6, dtype=D)
    data = torch.stack([1.5 * torch.exp(0.8 * t), 0.5 * torch.exp(-1.2 * t)])

    def run(callback=None, **extra):
        return implicit.least_squares(
            lambda ab: ab[:, :1] * torch.exp(ab[:, 1:] * t) - data,
            torch.ones(2, 2, dtype=D),
            solver=solver,
            batched=True,
            tol=1e-10,
            return_info=True,
            callback=callback,
            **options,
            **extra,
        )

    return run


#: Solvers that call the callback after each of their iterations.
EACH_ITERATION = {
    "fixed_point-picard": fixed_point("fixed_point"),
    "fixed_point-anderson": fixed_point("anderson"),
    "fixed_point-newton": fixed_point("newton"),
    "fixed_point-broyden": fixed_point("broyden"),
    "root_solve-newton": root("newton"),
    "root_solve-broyden": root("broyden"),
    "root_solve-bisection": root("bisection", lower=0.0, upper=10.0),
    "root_solve-chandrupatla": root("chandrupatla", lower=0.0, upper=10.0),
    "fixed_point-scipy-broyden1": fixed_point(implicit.solvers.Scipy("broyden1")),
    "invert-newton": inverse,
    "minimize-lbfgs": minimum("lbfgs"),
    "minimize-newton": minimum("newton"),
    "minimize-saddle": saddle,
    "least_squares-levenberg_marquardt": fit("levenberg_marquardt"),
    "least_squares-gauss_newton": fit("gauss_newton"),
}
#: Solvers that call it once, at the end (scipy gives no callback, or none with the
#: gradient that the test needs).
AT_THE_END = {
    "root_solve-scipy-hybr": root("scipy", method="hybr"),
    "minimize-scipy": minimum("scipy"),
    "least_squares-scipy": fit("scipy"),
}
ALL = {**EACH_ITERATION, **AT_THE_END}


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, iteration, residual, z):
        self.calls.append((iteration, residual, z))

    @property
    def iterations(self):
        return [call[0] for call in self.calls]


@pytest.mark.parametrize("case", EACH_ITERATION)
def test_called_after_each_iteration_with_the_residuals_and_the_iterate(case):
    recorder = Recorder()
    z, info = EACH_ITERATION[case](recorder)
    assert info.status == "converged" and info.iterations >= 2
    assert recorder.iterations == list(range(1, info.iterations + 1))
    for _, residual, state in recorder.calls:
        assert residual.shape == info.residual.shape and state.shape == z.shape
        assert not residual.requires_grad and not state.requires_grad
    _, residual, state = recorder.calls[-1]
    torch.testing.assert_close(state, z.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(residual, info.residual, rtol=1e-6, atol=1e-12)
    # A finished problem keeps its final residual while the others go on.
    per_problem = info.iterations_per_problem
    if bool((per_problem < info.iterations).any()):
        first = int(per_problem.argmin())
        kept = recorder.calls[int(per_problem[first]) - 1 :]
        assert all(float(r[first]) == float(info.residual[first]) for _, r, _ in kept)


@pytest.mark.parametrize("case", AT_THE_END)
def test_scipy_without_a_callback_of_its_own_calls_once_at_the_end(case):
    recorder = Recorder()
    z, info = AT_THE_END[case](recorder)
    assert info.status == "converged" and info.iterations >= 1
    assert recorder.iterations == [info.iterations]
    _, residual, state = recorder.calls[0]
    assert torch.equal(state, z.detach()) and torch.equal(residual, info.residual)


def test_scipy_per_sample_counts_each_problems_iterations():
    recorder = Recorder()
    solver = implicit.solvers.Scipy("broyden1", strategy="per_sample")
    _, info = fixed_point(solver)(recorder)
    per_problem = info.iterations_per_problem.tolist()
    assert recorder.iterations == [k for count in per_problem for k in range(1, count + 1)]


@pytest.mark.parametrize("case", ALL)
def test_no_callback_and_a_callback_give_the_same_solve_bitwise(case):
    z, info = ALL[case]()
    z_watched, info_watched = ALL[case](Recorder())
    assert torch.equal(z, z_watched)
    assert torch.equal(info.residual, info_watched.residual)
    assert info.history == info_watched.history and info.f_evals == info_watched.f_evals
    assert torch.equal(info.iterations_per_problem, info_watched.iterations_per_problem)


@pytest.mark.parametrize("case", ALL)
def test_a_callback_that_modifies_what_it_receives_changes_nothing(case):
    def vandal(iteration, residual, z):
        residual.fill_(float("nan"))
        z.fill_(float("nan"))

    z, info = ALL[case]()
    z_vandalised, info_vandalised = ALL[case](vandal)
    assert torch.equal(z, z_vandalised)
    assert torch.equal(info.residual, info_vandalised.residual)
    assert info.history == info_vandalised.history


class Stop(Exception):
    pass


@pytest.mark.parametrize("case", ALL)
def test_an_exception_in_the_callback_propagates_unchanged(case):
    def stop(iteration, residual, z):
        raise Stop(f"stopped at {iteration}")

    with pytest.raises(Stop, match="stopped at"):
        ALL[case](stop)
    _z, info = ALL[case]()  # nothing was left behind
    assert info.status == "converged"


class Calls(TorchFunctionMode):
    """The torch functions and tensor methods called, by name."""

    def __init__(self):
        super().__init__()
        self.names = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


#: Reading a tensor on the host: a synchronisation with an accelerator.
HOST_READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy"}
#: What the front door's adapter does per call: copy, reshape (and read shapes).
COPIES = {"detach", "clone", "reshape", "split", "view", "__get__"}
#: A bracketing solver hands over the end of each bracket with the smaller |g|.
BEST_END = {"abs", "le", "where"}


@pytest.mark.parametrize(
    ("case", "extra"),
    [
        ("fixed_point-anderson", set()),
        ("root_solve-newton", set()),
        ("minimize-lbfgs", set()),
        ("root_solve-bisection", BEST_END),
    ],
)
def test_the_solve_does_nothing_for_the_callback_but_copy_what_it_hands_over(case, extra):
    """With a callback the solve only adds the adapter's copies (and, for a bracketing
    solver, the choice of the iterate it hands over), so without one nothing at all;
    and it never reads a value on the host for it."""
    run = EACH_ITERATION[case]
    with Calls() as plain:
        run()
    with Calls() as watched:
        _, info = run(lambda iteration, residual, z: None)
    assert not plain.names - watched.names  # nothing the plain solve does is skipped
    added = watched.names - plain.names
    assert set(added) <= COPIES | extra and added["clone"] == 2 * info.iterations, added
    assert {k: plain.names[k] for k in HOST_READS} == {k: watched.names[k] for k in HOST_READS}


def test_the_callback_sees_the_structure_of_z0_and_the_shape_of_the_report():
    seen = []

    def f(z, x):
        return {"a": torch.tanh(0.5 * z["a"] + x), "b": (0.5 * z["b"][0], z["b"][1] / 2)}

    z0 = {"a": torch.zeros(3, dtype=D), "b": (torch.ones(2, 2, dtype=D), torch.ones(4, dtype=D))}
    z, info = implicit.fixed_point(
        f, z0, torch.ones(3, dtype=D), return_info=True, callback=lambda *a: seen.append(a)
    )
    assert len(seen) == info.iterations
    _, residual, state = seen[-1]
    assert residual.shape == () and set(state) == {"a", "b"} and isinstance(state["b"], tuple)
    assert state["a"].shape == (3,) and [t.shape for t in state["b"]] == [(2, 2), (4,)]
    assert torch.equal(state["a"], z["a"]) and torch.equal(state["b"][1], z["b"][1])


def test_under_unroll_the_callback_receives_detached_copies_and_gradients_are_unchanged():
    x = torch.tensor([0.3, -0.2], dtype=D, requires_grad=True)
    grads, flags = [], []

    def watch(iteration, residual, z):
        flags.append((residual.requires_grad, z.requires_grad))
        z.zero_()  # would corrupt the recorded graph if it were the solver's tensor

    for callback in (None, watch):
        z = implicit.fixed_point(
            lambda z, x: torch.tanh(0.5 * z + x),
            torch.zeros(2, dtype=D),
            x,
            backward="unroll",
            solver="fixed_point",
            callback=callback,
        )
        (grad,) = torch.autograd.grad(z.sum(), x)
        grads.append(grad)
    assert flags and not any(any(pair) for pair in flags)
    assert torch.equal(grads[0], grads[1])


def test_under_vmap_the_callback_sees_every_slice_with_the_vmapped_dimension_first():
    seen = []
    xs = torch.randn(4, 2, 3, dtype=D)

    def solve(x):
        return implicit.fixed_point(
            lambda z, x: torch.tanh(0.5 * z + x),
            torch.zeros(2, 3, dtype=D),
            x,
            batched=True,
            callback=lambda *a: seen.append(a),
        )

    out = torch.func.vmap(solve)(xs)
    _, residual, state = seen[-1]
    assert residual.shape == (4, 2) and torch.equal(state, out)


def test_a_black_box_takes_no_iteration_and_never_calls_back():
    recorder = Recorder()
    y = torch.tensor([0.1, 0.5], dtype=D)
    _, info = implicit.invert(
        torch.sin, y, inverse=lambda y: torch.asin(y), callback=recorder, return_info=True
    )
    assert info.iterations == 0 and not recorder.calls
    assert info.iterations_per_problem.shape == () and info.statuses == "converged"


@pytest.mark.parametrize("front_door", ["fixed_point", "root_solve", "invert", "minimize"])
def test_a_callback_that_is_not_callable_is_refused_by_name(front_door):
    function = getattr(implicit, front_door)
    fun = (lambda z: (z**2).sum()) if front_door == "minimize" else torch.tanh
    with pytest.raises(TypeError, match="callback must be callable"):
        function(fun, torch.zeros(2), callback="tqdm")


@pytest.mark.parametrize(
    "make",
    [
        lambda callback: implicit.DEQ(lambda z, x: torch.tanh(0.5 * z + x), callback=callback),
        lambda callback: implicit.ImplicitLayer(lambda z, x: z + z**3 - x, callback=callback),
        lambda callback: implicit.InverseLayer(lambda z: z + z**3, callback=callback),
    ],
    ids=["DEQ", "ImplicitLayer", "InverseLayer"],
)
def test_every_layer_calls_back_and_its_callback_may_be_replaced(make):
    first, second = Recorder(), Recorder()
    layer = make(first)
    x = torch.tensor([[0.5, 2.0], [1.0, 3.0]], dtype=D)
    layer(x)
    assert first.iterations == list(range(1, layer.last_info.iterations + 1))
    layer.callback = second
    layer(x)
    assert len(first.calls) == len(second.calls) == layer.last_info.iterations
    with pytest.raises(TypeError, match="callback"):
        make(42)


def test_watch_unpacks_folded_rows_of_an_unbatched_tree():
    """Under vmap the flat rows of an unbatched problem are its slices."""
    problem = Problem(
        lambda z: z, (torch.zeros(2, 3), torch.zeros(4)), (), batched=False, form="fixed_point"
    )
    seen = []
    watch = _progress.Watch(lambda *a: seen.append(a), problem, (5,))
    flat = torch.arange(50.0).reshape(5, 10)
    watch(1, torch.ones(5), flat)
    _, residual, (a, b) = seen[0]
    assert residual.shape == (5,) and a.shape == (5, 2, 3) and b.shape == (5, 4)
    assert torch.equal(a.reshape(5, 6), flat[:, :6]) and torch.equal(b, flat[:, 6:])
