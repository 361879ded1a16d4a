"""implicit: differentiable fixed points, roots and inverses for PyTorch."""

from implicit import layers, linear, solvers
from implicit._batch_jacobian import batch_jacobian
from implicit._custom import custom_root, implicit_inverse_layer
from implicit._info import BackwardInfo, ConvergenceError, ConvergenceWarning, SolveInfo
from implicit._invert import invert
from implicit._optimize import least_squares, minimize
from implicit.api import fixed_point, root_solve
from implicit.layers import DEQ, ImplicitLayer, InverseLayer

__version__ = "0.1.0"

__all__ = [
    "DEQ",
    "BackwardInfo",
    "ConvergenceError",
    "ConvergenceWarning",
    "ImplicitLayer",
    "InverseLayer",
    "SolveInfo",
    "batch_jacobian",
    "custom_root",
    "fixed_point",
    "implicit_inverse_layer",
    "invert",
    "layers",
    "least_squares",
    "linear",
    "minimize",
    "root_solve",
    "solvers",
]
