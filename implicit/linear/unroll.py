"""The one backward mode that is not a linear solve."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Unroll:
    """Differentiate through the forward solver's iterations with plain autograd.

    Not a linear solver: it marks the one mode that builds a graph through every
    forward iteration (memory grows with iterations). Useful as a reference.
    """

    name = "unroll"
