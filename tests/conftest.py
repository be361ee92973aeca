"""Test-session configuration.

* Eight simulated CPU devices, so the sharding tests run on any machine (the sharding
  tests build their meshes from the CPU devices, also where a GPU is the default). The
  flag must be set before JAX initialises its backends; it does not change single-device
  computations, which run on device 0 as usual.
* float64 enabled, so every test can build a float64 reference. Tests pass explicit
  dtypes everywhere. ``JSOFTMAX_TEST_X64=0`` runs the suite in JAX's default
  configuration instead (float64 off, as users run it): the cases that need float64
  inputs (a ``float64`` parameter, or the ``x64`` marker) are skipped there, and the
  rest compare against NumPy float64 references.
* Implicit rank promotion raises, so the library never relies on it.
* A persistent compilation cache in ``.cache/jax-tests/`` at the repository root (or
  ``JSOFTMAX_TEST_CACHE_DIR``; empty turns it off), shared by the pytest-xdist workers of
  a run and kept for the next run. The tests compile thousands of small programs; each is
  compiled once instead of once per worker and per run. The cache key is the program
  itself with the compiler, its options and the devices, so a change to jsoftmax or to
  JAX compiles anew; CI starts from a fresh clone, with an empty cache.
"""

import os
from pathlib import Path

import numpy as np
import pytest

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402

X64 = os.environ.get("JSOFTMAX_TEST_X64", "1") != "0"
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


def pytest_collection_modifyitems(config, items):
    if X64:
        return
    skip = pytest.mark.skip(reason="needs float64 (JSOFTMAX_TEST_X64=0: JAX's default config)")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.get_closest_marker("x64") or any(_is_float64(v) for v in params.values()):
            item.add_marker(skip)
