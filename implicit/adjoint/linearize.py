"""``g`` linearised at a solution: what every derivative of a solve is made of.

With ``A = ∂g/∂z`` at ``(z*, θ)``, reverse mode solves ``Aᵀ w = v`` and pulls ``−w`` back
through ``∂g/∂θ``; forward mode pushes ``dθ`` through ``∂g/∂θ`` and solves ``A dz = −b``.
A :class:`Linearization` offers the three pieces: the products of ``A`` (its
``jacobian``, which the linear solver sees as a
[`JacobianOperator`][implicit.linear.JacobianOperator]), the pullback and the push.
There are two, which give the same numbers:

* :class:`Functional` (``torch.func``): every piece is itself differentiable and
  composes with the ``torch.func`` transforms: for double backward, ``jacrev``,
  ``vmap``, forward mode;
* :class:`~implicit.adjoint.problems.Recorded`: one graph of ``g`` recorded with plain
  autograd, every product and the pullback one pass through it: cheaper, and chosen
  where nothing differentiates the backward and no transform is active (a first-order
  backward).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from implicit.linear.operator import Jacobian


class Linearization:
    """``g`` linearised at ``(z, inputs)``, with the partial derivatives in the inputs at
    the positions ``moving``.

    Attributes:
        jacobian: the products of ``A = ∂g/∂z`` (``rmatvec``, ``matvec``, ``dense``).
    """

    jacobian: Jacobian

    def pullback(self, cotangent: torch.Tensor) -> Sequence[torch.Tensor]:
        """``(∂g/∂θ_i)ᵀ cotangent`` for each moving input ``θ_i``."""
        raise NotImplementedError

    def push(self, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        """``Σ_i (∂g/∂θ_i) dθ_i`` for the tangents of the moving inputs."""
        raise NotImplementedError


class Functional(Linearization):
    """``g``'s linearisation by ``torch.func``: differentiable, composable.

    Args:
        residual: ``g(z, *inputs)``.
        z: the point.
        inputs: the inputs ``θ``.
        moving: the positions of the inputs to differentiate with respect to.
    """

    def __init__(
        self,
        residual: Callable[..., torch.Tensor],
        z: torch.Tensor,
        inputs: Sequence[torch.Tensor],
        moving: Sequence[int],
    ):
        self._residual = residual
        self._z = z
        self._inputs = inputs
        self._moving = moving
        self._partials: tuple[torch.Tensor, Callable] | None = None

    @functools.cached_property
    def jacobian(self) -> Jacobian:
        return Jacobian(self._residual, self._z, *self._inputs)

    def _vjp(self) -> tuple[torch.Tensor, Callable]:
        """``g`` and its pullback as a function of the moving inputs (built once, when
        first needed: the backward solves for its cotangent first)."""
        if self._partials is None:
            inputs, moving = self._inputs, self._moving

            def residual_of(*moved: torch.Tensor) -> torch.Tensor:
                tensors = list(inputs)
                for i, tensor in zip(moving, moved):
                    tensors[i] = tensor
                return self._residual(self._z, *tensors)

            self._partials = torch.func.vjp(residual_of, *(inputs[i] for i in moving))
        return self._partials

    def pullback(self, cotangent: torch.Tensor) -> Sequence[torch.Tensor]:
        return self._vjp()[1](cotangent)

    def push(self, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        # Reverse over reverse (the pullback is linear in the cotangent): forward mode
        # cannot nest inside the forward-mode rule that asks for this.
        value, pullback = self._vjp()
        _, linear = torch.func.vjp(pullback, torch.zeros_like(value))
        (pushed,) = linear(tuple(tangents))
        return pushed
