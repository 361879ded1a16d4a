"""DEQ as a module: its reports, parameters and state, option checks, the on_failure
policy, the batch dimension, copies and pickles."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import TIGHT, loss_of
from deq_cells import Cell, make_input

import implicit


def test_last_info_reports_forward_and_backward():
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver="fixed_point", backward="gmres", **TIGHT)
    assert deq.last_info is None
    z = deq(x)
    info = deq.last_info
    assert info.converged.shape == (3,) and info.status == "converged"
    assert info.history[-1] <= 1e-12
    loss_of(z).backward()
    assert info.backward.method == "gmres" and bool(info.backward.converged.all())


def test_no_graph_without_grad_and_module_bookkeeping():
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver="fixed_point", **TIGHT)
    with torch.no_grad():
        z = deq(x)
    assert z.grad_fn is None
    assert [p for p in deq.parameters()] == [p for p in cell.parameters()]
    assert set(deq.state_dict()) == {"f.linear.weight", "f.linear.bias"}
    assert "solver=FixedPoint" in repr(deq)


def test_bad_options_raise_and_name_the_argument():
    cell = Cell()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_iters'\]"):
        implicit.DEQ(cell, solver="fixed_point", max_iters=10)
    with pytest.raises(TypeError, match="damping"):  # lists the solver's valid options
        implicit.DEQ(cell, solver="fixed_point", dampnig=0.5)
    implicit.DEQ(cell, solver="fixed_point", damping=0.5)  # a real solver option is fine
    with pytest.raises(ValueError, match="unknown solver"):
        implicit.DEQ(cell, solver="picard")
    with pytest.raises(ValueError, match="unknown backward"):
        implicit.DEQ(cell, solver="fixed_point", backward="phantom_gradient")
    with pytest.raises(ValueError, match="tol"):
        implicit.DEQ(cell, solver="fixed_point", tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        implicit.DEQ(cell, solver="fixed_point", max_iter=0)
    with pytest.raises(ValueError, match="on_failure"):
        implicit.DEQ(cell, solver="fixed_point", on_failure="shout")
    with pytest.raises(ValueError, match="jac_reg"):
        implicit.DEQ(cell, solver="fixed_point", jac_reg=-1)
    with pytest.raises(TypeError, match="f must be callable"):
        implicit.DEQ("cell", solver="fixed_point")
    deq = implicit.DEQ(cell, solver="fixed_point")
    with pytest.raises(TypeError, match="pass z0"):  # zeros_like needs tensors
        deq({"x": 1.0})
    with pytest.raises(ValueError, match="samples"):
        deq.jacobian_penalty(make_input(), deq(make_input()), samples=0)


def test_non_convergence_follows_on_failure():
    cell, x = Cell(), make_input()
    deq = implicit.DEQ(cell, solver="fixed_point", tol=1e-14, max_iter=3, on_failure="raise")
    with pytest.raises(implicit.ConvergenceError):
        deq(x)
    deq = implicit.DEQ(cell, solver="fixed_point", tol=1e-14, max_iter=3)
    with pytest.warns(implicit.ConvergenceWarning):
        deq(x)
    assert deq.last_info.status == "max_iter"


def test_a_sample_without_batch_dimension_is_refused():
    # batched=True: a 1-D x would be n problems of one unknown each, although the cell
    # couples its features; the layer refuses it, naming the shape and the way out.
    cell = Cell(6)
    deq = implicit.DEQ(cell, solver="fixed_point", tol=1e-12, max_iter=200)
    with pytest.raises(ValueError, match=r"batched=True.*shape \(6,\).*x\[None\]"):
        deq(torch.randn(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z0 of shape \(6,\)"):
        deq(torch.randn(1, 6, dtype=torch.float64), z0=torch.zeros(6, dtype=torch.float64))
    x = torch.randn(6, dtype=torch.float64)
    one = deq(x[None])[0]
    unbatched = implicit.DEQ(cell, solver="fixed_point", batched=False, tol=1e-12, max_iter=200)(x)
    assert torch.allclose(one, unbatched, rtol=0, atol=1e-10)


def test_copies_and_pickles_after_a_forward_with_jac_reg():
    # last_jac_loss is part of the forward's graph: the copy keeps its value, detached.
    deq = implicit.DEQ(Cell(), solver="fixed_point", jac_reg=1, **TIGHT)
    x = make_input()
    z = deq(x)
    for copy_of in (copy.deepcopy, lambda layer: pickle.loads(pickle.dumps(layer))):
        twin = copy_of(deq)
        assert not twin.last_jac_loss.requires_grad
        assert torch.equal(twin.last_jac_loss, deq.last_jac_loss.detach())
        assert torch.equal(twin(x), z)
    assert deq.last_jac_loss.requires_grad  # the original keeps its graph
