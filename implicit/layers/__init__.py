"""Implicit layers: ``nn.Module`` front doors for training.

* :class:`DEQ`: a deep equilibrium layer, ``z* = f(z*, x)``;
* :class:`ImplicitLayer`: a general root, ``g(z*, *args) = 0``;
* :class:`InverseLayer`: an inverse, ``f(z*) = y``.

Each is a thin module over a front door of :mod:`implicit`, so it shares their
solvers, backward modes, gradients and reports (``last_info``).
"""

from implicit.layers.deq import DEQ
from implicit.layers.implicit import ImplicitLayer
from implicit.layers.inverse import InverseLayer

__all__ = ["DEQ", "ImplicitLayer", "InverseLayer"]
