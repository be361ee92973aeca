"""Test-session configuration.

* Eight simulated CPU devices, so the sharding tests run on any machine. The flag must
  be set before JAX initialises its backends; it does not change single-device
  computations, which run on device 0 as usual.
* float64 enabled, so every test can build a float64 reference. Tests pass explicit
  dtypes everywhere.
* Implicit rank promotion raises, so the library never relies on it.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
