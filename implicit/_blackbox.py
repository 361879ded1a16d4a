"""Black boxes: answers computed outside autograd (numpy, scipy, C) made differentiable.

A black box ``h(*args)`` returns a root of ``g(·, *args)`` by any means. It only
replaces the forward solve (step 1 of :mod:`implicit.adjoint`); the derivatives come from
the one implicit backward, like every other front door's:

1. :func:`call` runs ``h`` inside :class:`_Call`, an autograd function without
   derivatives, so that ``h`` always receives plain detached tensors (``A.numpy()``
   works), also under ``torch.func`` transforms, whose wrapped tensors numpy cannot
   read; its ``vmap`` rule calls ``h`` once per slice. The answer is converted to a
   tensor of the problem's dtype and device, and checked (the right shape);
2. the answer is the problem's initial state: capture discovery evaluates ``g`` there,
   and that evaluation is the residual check of step 3;
3. :class:`CheckAnswer` is the "forward solver": it takes no step, measures
   ``‖g(z)_b‖`` at the answer against ``tol · (1 + scale_b)`` and reports, per
   problem, an answer that is not a root (status ``"failed"``) or not finite
   (``"nonfinite"``) through ``on_failure``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from implicit._batch import residual_norms, thresholds
from implicit._capture import tree_map_tensors
from implicit._results import (
    CONVERGED,
    FAILED,
    NONFINITE,
    ConvergenceError,
    SolveInfo,
    status_name,
)
from implicit.linear.unroll import Unroll
from implicit.solvers.base import Residual, Solver


def describe(h: Callable[..., Any], role: str) -> str:
    """How error messages name a black box, e.g. ``"custom_root solver 'solve'"``."""
    name = getattr(h, "__qualname__", None) or getattr(h, "__name__", None) or repr(h)
    return f"{role} {name!r}"


def call(
    h: Callable[..., Any],
    args: Sequence[Any],
    *,
    who: str,
    dtype: torch.dtype | None,
    device: torch.device | None,
    shapes: Sequence[torch.Size] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``h(*args)`` on detached copies of the arguments, as tensors of ``dtype`` on ``device``.

    Args:
        h: the black box.
        args: its arguments; tensors are handed over as detached copies.
        who: the black box's name in error messages (see :func:`describe`).
        dtype: the dtype the answer is converted to (its complex counterpart for a
            complex answer); ``None`` keeps a floating or complex answer's own and
            gives others the default dtype.
        device: the device the answer is moved to; ``None`` keeps its own.
        shapes: the shapes the answer must have (one per tensor of a tuple answer), or
            ``None`` when only ``g`` can tell.

    Raises:
        RuntimeError: ``h`` raised (the original exception is chained).
        TypeError: the answer is not a tensor or an array of real or complex numbers.
        ValueError: the answer has the wrong shape.
    """
    out = _Call.apply(h, (who, dtype, device), *args)
    parts = out if isinstance(out, tuple) else (out,)
    if shapes is not None:
        got = [tuple(p.shape) for p in parts]
        want = [tuple(s) for s in shapes]
        if got != want:
            shown = got[0] if len(got) == 1 else got
            expected = want[0] if len(want) == 1 else want
            raise ValueError(f"{who} returned shape {shown}, expected {expected}")
    return out


class _Call(torch.autograd.Function):
    """``h(*args)`` with plain tensors, as a function without derivatives."""

    @staticmethod
    def forward(h, spec, *args):
        who, dtype, device = spec
        # Copies: a black box that writes into its inputs (scipy's overwrite_a=True)
        # must not change the tensors the gradients are computed from.
        copies = tree_map_tensors(args, lambda t: t.detach().clone())
        try:
            out = h(*copies)
        except Exception as error:
            raise RuntimeError(f"{who} raised {type(error).__name__}: {error}") from error
        if isinstance(out, (tuple, list)):
            if not out:
                raise TypeError(f"{who} returned an empty {type(out).__name__}")
            return tuple(_as_tensor(part, who, dtype, device) for part in out)
        return _as_tensor(out, who, dtype, device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*outputs)
        ctx.outputs = len(outputs) if isinstance(output, tuple) else None

    @staticmethod
    def jvp(ctx, *tangents):
        # Forward mode asks even for outputs marked non-differentiable: they have none.
        return None if ctx.outputs is None else (None,) * ctx.outputs

    @staticmethod
    def vmap(info, in_dims, h, spec, *args):
        answers = []
        for index in range(info.batch_size):
            sliced = [
                a if dim is None else a.select(dim, index) for a, dim in zip(args, in_dims[2:])
            ]
            answers.append(_Call.apply(h, spec, *sliced))
        if isinstance(answers[0], tuple):
            stacked = tuple(torch.stack(parts) for parts in zip(*answers))
            return stacked, (0,) * len(stacked)
        return torch.stack(answers), 0


