"""The differentiable solve: the one place in the package that computes derivatives.

Every front door reduces to a :class:`~implicit._problem.Problem` ``g(z, θ) = 0`` and
calls :func:`implicit.adjoint.function.solve`. In three steps:

1. **forward**: a solver finds ``z*`` inside
   :class:`~implicit.adjoint.function.ImplicitFunction`, where no graph is recorded
   (memory flat in the number of iterations) and where the ``torch.func`` transforms
   hand us plain tensors;
2. **wiring**: the function's inputs are the explicit tensor arguments *and* the tensors
   ``g`` captures (found by :meth:`Problem.discover`), so autograd orders the graph
   correctly and every one of them receives a gradient;
3. **backward**: ``v ↦ −(∂g/∂θ)ᵀ w`` with ``(∂g/∂z)ᵀ w = v``.

The modules: ``function.py`` (the entry, :func:`~implicit.adjoint.function.solve`:
where a solve needs the Function at all; and the ``torch.autograd.Function``: backward,
jvp, vmap), ``problems.py`` (the problems it solves: the user's root problem and the
linear systems of its derivatives, whose forward runs the linear solver, and the
linearisation recorded as one autograd graph), ``settings.py`` (what the solves of a
problem share; the solver of an answer already known), ``linearize.py`` (the
linearisation by ``torch.func``), ``vmap.py`` (problems folded under ``vmap``) and
``unroll.py`` (``backward="unroll"``).
"""

__all__: list[str] = []
