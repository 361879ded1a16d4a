"""The front doors a case enters a problem by, as a user writes them.

Each door is ``door(instance, solver, backward) -> (z, info or Later)``; it reads the
problem's explicit inputs from the instance (``args``, ``y``, ``bounds``), so that
forward mode can hand it tangent-carrying stand-ins of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import families

import implicit


def _settings(inst: families.Instance) -> dict[str, Any]:
    settings = {"tol": inst.tol_argument(), "max_iter": inst.max_iter}
    if inst.tol_mode is not None:
        settings["tol_mode"] = inst.tol_mode
    return {**settings, "on_failure": inst.on_failure}


def _fixed_point(inst, solver, backward):
    return implicit.fixed_point(
        inst.fn, inst.z0, *inst.args, solver=solver, backward=backward, batched=inst.batched,
        return_info=True, **_settings(inst),
    )  # fmt: skip


def _root_solve(inst, solver, backward):
    # solver_options: a bracketing solver's lower= and upper=, by name as users pass them.
    return implicit.root_solve(
        inst.residual_fn(), inst.z0, *inst.root_args(), solver=solver, backward=backward,
        batched=inst.batched, return_info=True, **_settings(inst), **inst.solver_options,
    )  # fmt: skip


def _invert(inst, solver, backward):
    return implicit.invert(
        inst.fn, inst.y, *inst.args, z0=inst.z0, solver=solver, backward=backward,
        batched=inst.batched, return_info=True, **_settings(inst),
    )  # fmt: skip


def _invert_inverse(inst, solver, backward):
    return implicit.invert(
        inst.fn, inst.y, *inst.args, inverse=inst.blackbox, backward=backward,
        batched=inst.batched, return_info=True, **_settings(inst),
    )  # fmt: skip


def _custom_root(inst, solver, backward):
    solve = implicit.custom_root(
        inst.residual_fn(), backward=backward, batched=inst.batched, **_settings(inst)
    )(inst.blackbox)
    return solve(*inst.root_args()), Later(lambda: solve.last_info)


def _deq(inst, solver, backward):
    # The layer's default batched=True, as a user writes it: an unbatched instance is
    # one sample of shape (n,), which the layer must refuse or solve as one problem.
    layer = implicit.DEQ(inst.fn, solver=solver, backward=backward, **_settings(inst))
    (x,) = inst.args
    return layer(x, z0=inst.z0), Later(lambda: layer.last_info)


def _minimize(inst, solver, backward):
    return implicit.minimize(
        inst.fn, inst.z0, *inst.args, solver=solver, backward=backward, bounds=inst.bounds,
        batched=inst.batched, return_info=True, **_settings(inst),
    )  # fmt: skip


def _least_squares(inst, solver, backward):
    return implicit.least_squares(
        inst.fn, inst.z0, *inst.args, solver=solver, backward=backward, bounds=inst.bounds,
        batched=inst.batched, return_info=True, **_settings(inst),
    )  # fmt: skip


class Later:
    """An info that a door keeps elsewhere (``solve.last_info``, ``layer.last_info``)."""

    def __init__(self, get: Callable[[], Any]):
        self.get = get


#: door name → ``(instance, solver, backward) -> (z, info or Later)``.
DOORS = {
    "fixed_point": _fixed_point,
    "root_solve": _root_solve,
    "invert": _invert,
    "invert_inverse": _invert_inverse,
    "custom_root": _custom_root,
    "deq": _deq,
    "minimize": _minimize,
    "least_squares": _least_squares,
}
