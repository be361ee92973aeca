"""Argument checks shared by every public function.

Each check runs on static information (shapes, dtypes, Python values) so that bad
input is rejected before tracing, with a message that names the argument.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

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


def floating_array(x, name: str, layout: str = "") -> jax.Array:
    """`as_array(x, name)`, which must already have a real floating dtype (nothing is
    promoted); `layout` (e.g. `"(H, V)"`) goes into the message."""
    a = as_array(x, name)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        shape = f" {layout}" if layout else ""
        raise TypeError(f"{name} must be a real floating array{shape}, got dtype {a.dtype}.")
    return a


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of `shape` broadcasts to exactly `target`."""
    try:
        return jnp.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def as_float_array(x: ArrayLike, name: str = "x", *, scalar: bool = False) -> jax.Array:
    """Converts `x` to a JAX array of rank >= 1 (any rank with `scalar=True`) with a
    floating dtype.

    Integer and boolean input is promoted to JAX's default float dtype (float32, or
    float64 when `jax_enable_x64` is on). Complex input is rejected.
    """
    x = as_array(x, name)
    if x.ndim == 0 and not scalar:
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
    """Like `canonical_axis` but also accepts a non-empty sequence of distinct axes
    (kept in the order given) or None (every axis)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, Sequence) and not isinstance(axis, str):
        if len(axis) == 0:
            raise ValueError(f"{name} must name at least one axis, got an empty sequence.")
        axes = tuple(canonical_axis(a, ndim, name) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"{name}={tuple(axis)} names the same axis twice.")
        return axes
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
    if not broadcasts_to(where.shape, shape):
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
    t = as_array(value, name)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        if jnp.issubdtype(t.dtype, jnp.integer):
            t = t.astype(jnp.result_type(float))
        else:
            raise TypeError(f"{name} must be a real array, got dtype {t.dtype}.")
    batch = tuple(s for k, s in enumerate(shape) if k not in axes)
    if not broadcasts_to(t.shape, batch):
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
    if is_concrete(t) and t.size:
        a = np.asarray(t)
        bad = ~((a > 0) & np.isfinite(a))
        if bad.any():
            raise ValueError(
                "temperature must be positive and finite everywhere; got an entry that "
                f"is not ({a[bad].flat[0]!r})."
            )
    return t


# --------------------------------------------------------------------------------------
# The options of the losses, checked once for every loss.
# --------------------------------------------------------------------------------------


class LossOptions(NamedTuple):
    """The checked options of a loss (frozen).

    `label_smoothing` and `z_loss` are None when off (a Python or concrete 0), a float
    when given as a number, or a traced scalar (a schedule inside `jax.jit`): those two
    may vary without recompiling. `logit_softcap` and `ignore_index` are static.
    """

    label_smoothing: float | jax.Array | None
    z_loss: float | jax.Array | None
    logit_softcap: float | None
    ignore_index: int | None
    reduction: Reduction


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def concrete_scalar(value, kinds: str):
    """A concrete 0-d JAX or NumPy array whose dtype is of one of `kinds` (NumPy kind
    letters) as the NumPy scalar it holds, for a static option that `jax.nn` callers
    pass as an array (e.g. `scale=1 / jnp.sqrt(h)`); anything else unchanged, a traced
    value included (for the caller to refuse)."""
    if isinstance(value, (jax.Array, np.ndarray)) and is_concrete(value):
        if value.shape == () and np.dtype(value.dtype).kind in kinds:
            return np.asarray(value)[()]
    return value


def coefficient(value, name: str, what: str, ok) -> float | jax.Array | None:
    """A loss coefficient: None for 0 (off), a float for a number or concrete scalar
    (checked with `ok`), or a traced real scalar as it is (not checkable: documented)."""
    if isinstance(value, (bool, np.bool_)) or value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be {what}, got {value!r}.")
    if not _is_number(value):
        arr = as_array(value, name)
        if arr.ndim != 0 or not (
            jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
        ):
            raise TypeError(
                f"{name} must be {what}: a real scalar, got shape {arr.shape} "
                f"and dtype {arr.dtype}."
            )
        if not is_concrete(arr):
            return arr
        value = arr.item()
    value = float(value)
    if not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return value or None


def check_softcap(logit_softcap) -> float | None:
    """`logit_softcap` as a float (None when not given); a static Python number > 0."""
    if logit_softcap is None:
        return None
    if not _is_number(logit_softcap):
        raise TypeError(
            f"logit_softcap must be None or a Python number > 0 (it is static), got "
            f"{logit_softcap!r}."
        )
    cap = float(logit_softcap)
    if not (cap > 0.0 and np.isfinite(cap)):
        raise ValueError(
            f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}."
        )
    return cap


def loss_options(
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    logit_softcap=None,
    ignore_index=None,
    reduction="none",
    labels_dtype=None,
) -> LossOptions:
    """Checks the options shared by every loss (messages name the argument)."""
    alpha = coefficient(
        label_smoothing, "label_smoothing", "a number in [0, 1]", lambda a: 0.0 <= a <= 1.0
    )
    c = coefficient(
        z_loss, "z_loss", "a finite number >= 0", lambda c: c >= 0.0 and bool(np.isfinite(c))
    )
    cap = check_softcap(logit_softcap)
    return LossOptions(
        alpha, c, cap, check_ignore_index(ignore_index, labels_dtype), check_reduction(reduction)
    )


def check_ignore_index(ignore_index, labels_dtype=None) -> int | None:
    """None or a Python int that the labels' integer dtype can hold (else a label could
    never equal it, or would wrap around to it under `jax.jit`)."""
    if ignore_index is None:
        return None
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(
        ignore_index, (int, np.integer)
    ):
        raise TypeError(f"ignore_index must be None or a Python int, got {ignore_index!r}.")
    ignore_index = int(ignore_index)
    if labels_dtype is not None and jnp.issubdtype(labels_dtype, jnp.integer):
        info = jnp.iinfo(labels_dtype)
        if not info.min <= ignore_index <= info.max:
            raise ValueError(
                f"ignore_index={ignore_index} cannot be held by the labels' dtype "
                f"{np.dtype(labels_dtype).name} (range [{info.min}, {info.max}]): no label "
                "could equal it. Pass labels of a wider signed dtype, e.g. int32."
            )
    return ignore_index


def split_where(where, shape: tuple[int, ...], axes: tuple[int, ...]):
    """`(class mask or None, example mask or None)` by optax's rule.

    A `where` with fewer dimensions than the logits is per-example: it must broadcast
    to the batch shape (`shape` without `axes`). One with the logits' rank masks
    entries (classes): it must broadcast to `shape`.
    """
    if where is None:
        return None, None
    where = as_bool_mask(as_array(where, "where"))
    batch = tuple(s for k, s in enumerate(shape) if k not in axes)
    if where.ndim < len(shape):
        if not broadcasts_to(where.shape, batch):
            raise ValueError(
                f"where of shape {where.shape} has fewer dimensions than the logits "
                f"{tuple(shape)}, so it is a per-example mask, and must broadcast to the "
                f"batch shape {batch} (the logits' shape without the class axis). For a "
                f"class mask give it the logits' rank, e.g. where[None, :]."
            )
        return None, jnp.broadcast_to(where, batch)
    if where.ndim > len(shape):
        raise ValueError(
            f"where of shape {where.shape} has more dimensions than the logits {tuple(shape)}."
        )
    return check_where(where, shape), None


def check_labels(
    labels,
    shape: tuple[int, ...],
    axis: int,
    ignore_index,
    *,
    logits_name: str = "logits",
    float_hint: str = "",
) -> jax.Array:
    """Integer class indices with the batch shape, or real probabilities with the
    logits' `shape` (the class axis `axis`)."""
    labels = as_array(labels, "labels")
    batch = tuple(s for k, s in enumerate(shape) if k != axis)
    if labels.dtype == jnp.bool_ or not (
        jnp.issubdtype(labels.dtype, jnp.integer) or jnp.issubdtype(labels.dtype, jnp.floating)
    ):
        raise TypeError(
            "labels must be integer class indices or real probabilities, got dtype "
            f"{labels.dtype}. Convert one-hot booleans with labels.astype({logits_name}.dtype)."
        )
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape == tuple(shape) and labels.shape != batch:
            raise ValueError(
                f"integer labels of shape {labels.shape} have a class axis: integer labels "
                f"are class indices with the batch shape {batch} ({logits_name}' shape "
                "without axis). For one-hot or probability targets pass float labels, e.g. "
                f"labels.astype({logits_name}.dtype)."
            )
        if labels.shape != batch:
            raise ValueError(
                f"integer labels of shape {labels.shape} do not match {logits_name}: class "
                f"indices must have the batch shape {batch} ({logits_name} {tuple(shape)} "
                f"without axis {axis})."
            )
        return labels
    if ignore_index is not None:
        raise ValueError(
            "ignore_index applies to integer class labels; got float (probability) labels. "
            "Mask examples of probability labels with a per-example where instead."
        )
    if labels.shape != tuple(shape):
        hint = " For class indices use an integer dtype." if labels.shape == batch else ""
        raise ValueError(
            f"float labels (a probability vector per row) must have the shape of "
            f"{logits_name}, {tuple(shape)}{float_hint}; got {labels.shape}.{hint}"
        )
    return labels


