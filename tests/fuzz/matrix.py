"""What the fuzz runs: solvers × backward modes × front doors × derivatives, where
they make sense.

A :class:`Case` is ``(family, seed, solver, backward, door, derivative)``: the problem
comes from ``(family, seed)`` alone, the rest says how it is solved and which
derivative is checked (``grad``: reverse mode; ``jvp``: forward mode,
``torch.func.jvp``; ``hvp``: a Hessian-vector product by double backward). Its ``id``
(``family:seed:solver:backward:door[:jvp|:hvp][:small]``) reproduces it:
``python benchmarks/fuzz.py --case ID``.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections.abc import Callable

import families
from doors import DOORS, Later

import implicit
from implicit import solvers

#: Root and fixed-point solvers by the names cases use.
ROOT_SOLVERS: dict[str, Callable[[], solvers.Solver]] = {
    "fixed_point": solvers.FixedPoint,
    "anderson": solvers.Anderson,
    "newton_dense": lambda: solvers.Newton(linear="dense"),
    "newton_krylov": lambda: solvers.Newton(linear="krylov"),
    "broyden": solvers.Broyden,
    "scipy_hybr": lambda: solvers.Scipy("hybr"),
    "scipy_lm": lambda: solvers.Scipy("lm"),
    "scipy_krylov": lambda: solvers.Scipy("krylov"),
}
_SCIPY_MINIMIZE = solvers.scipy_minimize.MINIMIZE_METHODS
#: Methods of ``scipy.optimize.minimize`` that take bounds.
SCIPY_BOUNDED = ("Nelder-Mead", "Powell", "L-BFGS-B", "TNC", "COBYLA", "COBYQA", "SLSQP",
                 "trust-constr")  # fmt: skip
#: Solvers of ``minimize``.
MINIMIZE_SOLVERS: dict[str, Callable[[], solvers.Solver]] = {
    "lbfgs": solvers.LBFGS,
    "newton_min": lambda: solvers.ModifiedNewton(linear="dense"),
    "newton_min_cg": lambda: solvers.ModifiedNewton(linear="cg"),
    **{f"scipy_min_{m}": (lambda m=m: solvers.ScipyMinimize(m)) for m in _SCIPY_MINIMIZE},
}
SCIPY_LEAST_SQUARES = ("trf", "dogbox", "lm")
#: Solvers of ``least_squares``.
LEAST_SQUARES_SOLVERS: dict[str, Callable[[], solvers.Solver]] = {
    "levenberg_marquardt": solvers.LevenbergMarquardt,
    "gauss_newton": solvers.GaussNewton,
    **{
        f"scipy_ls_{m}": (lambda m=m: solvers.ScipyLeastSquares(m)) for m in ("trf", "dogbox", "lm")
    },
    "lbfgs": solvers.LBFGS,
    "newton_min": lambda: solvers.ModifiedNewton(linear="dense"),
}
#: Bracketing solvers: passed by name, with the instance's ``lower=``/``upper=``.
BRACKET_SOLVERS = ("bisection", "chandrupatla")
SOLVERS: dict[str, Callable[[], solvers.Solver | str]] = {
    **ROOT_SOLVERS,
    **MINIMIZE_SOLVERS,
    **LEAST_SQUARES_SOLVERS,
    **{name: (lambda name=name: name) for name in BRACKET_SOLVERS},
}
#: The "solver" of the doors whose forward is an independent black box.
BLACKBOX = "blackbox"
#: Backward modes (``implicit.linear.NAMES``): the exact ones and ``unroll`` get their
#: gradient checked against the oracle, the inexact ones only for finiteness.
EXACT = ("auto", "dense", "cg", "gmres", "bicgstab", "neumann")
INEXACT = ("one_step", "phantom")
BACKWARDS = (*EXACT, *INEXACT, "unroll")
#: The backward modes of the optimisation and bracketing problems: Neumann's series
#: needs a contraction, which a Hessian is not; ``unroll`` is refused by design (line
#: searches, curvature tests and bracket choices are not differentiable).
OPTIMISATION_BACKWARDS = ("auto", "dense", "cg", "gmres", "bicgstab", "unroll")
DERIVATIVES = ("grad", "jvp", "hvp")
FAMILY_NAMES = tuple(families.FAMILIES)
ROOT_FAMILIES = tuple(f for f in FAMILY_NAMES if families.KIND[f] == "root")
NEW_FAMILIES = tuple(f for f in FAMILY_NAMES if families.KIND[f] != "root")


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    seed: int
    solver: str
    backward: str
    door: str
    small: bool = False
    derivative: str = "grad"

    @property
    def id(self) -> str:
        tail = f":{self.derivative}" if self.derivative != "grad" else ""
        tail += ":small" if self.small else ""
        return f"{self.family}:{self.seed}:{self.solver}:{self.backward}:{self.door}{tail}"

    @classmethod
    def parse(cls, text: str) -> Case:
        parts = text.split(":")
        extra = parts[5:]
        small = extra[-1:] == ["small"]
        extra = extra[:-1] if small else extra
        if len(parts) < 5 or len(extra) > 1 or (extra and extra[0] not in DERIVATIVES[1:]):
            raise ValueError(
                f"a case is family:seed:solver:backward:door[:jvp|:hvp][:small], got {text!r}"
            )
        family, seed, solver, backward, door = parts[:5]
        derivative = extra[0] if extra else "grad"
        return cls(family, int(seed), solver, backward, door, small, derivative)


def refused_by_design(solver: str, backward: str) -> bool:
    """``unroll`` through a minimiser or a bracketing solver: a clear ``ValueError``."""
    return backward == "unroll" and solver not in (*ROOT_SOLVERS, BLACKBOX)


def valid(family: str, solver: str, backward: str, door: str) -> bool:
    """Whether the combination makes sense (the API does not refuse it by design)."""
    if door not in families.DOORS[family]:
        return False
    kind = families.KIND[family]
    if kind != "root":
        return _valid_new(family, kind, solver, backward)
    if solver not in (*ROOT_SOLVERS, BLACKBOX):
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


def _valid_new(family: str, kind: str, solver: str, backward: str) -> bool:
    if backward not in OPTIMISATION_BACKWARDS:
        return False
    # The projected condition of a bounded problem has a non-symmetric Jacobian.
    if backward == "cg" and family not in families.SYMMETRIC:
        return False
    if kind == "bracket":
        return solver in BRACKET_SOLVERS
    names = MINIMIZE_SOLVERS if kind == "minimize" else LEAST_SQUARES_SOLVERS
    if solver not in names:
        return False
    if family in families.BOUNDED and solver.startswith("scipy_"):
        return solver.removeprefix("scipy_min_") in SCIPY_BOUNDED or solver in (
            "scipy_ls_trf",
            "scipy_ls_dogbox",
        )
    return True


def valid_higher_order(family: str, solver: str, backward: str, door: str) -> bool:
    """Whether forward mode and second order are checked for the combination: an exact
    mode or ``unroll`` (not refused), on a family with a float64 oracle."""
    if not valid(family, solver, backward, door) or refused_by_design(solver, backward):
        return False
    return backward in (*EXACT, "unroll") and family != "tanh_half"


def combinations(family: str) -> list[tuple[str, str, str]]:
    """Every valid ``(solver, backward, door)`` of a family, in a fixed order."""
    return [
        (solver, backward, door)
        for solver in (*SOLVERS, BLACKBOX)
        for backward in BACKWARDS
        for door in families.DOORS[family]
        if valid(family, solver, backward, door)
    ]


def higher_order(family: str) -> list[tuple[str, str, str]]:
    """The combinations of a family whose forward mode and second order are checked."""
    return [combo for combo in combinations(family) if valid_higher_order(family, *combo)]


def _shuffled(family: str, combos: list, salt: str = "") -> list:
    combos = list(combos)
    random.Random(zlib.crc32((family + salt).encode())).shuffle(combos)
    return combos


def large_run(count: int, offset: int = 0, suite: str = "root") -> list[Case]:
    """Problems ``offset … offset + count − 1`` of a suite.

    ``"root"``: the root families in turn, reverse mode, each family's combinations in
    a fixed shuffled order, round robin. ``"extended"``: the optimisation and
    bracketing families (twice as often) and the root families in turn; an
    optimisation problem checks reverse mode, forward mode or second order (2 : 1 : 1),
    a root problem forward mode or second order.
    """
    if suite not in ("root", "extended"):
        raise ValueError(f"unknown suite {suite!r}: 'root' or 'extended'")
    if suite == "root":
        slots = [(family, 0, 1) for family in ROOT_FAMILIES]
    else:  # (half precision has no float64 oracle for higher derivatives)
        higher = [f for f in ROOT_FAMILIES if higher_order(f)]
        slots = [(f, k, 2) for k in range(2) for f in NEW_FAMILIES] + [(f, 0, 1) for f in higher]
    cases = []
    for index in range(offset, offset + count):
        family, occurrence, copies = slots[index % len(slots)]
        seed = (index // len(slots)) * copies + occurrence
        if suite == "root":
            combos = _shuffled(family, combinations(family))
            cases.append(Case(family, seed, *combos[seed % len(combos)]))
            continue
        if families.KIND[family] == "root":
            combos = _shuffled(family, higher_order(family), "higher")
            combo = combos[(seed // 2) % len(combos)]
            cases.append(Case(family, seed, *combo, derivative=("jvp", "hvp")[seed % 2]))
            continue
        combos = _shuffled(family, combinations(family))
        combo = combos[seed % len(combos)]
        derivative = ("grad", "jvp", "grad", "hvp")[zlib.crc32(f"{family}:{seed}".encode()) % 4]
        if not valid_higher_order(family, *combo):
            derivative = "grad"
        cases.append(Case(family, seed, *combo, derivative=derivative))
    return cases


#: Higher-order cases per family and derivative in the fast sample.
FAST_HIGHER_ORDER = 3


#: Families whose solver × backward combinations are the same, shared out among them in
#: the fast sample (each combination on one of them, in turn): the sample's time.
SHARED = (
    ("opt_quadratic", "opt_illcond", "opt_nonconvex", "opt_nonfinite"),
    ("lsq_random", "lsq_curve"),
)


def _group(family: str) -> tuple[str, ...]:
    return next((group for group in SHARED if family in group), (family,))


def fast_sample() -> list[Case]:
    """Every family × solver × backward that makes sense, once, with small problems
    (the doors of each (solver, backward) pair in turn; the families of a ``SHARED``
    group take their common pairs in turn), then per family ``FAST_HIGHER_ORDER``
    forward-mode and as many second-order cases, their backward modes different where
    the family has enough."""
    cases = []
    for family in FAMILY_NAMES:
        group = _group(family)
        pairs: dict[tuple[str, str], list[str]] = {}
        for solver, backward, door in combinations(family):
            pairs.setdefault((solver, backward), []).append(door)
        solvers_ = list(dict.fromkeys(solver for solver, _ in pairs))
        backwards = list(dict.fromkeys(backward for _, backward in pairs))
        for seed, ((solver, backward), doors) in enumerate(pairs.items()):
            # A Latin square: every solver and every backward mode meet every member.
            turn = solvers_.index(solver) + backwards.index(backward)
            if group[turn % len(group)] != family:
                continue
            cases.append(Case(family, seed, solver, backward, doors[seed % len(doors)], small=True))
    for family in FAMILY_NAMES:
        for derivative in DERIVATIVES[1:]:
            chosen, modes = [], set()
            for combo in _shuffled(family, higher_order(family), derivative):
                if combo[1] not in modes and len(chosen) < FAST_HIGHER_ORDER:
                    chosen.append(combo)
                    modes.add(combo[1])
            for seed, combo in enumerate(chosen, start=1000):
                cases.append(Case(family, seed, *combo, small=True, derivative=derivative))
    return cases


#: scipy's derivative-free methods whose iterations may evaluate ``fun`` many times
#: (Powell: ``n`` line searches each).
DERIVATIVE_FREE_FEV = ("Nelder-Mead", "Powell", "COBYQA")


def make_solver(case: Case, inst: families.Instance) -> solvers.Solver | str | None:
    """The case's solver. In the fast sample, scipy's derivative-free methods get the
    evaluation cap ``maxfev = max_iter`` (their default caps iterations, each of which
    may evaluate ``fun`` dozens of times); the large run keeps the library's defaults
    (``maxfev = max_iter·(n + 1)``)."""
    if case.solver == BLACKBOX:
        return None
    method = case.solver.removeprefix("scipy_min_")
    if case.small and method in DERIVATIVE_FREE_FEV:
        return solvers.ScipyMinimize(method, options={"maxfev": inst.max_iter})
    return SOLVERS[case.solver]()


def make_backward(name: str):
    return implicit.linear.resolve(name)


__all__ = ["DOORS", "Case", "Later", "fast_sample", "large_run", "make_backward", "make_solver"]
