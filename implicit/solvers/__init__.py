"""Forward solvers: one file per method, all behind [`Solver`][implicit.solvers.Solver].

Pick one by name (``solver="anderson"``, with options as keyword arguments of the
front door) or pass an instance (``solver=implicit.solvers.Anderson(m=8)``).
"""

from implicit.solvers._bracket import Bracketing
from implicit.solvers._minimizer import Minimizer
from implicit.solvers.anderson import Anderson
from implicit.solvers.base import Residual, Solver
from implicit.solvers.bisection import Bisection
from implicit.solvers.broyden import Broyden
from implicit.solvers.chandrupatla import Chandrupatla
from implicit.solvers.fixed_point import FixedPoint
from implicit.solvers.gauss_newton import GaussNewton
from implicit.solvers.lbfgs import LBFGS
from implicit.solvers.levenberg_marquardt import LevenbergMarquardt
from implicit.solvers.modified_newton import ModifiedNewton
from implicit.solvers.newton import Newton
from implicit.solvers.registry import BRACKETING, LEAST_SQUARES, MINIMIZERS, NAMES, resolve
from implicit.solvers.scipy import Scipy
from implicit.solvers.scipy_least_squares import ScipyLeastSquares
from implicit.solvers.scipy_minimize import ScipyMinimize

__all__ = [
    "BRACKETING",
    "LBFGS",
    "LEAST_SQUARES",
    "MINIMIZERS",
    "NAMES",
    "Anderson",
    "Bisection",
    "Bracketing",
    "Broyden",
    "Chandrupatla",
    "FixedPoint",
    "GaussNewton",
    "LevenbergMarquardt",
    "Minimizer",
    "ModifiedNewton",
    "Newton",
    "Residual",
    "Scipy",
    "ScipyLeastSquares",
    "ScipyMinimize",
    "Solver",
    "resolve",
]
