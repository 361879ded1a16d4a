"""Jacobians of a flat batched residual, as products.

The solvers and the linear solves never see a user function directly: they see a
:class:`Jacobian` (``∂g/∂z`` at one point, as vector-Jacobian products, Jacobian-vector
products, or a dense per-sample matrix) and a :class:`Residual` (``g`` itself, with
evaluation counters). Everything is built on ``torch.func``, so it composes with
autograd (double backward) and with the ``torch.func`` transforms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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
            rows = torch.func.vmap(lambda e: self._vjp(e)[0], chunk_size=chunk_size)(basis)
        except RuntimeError as error:
            if "vmap" not in str(error) and "Batching rule" not in str(error):
                raise
            # The residual uses an operation vmap cannot batch: one product per row.
            rows = torch.stack([self._vjp(e)[0] for e in basis])
        return rows.transpose(0, 1)


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
        out = torch.func.vmap(product)(x.reshape(self.copies, *self.jacobian.shape))
        return out.reshape(x.shape)

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


class Operator:
    """The linear operator a linear solve sees: ``A`` or ``Aᵀ`` of a :class:`Jacobian`."""

    def __init__(self, jacobian: Jacobian | Repeated, transpose: bool):
        self.jacobian = jacobian
        self.transpose = transpose

    @property
    def shape(self) -> torch.Size:
        return self.jacobian.shape

    @property
    def products(self) -> int:
        return self.jacobian.vjps

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        return self.jacobian.rmatvec(x) if self.transpose else self.jacobian.matvec(x)

    def dense(self, chunk_size: int | None = None) -> torch.Tensor:
        blocks = self.jacobian.dense(chunk_size)
        return blocks.transpose(1, 2) if self.transpose else blocks


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
        """``∂g/∂z`` at ``z`` as products (costs one evaluation of ``g``)."""
        self.f_evals += 1
        return Jacobian(self.fn, z)

    def jacobian(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``g(z)`` and the dense per-sample Jacobian ``(B, n, n)`` at ``z``."""
        jac = self.linearize(z)
        self.jac_evals += 1
        return jac.value, jac.dense()
