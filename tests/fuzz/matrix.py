"""What the fuzz runs: solvers × backward modes × front doors, where they make sense.

A :class:`Case` is ``(family, seed, solver, backward, door)``: the problem comes from
``(family, seed)`` alone, the rest says how it is solved. Its ``id``
(``family:seed:solver:backward:door``) reproduces it:
``python benchmarks/fuzz.py --case ID``.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections.abc import Callable
from typing import Any

import families

import implicit
from implicit import solvers

#: Forward solvers by the names cases use.
SOLVERS: dict[str, Callable[[], solvers.Solver]] = {
    "fixed_point": solvers.FixedPoint,
    "anderson": solvers.Anderson,
    "newton_dense": lambda: solvers.Newton(linear="dense"),
    "newton_krylov": lambda: solvers.Newton(linear="krylov"),
    "broyden": solvers.Broyden,
    "scipy_hybr": lambda: solvers.Scipy("hybr"),
    "scipy_lm": lambda: solvers.Scipy("lm"),
    "scipy_krylov": lambda: solvers.Scipy("krylov"),
}
#: The "solver" of the doors whose forward is an independent black box.
BLACKBOX = "blackbox"
#: Backward modes (``implicit.linear.NAMES``): the exact ones and ``unroll`` get their
#: gradient checked against the oracle, the inexact ones only for finiteness.
EXACT = ("auto", "dense", "cg", "gmres", "bicgstab", "neumann")
INEXACT = ("one_step", "phantom")
BACKWARDS = (*EXACT, *INEXACT, "unroll")
FAMILY_NAMES = tuple(families.FAMILIES)


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    seed: int
    solver: str
    backward: str
    door: str
    small: bool = False

    @property
    def id(self) -> str:
        tail = ":small" if self.small else ""
        return f"{self.family}:{self.seed}:{self.solver}:{self.backward}:{self.door}{tail}"

    @classmethod
    def parse(cls, text: str) -> Case:
        parts = text.split(":")
        if len(parts) not in (5, 6) or (len(parts) == 6 and parts[5] != "small"):
            raise ValueError(f"a case is family:seed:solver:backward:door[:small], got {text!r}")
        family, seed, solver, backward, door = parts[:5]
        return cls(family, int(seed), solver, backward, door, len(parts) == 6)


def valid(family: str, solver: str, backward: str, door: str) -> bool:
    """Whether the combination makes sense (the API does not refuse it by design)."""
    if door not in families.DOORS[family]:
        return False
    if (solver == BLACKBOX) != (door in ("custom_root", "invert_inverse")):
        return False
    if backward == "cg" and family not in families.SYMMETRIC:
        return False
    if backward in INEXACT and door not in ("fixed_point", "deq"):
        return False
    # Documented refusals: a black box, scipy or a Krylov inner solve cannot be unrolled.
    return not (
        backward == "unroll"
        and (solver == BLACKBOX or solver.startswith("scipy") or solver == "newton_krylov")
    )


def combinations(family: str) -> list[tuple[str, str, str]]:
    """Every valid ``(solver, backward, door)`` of a family, in a fixed order."""
    return [
        (solver, backward, door)
        for solver in (*SOLVERS, BLACKBOX)
        for backward in BACKWARDS
        for door in families.DOORS[family]
        if valid(family, solver, backward, door)
    ]


def large_run(count: int, offset: int = 0) -> list[Case]:
    """Problems ``offset … offset + count − 1``: the families in turn, and for each
    family its combinations in a fixed shuffled order, round robin."""
    orders = {}
    for family in FAMILY_NAMES:
        combos = combinations(family)
        random.Random(zlib.crc32(family.encode())).shuffle(combos)
        orders[family] = combos
    cases = []
    for index in range(offset, offset + count):
        family = FAMILY_NAMES[index % len(FAMILY_NAMES)]
        seed = index // len(FAMILY_NAMES)
        combos = orders[family]
        cases.append(Case(family, seed, *combos[seed % len(combos)]))
    return cases


def fast_sample() -> list[Case]:
    """Every family × solver × backward that makes sense, once, with small problems;
    the doors of each (solver, backward) pair in turn."""
    cases = []
    for family in FAMILY_NAMES:
        pairs: dict[tuple[str, str], list[str]] = {}
        for solver, backward, door in combinations(family):
            pairs.setdefault((solver, backward), []).append(door)
        for seed, ((solver, backward), doors) in enumerate(pairs.items()):
            cases.append(Case(family, seed, solver, backward, doors[seed % len(doors)], small=True))
    return cases


# -- the front doors ------------------------------------------------------------------
def _settings(inst: families.Instance) -> dict[str, Any]:
    return {"tol": inst.tol, "max_iter": inst.max_iter, "on_failure": inst.on_failure}


def _fixed_point(inst, solver, backward):
    return implicit.fixed_point(
        inst.fn, inst.z0, *inst.args, solver=solver, backward=backward, batched=inst.batched,
        return_info=True, **_settings(inst),
    )  # fmt: skip


def _root_solve(inst, solver, backward):
    return implicit.root_solve(
        inst.residual_fn(), inst.z0, *inst.root_args(), solver=solver, backward=backward,
        batched=inst.batched, return_info=True, **_settings(inst),
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
}


def make_solver(name: str) -> solvers.Solver | None:
    return None if name == BLACKBOX else SOLVERS[name]()


def make_backward(name: str):
    return implicit.linear.resolve(name)
