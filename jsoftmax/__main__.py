"""Command line: `python -m jsoftmax {verify,bench,accuracy} [options]`, also installed
as the `jsoftmax` command.

Each subcommand is a module of `jsoftmax.tools` exposing `main(argv) -> int`; this
file only dispatches, so `python -m jsoftmax verify --help` shows that command's options.
"""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "verify": ("jsoftmax.tools.verify", "check every derivative method against float64 (main job)"),
    "bench": ("jsoftmax.tools.bench", "time jsoftmax against jax.nn and autodiff baselines"),
    "accuracy": ("jsoftmax.tools.accuracy", "error report against mpmath arbitrary precision"),
}


def _usage() -> str:
    lines = ["usage: python -m jsoftmax COMMAND [options]  (or: jsoftmax COMMAND [options])"]
    lines += ["", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    lines += ["", "Run 'python -m jsoftmax COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs `COMMAND [options]` from `argv` (`sys.argv[1:]` by default); returns the
    command's exit code (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"jsoftmax: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
