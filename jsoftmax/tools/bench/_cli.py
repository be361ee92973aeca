"""`python -m jsoftmax bench`: the command line of [`run`][jsoftmax.tools.bench.run]."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from jsoftmax.tools.bench._plan import GROUPS, check_groups
from jsoftmax.tools.bench._report import format_table, plot, plot_scaling, require_matplotlib
from jsoftmax.tools.bench._run import run
from jsoftmax.tools.bench._sharded import prepare_devices

PROG = "python -m jsoftmax bench"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Time jsoftmax against jax.nn and autodiff baselines on the default backend. "
        "Ratios are baseline / jsoftmax, so > 1 means jsoftmax is faster.",
    )
    p.add_argument("--quick", action="store_true", help="reduced run (< 1 minute on 2 CPU cores)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the ratios (needs matplotlib)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per function")
    p.add_argument(
        "--only",
        metavar="GROUPS",
        help=f"comma-separated groups to run, from: {', '.join(GROUPS)} (sharded needs --devices)",
    )
    p.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="also run the sharded benchmark over N devices",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _error(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command with `argv` (`sys.argv[1:]` by default); returns the exit code:
    0, or 2 for bad arguments."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.repeats is not None and args.repeats < 1:
        return _error(f"--repeats must be >= 1, got {args.repeats}.")
    if args.devices is not None and args.devices < 1:
        return _error(f"--devices must be >= 1, got {args.devices}.")
    groups = None
    if args.only:
        groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            return _error(f"--only: unknown group(s) {unknown}; choose from {list(GROUPS)}.")
        try:
            check_groups(groups, args.devices)
        except ValueError:
            return _error("--only sharded needs --devices N.")
    if args.plot:
        try:
            require_matplotlib()
        except ImportError as e:
            return _error(str(e))
    if args.devices is not None:
        # The device count is fixed when JAX starts its backends: ask before any timing.
        try:
            prepare_devices(args.devices)
        except (RuntimeError, ValueError) as e:
            return _error(str(e))
    result = run(
        quick=args.quick,
        repeats=args.repeats,
        groups=groups,
        progress=not args.no_progress,
        devices=args.devices,
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
        scaling = args.plot.removesuffix(".png") + "-scaling.png"
        if plot_scaling(result, scaling):
            print(f"wrote {scaling}")
    return 0
