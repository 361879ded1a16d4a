"""The reliability fuzz: thousands of random problems, each classified, none able to hang.

From the repository root::

    python benchmarks/fuzz.py --problems 10000 --workers 1 --timeout 20
    python benchmarks/fuzz.py --quick                     # ~1,000 problems
    python benchmarks/fuzz.py --suite extended --problems 5000
    python benchmarks/fuzz.py --case tanh_divergent:12:newton_dense:gmres:fixed_point

Suite ``root`` (the default): problem ``i`` is drawn from root family ``i mod F`` with
seed ``i div F`` and solved with that family's solver × backward × front door
combinations in turn, its reverse-mode gradient checked. Suite ``extended``: the
optimisation and bracketing families (``minimize``, ``least_squares``, bracketing
``root_solve``; reverse mode, forward mode and second order) and the root families'
forward mode and second order (see ``tests/fuzz/matrix.py``). Every run is classified
by ``tests/fuzz/classify.py``
(``OK``, ``OK-NONCONVERGED``, ``OK-REFUSED``; failures ``HANG``,
``FALSE-CONVERGENCE``, ``SILENT-NAN``, ``UNREPORTED``, ``CRASH``). A long run can be
split into chunks (``--offset``, ``--out``) and summarised together (``--merge``).
The summary goes to stdout, every result to ``benchmarks/results/fuzz.json``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "fuzz")]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import classify  # noqa: E402
import matrix  # noqa: E402
import runner  # noqa: E402

OUTCOMES = (*classify.OK_OUTCOMES, *classify.FAILURES, "HARNESS-ERROR")
SHORT = {
    "OK-NONCONVERGED": "OK-NONCONV",
    "FALSE-CONVERGENCE": "FALSE-CONV",
    "HARNESS-ERROR": "HARNESS",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=10_000)
    parser.add_argument("--offset", type=int, default=0, help="index of the first problem")
    parser.add_argument("--quick", action="store_true", help="1,000 problems")
    parser.add_argument(
        "--suite", choices=("root", "extended"), default="root", help="which problems (see above)"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per problem")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fuzz.json")
    parser.add_argument("--case", help="run one case id in this process and print it")
    parser.add_argument("--merge", nargs="+", type=Path, help="summarise these result files")
    args = parser.parse_args()
    if args.case:
        result = classify.run_with_alarm(matrix.Case.parse(args.case), args.timeout)
        print(json.dumps(result.as_dict(), indent=2))
        return
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        results = [dict(zip(part["columns"], row)) for part in parts for row in part["results"]]
        meta = {key: value for key, value in parts[0]["meta"].items() if key != "range"}
        meta["seconds"] = sum(p["meta"]["seconds"] for p in parts)
        meta["chunks"] = [p["meta"]["range"] for p in parts]
    else:
        count = 1000 if args.quick else args.problems
        cases = [case.id for case in matrix.large_run(count, args.offset, args.suite)]
        start = time.perf_counter()
        results = []
        for done, result in enumerate(
            runner.run(cases, workers=args.workers, timeout=args.timeout), 1
        ):
            results.append(result)
            if done % 500 == 0 or done == len(cases):
                print(
                    f"{done}/{len(cases)} in {time.perf_counter() - start:.0f} s", file=sys.stderr
                )
        meta = _meta(args, time.perf_counter() - start)
        meta["range"] = [args.offset, args.offset + count]
        meta["suite"] = args.suite
    summary = summarise(results)
    print(report(summary, meta))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = [[_compact(r, column) for column in COLUMNS] for r in results]
    brief = {key: value for key, value in summary.items() if key != "failures"}  # in the rows
    document = {"meta": meta, "summary": brief, "columns": COLUMNS, "results": rows}
    args.out.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    print(f"\nwrote {args.out}")


def _meta(args, seconds: float) -> dict:
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        models = [line.split(":", 1)[1].strip() for line in info if "model name" in line]
        cpu = models[0] if models else cpu
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "workers": args.workers, "timeout_s": args.timeout,
            "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit.stdout.strip(), "seconds": seconds}  # fmt: skip


#: The fields of a result kept in the JSON file, one row per problem.
COLUMNS = ["case", "outcome", "reason", "status", "backward_status", "residual_ratio",
           "grad_error", "cond", "seconds", "note"]  # fmt: skip


def _compact(result: dict, column: str):
    """A field as stored: floats to 3 significant digits, notes of acceptable runs dropped."""
    value = result.get(column)
    if isinstance(value, float):
        return float(f"{value:.3g}")
    if column == "note" and result["outcome"] in classify.OK_OUTCOMES:
        return ""
    return value


def summarise(results: list[dict]) -> dict:
    """Counts per family × outcome, failure kinds, gradient errors, and the failures."""
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    kinds: collections.Counter = collections.Counter()
    errors: dict[str, list] = {"exact": [], "unroll": [], "jvp": [], "hvp": []}
    unchecked: collections.Counter = collections.Counter()
    for r in results:
        family = r["case"].split(":")[0]
        table[family][r["outcome"]] += 1
        table["all"][r["outcome"]] += 1
        if r["outcome"] not in classify.OK_OUTCOMES:
            kinds[f"{r['outcome']}: {_kind(r['reason'])}"] += 1
        if r["outcome"] == "OK" and r["grad_error"] is not None:
            parts = r["case"].split(":")
            derivative = parts[5] if len(parts) > 5 and parts[5] in ("jvp", "hvp") else "grad"
            mode = "unroll" if parts[3] == "unroll" else "exact"
            errors[derivative if derivative != "grad" else mode].append(
                (r["grad_error"], r["case"])
            )
        if r["outcome"] == "OK" and "unchecked" in (r["reason"] or ""):
            unchecked[_kind(r["reason"])] += 1
    failures = [r for r in results if r["outcome"] not in classify.OK_OUTCOMES]
    failures.sort(key=lambda r: (r["outcome"], r["case"]))
    return {
        "problems": len(results),
        "table": {family: dict(counts) for family, counts in sorted(table.items())},
        "failure_kinds": dict(kinds.most_common()),
        "gradient_errors": {mode: _spread(found) for mode, found in errors.items()},
        "unchecked": dict(unchecked.most_common()),
        "failures": [{k: r[k] for k in ("case", "outcome", "reason", "note")} for r in failures],
    }


def _spread(errors: list[tuple[float, str]]) -> dict:
    errors = sorted(errors)
    return {
        "checked": len(errors),
        "median": errors[len(errors) // 2][0] if errors else None,
        "worst": list(errors[-1]) if errors else None,
    }


def _kind(reason: str) -> str:
    """A failure's reason without its numbers and names, to count alike failures together."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", reason)
    return reason[:110]


