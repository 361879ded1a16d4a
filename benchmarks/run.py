"""Run every benchmark in one process and regenerate docs/benchmarks.md and its plot.

From the repository root::

    pip install ".[bench]"          # TorchDEQ and jaxopt (optional: skipped if absent)
    python benchmarks/run.py        # about 15 minutes (it runs on one core); --quick: fewer

Sections (each a module of this directory): the DEQ training step against TorchDEQ and
jaxopt (:mod:`deq_step`), Newton on a small fixed point against autograd through Newton
(:mod:`seed_newton`), 100,000 scalar equations against a scipy loop
(:mod:`scalar_batch`), and warm-started adjoint solves in a training loop
(:mod:`warm_start`). The page states the machine, the versions and the method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Benchmark the checkout this script belongs to.
sys.path[:0] = [str(ROOT), str(HERE)]
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One core for the whole process, before any framework starts its threads (they inherit
# it): each contender computes on that core alone. Unpinned, XLA spread some of its work
# over the second core despite one intra-op thread (jaxopt at 256 × 512: 38 ms of wall
# time, 60 of CPU time; 52 and 52 pinned), and its idle helper threads spun there
# (64 × 256: 5.8 ms of CPU time, 4.7 wall; 4.4 and 4.4 pinned).
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import deq_step  # noqa: E402

deq_step.configure_jax_threads()

import torch  # noqa: E402
from _common import Row, fmt, markdown_table  # noqa: E402

import implicit  # noqa: E402

SIZES = ((64, 256), (256, 512))
#: The scaling curve: these sizes (reduced contenders: the default, the eager loop, the
#: peers' sweeps) and the main table's.
SCALING = ((16, 64), (32, 128), (128, 384), (512, 1024))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer contenders and repeats")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds per size")
    parser.add_argument("--no-peers", action="store_true", help="skip TorchDEQ and jaxopt")
    parser.add_argument(
        "--sections",
        default="deq,seed,scalar,warm",
        help="comma-separated subset of deq,seed,scalar,warm",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmarks.png")
    parser.add_argument(
        "--json", type=Path, default=HERE / "results" / "benchmarks.json", help="raw results"
    )
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    sections = set(options.sections.split(","))
    results: dict = {"machine": machine(), "sizes": {}}
    page = [HEADER.format(**results["machine"])]
    deq_rows: dict[str, list[Row]] = {}
    seed_rows: list[Row] | None = None

    if "deq" in sections:
        peers = deq_step.available_peers(not options.no_peers)
        page.append(DEQ_INTRO + peer_note(peers, options.no_peers))
        for batch, width in SIZES:
            rounds = options.rounds or (3 if options.quick else (8 if width <= 256 else 4))
            print(f"DEQ step {batch}×{width} ({rounds} rounds) ...", flush=True)
            rows, extra = deq_step.run(
                batch, width, rounds, quick=options.quick, use_peers=not options.no_peers
            )
            deq_rows[f"{batch}x{width}"] = rows
            results["sizes"][f"{batch}x{width}"] = {
                "rows": [r.as_dict() for r in rows],
                "t_f": extra["floors"],
                "kernels": extra["kernels"],
            }
            page.append(deq_section(batch, width, rows, extra))
        curve = {key: rows for key, rows in deq_rows.items()}
        for batch, width in () if options.quick else SCALING:
            rounds = options.rounds or (2 if width >= 1024 else 4)
            print(f"DEQ step {batch}×{width}, scaling ({rounds} rounds) ...", flush=True)
            rows, extra = deq_step.run(
                batch, width, rounds, use_peers=not options.no_peers, scaling=True
            )
            curve[f"{batch}x{width}"] = rows
            results.setdefault("scaling", {})[f"{batch}x{width}"] = {
                "rows": [r.as_dict() for r in rows],
                "t_f": extra["floors"],
            }
        results["curve"] = scaling_points(curve)
        page.append(scaling_section(results["curve"]))
        if options.plot:
            try:
                plot(results, options.plot)
                page.append(f"![time against gradient error]({options.plot.name})\n")
            except ImportError:
                page.append("*No plot: matplotlib is not installed (it comes with [bench]).*\n")

    if "seed" in sections:
        print("Newton against autograd through Newton ...", flush=True)
        import seed_newton

        seed_rows = seed_newton.run(3 if options.quick else 7)
        results["seed"] = [r.as_dict() for r in seed_rows]
        page.append(seed_section(seed_rows))

    if "scalar" in sections:
        print("100,000 scalar equations ...", flush=True)
        import scalar_batch

        rows = scalar_batch.run(3 if options.quick else 5, subset=500 if options.quick else 2000)
        results["scalar"] = [r.as_dict() for r in rows]
        page.append(scalar_section(rows))

    if "warm" in sections:
        print("warm starts in a training loop ...", flush=True)
        import warm_start

        rows = warm_start.run(10 if options.quick else 25)
        results["warm"] = [r.as_dict() for r in rows]
        page.append(warm_section(rows))

    if deq_rows:
        page.append(targets_section(deq_rows, seed_rows))
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text("\n".join(page))
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {options.out}" + (f", {options.plot}" if "deq" in sections else ""))
    return 0


def machine() -> dict:
    versions = {"torch": torch.__version__, "implicit": implicit.__version__}
    for module in ("jax", "jaxopt", "torchdeq"):
        try:
            versions[module] = getattr(__import__(module), "__version__", "installed")
        except ImportError:
            versions[module] = "not installed"
    if versions.get("jaxopt") == "installed":
        from jaxopt import version

        versions["jaxopt"] = version.__version__
    cpu = platform.processor() or "unknown"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line for line in lines if line.startswith("model name")), None)
    if model:
        cpu = model.split(":", 1)[1].strip()
    # MKL's kernels (torch's matmul and tanh) take their fastest path with AVX-512.
    flags = next((line for line in lines if line.startswith("flags")), "")
    if "avx512f" in flags.split():
        cpu += ", AVX-512"
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


HEADER = """# Benchmarks

