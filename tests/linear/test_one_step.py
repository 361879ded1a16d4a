"""The inexact modes by design (implicit/linear/one_step.py)."""

from __future__ import annotations

import torch
from systems import (
    operator,
    rhs_of,
    run,
    spd,
)

from implicit import linear
from implicit.linear.base import CONVERGED


def test_one_step_is_minus_the_right_hand_side():
    rhs = rhs_of(2, 3, 0)
    result = run(linear.OneStep(), operator(spd(2, 3, 2.0, 0)), rhs, tol=1e-10, max_iter=5)
    assert torch.equal(result.x, -rhs)
    assert result.codes.tolist() == [CONVERGED, CONVERGED] and result.iterations == 0
    assert bool(result.residual.isnan().all())
    assert not linear.OneStep.exact and linear.GMRES.exact