def report(summary: dict, meta: dict) -> str:
    lines = [
        f"{summary['problems']} problems (suite {meta.get('suite', 'root')}) in "
        f"{meta['seconds']:.0f} s on {meta['cpu']} "
        f"({meta['workers']} worker(s), {meta['timeout_s']:g} s per problem; "
        f"torch {meta['torch']}, commit {meta['commit']})",
        "",
    ]
    widths = [max(len(SHORT.get(o, o)), 5) for o in OUTCOMES]
    lines.append(
        f"{'family':<22}" + " ".join(f"{SHORT.get(o, o):>{w}}" for o, w in zip(OUTCOMES, widths))
    )
    for family, counts in summary["table"].items():
        lines.append(
            f"{family:<22}" + " ".join(f"{counts.get(o, 0):>{w}}" for o, w in zip(OUTCOMES, widths))
        )
    lines += [
        "",
        "derivatives of OK runs against the oracle (float64; relative error, 2-norm; exact and",
        "unroll: reverse mode; jvp: forward mode; hvp: Hessian-vector products):",
    ]
    for mode, spread in summary["gradient_errors"].items():
        if spread["checked"]:
            lines.append(
                f"  {mode:<7} {spread['checked']:>5} checked, median {spread['median']:.1e}, "
                f"worst {spread['worst'][0]:.1e} ({spread['worst'][1]})"
            )
    if summary.get("unchecked"):
        lines += ["", "OK runs whose derivative the oracle could not check:"]
        lines += [f"  {count:>5}  {kind}" for kind, count in summary["unchecked"].items()]
    if summary["failure_kinds"]:
        lines += ["", "failures by kind:"]
        lines += [f"  {count:>5}  {kind}" for kind, count in summary["failure_kinds"].items()]
        lines += ["", f"every failure ({len(summary['failures'])}; reproduce with --case ID):"]
        lines += [
            f"  {f['outcome']:<17} {f['case']:<60} {f['reason']}  [{f['note']}]"
            for f in summary["failures"]
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
