"""An inverse layer: arcsin computed by numpy, differentiated by ``implicit``.

``g`` inverts ``torch.sin`` outside autograd (numpy cannot record a graph). The layer
returns ``z = g(data)`` as a tensor whose gradient comes from the implicit function
theorem applied to ``sin(z) − data = 0``: ``dz/dy = 1 / cos(z) = 1 / sqrt(1 − y²)``.

Run: ``python examples/inverse_asin.py``
"""

from __future__ import annotations

import numpy as np
import torch

from implicit import implicit_inverse_layer


def g(y: torch.Tensor) -> torch.Tensor:
    """The inverse of sin, without autograd."""
    return torch.from_numpy(np.arcsin(y.numpy()))


def main() -> float:
    data = torch.linspace(-0.95, 0.95, 201, requires_grad=True)  # float32
    y = implicit_inverse_layer(data, g, forward_func=torch.sin)
    y.backward(torch.ones_like(y))

    expected = 1 / torch.sqrt(1 - data.detach() ** 2)
    error = float(((data.grad - expected).abs() / expected).max())
    print(f"z = asin(y) by numpy for {data.numel()} values of y in [-0.95, 0.95] (float32)")
    print(f"dz/dy against 1/sqrt(1 - y²): max relative error {error:.1e}")
    assert error < 1e-4, "the inverse layer's gradient is wrong"
    return error


if __name__ == "__main__":
    main()
