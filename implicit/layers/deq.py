"""Deep equilibrium layer: ``z* = f(z*, x)`` as an ``nn.Module``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from implicit._problem import Problem, State
from implicit._tree import flatten, tree_map
from implicit.api import run
from implicit.layers._base import SolverLayer
from implicit.linear.operator import GraphJacobian


class DEQ(SolverLayer):
    """A deep equilibrium layer: the output is the fixed point ``z* = f(z*, x)``.

    The forward solve records no graph, so memory does not grow with the number of
    iterations; gradients with respect to ``x`` and to every tensor ``f`` reads
    (``nn.Module`` parameters included) come from the implicit function theorem
    through [`implicit.fixed_point`][implicit.fixed_point]. They flow in ``eval()``
    mode exactly as in ``train()`` mode: the mode only matters to ``f`` itself (and to
    ``jac_reg``).

    The state may be a tensor or a tree of tensors (tuples, lists, dicts: e.g. the
    resolutions of a multi-resolution DEQ); ``f`` returns the same structure. When
    ``f`` is an ``nn.Module`` it is registered as a submodule, so
    ``layer.parameters()``, ``.to()``, ``state_dict()`` and ``DistributedDataParallel``
    see its parameters.

    Args:
        f: the cell, ``f(z, x) -> z``.
        solver: a forward solver name from ``implicit.solvers.NAMES`` or an instance.
        backward: a backward mode name from ``implicit.linear.NAMES`` or an instance,
            e.g. ``"phantom"`` or ``implicit.linear.Phantom(steps=5, damping=0.5)``.
        tol: stop when ``‖f(z) − z‖₂ ≤ tol · (1 + s)`` for each sample, with the
            sample's scale ``s = max(‖z0‖₂, ‖f(z0)‖₂)`` measured at the initial state
            (``s = 0`` with ``tol_mode="absolute"``); a number, or a tensor of one per
            sample.
        max_iter: the forward iteration cap (and the backward's, unless its instance
            sets one).
        batched: dim 0 of the state indexes independent samples (per-sample
            convergence, statistics and Jacobians). A 1-D state (one sample without a
            batch dimension) is refused: give it one (``x[None]``).
        warm_start_backward: start each backward's adjoint solve from the solution of
            the last one (when its shape fits): in a training loop consecutive adjoint
            solutions are close, and an iterative backward (``"gmres"``, ``"neumann"``,
            ``"auto"`` above its dense size) then needs fewer iterations. The layer
            keeps that solution (one tensor the size of the state).
        **opts: ``on_failure`` (``"warn"``, ``"raise"`` or ``"ignore"``, default
            ``"warn"``); ``tol_mode`` (``"relative"`` or ``"absolute"``); ``callback``
            (``callback(iteration, residual, z)`` after each iteration of every
            forward's solve, see [`fixed_point`][implicit.fixed_point]; the layer's
            ``callback`` attribute, which may be replaced); ``jac_reg`` (number of
            Hutchinson samples for ``last_jac_loss``, default 0: off; ``True`` means 1);
            and the options of the named solver (e.g. ``damping=0.5``). Anything else
            raises.

    Attributes:
        last_info: the [`SolveInfo`][implicit.SolveInfo] of the latest forward; after
            ``backward()``, ``last_info.backward`` reports the adjoint solve.
        last_jac_loss: with ``jac_reg``,
            [`jacobian_penalty`][implicit.layers.DEQ.jacobian_penalty] at the latest
            forward's fixed point, to add to the loss (``None`` in ``eval()`` mode or
            without grad; detached in a copy of the layer).

    Example:
        >>> class Cell(torch.nn.Module):  # f(z, x) = tanh(W z + x)
        ...     def __init__(self, width):
        ...         super().__init__()
        ...         self.linear = torch.nn.Linear(width, width, bias=False)
        ...     def forward(self, z, x):
        ...         return torch.tanh(self.linear(z) + x)
        >>> deq = implicit.DEQ(Cell(8), jac_reg=1)
        >>> x = torch.randn(4, 8)
        >>> z = deq(x)  # z0 defaults to zeros_like(x)
        >>> deq.last_info.status
        'converged'
        >>> loss = z.pow(2).mean() + 0.1 * deq.last_jac_loss
        >>> loss.backward()  # reaches the cell's parameters
        >>> z_next = deq(x + 0.01, z0=z.detach())  # warm start
    """

    def __init__(
        self,
        f: Callable[..., Any],
        solver: Any = "anderson",
        backward: Any = "auto",
        tol: float = 1e-4,
        max_iter: int = 50,
        batched: bool = True,
        warm_start_backward: bool = False,
        **opts: Any,
    ):
        if not callable(f):
            raise TypeError(f"f must be callable (a function or an nn.Module), got {type(f)}")
        defaults = {
            "solver": solver,
            "backward": backward,
            "tol": tol,
            "max_iter": max_iter,
            "on_failure": "warn",
            "tol_mode": "relative",
            "callback": None,
            "jac_reg": 0,
        }
        super().__init__("DEQ", dict(opts), defaults)
        jac_reg = self.layer_options.pop("jac_reg")
        if not isinstance(jac_reg, int) or jac_reg < 0:
            raise ValueError(f"jac_reg must be a number of samples >= 0 or a bool, got {jac_reg!r}")
        self.f = f
        self.batched = bool(batched)
        self.jac_reg = int(jac_reg)
        self.warm_start_backward = bool(warm_start_backward)
        self.last_jac_loss: torch.Tensor | None = None
        # The adjoint solution of the latest backward, with warm_start_backward.
        self._adjoint: torch.Tensor | None = None

    def forward(self, x: Any, z0: State | None = None) -> State:
        """The fixed point ``z* = f(z*, x)``, differentiable in ``x`` and ``f``'s tensors.

        Args:
            x: the input injected into every step (usually a tensor).
            z0: the initial state (a tensor or a tree of tensors); pass the previous
                solution, detached, to warm-start. Defaults to ``zeros_like(x)``
                (required when the state is not shaped like ``x``). Receives no
                gradient.
        """
        name = "z0"
        if z0 is None:
            z0, name = _zeros_like(x), "x (z0 defaults to zeros_like(x))"
        if self.batched:
            _check_batched(z0, name)
        if self.warm_start_backward and self.last_info is not None and self.last_info.backward:
            self._adjoint = self.last_info.backward.solution
        options = self.solve_options()
        tol_mode = options.pop("tol_mode")
        problem = Problem(
            self.f, z0, (x,), batched=self.batched, form="fixed_point", tol_mode=tol_mode
        )
        z, info = run(
            problem,
            options.pop("solver"),
            options.pop("backward"),
            backward_x0=self._adjoint if self.warm_start_backward else None,
            **options,
        )
        self.last_info = info
        self.last_jac_loss = None
        if self.jac_reg and self.training and torch.is_grad_enabled():
            self.last_jac_loss = self.jacobian_penalty(x, z, samples=self.jac_reg)
        return z

    def __getstate__(self) -> dict[str, Any]:
        # last_jac_loss belongs to the latest forward's graph, which deepcopy and pickle
        # cannot carry: a copy keeps its value, detached.
        state = super().__getstate__()
        if state.get("last_jac_loss") is not None:
            state["last_jac_loss"] = state["last_jac_loss"].detach()
        return state

    def jacobian_penalty(
        self,
        x: Any,
        z: State,
        samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A Hutchinson estimate of ``‖∂f/∂z‖²_F`` at ``z``: a differentiable loss term.

        Draws Rademacher vectors ``ε`` and returns the mean of ``‖εᵀ ∂f/∂z‖²``, an
        unbiased estimate of the squared Frobenius norm of ``f``'s Jacobian (per
        sample when batched, averaged over the batch). Penalising it keeps ``f``
        contractive around its equilibria, which keeps the forward and backward
        solves short (Bai et al., "Stabilizing Equilibrium Models by Jacobian
        Regularization", 2021; they also divide by the state size, which is a matter
        of the penalty's weight). ``z`` is treated as a constant, as in that paper:
        the gradient reaches ``f``'s parameters and ``x``, not the solve.

        Args:
            x: the layer's input.
            z: the fixed point (e.g. the layer's output).
            samples: the number of vectors ``ε`` (one vector-Jacobian product each).
            generator: the random generator for ``ε`` (default: torch's global one).

        Returns:
            A scalar tensor, differentiable with respect to ``x`` and ``f``'s tensors.
        """
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        jacobian = self._linearize(x, z)
        total = jacobian.out.new_zeros(())
        for _ in range(samples):
            probe = torch.empty_like(jacobian.out).bernoulli_(0.5, generator=generator) * 2 - 1
            product = jacobian.rmatvec(probe, create_graph=True)
            total = total + product.pow(2).sum(dim=1).mean()
        return total / samples

    def spectral_radius(self, x: Any, z: State, iterations: int = 50) -> torch.Tensor:
        """An estimate of the spectral radius of ``∂f/∂z`` at ``z``, per sample.

        Power iteration with vector-Jacobian products (``∂f/∂z`` and its transpose
        share their eigenvalues). The estimate is the geometric mean of the growth
        factors over the second half of the iterations, which also converges (like
        ``1/iterations``) when the dominant eigenvalues are a complex pair. Below 1,
        ``f`` is locally contractive and the Picard and Neumann iterations converge;
        near or above 1, expect slow or failing solves.

        Args:
            x: the layer's input.
            z: the fixed point (e.g. the layer's output).
            iterations: power iterations (one vector-Jacobian product each).

        Returns:
            Shape ``(B,)`` when batched, ``()`` otherwise; no gradient.
        """
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 2:
            raise ValueError(f"iterations must be an integer >= 2, got {iterations!r}")
        jacobian = self._linearize(x, z)
        vector = torch.randn_like(jacobian.value)
        vector = vector / torch.linalg.vector_norm(vector, dim=1, keepdim=True)
        log_growth = vector.new_zeros(vector.shape[0])
        burn_in = iterations // 2
        for k in range(iterations):
            product = jacobian.rmatvec(vector)
            norm = torch.linalg.vector_norm(product, dim=1, keepdim=True)
            if k >= burn_in:
                log_growth = log_growth + norm.squeeze(1).log()
            vector = product / torch.where(norm > 0, norm, 1)
        radius = (log_growth / (iterations - burn_in)).exp()
        return radius if self.batched else radius.squeeze(0)

    def _linearize(self, x: Any, z: State) -> GraphJacobian:
        """``∂f/∂z`` at ``z`` (treated as a constant) from one recorded graph of ``f``."""
        detached = tree_map(torch.Tensor.detach, z)
        problem = Problem(self.f, detached, (x,), batched=self.batched, form="fixed_point")
        return GraphJacobian.record(
            lambda state: problem.pack(self.f(problem.unpack(state), x)), problem.pack(detached)
        )

    def extra_repr(self) -> str:
        warm = ", warm_start_backward=True" if self.warm_start_backward else ""
        return f"{super().extra_repr()}, batched={self.batched}, jac_reg={self.jac_reg}{warm}"


def _check_batched(state: State, name: str) -> None:
    """Refuse a state without a batch dimension: with ``batched=True`` dim 0 indexes the
    samples, so a single sample of shape ``(n,)`` would be solved as ``n`` independent
    problems of one unknown each, although the cell couples its features."""
    for part in state if isinstance(state, (tuple, list)) else (state,):
        if isinstance(part, torch.Tensor) and part.dim() == 1:
            (size,) = part.shape
            raise ValueError(
                f"DEQ(batched=True) got {name} of shape ({size},): dim 0 indexes the "
                f"samples, so this would be {size} independent problems of one unknown "
                f"each. For one sample pass it with a batch dimension (x[None], shape "
                f"(1, {size}), then take z[0]), or build the DEQ with batched=False."
            )


def _zeros_like(x: Any) -> State:
    leaves, _, _ = flatten(x, "x")
    if leaves and all(isinstance(t, torch.Tensor) for t in leaves):
        return tree_map(torch.zeros_like, x)
    raise TypeError(
        f"z0 defaults to zeros_like(x), which needs x to be a tensor or a tree of "
        f"tensors (got {type(x).__name__}): pass z0"
    )
