"""Arithmetic on flat ``(B, n)`` batches, one row per problem: what the solvers' loops
share.

* **Rows**: selection without needless passes over the data (:func:`select_rows`),
  host tests only where a host read is cheap (:func:`cheap_host_reads`), the stopping
  test's norms and thresholds (:func:`residual_norms`, :func:`thresholds`), products
  with a set of rows per problem (``(B, k, n)``: histories, Krylov bases).
* **Small blocks** ``(B, n, n)``, one per problem: ``torch.linalg``'s batched LU calls
  LAPACK once per block, which for ``1 × 1`` blocks (a batch of scalar equations) is
  all the cost, orders of magnitude above the division that the factorisation and the
  solve amount to. :func:`lu_factor`, :func:`lu_solve`, :func:`solve` divide such
  blocks and hand every other size to ``torch.linalg``, with the same outputs (an
  exactly zero ``1 × 1`` block is reported singular, as LAPACK does, and divides to
  ``inf`` or ``nan``).
* **Half precision** (float16, bfloat16): the small linear algebra in float32. A state
  in half precision is solved with the user's function evaluated in its dtype, as
  written; everything the solvers and the backward add runs in float32, the *working*
  dtype, and the results are cast back: LAPACK has no half precision, and a sum of
  squares overflows float16 from a norm of 256 on. So the norms of the stopping tests,
  the line search's merit, the dense solves and the backward's linear solves, whose
  iterates live in float32 around products evaluated in half precision. A residual
  evaluated in half precision is only accurate to a few units of rounding of the state,
  so tolerances are floored at ``RESOLUTION`` units of the dtype (:func:`attainable`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from implicit._torch import transforms_active

#: The smallest relative tolerance a half-precision solve is held to, in units of the
#: dtype's machine epsilon (float16: 3.9e-3; bfloat16: 3.1e-2).
RESOLUTION = 4


def is_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16 (by identity: solvers ask every step)."""
    return dtype is torch.float16 or dtype is torch.bfloat16


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the solvers compute in for states of ``dtype``: float32 for half
    precision, the dtype itself otherwise."""
    return torch.float32 if is_half(dtype) else dtype


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its working dtype (itself, unless in half precision)."""
    # (Tested here: a no-op ``Tensor.to`` still costs a dispatch, on every iteration.)
    return tensor.float() if is_half(tensor.dtype) else tensor


def norms(tensor: torch.Tensor) -> torch.Tensor:
    """``‖tensor_b‖₂`` per row of a ``(B, n)`` tensor, in the working dtype."""
    if is_half(tensor.dtype):
        return torch.linalg.vector_norm(tensor, dim=1, dtype=torch.float32)
    return torch.linalg.vector_norm(tensor, dim=1)


def attainable(tol: float, dtype: torch.dtype) -> float:
    """``tol``, at least ``RESOLUTION`` machine epsilons of a half-precision ``dtype``."""
    if not is_half(dtype):
        return tol
    return max(tol, RESOLUTION * torch.finfo(dtype).eps)


def cheap_host_reads(tensor: torch.Tensor) -> bool:
    """Whether reading a value of ``tensor`` on the host costs less than a pass over the
    data: on the CPU it does; on an accelerator (CUDA, MPS, XPU, ...) a read stalls the
    device until its queue has run. The one place that decides where loops test their
    data on the host."""
    return tensor.is_cpu  # (a flag: no device object made)


def known_all(mask: torch.Tensor, check_every: int | None = None) -> bool:
    """Whether every entry of ``mask`` is True, where the host reads it cheaply
    (:func:`cheap_host_reads`) and the loop asking tests its data on the host every
    iteration (``check_every`` ``None`` or 1, see :func:`check_interval`);
    elsewhere ``False``: assume not, and take the general path, rather than stall the
    device."""
    return check_every in (None, 1) and cheap_host_reads(mask) and bool(mask.all())


def check_interval(check_every: int | None, tensor: torch.Tensor) -> int:
    """The iterations between two host reads of a loop on ``tensor``: ``check_every``,
    or where ``None``, 1 where reads are cheap (:func:`cheap_host_reads`) and 4
    elsewhere (an accelerator, where a read stalls the device). A loop that reads every
    iteration may take the shortcuts that a read allows (:func:`known_all`,
    :func:`select_rows`); one that reads every ``k > 1`` iterations reads nothing in
    between."""
    if check_every is not None:
        return check_every
    return 1 if cheap_host_reads(tensor) else 4


