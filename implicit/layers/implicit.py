"""A general implicit layer: the root ``z*`` of ``g(z, *args) = 0`` as an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit._problem import State
from implicit.api import root_solve
from implicit.layers._base import SolverLayer, front_door_defaults


class ImplicitLayer(SolverLayer):
    """The output is the root ``z*`` of ``g(z*, *args) = 0``.

    A thin module over [`implicit.root_solve`][implicit.root_solve]: gradients reach the tensor
    arguments and every tensor ``g`` reads (``nn.Module`` parameters included, and
    ``g`` is registered as a submodule when it is one), in ``eval()`` mode as in
    ``train()`` mode.

    Args:
        g: the residual, ``g(z, *args)`` shaped like ``z`` (tensor or tuple).
        batched: dim 0 of the state indexes independent problems.
        **opts: ``solver`` (default ``"newton"``), ``backward`` (``"auto"``), ``tol``
            (``1e-6``: ``‖g(z)‖₂ ≤ tol`` per problem), ``tol_mode`` (``"absolute"``, or
            ``"relative"``: ``‖g(z)‖₂ ≤ tol · (1 + ‖g(z0)‖₂)``), ``max_iter`` (50),
            ``on_failure`` (``"warn"``), ``callback`` (``None``; see
            [`root_solve`][implicit.root_solve]), and the options of the named solver.
            Anything else raises.

    Attributes:
        last_info: the [`SolveInfo`][implicit.SolveInfo] of the latest forward.

    Example:
        >>> layer = implicit.ImplicitLayer(lambda z, A, b: A @ z + torch.sigmoid(z) - b)
        >>> A = 2 * torch.eye(3)
        >>> b = torch.ones(3, requires_grad=True)
        >>> z = layer(A, b, z0=torch.zeros(3))
        >>> layer.last_info.status
        'converged'
    """

    def __init__(self, g: Callable[..., Any], batched: bool = False, **opts: Any):
        if not callable(g):
            raise TypeError(f"g must be callable (a function or an nn.Module), got {type(g)}")
        super().__init__("ImplicitLayer", dict(opts), front_door_defaults(root_solve))
        self.g = g
        self.batched = bool(batched)

    def forward(self, *args: Any, z0: State | None = None) -> State:
        """The root of ``g(z, *args) = 0``.

        Args:
            *args: the arguments of ``g``; tensors among them receive gradients.
            z0: the initial guess (a tensor or a tuple of tensors; no gradient).
                Defaults to zeros shaped like the first argument, which must then be
                a tensor.
        """
        if z0 is None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(
                    "z0 defaults to zeros shaped like the first argument, which must then "
                    "be a tensor: pass z0"
                )
            z0 = torch.zeros_like(args[0])
        z, info = root_solve(self.g, z0, *args, batched=self.batched, **self.solve_options())
        self.last_info = info
        return z

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batched={self.batched}"
