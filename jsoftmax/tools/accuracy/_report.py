"""`python -m jsoftmax accuracy`: the tables and the command line of `run`."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

import jax

from jsoftmax.tools.accuracy._families import FAMILIES
from jsoftmax.tools.accuracy._measure import DIGITS, run
from jsoftmax.tools.accuracy._metrics import DTYPES

PROG = "python -m jsoftmax accuracy"


def _fmt(u: float) -> str:
    if not math.isfinite(u):
        return "inf"
    if u == 0:
        return "0"
    if u < 10:
        return f"{u:.2f}"
    if u < 1e4:
        return f"{u:.0f}"
    return f"{u:.1e}"


def _pairs(results: list[dict]) -> dict:
    table: dict = {}
    for r in results:
        table.setdefault((r["dtype"], r["op"], r["family"]), {})[r["impl"]] = r
    return table


def _verdict(a: dict, b: dict) -> str:
    ka = (a["nonfinite"], a["max_ulp"], a["median_ulp"])
    kb = (b["nonfinite"], b["max_ulp"], b["median_ulp"])
    # Differences below a quarter ULP are noise.
    if ka[0] == kb[0] and abs(ka[1] - kb[1]) <= 0.25 + 0.05 * min(ka[1], kb[1]):
        return "same"
    return "better" if ka < kb else "worse"


def _cell(r: dict) -> str:
    return _fmt(r["max_ulp"]) + (f", {r['nonfinite']} non-finite" if r["nonfinite"] else "")


def _summary_table(table: dict) -> str:
    """The worst family of each (dtype, operation), for each implementation."""
    worst: dict = {}  # (impl, dtype, op) -> (family, row)
    for (dtype, op, family), d in table.items():
        for impl in ("jsoftmax", "jax.nn"):
            r = d[impl]
            old = worst.get((impl, dtype, op))
            if old is None or (r["nonfinite"], r["max_ulp"]) > (
                old[1]["nonfinite"],
                old[1]["max_ulp"],
            ):
                worst[(impl, dtype, op)] = (family, r)
    lines = [
        "| dtype | operation | jsoftmax max ULP (worst family) | jax.nn max ULP (worst family) |",
        "|---|---|---|---|",
    ]
    for (impl, dtype, op), (family, r) in worst.items():
        if impl != "jsoftmax":
            continue
        nn_family, nn = worst[("jax.nn", dtype, op)]
        lines.append(f"| {dtype} | {op} | {_cell(r)} ({family}) | {_cell(nn)} ({nn_family}) |")
    return "\n".join(lines)


def format_table(results: list[dict], summary: bool = False) -> str:
    """Markdown table of `run`'s rows, jsoftmax beside jax.nn; `summary` keeps
    the worst family of each dtype and operation only.

    Examples:
      >>> from jsoftmax.tools.accuracy import format_table
      >>> row = dict(dtype="float32", op="softmax", family="normal", n=8, rows=2,
      ...            median_ulp=0.1, max_rel=3e-8, median_rel=1e-8, nonfinite=0, flushed=0)
      >>> rows = [{**row, "impl": "jsoftmax", "max_ulp": 0.5},
      ...         {**row, "impl": "jax.nn", "max_ulp": 3.0}]
      >>> print(format_table(rows, summary=True).splitlines()[-1])
      | float32 | softmax | 0.50 (normal) | 3.00 (normal) |
    """
    table = _pairs(results)
    if summary:
        return _summary_table(table)
    lines = [
        "| dtype | operation | family | n | jsoftmax max / median ULP | "
        "jax.nn max / median ULP | jsoftmax max rel | jax.nn max rel | jsoftmax vs jax.nn |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (dtype, op, family), d in table.items():
        js, nn = d["jsoftmax"], d["jax.nn"]

        def cell(r):
            s = f"{_fmt(r['max_ulp'])} / {_fmt(r['median_ulp'])}"
            return s + (f" ({r['nonfinite']} non-finite)" if r["nonfinite"] else "")

        lines.append(
            f"| {dtype} | {op} | {family} | {js['n']} | {cell(js)} | {cell(nn)} | "
            f"{js['max_rel']:.1e} | {nn['max_rel']:.1e} | {_verdict(js, nn)} |"
        )
    return "\n".join(lines)


def _finite_or_none(r: dict) -> dict:
    # JSON has no infinity: an infinite error is written as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command with `argv`; returns 0, or 2 when mpmath is missing."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Error of jsoftmax and jax.nn against mpmath (50 digits), in ULPs of the "
            "output dtype; derivatives relative to the largest exact component of the row. "
            "Needs mpmath: pip install 'jsoftmax[accuracy]'."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rows (CI)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="dtypes to measure"
    )
    parser.add_argument(
        "--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="input families"
    )
    parser.add_argument("--summary", action="store_true", help="print the worst family only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        # float64 for this run only: the caller's JAX configuration is left as it was.
        with jax.enable_x64(True):
            results = run(
                quick=args.quick, dtypes=args.dtypes, families=args.families, seed=args.seed
            )
    except ImportError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(format_table(results, summary=args.summary))
    print(
        f"\n{len(results)} rows in {elapsed:.1f} s; jax {jax.__version__}, "
        f"backend {jax.default_backend()}, mpmath at {DIGITS} digits."
    )
    if args.json:
        payload = {
            "jax_version": jax.__version__,
            "backend": jax.default_backend(),
            "digits": DIGITS,
            "quick": bool(args.quick),
            "seed": args.seed,
            "results": [_finite_or_none(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=False)
    return 0
