"""Implicit layers: ``nn.Module`` front doors for training.

* [`DEQ`][implicit.layers.DEQ]: a deep equilibrium layer, ``z* = f(z*, x)``;
* [`ImplicitLayer`][implicit.layers.ImplicitLayer]: a general root, ``g(z*, *args) = 0``;
* [`InverseLayer`][implicit.layers.InverseLayer]: an inverse, ``f(z*) = y``.

Each is a thin module over a front door of ``implicit``, so it shares their
solvers, backward modes, gradients and reports (``last_info``).
"""

from implicit.layers.deq import DEQ
from implicit.layers.implicit import ImplicitLayer
from implicit.layers.inverse import InverseLayer

__all__ = ["DEQ", "ImplicitLayer", "InverseLayer"]
