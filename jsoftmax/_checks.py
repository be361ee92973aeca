"""Argument checks shared by every public function.

Each check runs on static information (shapes, dtypes, Python values) so that bad
input is rejected before tracing, with a message that names the argument.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.typing import ArrayLike

# The string options of the public functions, each defined once: the Literal type of
# the signatures and the tuple of accepted values are the same definition.
Rule = Literal["vjp", "jvp"]
Precision = Literal["default", "high"]
Reduction = Literal["none", "sum", "mean"]
RULES: tuple[Rule, ...] = get_args(Rule)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
REDUCTIONS: tuple[Reduction, ...] = get_args(Reduction)


def as_array(x, name: str) -> jax.Array:
    """`jnp.asarray(x)`, with a clear error naming `name` for non-array input."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}.")
    try:
        return jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}.") from e


def as_float_array(x: ArrayLike, name: str = "x") -> jax.Array:
    """Converts `x` to a JAX array of rank >= 1 with a floating dtype.

    Integer and boolean input is promoted to JAX's default float dtype (float32, or
    float64 when `jax_enable_x64` is on). Complex input is rejected.
    """
    x = as_array(x, name)
    if x.ndim == 0:
        raise ValueError(
            f"{name} must have at least one dimension (the softmax axis), got a scalar. "
            f"Wrap it as {name}[None] if you mean a vector of length 1."
        )
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {x.dtype}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def accumulation_dtype(dtype) -> np.dtype:
    """float32 for 16-bit floats (float16, bfloat16), else `dtype` itself."""
    dtype = np.dtype(dtype)
    if jnp.finfo(dtype).bits < 32:
        return np.dtype(jnp.float32)
    return dtype


def canonical_axis(axis, ndim: int, name: str = "axis") -> int:
    """Returns `axis` as a non-negative int, or raises a clear error."""
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {axis!r}.")
    try:
        axis = operator.index(axis)
    except TypeError as e:
        raise TypeError(f"{name} must be an int, got {type(axis).__name__} {axis!r}.") from e
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an input of rank {ndim}.")
    return axis % ndim


def canonical_axes(axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Like `canonical_axis` but also accepts a non-empty tuple of distinct axes."""
    if isinstance(axis, Sequence) and not isinstance(axis, str):
        if len(axis) == 0:
            raise ValueError(f"{name} must name at least one axis, got an empty sequence.")
        axes = tuple(canonical_axis(a, ndim, name) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"{name}={tuple(axis)} names the same axis twice.")
        return tuple(sorted(axes))
    return (canonical_axis(axis, ndim, name),)


def check_rule(rule: object) -> Rule:
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    return rule


def check_precision(precision: object) -> Precision:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    return precision


def as_bool_mask(where: ArrayLike, name: str = "where") -> jax.Array:
    """`where` as a boolean array; any other dtype is rejected with the conversion to use.

    A numeric mask is not read as "nonzero keeps" (as `jnp.where` would): an
    additive mask (0 to keep, `-inf` or `-1e9` to drop) would then silently keep
    exactly the entries it drops. Flax's `make_causal_mask` and `make_attention_mask`
    return float32 0/1 masks by default, so the message says how to convert one.
    """
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(
            f"{name} must be a boolean mask (True keeps an entry), got dtype {where.dtype}. "
            f"For a 0/1 mask (e.g. Flax's make_causal_mask, float32 by default) pass "
            f"{name}=mask.astype(bool) or build it with dtype=bool; an additive mask "
            "(0 keeps, -inf drops) is not a where mask: pass where=(mask == 0)."
        )
    return where


def check_reduction(reduction: object) -> Reduction:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    return reduction


def check_where(where: ArrayLike | None, shape: tuple[int, ...], name: str = "where"):
    """Returns `where` as a boolean array broadcast to `shape` (or None)."""
    if where is None:
        return None
    where = as_bool_mask(where, name)
    try:
        out = jnp.broadcast_shapes(where.shape, shape)
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"{name} of shape {where.shape} does not broadcast to the input shape {tuple(shape)}."
        )
    return jnp.broadcast_to(where, shape)


def is_concrete(x) -> bool:
    """True when `x` holds values known at trace time (not a tracer) that this process
    can read: a global array spanning several processes counts as not concrete, so no
    argument check fetches data held by another process."""
    if isinstance(x, Tracer):
        return False
    return bool(getattr(x, "is_fully_addressable", True))


def check_index(i, n: int, name: str) -> jax.Array | int:
    """Validates a component index `i` of an axis of length `n`.

    Python ints and integer arrays are accepted; concrete values must lie in `[-n, n)`.
    """
    if isinstance(i, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer index, got {i!r}.")
    if isinstance(i, (int, np.integer)):
        if not -n <= int(i) < n:
            raise IndexError(f"{name}={int(i)} is out of range for an axis of length {n}.")
        return int(i) % n
    arr = jnp.asarray(i)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer index, got dtype {arr.dtype}.")
    if is_concrete(arr) and arr.size and (np.min(arr) < -n or np.max(arr) >= n):
        raise IndexError(f"{name} has entries out of range for an axis of length {n}.")
    return jnp.where(arr < 0, arr + n, arr)


def check_same_shape(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b} must have the same shape as {name_a}: got {b.shape} and {a.shape}."
        )


def per_row_array(value, shape: tuple[int, ...], axes: tuple[int, ...], name: str):
    """A real array broadcastable to the batch shape (`shape` without `axes`).

    Returns it as a float array of the input's rank, broadcast to the batch shape with
    size-1 softmax axes, so it broadcasts against the input without rank promotion.
    """
    t = jnp.asarray(value)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        if jnp.issubdtype(t.dtype, jnp.integer):
            t = t.astype(jnp.result_type(float))
        else:
            raise TypeError(f"{name} must be a real array, got dtype {t.dtype}.")
    batch = tuple(s for k, s in enumerate(shape) if k not in axes)
    try:
        ok = jnp.broadcast_shapes(t.shape, batch) == batch
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {t.shape} does not broadcast to the batch shape {batch} "
            "(the input's shape without the softmax axis)."
        )
    return jnp.expand_dims(jnp.broadcast_to(t, batch), axes)


def prepare_temperature(temperature, shape: tuple[int, ...], axes: tuple[int, ...]):
    """Validates `temperature` and shapes it to broadcast against the input.

    Returns None for the default temperature 1 (so the fast path pays nothing), else an
    array of the input's rank with size-1 softmax axes, broadcast to the batch shape.
    """
    if isinstance(temperature, (bool, np.bool_)):
        raise TypeError(f"temperature must be a positive number or array, got {temperature!r}.")
    if isinstance(temperature, (int, float, np.integer, np.floating)):
        t = float(temperature)
        if not t > 0 or not np.isfinite(t):
            raise ValueError(f"temperature must be positive and finite, got {temperature!r}.")
        if t == 1.0:
            return None
        temperature = t  # shaped below like an array temperature
    t = per_row_array(temperature, shape, axes, "temperature")
    if is_concrete(t) and t.size and not bool(np.all(np.asarray(t) > 0)):
        raise ValueError("temperature must be positive everywhere; got a non-positive entry.")
    return t
