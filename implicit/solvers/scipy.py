"""Any ``scipy.optimize.root`` method as a forward solver.

The solve runs in numpy, inside the differentiable core's forward (where tensors are
plain), and only finds ``z*``; derivatives come from the implicit backward as for every
solver. ``g`` is evaluated by torch on the problem's device and dtype: each call of
scipy's function copies ``z`` to the device and the residual back to the host.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import torch

from implicit._batch import residual_norms, thresholds
from implicit._checks import check_options
from implicit._results import BREAKDOWN, CONVERGED, FAILED, NONFINITE, SolveInfo, status_name
from implicit.solvers._scipy_run import NONLIN, Run
from implicit.solvers.base import Residual, Solver

METHODS = (
    "hybr",
    "lm",
    "broyden1",
    "broyden2",
    "anderson",
    "linearmixing",
    "diagbroyden",
    "excitingmixing",
    "krylov",
    "df-sane",
)
"""The ``scipy.optimize.root`` methods [`Scipy`][implicit.solvers.Scipy] accepts."""
#: The methods that take a Jacobian (``jac=``); the others approximate their own.
_WITH_JACOBIAN = ("hybr", "lm")
#: The methods that call back after each iteration.
_CALLS_BACK = (*NONLIN, "df-sane")

#: Diagonal methods whose step length is global: coupled samples need several times the
#: iterations in a block (measured 3-6x), so ``"auto"`` solves them per sample.
_PER_SAMPLE = ("linearmixing", "diagbroyden")
MAX_BLOCK_UNKNOWNS = 256
"""Above this many unknowns in a block, hybr and lm factorise a dense ``(B·n)²`` Jacobian
(cost ``(B·n)³``): ``strategy="auto"`` solves them per sample instead (measured faster,
see [`Scipy`][implicit.solvers.Scipy])."""

Strategy = Literal["auto", "block", "per_sample"]


@dataclasses.dataclass(frozen=True)
class Scipy(Solver):
    """``scipy.optimize.root(method=...)`` on each problem of the batch.

    Tolerances follow the front doors' contract, per problem ``b``:
    ``‖g(z)_b‖₂ ≤ tol · (1 + scale_b)``. The residual-based methods (the ``nonlin``
    family and ``df-sane``) are given exactly that test as their stopping norm;
    ``hybr`` and ``lm`` stop on their step-size test (``xtol = tol``, relative to
    ``z``, as ``scipy.optimize.root(tol=...)`` sets it). Whatever
    scipy reports, the test is then applied to its answer, which decides convergence:

    * ``"converged"``: the answer passes the test (even if scipy reported a failure,
      e.g. hybr's "not making good progress" at a root already accurate to ``tol``);
    * ``"failed"``: it does not (scipy failed, or reported success above ``tol``);
    * ``"breakdown"``: scipy raised an exception (e.g. krylov's "Jacobian inversion
      yielded zero vector"); the best point evaluated is returned. Exceptions raised
      by ``g`` itself propagate unchanged;
    * ``"nonfinite"``: ``g`` returned a non-finite value; that problem's solve stops
      at once at the best finite point it had evaluated.

    ``info.message`` carries scipy's ``success``, ``status`` and ``message`` (grouped by
    problem when they differ). ``info.iterations`` counts scipy's iterations (its
    callbacks) for the ``nonlin`` methods and ``df-sane``, and its function evaluations
    for ``hybr`` and ``lm``, which report no iterations; ``info.history`` holds the worst
    residual after each iteration where scipy calls back, else the first and the last.
    A front door's ``callback`` is called from scipy's own callback, after each of its
    iterations, where scipy has one (the ``nonlin`` methods and ``df-sane``; a problem
    solved alone, ``strategy="per_sample"``, counts its iterations from 1, and the
    others keep their values meanwhile), and once at the end for ``hybr`` and ``lm``.

    ``max_iter`` becomes ``maxiter`` for the ``nonlin`` methods and
    ``maxfev = max_iter · (n + 1)`` for ``hybr``, ``lm`` and ``df-sane``, which only
    count function evaluations (``n + 1`` per finite-difference Jacobian). ``options``
    override every default above.

    float32 problems stay float32 for ``g`` (scipy's own arithmetic is float64 for
    hybr/lm, float32 for the others); without a Jacobian, hybr and lm are told the
    function's precision (``eps``) so that their finite differences are not noise.

    Args:
        method: one of ``scipy.optimize.root``'s methods (see
            [`METHODS`][implicit.solvers.scipy.METHODS]).
        options: scipy's ``options`` dict for the method; misspelt keys raise.
        strategy: how a batch of ``B`` problems is solved.
            ``"per_sample"``: one scipy solve per problem (each call of ``g``
            evaluates the whole batch, the other rows held fixed, so it costs about
            ``B`` times the evaluations); ``"block"``: one scipy solve of all
            ``B·n`` unknowns at once (one batched call of ``g`` per scipy call; the
            problems share scipy's steps and stop together). ``"auto"`` (default)
            picks the faster, as measured by ``benchmarks/scipy_strategies.py``:
            block, except per sample for hybr and lm above
            [`MAX_BLOCK_UNKNOWNS`][implicit.solvers.scipy.MAX_BLOCK_UNKNOWNS] unknowns
            (their dense ``(B·n)³`` factorisation dominates) and for linearmixing and
            diagbroyden (their global step length makes a block need 3-6x the
            iterations, so it failed within ``max_iter`` where per-sample solves
            converged). Block is faster for the other methods (the measurements:
            ``benchmarks/results/scipy_strategies.txt``).
        jacobian: give hybr and lm the exact per-sample Jacobian (autograd, one
            batched vector-Jacobian product per unknown) instead of finite
            differences. ``None`` (default) means yes for hybr and lm: 15-17
            evaluations instead of 23-4000, faster in blocks, exact in float32 (14
            evaluations instead of 53); only a single tiny problem may be faster
            with finite differences (``jacobian=False``). Must not be ``True`` for
            the other methods, which take no Jacobian.
    """

    name = "scipy"

    method: str = "hybr"
    options: dict[str, Any] | None = None
    strategy: Strategy = dataclasses.field(default="auto", kw_only=True)
    jacobian: bool | None = dataclasses.field(default=None, kw_only=True)
    # scipy runs its own loop.
    check_every: int | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        method = self.method
        if method not in METHODS:
            raise ValueError(f"unknown scipy method {method!r}: use one of {list(METHODS)}")
        if self.options is not None and not isinstance(self.options, dict):
            raise TypeError(f"options must be a dict, got {type(self.options).__name__}")
        options = dict(self.options or {})
        check_options(f"Scipy(method={method!r})", options, _option_names(method))
        if self.strategy not in ("auto", "block", "per_sample"):
            raise ValueError(
                f"strategy must be 'auto', 'block' or 'per_sample', got {self.strategy!r}"
            )
        if self.jacobian and method not in _WITH_JACOBIAN:
            raise ValueError(
                f"jacobian=True: method {method!r} takes no Jacobian; only {_WITH_JACOBIAN} do"
            )
        jacobian = method in _WITH_JACOBIAN if self.jacobian is None else bool(self.jacobian)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "jacobian", jacobian)

    def solve(self, fn: Residual, z0, r0, *, tol, max_iter, callback=None):
        r0 = fn(z0) if r0 is None else r0
        if r0.requires_grad:
            raise ValueError(
                "backward='unroll' differentiates through the solver's iterations, but the "
                "scipy solver runs in numpy: use an implicit backward ('auto', 'dense', ...)"
            )
        batch = z0.shape[0]
        # Fixed at the start, as for every solver. A problem that starts non-finite (its
        # iterate, residual or test's scale) stops at once, as in every solver: it is not
        # handed to scipy (where it would spoil the block of problems it belongs to).
        bound = thresholds(tol, fn.scale(z0, r0))
        finite = torch.isfinite(residual_norms(z0, r0)) & torch.isfinite(bound)
        startable = finite.nonzero().flatten().tolist()
        if self._strategy(batch * z0.shape[1]) == "block":
            groups = [startable] if startable else []
        else:
            groups = [[b] for b in startable]
        z = z0
        runs = []
        # The norms a callback sees: each problem's latest (its initial ones until run).
        latest = residual_norms(z0, r0) if callback is not None else None
        for rows in groups:
            run = Run(self, fn, z, rows, tol, bound[rows], max_iter, callback, latest)
            z = run.solve(r0[rows])
            runs.append(run)
            if latest is not None:
                latest = run.latest
        r = fn(z)
        norms = residual_norms(z, r)
        codes = torch.where(norms <= bound, CONVERGED, FAILED)
        blew_up = torch.zeros_like(codes, dtype=torch.bool)
        broke_down = torch.zeros_like(blew_up)
        for run in runs:
            blew_up[run.rows] = torch.as_tensor(run.blew_up, device=blew_up.device)
            broke_down[run.rows] = run.broke_down
        codes = torch.where(broke_down & (codes == FAILED), BREAKDOWN, codes)
        finite = torch.isfinite(norms) & torch.isfinite(bound)
        codes = torch.where(blew_up | ~finite, NONFINITE, codes)
        histories = [run.history for run in runs] or [[float(norms.max())]]
        length = max(len(h) for h in histories)
        history = [max(h[min(k, len(h) - 1)] for h in histories) for k in range(length)]
        iterations = torch.zeros_like(codes)
        for run in runs:
            iterations[run.rows] = run.iterations
        iterations_taken = max((run.iterations for run in runs), default=0)
        if callback is not None and runs and self.method not in _CALLS_BACK:
            callback(iterations_taken, norms, z)  # scipy has no callback: once, at the end
        info = SolveInfo(
            converged=codes == CONVERGED,
            residual=norms.detach(),
            iterations=iterations_taken,
            f_evals=fn.f_evals,
            history=[*history, float(norms.max())] if length == 1 else history,
            status=status_name(codes),
            solver=self.name,
            message=self._message(runs, codes),
            jac_evals=fn.jac_evals,
            iterations_per_problem=iterations,
            status_codes=codes,
        )
        return z, info

    def _strategy(self, unknowns: int) -> str:
        """``"block"`` or ``"per_sample"`` for a batch of ``unknowns`` in all."""
        if self.strategy != "auto":
            return self.strategy
        if self.method in _PER_SAMPLE:
            return "per_sample"
        if self.method in _WITH_JACOBIAN and unknowns > MAX_BLOCK_UNKNOWNS:
            return "per_sample"
        return "block"

    def _message(self, runs: list[Run], codes: torch.Tensor) -> str:
        """Scipy's verdicts, grouped by problem, and what our test made of them."""
        verdicts: dict[str, list[int]] = {}
        for run in runs:
            verdict = run.verdict
            if not run.success and bool((codes[run.rows] == CONVERGED).all()):
                verdict += " (yet the answer meets tol)"
            verdicts.setdefault(verdict, []).extend(run.rows)
        solved = {row for run in runs for row in run.rows}
        untested = [row for row in range(codes.shape[0]) if row not in solved]
        if untested:
            verdict = "not run: z0, g(z0) or the scale of the stopping test is not finite"
            verdicts[verdict] = untested
        parts = []
        for verdict, rows in verdicts.items():
            where = "" if len(verdicts) == 1 else f" [problem(s) {_ranges(rows)}]"
            parts.append(f"{verdict}{where}")
        text = f"scipy.optimize.root(method={self.method!r}): " + "; ".join(parts) + "."
        if bool(((codes == FAILED) | (codes == BREAKDOWN)).any()):
            text += (
                " The answer does not meet tol: raise max_iter, loosen tol, set scipy "
                "options, or try another method."
            )
        return text


def _option_names(method: str) -> list[str]:
    """The option names ``scipy.optimize.show_options`` documents for ``method``."""
    import scipy.optimize

    text = scipy.optimize.show_options("root", method, disp=False)
    section = text.split("Options\n-------\n", 1)[-1]
    section = re.split(r"\n\S[^\n]*\n-{3,}\n", section, maxsplit=1)[0]
    return re.findall(r"^(\w+) :", section, flags=re.M)


def _ranges(rows: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2, 5"``."""
    rows = sorted(rows)
    spans: list[str] = []
    start = previous = rows[0]
    for row in [*rows[1:], None]:
        if row is not None and row == previous + 1:
            previous = row
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        if row is not None:
            start = previous = row
    return ", ".join(spans)
