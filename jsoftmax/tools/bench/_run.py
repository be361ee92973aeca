"""Running the plan: progress bar, metadata, [`run`][jsoftmax.tools.bench.run]."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import jaxlib.version

import jsoftmax
from jsoftmax.tools.bench import _plan, _sharded
from jsoftmax.tools.bench._timing import Ctx, Group, Row


class Progress:
    """A plain-text progress bar on a stream (stderr by default)."""

    def __init__(
        self, total: int, stream: TextIO | None = None, width: int = 24, enabled: bool = True
    ):
        self.total, self.done, self.width, self.enabled = total, 0, width, enabled
        self.stream = sys.stderr if stream is None else stream
        self._last = 0

    def show(self, label: str) -> None:
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}"
        pad = " " * max(0, self._last - len(line))
        self._last = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            self.show("done")
            self.stream.write("\n")
            self.stream.flush()


def _meta(quick: bool, repeats: int) -> dict[str, Any]:
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    return {
        "backend": jax.default_backend(),
        "device": f"{dev.platform}: {dev.device_kind}",
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.version.__version__,
        "jsoftmax": jsoftmax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "dtype": "float32 unless a row names another",
        "mode": "quick" if quick else "full",
        "repeats": repeats,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "peak_bytes_in_use": (stats or {}).get("peak_bytes_in_use", "n/a"),
    }


def run(
    quick: bool = True,
    repeats: int | None = None,
    groups: Sequence[Group] | None = None,
    progress: bool = False,
    devices: int | None = None,
) -> dict[str, Any]:
    """Runs the benchmark and returns `{"meta": {...}, "rows": [...]}`.

    Every row times jsoftmax against a baseline measured in the same run (or compares
    bytes), and reports `ratio` = baseline / jsoftmax, so > 1 means jsoftmax is faster
    or smaller. Functions are jitted, compiled and warmed up before timing, and the
    repeats of the functions in a row are interleaved.

    Args:
      quick: a reduced set of shapes and repeats (under a minute on 2 CPU cores).
      repeats: timed samples per function (default 5 quick, 15 full).
      groups: restrict to these groups (see `GROUPS`); all single-device groups by
        default.
      progress: print a progress bar on stderr.
      devices: also run the `sharded` group on 1, 2, 4, 8 devices up to this count
        (simulated CPU devices are requested when JAX has not started yet).

    Returns:
      A JSON-serialisable dict. Each row has `group, case, candidate, baseline, unit,
      candidate_value, baseline_value, ratio` (baseline / jsoftmax: > 1 means jsoftmax
      is faster or smaller), `candidate_iqr`, `baseline_iqr`, `target` (minimum
      ratio, or None), `met`, `shape`, `dtype` and `note` (`"RESULTS DIFFER"`
      when the two sides did not compute the same thing).

    Raises:
      ValueError: `repeats` < 1, an unknown group, `"sharded"` without `devices`,
        or `devices` not a positive int.
      RuntimeError: fewer than `devices` devices are available.

    Examples:
      >>> from jsoftmax.tools import bench
      >>> result = bench.run(groups=["jacobian-free"], repeats=1)
      >>> [(r["case"], r["note"]) for r in result["rows"]]  # doctest: +NORMALIZE_WHITESPACE
      [('J @ v (1024,) float32', ''), ('v @ J (1024,) float32', ''),
       ('J @ v (4096,) float32', ''), ('v @ J (4096,) float32', '')]
    """
    if repeats is None:
        repeats = 5 if quick else 15
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    _plan.check_groups(groups, devices)
    if devices is not None:
        _sharded.prepare_devices(devices)
    ctx = Ctx(repeats=repeats, min_sample_s=0.003 if quick else 0.02)
    cases = _plan.plan(quick, groups, devices)
    bar = Progress(len(cases), enabled=progress)
    rows: list[Row] = []
    start = time.perf_counter()
    for case in cases:
        bar.show(case.label)
        rows.extend(case.run(ctx))
        bar.step()
    bar.close()
    meta = _meta(quick, repeats)
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    return {"meta": meta, "rows": [r.as_dict() for r in rows]}
