"""implicit: differentiable fixed points, roots and inverses for PyTorch."""

from implicit import linear, solvers
from implicit._results import BackwardInfo, ConvergenceError, ConvergenceWarning, SolveInfo
from implicit.api import fixed_point, root_solve

__version__ = "0.1.0"

__all__ = [
    "BackwardInfo",
    "ConvergenceError",
    "ConvergenceWarning",
    "SolveInfo",
    "fixed_point",
    "linear",
    "root_solve",
    "solvers",
]
