"""Error metrics in units in the last place (ULP) of a dtype."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np

Dtype = Literal["float16", "bfloat16", "float32", "float64"]

# Precision bits (stored mantissa) and minimum normal exponent of each dtype.
FORMAT: dict[Dtype, tuple[int, int]] = {
    "float16": (10, -14),
    "bfloat16": (7, -126),
    "float32": (23, -126),
    "float64": (52, -1022),
}
DTYPES: tuple[Dtype, ...] = tuple(FORMAT)


def smallest_normal(dtype: Dtype) -> float:
    return float(np.ldexp(1.0, FORMAT[dtype][1]))


def to_dtype(x, dtype: Dtype) -> np.ndarray:
    """The float64 values `x` rounded to `dtype` (to nearest), back in float64."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float64).astype(jnp.dtype(dtype)).astype(np.float64)


def ulp(a, dtype: Dtype) -> np.ndarray:
    """Spacing of `dtype` at the float64 values `a` (smallest subnormal at 0).

    Examples:
      >>> from jsoftmax.tools.accuracy import ulp
      >>> [float(u) * 2**23 for u in ulp([1.0, 3.0, 0.75], "float32")]
      [1.0, 2.0, 0.5]
      >>> float(ulp(0.0, "float16")) == 2.0**-24  # the smallest subnormal
      True
    """
    nmant, emin = FORMAT[dtype]
    a = np.abs(np.asarray(a, np.float64))
    finite = np.isfinite(a) & (a > 0)
    _, e = np.frexp(np.where(finite, a, 1.0))
    e = np.where(finite, e - 1, emin)
    return np.ldexp(1.0, np.maximum(e, emin) - nmant)


def errors(got, hi: np.ndarray, lo: np.ndarray, dtype: Dtype, scale=None):
    """Per-component (ulp error, relative error, nonfinite flag, flushed flag).

    The exact value is `hi + lo` (two float64 numbers); `got` is the computed result.
    The error is `|got - exact|` in ULPs of `dtype` at `|exact|` (at `scale`
    when given, e.g. the largest component of a row) and relative to `|exact|` (or
    `scale`), never to less than the smallest normal number.

    A component whose exact value lies below the dtype's smallest normal number and
    which came out as zero is "flushed" (XLA on CPU flushes subnormal results to zero):
    it is counted separately and given error 0, since no XLA CPU computation can
    return the subnormal. A NaN, or an infinity where the correctly rounded answer is
    finite, is an infinite error and flagged `nonfinite`; an exact value beyond the
    dtype's range must come out as the same infinity.
    """
    got = np.asarray(got, np.float64)
    tiny = smallest_normal(dtype)
    flushed = (got == 0) & (np.abs(hi) < tiny) & (hi != 0)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = to_dtype(hi, dtype)
        exact_inf = np.isinf(rounded)  # the correctly rounded answer is infinite
        diff = np.abs((got - hi) - lo)
        diff = np.where((got == hi) & np.isinf(hi), 0.0, diff)  # the exact infinity
        diff = np.where(exact_inf, np.where(got == rounded, 0.0, np.inf), diff)
        diff = np.where(np.isnan(diff), np.inf, diff)
        diff = np.where(flushed, 0.0, diff)
        ref = np.abs(hi) if scale is None else scale
        ulps = diff / ulp(ref, dtype)
        rel = np.where(diff == 0, 0.0, diff / np.maximum(ref, tiny))
    nonfinite = ~np.isfinite(got) & np.isfinite(rounded)
    return ulps, rel, nonfinite, flushed


def row_scale(hi: np.ndarray) -> np.ndarray:
    """The largest magnitude of each row (last axis), broadcast to `hi`'s shape."""
    return np.broadcast_to(np.max(np.abs(hi), axis=-1, keepdims=True), hi.shape)


def summary(ulps, rel, nonfinite, flushed) -> dict:
    """The per-row report fields from `errors`' per-component arrays."""
    ulps, rel = np.ravel(ulps), np.ravel(rel)
    return {
        "max_ulp": float(np.max(ulps)) if ulps.size else 0.0,
        "median_ulp": float(np.median(ulps)) if ulps.size else 0.0,
        "max_rel": float(np.max(rel)) if rel.size else 0.0,
        "median_rel": float(np.median(rel)) if rel.size else 0.0,
        "nonfinite": int(np.sum(nonfinite)),
        "flushed": int(np.sum(flushed)),
    }
