"""Helpers shared by the test modules: inputs, float64 references, comparisons.

The references are NumPy float64 computations written from the definitions, independent
of jsoftmax and of JAX's configuration (they work with ``jax_enable_x64`` on or off).
"""

from __future__ import annotations

import contextlib
import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import AxisType, NamedSharding

# Whether float64 is enabled (tests/conftest.py: on unless JSOFTMAX_TEST_X64=0).
X64 = bool(jax.config.read("jax_enable_x64"))

# The dtype of references that JAX itself computes (autodiff of a plain implementation,
# jax.nn, optax, check_grads): float64 where enabled, else float32. Comparisons in it take
# their tolerances from it (``close(..., REF_DTYPE)``, ``tol(REF_DTYPE, ...)``).
REF_DTYPE = jnp.float64 if X64 else jnp.float32


_SHORT_DTYPES = {
    "bool": "bool",
    **{f"f{b}": f"float{b}" for b in (16, 32, 64)},
    "bf16": "bfloat16",
    **{f"i{b}": f"int{b}" for b in (8, 16, 32, 64)},
    **{f"u{b}": f"uint{b}" for b in (8, 16, 32, 64)},
}


def saved_residuals(f, *args) -> list[tuple[jax.ShapeDtypeStruct, str]]:
    """What `jax.vjp(f, *args)` saves for the backward pass: `(shape and dtype, where it
    comes from)` per array, read from JAX's public printer
    (`jax.ad_checkpoint.print_saved_residuals`; the description is its line, e.g.
    `f32[8,32] from the argument x`)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_saved_residuals(f, *args)
    out = []
    for line in buf.getvalue().splitlines():
        # Sharded dimensions print with their mesh axes, e.g. f32[8@b,32@c] or
        # f32[32@(b,c),1].
        dtype, dims = re.match(r"(\w+)\[([^\]]*)\]", line).groups()
        shape = tuple(int(d) for d in re.findall(r"(\d+)(?:@(?:\w+|\([^)]*\)))?", dims))
        out.append((jax.ShapeDtypeStruct(shape, jnp.dtype(_SHORT_DTYPES[dtype])), line))
    return out


EXHAUSTIVE = os.environ.get("JSOFTMAX_TEST_EXHAUSTIVE", "0") == "1"


def examples(n: int) -> int:
    """Hypothesis examples of a property run: `n` with `JSOFTMAX_TEST_EXHAUSTIVE=1`, half
    (at least 4) in a normal run. The examples are derandomized, so a run is repeatable."""
    return n if EXHAUSTIVE else max(4, (n + 1) // 2)


def fast_subset(values, fast, *, unpack: bool = False) -> list:
    """The values of a parametrized argument, those not in ``fast`` marked ``slow``.

    For exhaustive grids (every option, mesh, reduction and dtype): the fast suite
    (``pytest -m "not slow"``) runs the representative cases in ``fast``, the whole suite
    (and CI) runs every case. Stacked ``parametrize`` decorators combine the marks, so a
    case is fast only where every one of its arguments is. ``unpack`` for several argument
    names per value (a tuple of values each).
    """
    missing = [v for v in fast if v not in values]
    if missing:
        raise ValueError(f"fast_subset: {missing!r} not among the values {values!r}")
    return [
        v if v in fast else pytest.param(*(v if unpack else (v,)), marks=pytest.mark.slow)
        for v in values
    ]


def make_logits(shape, dtype=jnp.float32, seed=0, scale=3.0):
    """Standard-normal logits times ``scale``, drawn in float64 and rounded to ``dtype``."""
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    return jnp.asarray(x, dtype)


def f64(a) -> np.ndarray:
    """``a`` as a NumPy float64 array (16-bit JAX arrays included)."""
    return np.asarray(np.asarray(a).astype(np.float64))


def assert_close(a, b, *, rtol, atol=0.0):
    """``a`` and ``b`` agree elementwise in float64 within ``atol + rtol * |b|``."""
    np.testing.assert_allclose(f64(a), f64(b), rtol=rtol, atol=atol)


# Tolerances of results that are a few roundings away from exact (relative and absolute).
TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-12}


def close(a, b, dtype, scale=1.0, *, atol_scale=1.0):
    """``a`` and ``b`` agree to ``TOL[dtype] * scale`` (relative and absolute); for a
    quantity near 0 summed from larger terms, ``atol_scale`` widens the absolute part."""
    tol = TOL[np.dtype(dtype)] * scale
    assert_close(a, b, rtol=tol, atol=tol * atol_scale)


def tol(dtype, f64, f32):
    """The tolerance of a comparison computed in ``dtype``: ``f64`` for float64, ``f32``
    for float32 (for a test that states its own, e.g. a few ULP of each)."""
    return {np.dtype(np.float64): f64, np.dtype(np.float32): f32}[np.dtype(dtype)]


def np_softmax(x, axis=-1):
    x = f64(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    x = f64(x)
    s = x - x.max(axis=axis, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def cpu_mesh(shape, names, axis_types=None):
    """A mesh of the first ``prod(shape)`` CPU devices (conftest.py simulates 8).

    Built from the CPU platform explicitly, so the sharding tests run the same on a
    machine whose default backend is a single GPU.
    """
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, axis_types, devices=jax.devices("cpu")[:n])


def cpu_device_count() -> int:
    return len(jax.devices("cpu"))


def mesh_of(shape, names, kind=AxisType.Explicit):
    """A CPU mesh whose axes are all of ``kind`` (Explicit, as ``jax.make_mesh``)."""
    return cpu_mesh(shape, names, axis_types=(kind,) * len(shape))


def put(a, mesh, spec):
    """``a`` placed on ``mesh`` as ``spec`` says."""
    return jax.device_put(a, NamedSharding(mesh, spec))


def host(a) -> np.ndarray:
    """A (possibly sharded) array gathered to one NumPy array."""
    return np.asarray(jax.device_get(a))


_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+"
    r"(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
)


def collectives(compiled_text: str) -> list[tuple[str, list[int]]]:
    """(op name, element count of each operand) for every collective in the HLO."""
    found = []
    # XLA numbers long operand lists with comments (/*index=5*/) that contain "=".
    compiled_text = re.sub(r"/\*index=\d+\*/", "", compiled_text)
    for shapes, op in _COLLECTIVE.findall(compiled_text):
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dims in re.findall(r"\[([\d,]*)\]", shapes)
        ]
        found.append((op, sizes))
    return found


def compiled_hlo(f, *args) -> str:
    """The compiled (optimised, partitioned) HLO text of ``jax.jit(f)(*args)``."""
    return jax.jit(f).lower(*args).compile().as_text()


def ce_reference(
    z,
    labels,
    *,
    where=None,
    example_mask=None,
    ignore_index=None,
    weights=None,
    alpha=0.0,
    z_loss=0.0,
    cap=None,
    temperature=1.0,
    reduction="none",
    dtype=REF_DTYPE,
):
    """The cross-entropy of every jsoftmax loss, from its definitions, in ``dtype``, over
    the last axis of (B, N) logits (the one reference of the loss tests).

    Valid classes are those not masked by ``where`` (a class mask broadcastable to the
    logits) whose logit is not -inf. Per row, with p the softmax over the valid classes
    of s = softcap(z) / T and the m valid classes:
    l = (1 - a) w_y (-log p_y) + (a / m) sum_valid w_c (-log p_c) + c w_y lse^2 for
    integer labels (PyTorch's weight and label_smoothing; the z-loss weighted like the
    row), l = -sum_valid w_c ((1 - a) y_c + a / m) log p_c + c lse^2 for probability
    labels. Rows that do not count (ignore_index, example_mask, an integer label on an
    excluded class, no valid class) give 0; the mean divides by the sum of w_y (integer
    labels) or the number of counted rows, and is 0 when that is 0.
    """
    z = jnp.asarray(z).astype(dtype)
    n = z.shape[-1]
    valid = z > -jnp.inf
    if where is not None:
        valid = valid & jnp.broadcast_to(where, z.shape)
    if cap is not None:
        z = jnp.where(z > -jnp.inf, cap * jnp.tanh(z / cap), z)
    t = jnp.asarray(temperature, dtype)
    s = z / (t[:, None] if t.ndim else t)
    s = jnp.where(valid, s, -1e30)  # exp underflows to exactly 0
    lse = jax.scipy.special.logsumexp(s, axis=-1)
    log_p = jnp.where(valid, s - lse[:, None], 0.0)
    w = jnp.ones(n, dtype) if weights is None else jnp.asarray(weights, dtype)
    m = jnp.sum(valid, axis=-1)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        safe = jnp.clip(labels, 0, n - 1)
        nll = -jnp.take_along_axis(log_p, safe[:, None], axis=-1)[:, 0]
        smooth = -jnp.sum(jnp.where(valid, w[None] * log_p, 0.0), axis=-1) / jnp.maximum(m, 1)
        row_weight = w[safe]
        row = (1 - alpha) * row_weight * nll + alpha * smooth + z_loss * row_weight * lse**2
        counted = jnp.take_along_axis(valid, safe[:, None], axis=-1)[:, 0]
        if ignore_index is not None:
            counted &= labels != ignore_index
    else:
        y = jnp.asarray(labels).astype(dtype)
        y = jnp.where(valid, (1 - alpha) * y + alpha / jnp.maximum(m, 1)[:, None], 0.0)
        row = -jnp.sum(w[None] * y * log_p, axis=-1) + z_loss * lse**2
        counted = jnp.any(valid, axis=-1)
        row_weight = jnp.ones(row.shape, dtype)
    if example_mask is not None:
        counted &= example_mask
    row = jnp.where(counted, row, 0.0)
    if reduction == "none":
        return row
    if reduction == "sum":
        return jnp.sum(row)
    denom = jnp.sum(jnp.where(counted, row_weight, 0.0))
    return jnp.where(denom != 0, jnp.sum(row) / jnp.where(denom != 0, denom, 1.0), 0.0)
