"""The interface every forward solver implements, the residual it receives, and the loop
that drives it.

A solver finds ``z`` with ``g(z) = 0`` for a flat batch ``z`` of shape ``(B, n)``
(row ``b`` is problem ``b``). It implements two small methods:

* ``Solver.init`` builds the method's state from the first iterate;
* ``Solver.step`` proposes the next iterate and its residual.

A method that watches the batch's progress may also take, through ``Solver.observe``,
the largest residual norm the driver has read on the host (state in, state out).

``Solver.solve`` owns everything else, once for all methods: per-problem stopping
(``‖g(z)_b‖₂ ≤ tol_b · (1 + scale_b)``, the scale fixed at the initial guess), freezing
of finished problems, non-finite detection, the residual history, the counters of
``SolveInfo`` and the per-iteration callback. A method that is not iterative (scipy, a
black box) overrides ``Solver.solve``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from implicit._batch import (
    all_running,
    check_interval,
    residual_norms,
    select_rows,
    thresholds,
    traced,
    working_dtype,
)
from implicit._batch import norms as norms_of
from implicit._results import (
    CONVERGED,
    MAX_ITER,
    NONFINITE,
    STATUS_NAMES,
    SolveInfo,
    check_number,
    status_name,
)
from implicit.linear.operator import GraphJacobian, Jacobian, JacobianOperator

if TYPE_CHECKING:
    from implicit.linear import Hint


@dataclasses.dataclass(frozen=True, kw_only=True)
class Solver(abc.ABC):
    """A method for ``g(z) = 0`` on a flat batch ``(B, n)``.

    A solver is configuration only: an immutable dataclass, safe to reuse across calls,
    threads and ``torch.func`` transforms; what a solve needs per call (``tol``,
    ``max_iter``, the callback) is passed to [`solve`][implicit.solvers.Solver.solve],
    and what it learns lives in the state its methods pass along. A method sets
    ``name`` and implements [`init`][implicit.solvers.Solver.init] and
    [`step`][implicit.solvers.Solver.step]; [`solve`][implicit.solvers.Solver.solve]
    runs the loop. They receive the problem as a
    [`Residual`][implicit.solvers.Residual] ``fn``: ``fn(z)`` evaluates ``g`` on
    ``(B, n)`` tensors (counted in ``SolveInfo.f_evals``), ``fn.linearize(z)`` returns
    ``g(z)`` and ``∂g/∂z`` as a [`JacobianOperator`][implicit.linear.JacobianOperator]
    (products ``.mv(x)``, blocks ``.dense()``), ``fn.jacobian(z)`` ``g(z)`` and the
    ``(B, n, n)`` blocks. A step must stay differentiable (no in-place update of a
    tensor that may require grad, no ``.detach()`` of an iterate), so that
    ``backward="unroll"`` can run through it.

    Args:
        check_every: test for the end of the loop (a host synchronisation) every this
            many iterations; ``None`` means every iteration on the CPU and every 4 on
            accelerators, where a synchronisation stalls the device. Finished problems
            stop changing at once either way.
    """

    name: ClassVar[str]

    check_every: int | None = None

    def __post_init__(self) -> None:
        if self.check_every is not None:
            check_number(self.check_every, "check_every", "an integer >= 1")

    def init(self, fn: Residual, z: torch.Tensor, r: torch.Tensor) -> Any:
        """The method's state at the first iterate ``z`` with residual ``r = g(z)``."""
        return None

    def step(
        self, fn: Residual, z: torch.Tensor, r: torch.Tensor, state: Any
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """One iteration from ``z`` (residual ``r``): the next ``z``, ``g(z)`` and state.

        Every row is stepped; the driver discards the rows of finished problems. A
        method that is not iterative in this loop overrides
        [`solve`][implicit.solvers.Solver.solve] instead.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement step() or solve()")

    def observe(self, state: Any, largest: float) -> Any:
        """The state after the driver read ``largest``, the batch's largest residual
        norm at the iterate it passes to the next
        [`step`][implicit.solvers.Solver.step], on the host (it does so where it tests
        every iteration, until a problem ends). A method that watches the batch's
        progress takes it from here instead of spending a pass over the data on it; by
        default the state is unchanged."""
        return state

    def hint(self, state: Any) -> Hint | None:
        """What the method learned about ``∂g/∂z`` near its last iterate, from its final
        ``state``, for the backward (``SolveInfo.hint``): a [`Hint`][implicit.linear.Hint]
        such as Newton's [`NearbyFactorization`][implicit.linear.NearbyFactorization],
        Broyden's and Anderson's [`LowRankInverse`][implicit.linear.LowRankInverse], a
        minimiser's [`PositiveDefinite`][implicit.linear.PositiveDefinite]; ``None`` by
        default. It is kept until the backward only where its linear solver uses it, so
        it should be cheap to make (compute what it holds when it is first applied)."""
        return None

    def solve(
        self,
        fn: Residual,
        z0: torch.Tensor,
        r0: torch.Tensor | None,
        *,
        tol: float | torch.Tensor,
        max_iter: int,
        callback: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> tuple[torch.Tensor, SolveInfo]:
        """Iterate from ``z0`` (whose residual ``r0`` may be known) until every problem
        has converged, turned non-finite, or ``max_iter`` iterations have passed.

        Args:
            fn: the residual on ``(B, n)`` rows.
            z0: the initial iterate, ``(B, n)``.
            r0: ``fn(z0)`` when already known, else ``None``.
            tol: the tolerance: a number, or a ``(B,)`` tensor (one per problem) in the
                dtype of the norms; problem ``b`` stops at
                ``‖g(z)_b‖₂ ≤ tol_b · (1 + fn.scale(z0, r0)_b)``.
            max_iter: the iteration cap.
            callback: called after each iteration as ``callback(k, norms, z)``: the
                iteration number ``k`` (from 1), the ``(B,)`` residual norms and the
                ``(B, n)`` iterate, the driver's own tensors (a front door hands the
                user copies). A finished problem keeps its final values. The end is
                tested every ``check_every`` iterations, so up to ``check_every − 1``
                calls can follow the last counted iteration, in which nothing changes.
        """
        z = z0
        r = fn(z) if r0 is None else r0
        check_every = check_interval(self.check_every, z)
        norms = residual_norms(z, r)
        # Fixed at the start, so that a diverging iterate cannot loosen its own test.
        threshold = thresholds(tol, fn.scale(z, r))
        # While the host knows that every problem runs (it checks every iteration),
        # ``running`` is None and an iteration needs none of the per-problem
        # bookkeeping: the common case. One problem's threshold is then a number.
        running = stopped_at = worst = None
        if check_every == 1:
            limit = threshold.item() if norms.shape[0] == 1 else threshold
            worst = all_running(norms, limit)
            # The worst residual per iteration, read on the host as the loop goes.
            history: list = [norms.max().item() if worst is None else worst]
        else:
            history = [norms.max()]  # read once, at the end
        if worst is None:
            # A problem runs while its residual is finite and above its threshold (a
            # NaN fails both tests); it stops changing when it ends.
            running = (norms > threshold) & (norms < math.inf)
            # Iterations per problem: the loop count for every problem still running.
            stopped_at = torch.zeros_like(norms, dtype=torch.long)
        state = self.init(fn, z, r)
        if worst is not None:
            state = self.observe(state, worst)
        ended = False  # the loop found no problem running
        solved = False  # the one problem converged, as the host read
        checked = False  # the final iterates' finiteness is known
        k = 0
        for k in range(max_iter):
            if running is not None and k % check_every == 0 and not bool(running.any()):
                ended = True
                break
            z_new, r_new, state = self.step(fn, z, r, state)
            new_norms = norms_of(r_new)
            if running is None:
                # Ending or blowing up both leave this fast path. (No problem ends on it,
                # so its iterates' finiteness is left to the paths where they can.)
                worst = all_running(new_norms, limit)
                if worst is not None:
                    z, r, norms = z_new, r_new, new_norms
                    state = self.observe(state, worst)
                    history.append(worst)
                    if callback is not None:
                        callback(k + 1, norms, z)
                    continue
                if norms.shape[0] == 1:
                    # One problem ended: it converged, or stops at its last finite iterate
                    # (as below, on the host).
                    new_norms = residual_norms(z_new, r_new, new_norms)
                    history.append(new_norms.item())
                    # (A finite residual that ended the loop is at most the limit,
                    # which is not NaN on this path.)
                    solved = checked = history[-1] < math.inf
                    if checked:
                        z, r, norms = z_new, r_new, new_norms
                    stopped_at = torch.full_like(norms, k + 1, dtype=torch.long)
                    if callback is not None:
                        callback(k + 1, norms, z)
                    k, ended = k + 1, True
                    break
                running = torch.ones_like(new_norms, dtype=torch.bool)
                stopped_at = torch.zeros_like(new_norms, dtype=torch.long)
            new_norms = residual_norms(z_new, r_new, new_norms)
            # The running problems take the step, except those whose residual turned
            # non-finite: they stop at their last finite iterate.
            stepped = running & (new_norms < math.inf)
            z, r = select_rows(stepped, check_every, (z_new, z), (r_new, r))
            top = torch.where(running, new_norms, norms).max()
            history.append(top.item() if check_every == 1 else top)
            norms = torch.where(stepped, new_norms, norms)
            stopped_at = stopped_at.masked_fill(running, k + 1)
            running = stepped & (new_norms > threshold)
            if callback is not None:
                callback(k + 1, norms, z)
        else:
            k = max_iter
        # A problem that is neither converged nor running ended non-finite: at the start,
        # or at its last finite iterate (whose residual was above the threshold); so did
        # one running with an iterate that the fast path took unchecked.
        if not checked:
            norms = residual_norms(z, r, norms)
        converged = norms <= threshold
        if solved:  # (what the general end computes, without its passes)
            codes = torch.full_like(norms, CONVERGED, dtype=torch.long)
            iterations = stopped_at
        elif ended:  # every problem stopped converged or non-finite, in the loop
            codes = torch.where(converged, CONVERGED, NONFINITE)
            iterations = stopped_at
        elif running is None:  # every problem ran every iteration
            codes = torch.where(
                converged, CONVERGED, torch.where(norms < math.inf, MAX_ITER, NONFINITE)
            )
            iterations = torch.full_like(norms, k, dtype=torch.long)
        else:
            ran_out = running & (norms < math.inf)
            codes = torch.where(converged, CONVERGED, torch.where(ran_out, MAX_ITER, NONFINITE))
            # Problems still running at the end ran every iteration of the loop.
            iterations = torch.where(running, k, stopped_at)
        info = SolveInfo(
            converged=converged,
            residual=norms.detach(),
            # Testing every iteration, the loop ran while some problem ran.
            iterations=k if check_every == 1 else int(iterations.max()),
            f_evals=fn.f_evals,
            history=history if check_every == 1 else torch.stack(history).detach().tolist(),
            status=STATUS_NAMES[CONVERGED] if solved else status_name(codes),
            solver=self.name,
            jac_evals=fn.jac_evals,
            hint=self.hint(state),
            iterations_per_problem=iterations,
            status_codes=codes,
        )
        return z, info


class Residual:
    """The residual ``g`` on a flat batch ``(B, n)``, as a forward solver receives it.

    Row ``b`` of ``g(z)`` depends only on row ``b`` of ``z`` (``B`` independent
    problems). Every evaluation is counted, so that ``SolveInfo.f_evals`` reports what
    the solver spent.

    Args:
        fn: ``g`` on the flat view, ``fn(z, *args)``: ``(B, n) -> (B, n)``.
        scale: ``scale(z0, g(z0), *args) -> (B,)``, the scale of the stopping test
            (problem ``b`` has converged when ``‖g(z)_b‖₂ ≤ tol · (1 + scale_b)``);
            ``None``: zero, an absolute test.
        args: further arguments of ``fn`` and ``scale`` (the problem's inputs).

    Attributes:
        f_evals: evaluations of ``g`` so far (one call on the whole batch counts once;
            a linearisation counts one).
        jac_evals: dense Jacobians built so far (the solver counts those it builds).

    Example:
        >>> fn = implicit.solvers.Residual(lambda z: z**3 - 8)
        >>> z = torch.full((2, 1), 3.0)
        >>> r, jacobian = fn.linearize(z)  # g(z) and ∂g/∂z at z, as products
        >>> r.flatten(), jacobian.mv(torch.ones(2, 1)).flatten()  # 3z², per row
        (tensor([19., 19.]), tensor([27., 27.]))
        >>> fn.f_evals
        1
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        scale: Callable[..., torch.Tensor] | None = None,
        args: Sequence[Any] = (),
    ):
        self.fn = fn
        self._scale = scale
        self.args = tuple(args)
        self.f_evals = 0
        self.jac_evals = 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """``g(z)``."""
        self.f_evals += 1
        return self.fn(z, *self.args)

    def scale(self, z0: torch.Tensor, r0: torch.Tensor) -> torch.Tensor:
        """The ``(B,)`` scale of the stopping test, from the initial guess ``z0`` and its
        residual ``r0`` (see [`Solver.solve`][implicit.solvers.Solver.solve])."""
        if self._scale is None:
            return z0.new_zeros(z0.shape[0], dtype=working_dtype(z0.dtype))
        return self._scale(z0, r0, *self.args)

    def linearize(self, z: torch.Tensor) -> tuple[torch.Tensor, JacobianOperator]:
        """``g(z)`` and ``∂g/∂z`` at ``z`` as a
        [`JacobianOperator`][implicit.linear.JacobianOperator] (one evaluation of ``g``).

        The operator's products are one pass each through a graph of ``g`` recorded
        with plain autograd, unless the solver's operations are recorded themselves
        (``backward="unroll"``) or a ``torch.func`` transform sees them: then they are
        ``torch.func`` products, which can be differentiated.
        """
        self.f_evals += 1
        if traced(z):
            jacobian = Jacobian(self.fn, z, *self.args)
        else:
            jacobian = GraphJacobian.record(self.fn, z, *self.args)
        return jacobian.value, JacobianOperator(jacobian)

    def jacobian(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(z)`` and the dense per-problem Jacobian ``(B, n, n)`` at ``z`` (``n``
        products; counts one evaluation and one Jacobian)."""
        value, operator = self.linearize(z)
        self.jac_evals += 1
        return value, operator.dense()
