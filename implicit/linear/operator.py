"""The operator a linear solver sees, and the two ways its products are computed.

[`JacobianOperator`][implicit.linear.JacobianOperator] is ``A = ∂g/∂z`` of a batched
flat residual at one point, or its transpose, with what is known of its structure. Its
products come from one of two linearisations of ``g``, which give the same numbers:

* :class:`Jacobian`: ``torch.func.vjp``, whose products are themselves differentiable
  and compose with every ``torch.func`` transform (double backward, ``jacrev``,
  ``vmap``, forward mode, ``backward="unroll"``);
* :class:`GraphJacobian`: one graph of ``g`` recorded with plain autograd, every product
  one backward pass through it: cheaper, where nothing differentiates the products and
  no transform is active (a first-order backward, a forward solve).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from implicit._torch import autograd_grad, vmap_call


class JacobianOperator:
    """``A = ∂g/∂z`` of a batched flat residual ``g: (B, n) -> (B, n)`` at one point, or
    its transpose, as products: what a linear solver receives.

    Row ``b`` of ``g`` depends only on row ``b`` of ``z`` (``B`` independent problems),
    so ``A`` is block diagonal, one ``n × n`` block per problem, and every product acts
    row by row. The operator also says what it is known to be, so that solvers dispatch
    on structure rather than guess:

    Attributes:
        transposed: whether the operator is ``(∂g/∂z)ᵀ`` (the backward's adjoint
            system) rather than ``∂g/∂z`` (forward mode, Newton's steps).
        shifted: ``A = S − I`` with the products of ``S`` at hand
            ([`shifted_mv`][implicit.linear.JacobianOperator.shifted_mv]): the adjoint of
            a fixed point ``g = f(z) − z``, whose ``S = (∂f/∂z)ᵀ``.
        symmetric: ``A = Aᵀ`` is known (e.g. a Hessian).
        positive_definite: ``A`` is known symmetric positive definite (the Hessian at a
            strict minimum): [`Auto`][implicit.linear.Auto] chooses
            [`CG`][implicit.linear.CG] for it.

    Args:
        jacobian: the products of ``∂g/∂z`` (made by the library: see
            [`of`][implicit.linear.JacobianOperator.of] to make one).
        transposed: as above.
        symmetric: as above.
        positive_definite: as above (implies ``symmetric``).
    """

    #: The dtype the products are evaluated in where it is narrower than the iterates'
    #: (half precision, whose products a solver sees in float32); ``None``: theirs.
    evaluated_in: torch.dtype | None = None

    def __init__(
        self,
        jacobian: Jacobian,
        *,
        transposed: bool = False,
        symmetric: bool = False,
        positive_definite: bool = False,
    ):
        self.jacobian = jacobian
        #: ``(B, n)``: the shape of the vectors the operator acts on.
        self.shape: torch.Size = jacobian.shape
        self.transposed = transposed
        self.symmetric = symmetric or positive_definite
        self.positive_definite = positive_definite
        # Only the transposed products of S are recorded (the first-order backward).
        self.shifted = transposed and jacobian.shifted

    @classmethod
    def of(
        cls,
        fn: Callable[[torch.Tensor], torch.Tensor],
        z: torch.Tensor,
        *,
        transposed: bool = False,
        symmetric: bool = False,
        positive_definite: bool = False,
    ) -> JacobianOperator:
        """The operator of ``∂fn/∂z`` at ``z`` (shape ``(B, n)``; row ``b`` of ``fn``
        depending on row ``b`` of ``z`` only), e.g. to test a linear solver."""
        return cls(
            Jacobian(fn, z),
            transposed=transposed,
            symmetric=symmetric,
            positive_definite=positive_definite,
        )

    @classmethod
    def of_fixed_point(
        cls, f: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
    ) -> JacobianOperator:
        """The adjoint operator ``(∂f/∂z − I)ᵀ`` of the fixed point ``z = f(z)`` at ``z``,
        shifted (its products of ``(∂f/∂z)ᵀ`` are one pass through ``f``'s graph)."""
        return cls(GraphJacobian.record(f, z, shifted=True), transposed=True)

    @property
    def products(self) -> int:
        """The vector-Jacobian products used so far (a dense matrix counts ``n``)."""
        return self.jacobian.vjps

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` per row: one vector-Jacobian product (``Aᵀ``'s products are those, and
        so are a symmetric ``A``'s); ``A``'s own take reverse mode over one."""
        if self.transposed or self.symmetric:
            return self.jacobian.rmatvec(x)
        return self.jacobian.matvec(x)

    def shifted_mv(self, x: torch.Tensor) -> torch.Tensor:
        """``(A + I) x = S x``, one product without the identity's pass (only where
        ``shifted``)."""
        if not self.shifted:
            raise TypeError("shifted_mv needs a shifted operator (A = S − I with S at hand)")
        return self.jacobian.shifted_rmatvec(x)

    def dense(self, chunk_size: int | None = None) -> torch.Tensor:
        """The ``(B, n, n)`` blocks of ``A`` (``n`` products, ``chunk_size`` rows at a
        time when given)."""
        blocks = self.jacobian.dense(chunk_size)
        return blocks.transpose(1, 2) if self.transposed else blocks

    def transpose(self) -> JacobianOperator:
        """``Aᵀ``: the same Jacobian, the other way round."""
        return JacobianOperator(
            self.jacobian,
            transposed=not self.transposed,
            symmetric=self.symmetric,
            positive_definite=self.positive_definite,
        )

    def __repr__(self) -> str:
        flags = {
            "transposed": self.transposed,
            "shifted": self.shifted,
            "symmetric": self.symmetric,
            "positive_definite": self.positive_definite,
        }
        known = [name for name, value in flags.items() if value]
        return f"JacobianOperator(shape={tuple(self.shape)}, {', '.join(known) or 'general'})"


class Jacobian:
    """``A = ∂g/∂z`` of a batched flat residual ``g: (B, n) -> (B, n)`` at ``z``.

    Row ``b`` of the batch depends only on row ``b`` of ``z`` (a batched problem, or
    a single problem with ``B = 1``), so ``A`` is block diagonal and is handled per
    sample: :meth:`dense` returns the ``(B, n, n)`` blocks. :meth:`dense` also serves
    rectangular maps ``(B, n_in) -> (B, n_out)`` (``implicit.batch_jacobian``).

    Args:
        fn: the residual, ``fn(z, *args)``.
        z: the point, shape ``(B, n)``.
        args: the further arguments of ``fn``, constants here.
    """

    #: Whether products of ``∂g/∂z + I`` are at hand (see :class:`GraphJacobian`).
    shifted = False

    def __init__(self, fn: Callable[..., torch.Tensor], z: torch.Tensor, *args: Any):
        if args:
            fn = functools.partial(_trailing, fn, args)
        self.value, self._vjp = torch.func.vjp(fn, z)
        self._jvp: Callable | None = None
        self.vjps = 0
        self.shape, self.dtype, self.device = self.value.shape, z.dtype, z.device

    def rmatvec(self, w: torch.Tensor) -> torch.Tensor:
        """``Aᵀ w`` per sample (one vector-Jacobian product)."""
        self.vjps += 1
        return self._vjp(w)[0]

    def matvec(self, u: torch.Tensor) -> torch.Tensor:
        """``A u`` per sample, by reverse mode over the (linear) vector-Jacobian product.

        Reverse-over-reverse rather than forward mode because nested forward-mode AD
        is not supported and the core runs inside forward-mode rules.
        """
        self.vjps += 1
        return self._linear_vjp()((u,))[0]

    def _linear_vjp(self) -> Callable:
        """The pullback of the (linear) vector-Jacobian product, built once."""
        if self._jvp is None:
            _, self._jvp = torch.func.vjp(self._vjp, torch.zeros_like(self.value))
        return self._jvp

    def dense(self, chunk_size: int | None = None) -> torch.Tensor:
        """The per-sample Jacobian blocks ``A[b]`` with ``A[b, i, j] = ∂g_bi/∂z_bj``,
        shape ``(B, n_out, n_in)``."""
        batch, n = self.shape
        # Row i of every block at once: a cotangent that is e_i in every sample.
        basis = torch.eye(n, dtype=self.dtype, device=self.device)
        basis = basis.unsqueeze(1).expand(n, batch, n)
        self.vjps += n
        try:
            if chunk_size is None:
                rows = vmap_call(self._vjp_one, n, (basis,), (0,))
            else:
                rows = torch.func.vmap(self._vjp_one, chunk_size=chunk_size)(basis)
        except RuntimeError as error:
            if "vmap" not in str(error) and "Batching rule" not in str(error):
                raise
            # The residual uses an operation vmap cannot batch: one product per row.
            rows = torch.stack([self._vjp_one(e) for e in basis])
        return rows.transpose(0, 1)

    def _vjp_one(self, w: torch.Tensor) -> torch.Tensor:
        return self._vjp(w)[0]


class GraphJacobian(Jacobian):
    """``A = ∂g/∂z`` from one recorded graph ``out = g(z, θ)`` (``z`` a leaf).

    Where nothing differentiates the products themselves and no ``torch.func``
    transform is active, ``g`` is recorded once with plain autograd and every product
    is one backward pass through that graph (autograd's engine called as
    :func:`torch.autograd.grad` calls it, see :func:`~implicit._torch.autograd_grad`):
    the same products as :class:`Jacobian`, without the transform's wrappers. The
    first-order backward also takes the partial derivatives in the inputs ``θ`` from the
    same graph (``out``: :class:`~implicit.adjoint.problems.Recorded`).

    For a fixed point ``g = f(z) − z`` the graph may be that of ``f`` alone
    (``shifted=True``): ``A = ∂f/∂z − I``, whose products subtract their argument
    (one pass over the data, where autograd through ``f(z) − z`` takes two), and which
    also offers the products of ``A + I = ∂f/∂z`` themselves (:meth:`shifted_rmatvec`:
    the classic DEQ backward iterates those).

    Args:
        out: ``g(z, θ)`` (or ``f(z, θ)`` when ``shifted``), recorded with a graph.
        z: the leaf tensor ``out`` was computed from.
        shifted: ``out`` is ``f`` of a fixed point and ``A = ∂out/∂z − I``.
    """

    def __init__(self, out: torch.Tensor, z: torch.Tensor, shifted: bool = False):
        self.out = out
        self.z = z
        self.shifted = shifted
        self.vjps = 0
        self.shape, self.dtype, self.device = out.shape, z.dtype, z.device
        self._reverse: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def record(
        cls, fn: Callable[..., torch.Tensor], z: torch.Tensor, *args: Any, shifted: bool = False
    ) -> GraphJacobian:
        """Evaluate ``fn(z, *args)`` with a graph from a leaf ``z`` (see the class for
        ``shifted``)."""
        with torch.enable_grad():
            point = z.detach().requires_grad_()
            return cls(fn(point, *args), point, shifted)

    @functools.cached_property
    def value(self) -> torch.Tensor:
        """``g(z)`` (computed once)."""
        out = self.out.detach()
        return out - self.z.detach() if self.shifted else out

    def rmatvec(self, w: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        """``Aᵀ w``; with ``create_graph`` the product is itself differentiable (in the
        tensors ``out`` was recorded from), e.g. for a Jacobian penalty."""
        self.vjps += 1
        return self._vjp_one(w, create_graph=create_graph)

    def shifted_rmatvec(self, w: torch.Tensor) -> torch.Tensor:
        """``(A + I)ᵀ w = (∂f/∂z)ᵀ w`` (``shifted`` graphs only)."""
        self.vjps += 1
        return autograd_grad(self.out, w, (self.z,))[0]

    def matvec(self, u: torch.Tensor) -> torch.Tensor:
        if self._reverse is None:
            # (∂out/∂z)ᵀy as a function of y, recorded once; its VJP with u is ∂out/∂z u.
            with torch.enable_grad():
                dummy = torch.zeros_like(self.out, requires_grad=True)
                (transposed,) = autograd_grad(self.out, dummy, (self.z,), create_graph=True)
                self._reverse = (dummy, transposed)
        self.vjps += 1
        dummy, transposed = self._reverse
        product = autograd_grad(transposed, u, (dummy,))[0]
        return product - u if self.shifted else product

    def _vjp_one(self, w: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        # Batched by the inherited torch.func.vmap (dense), not by autograd's
        # is_grads_batched, whose batching falls back to a loop for some products
        # (``W @ z`` with a constant W: 14x slower).
        product = autograd_grad(self.out, w, (self.z,), create_graph=create_graph)[0]
        return product - w if self.shifted else product


def _trailing(fn: Callable[..., torch.Tensor], args: tuple[Any, ...], z: torch.Tensor):
    """``fn(z, *args)``: ``fn`` as a function of ``z`` alone, for ``torch.func``."""
    return fn(z, *args)
