"""How the backward's condition estimate tracks the true condition number and the
gradient's error: the measurements behind the ``"ill_conditioned"`` limit (``1/√eps``).

From the repository root::

    python benchmarks/conditioning.py [problems]

Runs the fuzz's problems (``tests/fuzz``: tanh maps, linear roots with condition
numbers up to 1e8, Kepler's equation, ...) with every exact backward mode, in float32
and float64, with ``on_failure="ignore"``, and compares for each problem whose forward
converged, and whose backward either converged or was reported ill-conditioned: the worst
``info.backward.condition`` over its batch, the true ``κ₂(∂g/∂z)``
at the float64 reference root, and the relative error of the gradient of
``L = Σ c·z`` against the float64 oracle. Prints, per dtype and decade of the true
condition number, the number of problems, the median and worst gradient error, the
median ratio estimate / truth, and how many were reported ``"ill_conditioned"``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "fuzz")]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import families  # noqa: E402
import matrix  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import implicit  # noqa: E402
from implicit._results import condition_limit  # noqa: E402

SKIP_FAMILIES = {"nan_root", "exp_overflow", "nan_fixed_point"}


def measure(case: matrix.Case) -> dict | None:
    """One problem: its dtype, estimate, truth, gradient error and backward status."""
    inst = families.make(case.family, case.seed)
    inst = dataclasses.replace(inst, on_failure="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            z, info = matrix.DOORS[case.door](
                inst, matrix.make_solver(case.solver), matrix.make_backward(case.backward)
            )
            info = info.get() if isinstance(info, matrix.Later) else info
            if info.status != "converged":
                return None
            zs = z if isinstance(z, tuple) else (z,)
            cs = inst.cotangent if isinstance(inst.cotangent, tuple) else (inst.cotangent,)
            loss = sum((c * part).sum() for c, part in zip(cs, zs))
            params = list(inst.params.values())
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        except Exception:  # refused inputs, raised errors: not what is measured here
            return None
    backward = info.backward
    if backward is None or backward.condition is None or not inst.check_gradient:
        return None
    if backward.status not in ("converged", "ill_conditioned"):
        return None  # a failed solve, reported as such: not what is measured here
    root = (
        inst.root64
        if inst.root64 is not None
        else families.refine(inst, families.flat(z, inst.batched))
    )
    if root is None:
        return None
    try:
        reference, cond = families.reference_gradient(inst, root)
    except np.linalg.LinAlgError:
        return None
    ref = np.concatenate([np.asarray(reference[k], dtype=float).ravel() for k in inst.params])
    got = torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).detach().double().flatten()
            for g, p in zip(grads, params)
        ]
    ).numpy()
    scale = float(np.linalg.norm(ref)) or 1.0
    return {
        "dtype": str(inst.dtype).removeprefix("torch."),
        "estimate": float(backward.condition.max()),
        "cond": cond,
        "error": float(np.linalg.norm(got - ref)) / scale,
        "flagged": backward.status == "ill_conditioned",
        "status": backward.status,
        "backward": case.backward,
        "id": case.id,
    }


def sweep(trials: int) -> None:
    """Linear roots ``A z = b`` with ``κ₂(A)`` log-uniform up to ``1e16`` (float64) or
    ``1e9`` (float32), SPD or not, ``n`` from 4 to 100 (GMRES above 64 under ``auto``):
    the gradient ``A⁻ᵀ c`` of ``L = c·z`` with respect to ``b`` against a 40-digit
    solve (mpmath) of the same rounded system, for ``dense``, ``auto``, ``gmres`` and
    ``cg`` (SPD only) at a backward tolerance of 100 eps."""
    import mpmath

    mpmath.mp.dps = 40
    rng = np.random.default_rng(0)
    rows = []
    for trial in range(trials):
        dtype = (torch.float64, torch.float32)[trial % 2]
        n = int(rng.choice([4, 8, 16, 48, 100]))
        top = 16 if dtype == torch.float64 else 9
        cond = 10 ** rng.uniform(0, top)
        spd = trial % 4 < 2
        q1 = np.linalg.qr(rng.standard_normal((n, n)))[0]
        q2 = q1 if spd else np.linalg.qr(rng.standard_normal((n, n)))[0]
        a = (q1 * np.logspace(0, np.log10(cond), n)[rng.permutation(n)]) @ q2.T
        a = (a + a.T) / 2 if spd else a
        A = torch.from_numpy(a).to(dtype)
        c = torch.from_numpy(rng.standard_normal(n)).to(dtype)
        exact = mpmath.lu_solve(
            mpmath.matrix(A.double().T.tolist()), mpmath.matrix(c.double().tolist())
        )
        reference = np.array([float(v) for v in exact])
        true = float(np.linalg.cond(A.double().numpy()))
        tol = 100 * torch.finfo(dtype).eps
        for name in ("dense", "auto", "gmres", "cg"):
            if name == "cg" and not spd:
                continue
            backward = implicit.linear.resolve(name)
            if name != "dense":
                backward = dataclasses.replace(backward, tol=tol, max_iter=20 * n)
            b = torch.zeros(n, dtype=dtype, requires_grad=True)
            solve = implicit.custom_root(
                lambda z, b, A=A: z @ A.T - b, backward=backward, on_failure="ignore", tol=1.0
            )(lambda b, n=n: np.zeros(n))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                z = solve(b)
                (grad,) = torch.autograd.grad((c * z).sum(), [b])
            report = solve.last_info.backward
            error = float(np.linalg.norm(grad.double().numpy() - reference))
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "mode": name,
                    "cond": true,
                    "estimate": float(report.condition.max()),
                    "error": error / float(np.linalg.norm(reference)),
                    "status": report.status,
                }
            )
    print("dtype    mode   κ₂ decade  problems  median error  worst error  estimate/κ₂  statuses")
    by = collections.defaultdict(list)
    for row in rows:
        decade = math.floor(math.log10(max(row["cond"], 1.0)))
        by[(row["dtype"], row["mode"], decade)].append(row)
    for (dtype, mode, decade), group in sorted(by.items()):
        errors = np.array([r["error"] for r in group])
        ratios = np.array([r["estimate"] / r["cond"] for r in group])
        statuses = collections.Counter(r["status"] for r in group)
        print(
            f"{dtype:8s} {mode:6s} 1e{decade:<2d}       {len(group):8d}  {np.median(errors):12.1e}"
            f"  {errors.max():11.1e}  {np.nanmedian(ratios):11.2f}  {dict(statuses)}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sweep":
        sweep(int(sys.argv[2]) if len(sys.argv) > 2 else 400)
        return
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    torch.set_num_threads(1)
    rows = []
    for case in matrix.large_run(count):
        if case.family in SKIP_FAMILIES or case.backward not in matrix.EXACT:
            continue
        row = measure(case)
        if row is not None:
            rows.append(row)
    by = collections.defaultdict(list)
    for row in rows:
        decade = math.floor(math.log10(max(row["cond"], 1.0)))
        by[(row["dtype"], min(decade, 12))].append(row)
    print(f"{len(rows)} converged problems with a backward (of {count} drawn)")
    print("dtype    κ₂ decade  problems  median error  worst error  estimate/κ₂  flagged")
    for (dtype, decade), group in sorted(by.items()):
        errors = np.array([r["error"] for r in group])
        ratios = np.array([r["estimate"] / r["cond"] for r in group])
        flagged = sum(r["flagged"] for r in group)
        print(
            f"{dtype:8s} 1e{decade:<2d}       {len(group):8d}  {np.median(errors):12.1e}"
            f"  {errors.max():11.1e}  {np.nanmedian(ratios):11.2f}  {flagged:7d}"
        )
    for dtype in ("float32", "float64"):
        limit = condition_limit(getattr(torch, dtype))
        group = [r for r in rows if r["dtype"] == dtype]
        false = [r for r in group if r["flagged"] and r["cond"] < limit / 10]
        missed = [r for r in group if not r["flagged"] and r["cond"] > 10 * limit]
        print(
            f"{dtype}: limit {limit:.1e}; flagged with κ₂ < limit/10: {len(false)}; "
            f"not flagged with κ₂ > 10·limit: {len(missed)}"
        )
        for r in (false + missed)[:5]:
            print("  ", r["id"], f"κ₂={r['cond']:.1e} estimate={r['estimate']:.1e}")


if __name__ == "__main__":
    main()
