"""Bilevel optimisation: learning ridge penalties through an inner solve.

The inner problem fits ridge regression with one penalty per feature,

    w*(θ) = argmin_w  ½‖X w − y‖² + ½ Σ_j exp(θ_j) w_j²,

found by ``implicit.root_solve`` on its optimality condition ``∇_w = 0`` (whose Jacobian
is symmetric positive definite, so the backward uses conjugate gradients). The outer
problem picks the penalties ``θ`` that minimise the validation loss

    L(θ) = ½‖X_val w*(θ) − y_val‖².

``dL/dθ`` (the hypergradient) comes from the implicit function theorem; Hessian-vector
products ``(d²L/dθ²) v`` come from double backward through the solution. Both are
checked against differentiating the closed form ``w* = (XᵀX + diag(exp θ))⁻¹ Xᵀy`` with
autograd, and forward mode (``torch.func.jvp``) against the reverse-mode hypergradient.
Then a few Newton–CG steps on ``θ``, driven by Hessian-vector products alone, learn
penalties that beat the best single penalty shared by all features.

Run: ``python examples/bilevel.py``
"""

from __future__ import annotations

import torch

import implicit

torch.manual_seed(0)
FEATURES, TRAIN, VALIDATION = 8, 20, 200
# Half of the features carry signal; the other half are noise the penalties should mute.
truth = torch.cat([torch.randn(FEATURES // 2), torch.zeros(FEATURES // 2)]).double()
x_train = torch.randn(TRAIN, FEATURES, dtype=torch.float64)
x_val = torch.randn(VALIDATION, FEATURES, dtype=torch.float64)
y_train = x_train @ truth + 0.5 * torch.randn(TRAIN, dtype=torch.float64)
y_val = x_val @ truth + 0.5 * torch.randn(VALIDATION, dtype=torch.float64)


def inner_objective(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x_train @ w - y_train) ** 2).sum() + 0.5 * (theta.exp() * w**2).sum()


#: The inner optimality condition ∇_w = 0: a root problem in w with parameters θ.
optimality = torch.func.grad(inner_objective)


def fit(theta: torch.Tensor) -> torch.Tensor:
    """``w*(θ)``, differentiable in ``θ`` to any order."""
    return implicit.root_solve(
        optimality, torch.zeros(FEATURES, dtype=torch.float64), theta, backward="cg", tol=1e-12
    )


def validation_loss(theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((x_val @ fit(theta) - y_val) ** 2).sum()


def closed_form_loss(theta: torch.Tensor) -> torch.Tensor:
    """The same loss through ``w* = (XᵀX + diag(exp θ))⁻¹ Xᵀy``: the reference."""
    w = torch.linalg.solve(x_train.T @ x_train + torch.diag(theta.exp()), x_train.T @ y_train)
    return 0.5 * ((x_val @ w - y_val) ** 2).sum()


def hypergradient_and_hvp(loss, theta: torch.Tensor, v: torch.Tensor):
    """``dL/dθ`` and ``(d²L/dθ²) v`` by double backward through ``loss``."""
    theta = theta.detach().requires_grad_()
    (grad,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
    (hvp,) = torch.autograd.grad(grad, theta, grad_outputs=v)
    return grad.detach(), hvp


def newton_cg_step(theta: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """One damped Newton step: solve ``(H + μI) d = −g`` by CG on Hessian-vector products.

    ``H`` is never formed: each CG iteration is one double backward through the solve.
    """
    grad, _ = hypergradient_and_hvp(validation_loss, theta, torch.zeros_like(theta))
    damping = 1e-3 * float(grad.norm()) + 1e-6
    step = torch.zeros_like(theta)
    residual = -grad
    direction = residual.clone()
    for _ in range(iterations):
        _, hvp = hypergradient_and_hvp(validation_loss, theta, direction)
        curvature = direction @ hvp + damping * direction @ direction
        if curvature <= 0:  # outside the convex region: keep the step found so far
            break
        alpha = (residual @ residual) / curvature
        step = step + alpha * direction
        new_residual = residual - alpha * (hvp + damping * direction)
        if new_residual.norm() <= 1e-8 * grad.norm():
            break
        direction = new_residual + (new_residual @ new_residual) / (residual @ residual) * direction
        residual = new_residual
    # At most a factor e^2 per penalty and step, then backtrack on the validation loss
    # (the outer problem is not convex everywhere).
    step = step * min(1.0, 2.0 / float(step.abs().max()))
    before = float(validation_loss(theta))
    for _ in range(30):
        if float(validation_loss(theta + step)) < before:
            return theta + step
        step = step / 2
    return theta


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))


def main(verbose: bool = True) -> dict[str, float]:
    report = print if verbose else (lambda *args, **kwargs: None)
    theta = torch.zeros(FEATURES, dtype=torch.float64)  # every penalty exp(0) = 1
    v = torch.randn(FEATURES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    grad, hvp = hypergradient_and_hvp(validation_loss, theta, v)
    grad_ref, hvp_ref = hypergradient_and_hvp(closed_form_loss, theta, v)
    # Forward mode: dL/dθ · v by a JVP through the solution, against the hypergradient.
    _, directional = torch.func.jvp(validation_loss, (theta,), (v,))
    results = {
        "hypergradient error": relative(grad, grad_ref),
        "hvp error": relative(hvp, hvp_ref),
        "forward-mode error": relative(directional, grad @ v),
    }
    report("Hypergradient dL/dθ against the closed form: relative error", end=" ")
    report(f"{results['hypergradient error']:.1e}")
    report(f"Hessian-vector product (double backward): relative error {results['hvp error']:.1e}")
    report(f"JVP dL/dθ·v (forward mode): relative error {results['forward-mode error']:.1e}")

    results["validation loss before"] = float(validation_loss(theta))
    report("\nNewton–CG on θ (Hessian-vector products through w*(θ)):")
    report(f"  step 0: validation loss {results['validation loss before']:.3f}")
    for step in range(1, 6):
        theta = newton_cg_step(theta)
        report(f"  step {step}: validation loss {float(validation_loss(theta)):.3f}")
    results["validation loss after"] = float(validation_loss(theta))
    report("Learned penalties exp(θ) (signal features first):")
    report("  " + " ".join(f"{p:.2g}" for p in theta.exp().tolist()))
    # The baseline: the best single penalty shared by all features, on a grid.
    results["validation loss, best shared penalty"] = min(
        float(closed_form_loss(torch.full((FEATURES,), t, dtype=torch.float64)))
        for t in torch.linspace(-8, 8, 81).tolist()
    )
    report(
        "Best single penalty shared by all features (grid): validation loss "
        f"{results['validation loss, best shared penalty']:.3f}"
    )
    assert results["hypergradient error"] < 1e-9, "the hypergradient is wrong"
    assert results["hvp error"] < 1e-9, "the Hessian-vector product is wrong"
    assert results["forward-mode error"] < 1e-9, "the forward-mode derivative is wrong"
    return results


if __name__ == "__main__":
    main()