What a training step or a batch of solves costs with `implicit`, beside other ways of
getting the same derivatives: TorchDEQ and jaxopt (compiled by XLA) for the training
step of a deep equilibrium model, autograd through Newton's iterations for a small root
problem, and scipy called once per equation for a large batch of scalar equations.
Every contender's gradient is checked against a reference, and a speed ratio is only
quoted against a row of equal or better accuracy.

**Machine**: {cpu}, {cores} cores shared with other jobs; Python {python}; {versions};
{date}.

**Settings**: every contender computes on one CPU core with one thread (torch and XLA
alike). Times are CPU time per call: each timing round runs every contender in turn,
one untimed call then three timed ones (warm caches, as at any step of a training
loop), and the tables give the median over rounds. Times on a shared machine move by
about ±20% from one run to the next: read the ratios and the counts beside them.

Regenerated by `python benchmarks/run.py` (this page, [the plot](benchmarks.png) and
`benchmarks/results/benchmarks.json`); TorchDEQ and jaxopt come with
`pip install ".[bench]"` and are skipped, with a note, when absent. How a run is set
up, and how to profile: [developer notes](developers.md).
"""

DEQ_INTRO = """
## 1. The DEQ training step

`z = tanh(W z + U x + b)`, float32, `‖W‖₂ = 0.9`, `U ~ N(0, 1/D)`, `b ~ N(0, 0.01)`,
`x ~ N(0, 1)`, `z0 = 0`, loss `mean(z²)`. One step = the injection `U x + b`, the
fixed-point solve, the loss and the gradients of `W`, `U`, `b`: what a training loop
does per batch. `f` captures `W` (like a module parameter) and takes the injection as
an argument.

