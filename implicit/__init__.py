"""implicit: differentiable fixed points, roots and inverses for PyTorch."""

from implicit import linear, solvers
from implicit._results import BackwardInfo, ConvergenceError, ConvergenceWarning, SolveInfo
from implicit.api import (
    batch_jacobian,
    custom_root,
    fixed_point,
    implicit_inverse_layer,
    invert,
    root_solve,
)

__version__ = "0.1.0"

__all__ = [
    "BackwardInfo",
    "ConvergenceError",
    "ConvergenceWarning",
    "SolveInfo",
    "batch_jacobian",
    "custom_root",
    "fixed_point",
    "implicit_inverse_layer",
    "invert",
    "linear",
    "root_solve",
    "solvers",
]
