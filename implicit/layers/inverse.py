"""An inverse layer: the ``z`` with ``f(z) = y`` as an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit import linear
from implicit._invert import invert
from implicit._problem import State
from implicit.layers._base import SolverLayer, front_door_defaults

#: The options that still apply when a black box replaces the solver.
_BLACK_BOX_OPTIONS = ("backward", "tol", "tol_mode", "max_iter", "on_failure", "callback")


class InverseLayer(SolverLayer):
    """The output is the ``z`` with ``f(z) = y``: a differentiable inverse of ``f``.

    A thin module over [`implicit.invert`][implicit.invert]. Gradients reach ``y`` and every tensor
    ``f`` reads (``nn.Module`` parameters included; ``f`` is registered as a submodule
    when it is one), in ``eval()`` mode as in ``train()`` mode: ``dz/dy = (∂f/∂z)⁻¹``
    and ``dz/dθ = −(∂f/∂z)⁻¹ ∂f/∂θ``.

    Args:
        f: the forward map, ``f(z)`` shaped like ``y``. The solve starts from
            ``z0 = y``, so ``f``'s input has the shape of its output.
        inverse: an optional black box ``inverse(y)`` (numpy, scipy, C, no autograd)
            returning ``z``; it replaces the iterative solver and is checked and
            differentiated like a solver's answer.
        batched: dim 0 of ``y`` indexes independent problems.
        **opts: ``solver`` (default ``"newton"``), ``backward`` (``"auto"``), ``tol``
            (``1e-6``: ``‖f(z) − y‖₂ ≤ tol · (1 + ‖y‖₂)`` per problem), ``tol_mode``
            (``"relative"``, or ``"absolute"``: ``‖f(z) − y‖₂ ≤ tol``), ``max_iter``
            (50), ``on_failure`` (``"warn"``), ``callback`` (``None``; see
            [`invert`][implicit.invert]) and the options of the named solver. With
            ``inverse``, only ``backward``, ``tol``, ``tol_mode``, ``max_iter``,
            ``on_failure`` and ``callback`` (never called) apply. Anything else raises.

    Attributes:
        last_info: the [`SolveInfo`][implicit.SolveInfo] of the latest forward.

    Example:
        >>> flow = implicit.InverseLayer(lambda z: z + 0.5 * torch.tanh(z))  # monotone
        >>> y = torch.randn(4, 3)
        >>> z = flow(y)  # f(z) = y, each row its own problem
        >>> torch.allclose(z + 0.5 * torch.tanh(z), y, atol=1e-5)
        True
        >>> asin = implicit.InverseLayer(torch.sin, inverse=lambda y: np.arcsin(y.numpy()))
        >>> asin(torch.tensor([[0.5]]))
        tensor([[0.5236]])
    """

    def __init__(
        self,
        f: Callable[..., Any],
        inverse: Callable[..., Any] | None = None,
        batched: bool = True,
        **opts: Any,
    ):
        if not callable(f):
            raise TypeError(f"f must be callable (a function or an nn.Module), got {type(f)}")
        if inverse is not None:
            if not callable(inverse):
                raise TypeError(f"inverse must be callable, got {type(inverse).__name__}")
            extra = sorted(set(opts) - set(_BLACK_BOX_OPTIONS))
            if extra:
                raise TypeError(
                    f"InverseLayer got option(s) {extra} that do not apply with inverse=: "
                    f"the black box replaces the solver; valid options are "
                    f"{sorted(_BLACK_BOX_OPTIONS)}"
                )
        super().__init__("InverseLayer", dict(opts), front_door_defaults(invert))
        if inverse is not None and isinstance(self.backward_mode, linear.Unroll):
            raise ValueError(
                "backward='unroll' does not apply with inverse=: a black box has no "
                "iterations to unroll; use an implicit backward mode"
            )
        self.f = f
        self.inverse = inverse
        self.batched = bool(batched)

    def forward(self, y: torch.Tensor) -> State:
        """The ``z`` with ``f(z) = y``, differentiable in ``y`` and ``f``'s tensors."""
        options = self.solve_options()
        if self.inverse is not None:
            del options["solver"]  # the black box replaces it
        z, info = invert(self.f, y, inverse=self.inverse, batched=self.batched, **options)
        self.last_info = info
        return z

    def extra_repr(self) -> str:
        if self.inverse is None:
            return f"{super().extra_repr()}, batched={self.batched}"
        return (
            f"inverse={self.inverse!r}, backward={self.backward_mode!r}, tol={self.tol}, "
            f"max_iter={self.max_iter}, batched={self.batched}"
        )