* **f-evals**, **VJPs**: evaluations of `f` and vector-Jacobian products through it,
  counted by running the step once more with a counting `tanh` (every evaluation:
  the forward iterations, capture discovery, the graph the backward records; every
  VJP: the adjoint solve's products and the final pass to the parameters).
* **overhead** = time ÷ (f-evals · t_f + VJPs · t_vjp): how far the step is from the
  arithmetic it needs. `t_f` and `t_vjp` are measured in this process, for the
  contender's framework, by probes that run in every timing round with the contenders
  (10 chained evaluations of `f`, 10 chained VJPs, as a solver meets them); the
  overhead is the median over rounds of each round's ratio, so that machine noise
  divides out. Not in the floor, for every contender alike: the injection `x Uᵀ` and
  its gradient (two products of the size of `f`'s), and the parameter gradient `∇W`
  in the last VJP. `unroll` differentiates through the solver, so its VJPs also carry
  the parameter gradients of every iteration.
* **eager loop**: `fixed_point / neumann`'s arithmetic written as a plain torch loop
  (the same per-problem stops, the same counts and, checked by the tests, the same
  gradients): what eager PyTorch itself costs for this step. The gap between it and
  implicit's row is the library's own overhead.
* **error**: relative error of `(∇W, ∇U, ∇b)` against a float64 reference (Picard to
  a step below 1e-15 and the adjoint's Neumann series to the same level, gradients
  written out by hand). float32 cannot do better than about 4e-7 here.
* **Tolerances** (`tol` column): implicit stops sample `b` at
  `‖f(z)_b − z_b‖ ≤ tol · (1 + ‖f(z0)_b‖)` and the adjoint at
  `‖(∂g/∂z)ᵀw − v‖ ≤ tol · ‖v‖`; TorchDEQ runs `stop_mode="rel"` (`≤ tol · ‖f(z)_b‖`
  per sample, forward and backward); jaxopt solves the batch as one problem, so its
  `tol` is the root mean square of implicit's per-sample thresholds, and its linear
  solve gets `tol`. Beside the main table at `tol = 1e-6`, sweeps run implicit's
  default (`anderson` / `auto`) and the eager loop from 1e-3 to 1e-7 (and
  `fixed_point` / `neumann` at the decades), TorchDEQ at 1e-5 and 1e-6 and jaxopt
  from 1e-3 to 1e-6: each peer at its best. The error column decides: **a speed
  ratio counts only against a row of equal or worse error**, which is what the
  "equal accuracy" table does. Its
  last two columns are the ratios with no library (the fastest **eager loop** that
  accurate) and **with no overhead at all** (implicit's step costing only
  `f_evals · t_f + VJPs · t_vjp`, the fewest among its rows that accurate): the
  second bounds any library in eager torch with these counts.
* **the product `z Wᵀ`, `tanh`**: `f`'s two kernels timed alone by the same probes,
  per framework: where `t_f` goes, with no library involved.
"""


def peer_note(peers: dict, disabled: bool) -> str:
    missing = [name for name, ok in peers.items() if not ok]
    if not missing:
        return ""
    why = "disabled by --no-peers" if disabled else 'not installed: pip install ".[bench]"'
    return f"\n*Skipped: {', '.join(missing)} ({why}).*\n"


def deq_section(batch: int, width: int, rows: list[Row], extra: dict) -> str:
    probes = []
    for framework, label in (("torch", "torch"), ("jax", "jax (compiled)")):
        if framework in extra["floors"]:
            t_f, t_vjp = extra["floors"][framework]
            product, tanh = extra["kernels"][framework]
            probes.append(
                f"{label}: t_f = {t_f * 1e3:.3f} ms (the product `z Wᵀ` {product * 1e3:.3f},"
                f" `tanh` {tanh * 1e3:.3f}), t_vjp = {t_vjp * 1e3:.3f} ms"
            )
    floors = "; ".join(probes)
    main = [r for r in rows if r.tol == deq_step.TOL]
    main.sort(key=lambda r: r.median)
    table = markdown_table(
        [
            "contender (forward / backward)",
            "ms",
            "f-evals",
            "VJPs",
            "floor ms",
            "overhead",
            "error",
        ],
        [
            [
                r.name,
                fmt(r.median * 1e3),
                str(r.f_evals),
                str(r.vjps),
                fmt(r.floor * 1e3),
                fmt(r.overhead),
                fmt(r.error),
            ]
            for r in main
        ],
    )
    return (
        f"\n### {batch} × {width}\n\n{floors}.\n\nAll at tol = {deq_step.TOL:g}, fastest first "
        "(`one_step` is the Jacobian-free gradient, inexact by design: see its error):\n\n"
        f"{table}\n\n{matched_table(rows)}\n"
    )


@dataclass
class Match:
    """A peer row against implicit at equal or better gradient error."""

    peer: Row
    #: The fastest implicit row whose error is at most the peer's (None: none is).
    best: Row | None
    #: How many times faster ``best`` is than the peer.
    ratio: float
    #: The ratio with no library: the peer's time over the fastest eager loop (implicit's
    #: arithmetic written out in torch) that accurate.
    eager: float
    #: The ratio with no overhead at all: the peer's time over the smallest floor
    #: (``f_evals · t_f + VJPs · t_vjp``) among the implicit rows that accurate.
    bound: float


def match(peer: Row, rows: list[Row], name: str | None = None) -> Match:
    """``peer`` against the rows of ``rows`` whose gradient error is at most its own
    (implicit's rows named ``name`` only, where given)."""

    def as_accurate(group: str) -> list[Row]:
        return [r for r in rows if r.group == group and r.error <= peer.error]

    eligible = [r for r in as_accurate("implicit") if name is None or r.name == name]
    if not eligible:
        return Match(peer, None, math.nan, math.nan, math.nan)
    best = min(eligible, key=lambda r: r.median)
    eager = min((r.median for r in as_accurate("eager loop")), default=math.nan)
    least = min(r.floor for r in eligible)
    return Match(peer, best, peer.median / best.median, peer.median / eager, peer.median / least)


def matched_table(rows: list[Row]) -> str:
    """Each peer row against the fastest implicit row of equal or better error."""
    lines = []
    for peer in rows:
        if peer.group not in ("TorchDEQ", "jaxopt"):
            continue
        m = match(peer, rows)
        default = match(peer, rows, deq_step.DEFAULT)
        head = [f"{peer.name} @ {peer.tol:g}", fmt(peer.median * 1e3), fmt(peer.error)]
        if m.best is None:
            lines.append([*head, "none as accurate", "–", "–", "–", "–", "–"])
            continue
        lines.append(
            [
                *head,
                f"{m.best.name} @ {m.best.tol:g}",
                fmt(m.best.median * 1e3),
                f"{m.ratio:.2f}×",
                "–" if default.best is None else f"{default.ratio:.2f}× (@ {default.best.tol:g})",
                _times(m.eager),
                _times(m.bound),
            ]
        )
    if not lines:
        return ""
    table = markdown_table(
        [
            "peer @ tol",
            "ms",
            "error",
            "fastest implicit with error ≤ peer's",
            "ms",
            "implicit faster by",
            "the default (anderson / auto) faster by",
            "the eager loop",
            "with no overhead at all",
        ],
        lines,
    )
    return (
        "Equal accuracy (the tolerance sweep, every row of it, against each peer row):\n\n" + table
    )


def _least(values) -> float:
    """The smallest of ``values`` that is not NaN (NaN if none)."""
    return min((v for v in values if not math.isnan(v)), default=math.nan)


def _times(ratio: float) -> str:
    return "–" if math.isnan(ratio) else f"{ratio:.2f}×"


def at_its_best(rows: list[Row], group: str) -> tuple[Match, float, float, int] | None:
    """The default (``deq_step.DEFAULT``) against a peer at its best: the match of the
    peer row (any tolerance) against which the default's fastest run at equal or better
    error gains least, the least ratios over the peer's rows with no library and with
    no overhead, and how many peer rows are more accurate than any default run."""
    every = [match(r, rows, deq_step.DEFAULT) for r in rows if r.group == group]
    matches = [m for m in every if m.best is not None]
    if not matches:
        return None
    worst = min(matches, key=lambda m: m.ratio)
    eager = _least(m.eager for m in matches)
    bound = _least(m.bound for m in matches)
    return worst, eager, bound, len(every) - len(matches)


#: The goals for the default configuration (anderson / auto), per size and peer.
GOALS = {"64x256": {"TorchDEQ": 4.0, "jaxopt": 1.5}, "256x512": {"TorchDEQ": 3.0, "jaxopt": 2.0}}


def targets_section(deq: dict[str, list[Row]], seed: list[Row] | None) -> str:
    """The performance goals, each as measured and as bounded by the counts.

    The bound is what the row would measure if the library and eager dispatch cost
    nothing beyond the products the step makes (for Newton at n = 10: if the backward
    cost one VJP). A bound under the target means no implementation in eager torch on this
    machine reaches it with these counts.
    """
    lines = []
    for size, rows in deq.items():
        for group, target in GOALS.get(size, {}).items():
            # Each peer at its best: the peer row (any tolerance) against which the
            # default's fastest run at equal or better error gains least.
            best = at_its_best(rows, group)
            if best is None:
                continue
            worst, eager, bound, unmatched = best
            lines.append(
                [
                    f"default ≥ {target:g}× {group} at its best, {size.replace('x', ' × ')}",
                    f"{worst.ratio:.2f}× ({worst.best.tol:g} against {worst.peer.name}"
                    f" @ {worst.peer.tol:g})"
                    + (f"; {unmatched} peer rows more accurate than any" if unmatched else ""),
                    _times(eager),
                    _times(bound),
                    "yes" if worst.ratio >= target and not unmatched else "no",
                ]
            )
    big = deq.get("256x512", [])
    at_tol = [r for r in big if r.tol == deq_step.TOL]
    picard = [r for r in at_tol if r.name.endswith("fixed_point / neumann")]
    eager = [r for r in at_tol if r.group == "eager loop"]
    if picard and eager:
        lines.append(
            [
                "overhead ≤ 1.2, 256 × 512 (fixed_point / neumann)",
                fmt(picard[0].overhead),
                fmt(eager[0].overhead),
                "1",
                "yes" if picard[0].overhead <= 1.2 else "no",
            ]
        )
    one = [r for r in seed or [] if "1 problem" in r.name]
    implicit_row = next((r for r in one if r.group == "implicit newton / dense"), None)
    by_hand = next((r for r in one if "Jacobian by hand" in r.group), None)
    floor = next((r for r in one if r.group == "one VJP"), None)
    if implicit_row and by_hand and floor:
        hand = float(by_hand.note)
        lines.append(
            [
                "Newton n = 10: implicit backward ≥ 10× autograd through Newton (by hand)",
                f"{hand / float(implicit_row.note):.2f}×",
                "–",
                f"{hand / float(floor.note):.2f}× (one VJP)",
                "yes" if hand / float(implicit_row.note) >= 10 else "no",
            ]
        )
    table = markdown_table(
        ["goal", "this run", "the eager loop", "with no overhead at all", "met"], lines
    )
    return (
        "\n## Performance goals\n\nThe goals set for the DEQ step and the Newton backward,"
        " as this run measured them. The DEQ goals are for the default configuration"
        " (`anderson` / `auto`, what `fixed_point` and `DEQ` run unless told otherwise):"
        " its fastest run over implicit's tolerance sweep with gradient error at most the"
        " peer row's, against every row of the peer's own sweep, the least ratio counting."
        " Beside them, the ratios (least over the peer's rows) with no library (**the eager"
        " loop**: implicit's arithmetic as a plain torch loop, at the peer's accuracy) and"
        " with no overhead at all (the step costing only its products,"
        " `f_evals · t_f + VJPs · t_vjp`, the fewest among implicit's rows at the peer's"
        " accuracy; for Newton at n = 10, the backward costing one VJP of `g` at the root)."
        " Where the last is below the goal, no implementation in eager torch on this"
        " machine reaches it with these counts. The cost model:"
        " [developer notes](developers.md#the-cost-model).\n\n" + table + "\n"
    )


def scaling_points(curve: dict[str, list[Row]]) -> list[dict]:
    """Per size (smallest first): the default against each peer at its best."""
    points = []
    for size, rows in sorted(curve.items(), key=lambda kv: _elements(kv[0])):
        point = {"size": size, "elements": _elements(size)}
        for group in ("TorchDEQ", "jaxopt"):
            best = at_its_best(rows, group)
            if best is not None:
                worst, eager, bound, unmatched = best
                point[group] = {
                    "ratio": worst.ratio,
                    "default_tol": worst.best.tol,
                    "default_ms": worst.best.median * 1e3,
                    "peer": f"{worst.peer.name} @ {worst.peer.tol:g}",
                    "peer_ms": worst.peer.median * 1e3,
                    "eager": eager,
                    "bound": bound,
                    "unmatched": unmatched,
                }
        points.append(point)
    return points


def _elements(size: str) -> int:
    batch, width = size.split("x")
    return int(batch) * int(width)


def scaling_section(points: list[dict]) -> str:
    lines = []
    for point in points:
        cells = [point["size"].replace("x", " × ")]
        for group in ("TorchDEQ", "jaxopt"):
            p = point.get(group)
            if p is None:
                cells += ["–", "–", "–"]
                continue
            cells += [
                f"{p['ratio']:.2f}× ({fmt(p['default_ms'])} ms @ {p['default_tol']:g}"
                f" against {p['peer']}: {fmt(p['peer_ms'])} ms)"
                + (f"; {p['unmatched']} peer rows more accurate" if p["unmatched"] else ""),
                _times(p["eager"]),
                _times(p["bound"]),
            ]
        lines.append(cells)
    table = markdown_table(
        [
            "batch × width",
            "default vs TorchDEQ at its best",
            "eager loop",
            "no overhead",
            "default vs jaxopt at its best",
            "eager loop",
            "no overhead",
        ],
        lines,
    )
    return (
        "\n### Scaling over sizes\n\nThe default (`anderson` / `auto`) against each peer at"
        " its best, as in the goals below (its fastest run at equal or better error, the"
        " least ratio over the peer's tolerance sweep), from small cells to large; beside"
        " each, the same ratio for the eager loop and with no overhead at all. The sizes"
        " outside the two tables above run only the default, the eager loop and the"
        " peers' sweeps, in fewer rounds.\n\n" + table + "\n"
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "implicit": ("tab:blue", "o"),
        "unroll": ("tab:gray", "x"),
        "eager loop": ("tab:purple", "D"),
        "TorchDEQ": ("tab:red", "s"),
        "jaxopt": ("tab:green", "^"),
    }
    sizes = results["sizes"]
    curve = results.get("curve", [])
    panels = len(sizes) + bool(curve)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
    if curve:
        _plot_curve(axes[0][-1], curve, styles)
    for ax, (size, data) in zip(axes[0], sizes.items()):
        by_name: dict[str, list[dict]] = {}
        for row in data["rows"]:
            if row["name"].endswith("one_step"):  # inexact by design: off the chart
                continue
            by_name.setdefault(row["name"], []).append(row)
        for name, points in by_name.items():
            points.sort(key=lambda r: r["error"])
            color, marker = styles.get(points[0]["group"], ("black", "."))
            xs = [p["error"] for p in points]
            ys = [p["median_s"] * 1e3 for p in points]
            ax.plot(
                xs,
                ys,
                marker=marker,
                color=color,
                alpha=0.85,
                linestyle="-" if len(points) > 1 else "",
            )
            if len(points) > 1 or points[0]["group"] != "implicit":
                ax.annotate(name.replace(" (jit)", ""), (xs[0], ys[0]), fontsize=6, alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("relative error of the gradient (float64 reference)")
        ax.set_ylabel("CPU time per training step [ms]")
        ax.set_title(f"DEQ training step, {size.replace('x', ' × ')}, float32")
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        plt.Line2D([], [], color=c, marker=m, linestyle="", label=g) for g, (c, m) in styles.items()
    ]
    axes[0][len(sizes) - 1].legend(handles=handles, loc="upper right")
    fig.suptitle(
        "Lower left is better; lines join one contender's tolerance sweep;"
        " one_step (error 0.3 by design) not shown"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curve(ax, curve: list[dict], styles: dict) -> None:
    """The default's speed-up over each peer at its best, against the size."""
    for group in ("TorchDEQ", "jaxopt"):
        points = [p for p in curve if group in p]
        if not points:
            continue
        color, marker = styles[group]
        xs = [p["elements"] for p in points]
        ax.plot(xs, [p[group]["ratio"] for p in points], marker=marker, color=color, label=group)
        ax.plot(
            xs,
            [p[group]["bound"] for p in points],
            marker=marker,
            color=color,
            linestyle=":",
            alpha=0.6,
            label=f"{group}, with no overhead at all",
        )
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch × width (elements of the state)")
    ax.set_ylabel("default (anderson / auto) faster by [×]")
    ax.set_title("The default against each peer at its best")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def seed_section(rows: list[Row]) -> str:
    import seed_newton

    table = markdown_table(
        ["contender", "step ms (forward + backward)", "backward alone ms", "error"],
        [[r.name, fmt(r.median * 1e3, 3), r.note, fmt(r.error)] for r in rows],
    )
    return _section("2. Newton against autograd through Newton", seed_newton, table)


def scalar_section(rows: list[Row]) -> str:
    import scalar_batch

    table = markdown_table(
        ["contender", "ms", "error", "note"],
        [[r.name, fmt(r.median * 1e3, 1), fmt(r.error), r.note] for r in rows],
    )
    return _section("3. 100,000 scalar equations", scalar_batch, table)


def warm_section(rows: list[Row]) -> str:
    import warm_start

    table = markdown_table(
        ["backward, start, data", "adjoint products per step", "ms per step"],
        [[r.name, fmt(r.vjps, 1), fmt(r.median * 1e3)] for r in rows],
    )
    return _section("4. Warm-started adjoint solves in a training loop", warm_start, table)


def _section(heading: str, module, table: str) -> str:
    """A section of the page: its heading, the benchmark module's docstring (after its
    first paragraph) as the description, and the table."""
    return f"\n## {heading}\n\n" + module.__doc__.split("\n\n", 1)[1] + "\n" + table + "\n"


if __name__ == "__main__":
    sys.exit(main())