def check_label_range(labels, n: int, ignore_index, counted=None) -> None:
    """Raises `IndexError` for concrete integer labels outside `[0, n)` in the rows that
    count: not `ignore_index`, and where the per-example mask `counted` (if given) is
    True. Traced labels, or a traced mask, cannot be checked: those rows become NaN."""
    if not (is_concrete(labels) and labels.size):
        return
    values = np.asarray(labels)  # numpy: jnp would be staged inside a trace
    keep = np.ones(values.shape, bool)
    if ignore_index is not None:
        keep &= values != ignore_index
    if counted is not None:
        if not is_concrete(counted):
            return
        keep &= np.broadcast_to(np.asarray(counted), values.shape)
    values = values[keep]
    if values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= n:
            raise IndexError(
                f"labels has entries out of range for {n} classes in rows that count: got "
                f"values in [{lo}, {hi}], valid class indices are 0 to {n - 1}"
                + ("." if ignore_index is None else f" (or ignore_index={ignore_index}).")
            )


def check_weights(weights, n: int, hint: str = ""):
    """Per-class weights of shape `(n,)`, as a float array without gradient (or None)."""
    if weights is None:
        return None
    w = as_array(weights, "weights")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        if jnp.issubdtype(w.dtype, jnp.integer):
            w = w.astype(jnp.result_type(float))
        else:
            raise TypeError(f"weights must be a real array, got dtype {w.dtype}.")
    if w.shape != (n,):
        raise ValueError(
            f"weights must have one entry per class, shape ({n},), got shape {w.shape}.{hint}"
        )
    return jax.lax.stop_gradient(w)


def check_chunk_size(chunk_size, default: int, limit: int, name: str = "chunk_size") -> int:
    """None (`default`) or a positive int, clipped to `limit`."""
    if chunk_size is None:
        return int(min(default, limit))
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"{name} must be None or a positive int, got {chunk_size!r}.")
    if chunk_size <= 0:
        raise ValueError(f"{name} must be a positive int, got {chunk_size}.")
    return int(min(chunk_size, limit))
