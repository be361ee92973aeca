"""The plan: which cases run, in which order. A new group is a module with `GROUPS` and
`cases(quick) -> list[Case]`, added to `_MODULES`."""

from __future__ import annotations

from collections.abc import Sequence

from jsoftmax.tools.bench import (
    _attention,
    _bandwidth,
    _cross_entropy,
    _forward,
    _fwd_bwd,
    _jacobians,
    _linear_ce,
    _memory,
    _post,
    _sharded,
    _torch,
)
from jsoftmax.tools.bench._timing import Case, Group

# Single-device groups, in the order they run.
_MODULES = (
    _forward,
    _fwd_bwd,
    _cross_entropy,
    _jacobians,
    _memory,
    _linear_ce,
    _post,
    _attention,
    _bandwidth,
    _torch,
)
SHARDED = _sharded.GROUPS[0]
GROUPS: tuple[Group, ...] = tuple(g for m in _MODULES for g in m.GROUPS) + _sharded.GROUPS


def check_groups(groups: Sequence[str] | None, devices: int | None) -> None:
    """Raises `ValueError` for unknown group names, or `sharded` without devices."""
    if groups is None:
        return
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"groups: unknown {unknown}; choose from {list(GROUPS)}.")
    if SHARDED in groups and devices is None:
        raise ValueError(f"groups: {SHARDED!r} needs devices (the largest device count).")


def plan(quick: bool, groups: Sequence[str] | None = None, devices: int | None = None):
    """The cases to run: those of `groups` (all single-device groups by default), then
    the `sharded` group when `devices` is given."""
    check_groups(groups, devices)
    cases: list[Case] = [
        c for m in _MODULES for c in m.cases(quick) if groups is None or c.group in groups
    ]
    if devices is not None:
        cases += _sharded.cases(quick, devices)
    return cases