def all_running(norms: torch.Tensor, thresholds: torch.Tensor | float) -> float | None:
    """The largest of ``norms``, read on the host, when every problem goes on after an
    iteration (each residual norm finite and above its threshold); else ``None``. For
    loops that test on the host (:func:`cheap_host_reads`).

    One problem (``thresholds`` then a number, read by the caller once before its
    loop) takes one host read and no operation; a batch takes its maximum and one comparison (an
    infinite or NaN maximum fails, and NaN fails the comparison)."""
    if isinstance(thresholds, float):
        worst = norms.item()
        running = worst > thresholds
    else:
        worst = norms.max().item()
        running = bool((norms > thresholds).all())
    return worst if running and math.isfinite(worst) else None


#: From this many entries per tensor on, copying the selected rows beats ``torch.where``
#: on the CPU (measured for two pairs of tensors: ``torch.where`` costs a third of the
#: copies at 4 × 8, about the same at 8 × 1024, and more from 64 × 256 on).
COPY_ROWS_FROM = 12_000


def select_rows(
    rows: torch.Tensor, check_every: int | None, *pairs: tuple[torch.Tensor, torch.Tensor]
) -> list[torch.Tensor]:
    """For each ``(new, old)`` pair of ``(B, width)`` tensors, ``new`` in the rows that
    ``rows`` (shape ``(B,)``) selects and ``old`` elsewhere.

    On the CPU, in a loop that reads the host every iteration (``check_every`` ``None``
    or 1), a host check costs less than a pass over the data: the common cases (every
    row, no row) hand back ``new`` or ``old`` as they are, and otherwise, in a batch of
    at least ``COPY_ROWS_FROM`` entries, the fewer rows are copied into a copy of the
    other tensor (``torch.where`` over the whole batch costs several copies there: 1.5
    times the time at 64 × 256, 2 to 4 times at 256 × 512); the check is made once for
    all the pairs. Smaller batches take one ``torch.where`` per pair, and so does every
    batch where a host check would stall the device, or in a loop that reads the host
    only every ``check_every > 1`` iterations.
    """
    if check_every in (None, 1) and cheap_host_reads(rows):
        selected = int(rows.sum())
        if selected == rows.shape[0]:
            return [new for new, _ in pairs]
        if selected == 0:
            return [old for _, old in pairs]
        if rows.shape[0] * pairs[0][0].shape[1] >= COPY_ROWS_FROM:
            if 2 * selected <= rows.shape[0]:
                index = rows.nonzero().squeeze(1)
                return [old.index_copy(0, index, new.index_select(0, index)) for new, old in pairs]
            index = (~rows).nonzero().squeeze(1)
            return [new.index_copy(0, index, old.index_select(0, index)) for new, old in pairs]
    mask = rows.unsqueeze(1)
    return [torch.where(mask, new, old) for new, old in pairs]


def residual_norms(
    z: torch.Tensor, r: torch.Tensor, known: torch.Tensor | None = None
) -> torch.Tensor:
    """``‖r_b‖₂`` per row (in float32 for half precision; ``known`` where already
    computed), NaN where the iterate ``z_b`` is not finite: a residual can be finite at
    an infinite iterate (``tanh(∞) = 1``), which must never pass a test.

    An infinite or NaN entry makes the row's sum non-finite, and ``0 · sum`` NaN, which
    the sum ``norms + 0 · sum`` keeps (finite rows add zero): one fast reduction and
    one small sum per check, where ``isfinite(z).all(dim=1)`` costs a sizeable part of
    a small DEQ cell's evaluation on a CPU, and a ``torch.where`` more dispatches. A row
    whose finite entries sum beyond the dtype's range (about 1e38 in float32) also
    counts as non-finite."""
    if known is None:
        known = norms(r)
    # (In the norms' dtype: the working dtype of z, as of r.)
    return known.add(z.sum(dim=1, dtype=known.dtype), alpha=0)


