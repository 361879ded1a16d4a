"""Jacobians of a flat batched residual, as products.

The solvers and the linear solves never see a user function directly: they see a
:class:`Jacobian` (``∂g/∂z`` at one point, as vector-Jacobian products, Jacobian-vector
products, or a dense per-sample matrix) and a :class:`Residual` (``g`` itself, with
evaluation counters). Everything is built on ``torch.func``, so it composes with
autograd (double backward) and with the ``torch.func`` transforms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from implicit._batch import traced
from implicit._torch import autograd_grad, vmap_call


class Jacobian:
    """``A = ∂g/∂z`` of a batched flat residual ``g: (B, n) -> (B, n)`` at ``z``.

    Row ``b`` of the batch depends only on row ``b`` of ``z`` (a batched problem, or
    a single problem with ``B = 1``), so ``A`` is block diagonal and is handled per
    sample: :meth:`dense` returns the ``(B, n, n)`` blocks. :meth:`dense` also serves
    rectangular maps ``(B, n_in) -> (B, n_out)`` (``implicit.batch_jacobian``).

    Args:
        fn: the residual as a function of ``z`` alone.
        z: the point, shape ``(B, n)``.
    """

    #: Whether products of ``∂g/∂z + I`` are at hand (see :class:`GraphJacobian`).
    shifted = False

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor):
        self.value, self._vjp = torch.func.vjp(fn, z)
        self._jvp: Callable | None = None
        self.vjps = 0

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

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
        basis = torch.eye(n, dtype=self.value.dtype, device=self.value.device)
        basis = basis.unsqueeze(1).expand(n, batch, n)
        self.vjps += n
        try:
            rows = self._batched_vjp(basis, chunk_size)
        except RuntimeError as error:
            if "vmap" not in str(error) and "Batching rule" not in str(error):
                raise
            # The residual uses an operation vmap cannot batch: one product per row.
            rows = torch.stack([self._vjp_one(e) for e in basis])
        return rows.transpose(0, 1)

    def _vjp_one(self, w: torch.Tensor) -> torch.Tensor:
        return self._vjp(w)[0]

    def _batched_vjp(self, cotangents: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        if chunk_size is not None:
            return torch.func.vmap(self._vjp_one, chunk_size=chunk_size)(cotangents)
        return vmap_call(self._vjp_one, cotangents.shape[0], (cotangents,), (0,))


class GraphJacobian(Jacobian):
    """``A = ∂g/∂z`` from one recorded graph ``out = g(z, θ)`` (``z`` a leaf).

    Where nothing differentiates the products themselves and no ``torch.func``
    transform is active, ``g`` is recorded once with plain autograd and every product
    is one backward pass through that graph (autograd's engine called as
    :func:`torch.autograd.grad` calls it, see :func:`~implicit._torch.autograd_grad`):
    the same products as :class:`Jacobian`, without the transform's wrappers. The
    first-order backward also takes the partial derivatives in the inputs ``θ`` from the
    same graph (``out``).

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
        self._reverse: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def record(
        cls, fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, shifted: bool = False
    ) -> GraphJacobian:
        """Evaluate ``fn`` at ``z`` with a graph (see the class for ``shifted``)."""
        with torch.enable_grad():
            point = z.detach().requires_grad_()
            return cls(fn(point), point, shifted)

    @functools.cached_property
    def value(self) -> torch.Tensor:
        """``g(z)`` (computed once)."""
        out = self.out.detach()
        return out - self.z.detach() if self.shifted else out

    @property
    def shape(self) -> torch.Size:
        return self.out.shape

    def rmatvec(self, w: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        """``Aᵀ w``; with ``create_graph`` the product is itself differentiable (in the
        tensors ``out`` was recorded from), e.g. for a Jacobian penalty."""
        self.vjps += 1
        return self._vjp_one(w, create_graph=create_graph)

    def shifted_rmatvec(self, w: torch.Tensor) -> torch.Tensor:
        """``(A + I)ᵀ w = (∂f/∂z)ᵀ w`` (``shifted`` graphs only)."""
        self.vjps += 1
        return self._grad(self.out, w)

    def matvec(self, u: torch.Tensor) -> torch.Tensor:
        if self._reverse is None:
            # (∂out/∂z)ᵀy as a function of y, recorded once; its VJP with u is ∂out/∂z u.
            with torch.enable_grad():
                dummy = torch.zeros_like(self.out, requires_grad=True)
                self._reverse = (dummy, self._grad(self.out, dummy, create_graph=True))
        self.vjps += 1
        dummy, transposed = self._reverse
        product = self._grad(transposed, u, inputs=dummy)
        return product - u if self.shifted else product

    def _vjp_one(self, w: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        # Batched by the inherited torch.func.vmap (dense), not by autograd's
        # is_grads_batched, whose batching falls back to a loop for some products
        # (``W @ z`` with a constant W: 14x slower).
        product = self._grad(self.out, w, create_graph=create_graph)
        return product - w if self.shifted else product

    def _grad(
        self,
        out: torch.Tensor,
        cotangent: torch.Tensor,
        *,
        inputs: torch.Tensor | None = None,
        create_graph: bool = False,
    ) -> torch.Tensor:
        """``(∂out/∂inputs)ᵀ cotangent`` (``inputs`` defaults to ``z``), zero where unused."""
        inputs = self.z if inputs is None else inputs
        (grad,) = autograd_grad(out, cotangent, (inputs,), create_graph=create_graph)
        return grad

    def partials(
        self, cotangent: torch.Tensor, inputs: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``(∂out/∂x)ᵀ cotangent`` for each ``x`` in ``inputs`` (tensors ``out`` was
        recorded from), zero for those it does not depend on; the graph's last use: it
        is freed."""
        return autograd_grad(self.out, cotangent, tuple(inputs), retain_graph=False)


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
        return vmap_call(product, self.copies, (rows,), (0,)).reshape(x.shape)

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


class Residual:
    """A flat batched residual with evaluation counters, as the forward solvers see it.

    Args:
        fn: ``g`` on the flat view, ``(B, n) -> (B, n)``.
        scale: ``scale(z0, g(z0)) -> (B,)``, evaluated once at the initial guess;
            sample ``b`` has converged when ``‖g(z)_b‖₂ ≤ tol · (1 + scale_b)``.
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        scale: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ):
        self.fn = fn
        self.scale = scale
        self.f_evals = 0
        self.jac_evals = 0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        self.f_evals += 1
        return self.fn(z)

    def linearize(self, z: torch.Tensor) -> Jacobian:
        """``∂g/∂z`` at ``z`` as products (costs one evaluation of ``g``).

        Plain autograd on one recorded graph (:class:`GraphJacobian`) unless the
        solver's operations are :func:`~implicit._batch.traced` (``backward="unroll"``,
        a ``torch.func`` transform): then the products must themselves be differentiable.
        """
        self.f_evals += 1
        if traced(z):
            return Jacobian(self.fn, z)
        return GraphJacobian.record(self.fn, z)

    def jacobian(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(z)`` and the dense per-sample Jacobian ``(B, n, n)`` at ``z``."""
        jac = self.linearize(z)
        self.jac_evals += 1
        return jac.value, jac.dense()
