"""Test-session configuration.

* Eight simulated CPU devices, so the sharding tests run on any machine (the sharding
  tests build their meshes from the CPU devices, also where a GPU is the default). The
  flag must be set before JAX initialises its backends; it does not change single-device
  computations, which run on device 0 as usual.
* Most compiler optimizations off (``JAX_DISABLE_MOST_OPTIMIZATIONS=1`` unless the
  environment sets it: LLVM's code generation at -O0; XLA's HLO passes, fusion and
  buffer assignment run as usual, so the compiled memory figures the tests assert are
  those of a default build). The suite compiles thousands of small programs and
  compile time dominates it (-30% wall time, cold). It is inherited by the examples,
  notebooks and worker processes the tests start. The wheel lane (``.ci/wheel``) runs the
  fast suite with JAX's full optimization.
* float64 enabled, so every test can build a float64 reference. Tests pass explicit
  dtypes everywhere. ``JSOFTMAX_TEST_X64=0`` runs the suite in JAX's default
  configuration instead (float64 off, as users run it): the cases that need float64
  inputs (a ``float64`` parameter, or the ``x64`` marker) are skipped there, and the
  rest compare against NumPy float64 references.
* Implicit rank promotion raises, so the library never relies on it.
* Grids of parametrized cases run as a covering array: of the cases marked ``slow`` by
  ``helpers.fast_subset`` (the exhaustive remainder of a grid of options, dtypes, shapes
  and meshes), a run keeps those needed for every pair of parameter values to occur in
  some case that runs, chosen greedily and deterministically (for a single parameter,
  every other such case); the fast cases always run.
  ``JSOFTMAX_TEST_EXHAUSTIVE=1`` runs every case of every grid (and a test id named on
  the command line always runs).
* A persistent compilation cache in ``.cache/jax-tests/`` at the repository root (or
  ``JSOFTMAX_TEST_CACHE_DIR``; empty turns it off), shared by the pytest-xdist workers of
  a run and kept for the next run. The tests compile thousands of small programs; each is
  compiled once instead of once per worker and per run. The cache key is the program
  itself with the compiler, its options and the devices, so a change to jsoftmax or to
  JAX compiles anew; CI starts from a fresh clone, with an empty cache.
"""

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# Read by JAX when it is imported, and inherited by the processes the tests start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

X64 = os.environ.get("JSOFTMAX_TEST_X64", "1") != "0"
EXHAUSTIVE = os.environ.get("JSOFTMAX_TEST_EXHAUSTIVE", "0") == "1"
jax.config.update("jax_enable_x64", X64)
jax.config.update("jax_numpy_rank_promotion", "raise")

_CACHE_DIR = os.environ.get(
    "JSOFTMAX_TEST_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax-tests")
)
_CACHE_LIMIT_BYTES = 2**30


def _prune(cache: Path) -> None:
    """Empty the cache once it outgrows its limit (JAX's own size-bounded eviction
    rescans the directory on every write: far slower than compiling)."""
    entries = list(cache.iterdir()) if cache.is_dir() else []
    if sum(e.stat().st_size for e in entries if e.is_file()) > _CACHE_LIMIT_BYTES:
        for e in entries:
            e.unlink(missing_ok=True)


if _CACHE_DIR:
    if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller, before any worker
        _prune(Path(_CACHE_DIR))
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _is_float64(value) -> bool:
    if isinstance(value, str):
        return value == "float64"
    if value is None or value is float:  # np.dtype gives float64 for both
        return False
    try:
        return np.dtype(value) == np.float64
    except (TypeError, ValueError):  # e.g. a tuple of axes, which np.dtype reads as fields
        return False


def _pairs(params: dict) -> set:
    """The (name, value) pairs of a case's parameters, and each (name, value) alone."""
    values = sorted((name, repr(v)) for name, v in params.items())
    return {(v,) for v in values} | set(itertools.combinations(values, 2))


def _grid_marked_slow(item) -> bool:
    """Whether the case's own parameters carry the slow mark (fast_subset's remainder)."""
    return any(mark.name == "slow" for mark in item.callspec.marks)


def _covering_cases(items) -> list:
    """`items` without the grid cases that no parameter pair needs (see the docstring)."""
    groups: dict = {}
    for item in items:
        if getattr(item, "callspec", None) is not None:
            groups.setdefault((item.path, item.originalname), []).append(item)
    dropped = set()
    for cases in groups.values():
        optional = [c for c in cases if _grid_marked_slow(c)]
        if not optional:
            continue
        if len(cases[0].callspec.params) == 1:
            # One parameter (a list of options): every other case beyond the fast ones.
            dropped.update(id(c) for c in optional[1::2])
            continue
        covered = set().union(*(_pairs(c.callspec.params) for c in cases if c not in optional))
        new = {id(c): _pairs(c.callspec.params) - covered for c in optional}
        while True:
            best = max(optional, key=lambda c: len(new[id(c)]), default=None)
            if best is None or not new[id(best)]:
                break
            covered |= new[id(best)]
            optional.remove(best)
            for c in optional:
                new[id(c)] -= covered
        dropped.update(id(c) for c in optional)
    return [item for item in items if id(item) not in dropped]


_LONG_FIRST = {
    "test_notebooks.py",
    "test_language_model.py",
    "test_docs.py",
    "test_verify.py",
    "test_bench.py",
    "test_multiprocess.py",
    "test_accuracy.py",
}


def pytest_collection_modifyitems(config, items):
    named = any("::" in str(arg) for arg in config.args)
    if not EXHAUSTIVE and not named:
        kept = _covering_cases(items)
        if len(kept) < len(items):
            keep = {id(item) for item in kept}
            config.hook.pytest_deselected(items=[i for i in items if id(i) not in keep])
            items[:] = kept
    # The long runs (notebooks, examples, the CLIs, other processes) first, so that the
    # workers share them and the run does not end on one of them while the other waits.
    items.sort(key=lambda item: item.path.name not in _LONG_FIRST)
    if X64:
        return
    skip = pytest.mark.skip(reason="needs float64 (JSOFTMAX_TEST_X64=0: JAX's default config)")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("x64") or any(_is_float64(v) for v in params.values()):
            item.add_marker(skip)