def thresholds(tol: float | torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The stopping thresholds ``tol_b · (1 + scale_b)`` (``tol`` a number or one per
    row, in the dtype of ``scale``), NaN where the scale is not
    finite (an infinite ``z0`` or ``f(z0)``): every comparison with NaN fails, so such
    a problem neither runs nor converges; it stops at once with status
    ``"nonfinite"``."""
    # (One call where a comparison and a torch.where take three with the scalar; methods,
    # not operators, whose reflected forms with a number go through Python.)
    return scale.add(1).mul(tol).nan_to_num(nan=math.nan, posinf=math.nan, neginf=-math.inf)


def project(rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, k)`` inner products of ``v`` ``(B, n)`` with the ``k`` rows of ``rows``
    ``(B, k, n)``.

    Row vectors times matrices, by ``bmm``: on the CPU the fast layout of these
    products (the matrix-vector layouts that ``einsum`` picks are about ten times
    slower), and one call where ``@`` dispatches nine.
    """
    return torch.bmm(v.unsqueeze(1), rows.transpose(1, 2)).squeeze(1)


def combine(rows: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``Σ_k coefficients[:, k] · rows[:, k]``, shape ``(B, n)``, by ``bmm`` as in
    :func:`project`."""
    # Contiguous: a batch of row vectors with strides across the batch (as LAPACK
    # solves return them) sends the product down a path ten times slower.
    return torch.bmm(coefficients.contiguous().unsqueeze(1), rows).squeeze(1)


def store(buffer: torch.Tensor, slot: int, value: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``buffer`` with index ``slot`` of dimension ``dim`` set to ``value``.

    In place when the solve runs on plain tensors with no graph recorded (the implicit
    forward); into a copy when the solver's operations are :func:`traced`
    (``backward="unroll"``), whose graph needs the old values.
    """
    if traced(buffer, value):
        buffer = buffer.clone()
    buffer.select(dim, slot).copy_(value)
    return buffer


def traced(*tensors: torch.Tensor) -> bool:
    """Whether autograd records the solver's operations (grad mode on, as under
    ``backward="unroll"``) or a ``torch.func`` transform sees them (the solver's
    ``tensors``, see :func:`implicit._torch.transforms_active`): then nothing may be
    updated in place and products must themselves be differentiable. Otherwise (the
    implicit forward) the solve runs on plain tensors."""
    return torch.is_grad_enabled() or transforms_active(*tensors)


def lu_factor(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.lu_factor_ex(blocks)``: ``(LU, pivots, info)`` (float32 factors
    of half-precision blocks)."""
    if is_half(blocks.dtype):  # LAPACK has no half precision
        return lu_factor(blocks.float())
    if blocks.shape[-1] != 1:
        return torch.linalg.lu_factor_ex(blocks)
    pivots = torch.ones(blocks.shape[:-1], dtype=torch.int32, device=blocks.device)
    return blocks, pivots, _zero_pivot(blocks)


def lu_solve(
    lu: torch.Tensor, pivots: torch.Tensor, rhs: torch.Tensor, *, adjoint: bool = False
) -> torch.Tensor:
    """``torch.linalg.lu_solve(lu, pivots, rhs, adjoint=adjoint)`` for a factorisation
    by :func:`lu_factor` (``adjoint``: solve with the transposed blocks), in the
    dtype of ``rhs``."""
    if rhs.dtype != lu.dtype:  # float32 factors of half-precision blocks
        return lu_solve(lu, pivots, rhs.to(lu.dtype), adjoint=adjoint).to(rhs.dtype)
    if lu.shape[-1] == 1:
        return rhs / lu
    return torch.linalg.lu_solve(lu, pivots, rhs, adjoint=adjoint)


@dataclasses.dataclass(frozen=True)
class Factorization:
    """``(B, n, n)`` blocks ``A`` factorised for solves with ``A`` and ``Aᵀ``.

    LU factors (from :func:`lu_factor`) of ``Aᵀ``, which serve the same solves: cheaper
    where ``A`` is laid out by rows, as the Jacobians built from vector-Jacobian
    products are (LAPACK would copy the blocks column by column first).
    """

    lu: torch.Tensor
    pivots: torch.Tensor

    @classmethod
    def of(cls, blocks: torch.Tensor) -> Factorization:
        """The factorisation of ``blocks``."""
        lu, pivots, _ = lu_factor(blocks.mT)
        return cls(lu, pivots)

    def solve(self, rhs: torch.Tensor, *, adjoint: bool = False) -> torch.Tensor:
        """``A⁻¹ rhs`` (or ``A⁻ᵀ rhs``) per block for ``rhs`` of shape ``(B, n)``."""
        # The factors are those of Aᵀ: A's own solve is their adjoint one.
        solved = lu_solve(self.lu, self.pivots, rhs.unsqueeze(-1), adjoint=not adjoint)
        return solved.squeeze(-1)

    def diagonal(self) -> torch.Tensor:
        """The pivots of the factorisation, ``(B, n)`` (the diagonal of ``U``)."""
        return self.lu.diagonal(dim1=-2, dim2=-1)


def solve(blocks: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.solve_ex(blocks, rhs)``: ``(x, info)``, for ``rhs`` a batch of
    vectors ``(..., n)`` or of matrices ``(..., n, k)``; ``x`` in the dtype of ``rhs``."""
    if upcast(rhs) is not rhs:  # half precision: solved in float32
        x, info = solve(upcast(blocks), upcast(rhs))
        return x.to(rhs.dtype), info
    if blocks.shape[-1] != 1:
        return torch.linalg.solve_ex(blocks, rhs)
    divisor = blocks[..., 0] if rhs.dim() < blocks.dim() else blocks
    return rhs / divisor, _zero_pivot(blocks)


def _zero_pivot(blocks: torch.Tensor) -> torch.Tensor:
    """LAPACK's ``info`` for ``1 × 1`` blocks: 1 where the block is exactly zero."""
    return (blocks[..., 0, 0] == 0).to(torch.int32)
