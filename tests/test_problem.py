"""The flat view of a problem (implicit/_problem.py)."""

from __future__ import annotations

import pytest
import torch

from implicit._problem import Problem


@pytest.mark.parametrize(
    ("states", "batched"),
    [
        (torch.randn(3, 4), True),  # a batch of vectors: the flat view itself
        (torch.randn(3, 2, 2), True),
        (torch.randn(5), False),
        (torch.randn(2, 3), False),
        ((torch.randn(3, 4), torch.randn(3, 2, 2)), True),
    ],
)
def test_pack_and_unpack_are_inverse(states, batched):
    problem = Problem(lambda z: z, states, (), batched=batched)
    flat = problem.pack(states)
    batch = next(iter(states)).shape[0] if isinstance(states, tuple) else states.shape[0]
    assert flat.shape == ((batch if batched else 1), flat.shape[1])
    back = problem.unpack(flat)
    for got, want in zip(
        back if isinstance(back, tuple) else (back,),
        states if isinstance(states, tuple) else (states,),
    ):
        assert torch.equal(got, want)
    # The user's function returns the state's shape: packed to the same rows.
    assert torch.equal(problem.map(flat), flat)


def test_a_batch_of_vectors_is_used_as_it_is():
    # No reshape on the way in or out, so that the graph recorded through f for the
    # backward has no view nodes for the products to run through.
    z = torch.randn(3, 4)
    problem = Problem(lambda z: z, z, (), batched=True)
    flat = problem.pack(z)
    assert problem.unpack(flat) is flat
    out = torch.tanh(flat)
    assert Problem(lambda z: out, z, (), batched=True).map(flat) is out
    point = flat.detach().requires_grad_()
    assert Problem(torch.tanh, z, (), batched=True).map(point).grad_fn.name() == ("TanhBackward0")