def evaluated_at_answer(g: Callable[..., Any], who: str) -> Callable[..., Any]:
    """``g``, with its errors naming the black box whose answer it was evaluated at.

    Every evaluation of ``g`` in a black-box solve is at the answer (``z* = answer``),
    so an error there is most often an answer of the wrong shape.
    """

    def g_at_answer(z, *args):
        try:
            return g(z, *args)
        except ConvergenceError:
            raise
        except Exception as error:
            shapes = [tuple(t.shape) for t in (z if isinstance(z, tuple) else (z,))]
            shown = shapes[0] if len(shapes) == 1 else shapes
            raise RuntimeError(
                f"g raised {type(error).__name__} at the answer of {who} (shape {shown}): {error}"
            ) from error

    return g_at_answer


def _as_tensor(
    out: Any, who: str, dtype: torch.dtype | None, device: torch.device | None
) -> torch.Tensor:
    """A black box's answer as a tensor of ``dtype`` on ``device`` (non-finite entries
    are left to :class:`CheckAnswer`, which reports them per problem). A complex answer
    with a real ``dtype`` gets the complex dtype of that precision: its imaginary part
    is never dropped."""
    if isinstance(out, (np.ndarray, np.generic)):
        if out.dtype.kind not in "biufc":
            raise TypeError(
                f"{who} returned a numpy array of dtype {out.dtype}: expected real or "
                f"complex numbers"
            )
        out = torch.from_numpy(np.array(out, dtype=np.float64 if out.dtype.kind in "biu" else None))
    elif not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{who} must return a torch.Tensor or a numpy array, got {type(out).__name__}"
        )
    if dtype is None:
        numeric = out.is_floating_point() or out.is_complex()
        dtype = out.dtype if numeric else torch.get_default_dtype()
    elif out.is_complex() and not dtype.is_complex:
        dtype = dtype.to_complex()
    return out.detach().to(dtype=dtype, device=out.device if device is None else device)


@dataclasses.dataclass(frozen=True)
class CheckAnswer(Solver):
    """The forward "solver" of a black box: it checks the answer it is started from.

    No step is taken. The residual at the answer (already known from capture
    discovery, or one evaluation) decides, per problem: one whose ``‖g(z)_b‖₂``
    exceeds ``tol · (1 + scale_b)`` gets status ``"failed"`` — the answer is not a
    root — and one whose answer, residual or scale is not finite gets ``"nonfinite"``;
    ``on_failure`` says so, and the other problems of the batch are unaffected.

    Args:
        who: the black box's name, for the report.
    """

    name = "black_box"

    who: str

    def solve(self, fn: Residual, z0, r0, *, tol, max_iter, callback=None):
        # No iteration: a callback is never called.
        r = fn(z0) if r0 is None else r0
        norms = residual_norms(z0, r)
        bound = thresholds(tol, fn.scale(z0, r))
        codes = torch.where(norms <= bound, CONVERGED, FAILED)
        codes = torch.where(torch.isfinite(norms) & torch.isfinite(bound), codes, NONFINITE)
        messages = []
        nonfinite = int((codes == NONFINITE).sum())
        if nonfinite:
            messages.append(
                f"The answer of {self.who} (or g there) is not finite for {nonfinite} problem(s)."
            )
        if bool((codes == FAILED).any()):
            worst = int(torch.argmax(torch.where(codes == FAILED, norms / bound, -1)))
            messages.append(
                f"The answer of {self.who} is not a root: ‖g(z)‖ = {float(norms[worst]):.3e} "
                f"exceeds tol·(1 + scale) = {float(bound[worst]):.3e}."
            )
        if messages:
            messages.append("Check the black box and its arguments, or loosen tol.")
        message = " ".join(messages)
        info = SolveInfo(
            converged=codes == CONVERGED,
            residual=norms.detach(),
            iterations=0,
            f_evals=fn.f_evals,
            history=[float(norms.max())],
            status=status_name(codes),
            solver=self.name,
            message=message,
            iterations_per_problem=torch.zeros_like(codes),
            status_codes=codes,
        )
        return z0, info


def shape_of(value: Any, name: str) -> torch.Size:
    """The shape of a tensor the caller gave to say what shape an answer must have."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value.shape


def no_unroll(backward: Any, who: str) -> Any:
    """``backward``, which must not be ``"unroll"``: a black box has no iterations to
    differentiate through."""
    if isinstance(backward, Unroll) or backward == "unroll":
        raise ValueError(
            f"backward='unroll' differentiates through a solver's iterations, but {who} is "
            f"a black box: use an implicit backward ('auto', 'dense', 'gmres', ...)"
        )
    return backward
