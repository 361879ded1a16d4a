"""Complex states as real ones: the solvers see ``2n`` real numbers for ``n`` complex.

A complex state enters the flat ``(B, n)`` view of :mod:`implicit._problem` as its
real and imaginary parts side by side (the layout of ``torch.view_as_real``) and
leaves it as a complex tensor again, so every forward and linear solver works
unchanged on the real system of twice the size. The derivatives are autograd's
through those two maps and the user's complex function, hence PyTorch's conventions
for complex numbers (the gradient of a real loss ``L`` with respect to ``z = x + iy``
is ``∂L/∂x + i ∂L/∂y``, the convention ``torch.autograd.gradcheck`` checks) hold by
construction.
"""

from __future__ import annotations

import torch


def is_supported(dtype: torch.dtype) -> bool:
    """Whether a state may have ``dtype``: a floating-point or complex dtype other than
    complex32, whose few operators would fail inside the user's function."""
    return dtype.is_floating_point or (dtype.is_complex and dtype is not torch.complex32)


def as_real(tensor: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts (a trailing dim of 2); a real one
    as it is."""
    if not tensor.is_complex():
        return tensor
    # A copy, not torch.view_as_real: that view's derivative (a complex view of the
    # gradient) fails on the strides of gradients batched by vmap, which the dense
    # Jacobians and Hessians use.
    return torch.stack((tensor.real, tensor.imag), dim=-1)


def from_real(flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The complex tensor of ``shape`` whose parts (as :func:`as_real` lays them out)
    are the values of ``flat``: a view where the strides allow (its derivative, the
    real view of a gradient, always exists), else a copy."""
    pairs = flat.reshape(*shape, 2)
    try:
        return torch.view_as_complex(pairs)
    except RuntimeError:  # strides a complex view cannot express (an odd offset, ...)
        return torch.view_as_complex(pairs.contiguous())


def same_precision(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether two floating-point or complex dtypes have the same real precision
    (float64 with complex128, float32 with complex64)."""
    return a.to_real() == b.to_real()
