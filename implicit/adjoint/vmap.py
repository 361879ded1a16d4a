"""``torch.func.vmap`` over a solve: the vmapped slices as more rows of one problem.

The slices of a vmapped problem are independent problems, just like the rows of a
batched one. So ``size`` slices of a problem on ``(B, n)`` rows are solved as one
problem on ``(size·B, n)`` rows (:class:`Folded`), each row with its own stopping
test, in one call of the solver. Where only the right-hand sides of a linear system
differ between slices (``jacrev``, ``jacfwd``: one matrix, many vectors), the slices
are more copies of one system, whose Jacobian is linearised once (:class:`Repeated`);
:func:`fold` makes the one problem.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from implicit import _torch
from implicit.linear.operator import Jacobian


class Folded:
    """``size`` slices of a problem under ``torch.func.vmap``, as one batch of rows.

    The residual (and every per-row function) evaluates the inner problem's under
    ``vmap``, slice by slice.

    Args:
        inner: the problem (or the parent of a linear system) being folded.
        size: the number of vmapped slices.
        in_dims: for each input, 0 when it has the vmapped dimension first, ``None``
            when it is shared by every slice.
    """

    def __init__(self, inner, size: int, in_dims: Sequence[int | None]):
        self.inner = inner
        self.size = size
        self.in_dims = tuple(in_dims)

    @property
    def settings(self):
        return self.inner.settings

    @property
    def report_shape(self) -> tuple[int, ...]:
        return (self.size, *self.inner.report_shape)

    @property
    def backward_x0(self) -> torch.Tensor | None:
        return self.inner.backward_x0

    @property
    def symmetric(self) -> bool:
        return self.inner.symmetric

    #: What the inner problem's solve verified holds at its own solution, not at the
    #: points of other slices.
    positive_definite = False

    def _per_slice(self, fn, rows: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]):
        slices = [row.reshape(self.size, -1, *row.shape[1:]) for row in rows]
        in_dims = (*(0 for _ in rows), *self.in_dims)
        out = _torch.vmap_call(fn, self.size, (*slices, *inputs), in_dims)
        return out.reshape(-1, *out.shape[2:])

    def residual(self, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self._per_slice(self.inner.residual, [z], inputs)

    def scale(self, z0: torch.Tensor, r0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return self._per_slice(self.inner.scale, [z0, r0], inputs)

    def per_row(self, name: str, z: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        """The inner problem's per-row function ``name`` (an objective's value, ...)."""
        return self._per_slice(lambda *a: self.inner.per_row(name, *a), [z], inputs)

    def solver_view(self, inputs: Sequence[torch.Tensor], source=None):
        """The inner problem's view for its solvers, evaluated by these slices."""
        return self.inner.solver_view(inputs, self if source is None else source)

    @property
    def info(self):
        """The report of the inner problem (where its backward is reported)."""
        return self.inner.info


def fold(
    problem: Any, size: int, in_dims: Sequence[int | None], inputs: Sequence[torch.Tensor]
) -> tuple[Any, Sequence[torch.Tensor]] | None:
    """``problem`` (a :class:`~implicit.adjoint.problems.RootProblem` or
    :class:`~implicit.adjoint.problems.LinearProblem`) for ``size`` vmapped slices at
    once, with its inputs (``in_dims``: 0 or ``None`` for each), or ``None`` when no
    single problem covers them.

    A root problem's slices are more rows of it. A linear system's are more copies of
    it where only the right-hand sides differ (``jacrev``, ``jacfwd``: ``g`` is not
    evaluated under ``vmap`` at all), else the rows of the system of the folded parent.
    """
    from implicit.adjoint.problems import LinearProblem, RootProblem  # (they import this)

    if isinstance(problem, RootProblem):
        shape = (size, *problem.report_shape)
        folded = RootProblem(
            Folded(problem.problem, size, in_dims), problem.solver, problem.settings, None, shape
        )
        folded.unfolded = problem
        return folded, inputs
    rhs, z, *theta = inputs
    rhs_dim, z_dim, *theta_dims = in_dims
    stacked = rows(rhs, rhs_dim, size)
    if z_dim is None and all(dim is None for dim in theta_dims):
        repeated = LinearProblem(problem.parent, problem.transpose, size * problem.copies)
        return repeated, (stacked, z, *theta)
    if problem.copies > 1:
        return None
    folded = LinearProblem(Folded(problem.parent, size, theta_dims), problem.transpose)
    return folded, (stacked, rows(z, z_dim, size), *theta)


def rows(tensor: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """``(size, B, n)`` slices (or one ``(B, n)`` tensor shared by all) as rows."""
    if dim is None:
        tensor = tensor.expand(size, *tensor.shape)
    return tensor.reshape(-1, tensor.shape[-1])


class Repeated:
    """The block-diagonal operator of ``copies`` copies of one :class:`Jacobian`.

    A linear system with many right-hand sides and one matrix (the rows of a Jacobian
    computed under ``vmap``, e.g. by ``torch.func.jacrev``) acts on ``(copies·B, n)``
    rows: the Jacobian is linearised once and its products are applied to every copy
    at once, under ``vmap``; ``g`` itself is not evaluated again.

    Args:
        jacobian: the shared ``(B, n)`` Jacobian.
        copies: the number of copies; row block ``k`` of a vector is copy ``k``.
    """

    shifted = False

    def __init__(self, jacobian: Jacobian, copies: int):
        self.jacobian = jacobian
        self.copies = copies

    @property
    def shape(self) -> torch.Size:
        batch, n = self.jacobian.shape
        return torch.Size((self.copies * batch, n))

    @property
    def vjps(self) -> int:
        return self.jacobian.vjps

    def _each(self, product: Callable, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(self.copies, *self.jacobian.shape)
        return _torch.vmap_call(product, self.copies, (rows,), (0,)).reshape(x.shape)

    def rmatvec(self, w: torch.Tensor) -> torch.Tensor:
        """``Aᵀ w`` for every copy."""
        return self._each(self.jacobian.rmatvec, w)

    def matvec(self, u: torch.Tensor) -> torch.Tensor:
        """``A u`` for every copy."""
        self.jacobian._linear_vjp()  # built outside vmap, where it is reused
        return self._each(self.jacobian.matvec, u)

    def dense(self, chunk_size: int | None = None) -> torch.Tensor:
        """The ``(copies·B, n, n)`` blocks (one Jacobian, expanded)."""
        blocks = self.jacobian.dense(chunk_size)
        return blocks.expand(self.copies, *blocks.shape).reshape(-1, *blocks.shape[1:])
