r"""The one max-exp-sum pass of every softmax in jsoftmax.

`softmax`, `log_softmax`, the losses of [`jsoftmax._kernel`][jsoftmax._kernel], the
post-training functions and the sharded functions reduce their logits (or a piece of
them) to a row maximum `m` and a sum-exp `t = sum exp((u - m) / T)` by `exp_pass`; the
merge of pieces is `jsoftmax._merge`'s.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoftmax import _checks


class Pass(NamedTuple):
    """One piece's max-exp-sum pass (keepdims along the reduced axes)."""

    u: jax.Array  # the (soft-capped) logits, -inf where not valid
    d: jax.Array  # (u - m) / T: -inf where not valid
    e: jax.Array  # exp(d)
    total: jax.Array  # sum exp(d): 0 for a piece without valid entries
    m: jax.Array  # the row maximum of u (no gradient; the lowest finite value if empty)


def exp_pass(u, valid, axes: tuple[int, ...], temperature=None, row_max=None, dtype=None) -> Pass:
    """The max-exp-sum pass over `axes` of `u`, computed in `dtype` (default: the
    accumulation dtype of `u`).

    Entries where `valid` is False become `-inf` before the maximum and the exponential
    ("double where"), so a large masked logit never reaches `exp`. The maximum starts
    from the lowest finite value, so a piece without a finite entry is shifted by a
    finite amount and sums to 0. The temperature divides the shifted values,
    $(u - m)/T$, so that the largest entry is exactly 0 however XLA rewrites the
    division; `+inf` and NaN propagate to NaN. `row_max`, if given, maps the local
    maximum to the one to shift by (e.g. one computed from the logits before a
    monotone soft-cap).
    """
    if valid is not None:
        u = jnp.where(valid, u, -jnp.inf)
    # The maximum in the input's dtype (exact; a 16-bit reduction reads half the bytes),
    # the rest in the accumulation dtype.
    m = row_max_of(u, axes)
    cdt = _checks.accumulation_dtype(u.dtype) if dtype is None else dtype
    u, m = u.astype(cdt), m.astype(cdt)
    m = lax.stop_gradient(m if row_max is None else row_max(m))
    e = jnp.exp(exp_arg(u, m, temperature))
    return Pass(u, shifted(u, m, temperature), e, jnp.sum(e, axis=axes, keepdims=True), m)


def row_max_of(u, axes: tuple[int, ...]):
    """The maximum over `axes` (keepdims), starting from the lowest finite value, so a
    row without a finite entry gives a finite maximum.

    A `lax.reduce` whose initial value is that lowest value: XLA's CPU backend then fuses
    the maximum with the subtraction and exponential that follow (as for
    `jax.nn.softmax`), where `jnp.max(..., initial=...)` adds a separate `maximum` after
    the reduction and splits that fusion (one more pass over the data).
    """
    lowest = jnp.asarray(jnp.finfo(u.dtype).min, u.dtype)
    axes = tuple(a % u.ndim for a in axes)
    # No derivative: the shift is a constant of every formula it enters (and the
    # derivative rule of a maximum divides by the number of entries equal to it, which
    # is 0 for a row without a finite entry).
    m = lax.reduce(lax.stop_gradient(u), lowest, lax.max, axes)
    if math.prod(u.shape[a] for a in axes) == 1:
        # XLA rewrites a reduction over one entry as that entry, dropping the initial
        # value (jaxlib 0.10): apply it here (test_n1_fully_masked_row).
        m = jnp.maximum(m, lowest)
    return jnp.expand_dims(m, axes)


def shifted(u, m, temperature=None):
    """`(u - m) / T`, `-inf` where `u` is `-inf` (the log-probabilities' shift)."""
    if temperature is None:
        return u - m
    return jnp.where(u > -jnp.inf, exp_arg(u, m, temperature), -jnp.inf)


def exp_arg(u, m, temperature=None):
    """The exponentials' argument `(u - m) / T`: where `u` is `-inf` a value whose
    exponential is 0 and whose derivatives are 0.

    With a temperature the gap `u - m` is raised to the lowest finite value before the
    division: `lowest / T` is finite or `-inf` and its exponential underflows to 0 (for
    `T` below about `3e36` in float32), so a derivative in `T` meets
    `exp(d) * lowest = 0`, not `0 * inf`. A maximum rather than a select: on XLA's CPU
    backend a select beside the exponential keeps the kernel from being vectorised
    (about 1.4x the time of the exponential alone).
    """
    if temperature is None:
        return u - m
    lowest = jnp.asarray(jnp.finfo(u.dtype).min, u.dtype)
    return jnp.maximum(u - m, lowest) / temperature.astype(u.dtype)


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _variadic_sum(axes: tuple[int, ...], terms: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """The sums of same-shaped `terms` over `axes` as one variadic reduction, which XLA's
    CPU backend fuses with the terms' elementwise producers (compares and selects too)."""
    zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
    add = lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True))  # noqa: E731
    return tuple(lax.reduce(terms, zeros, add, axes))


@_variadic_sum.defjvp
def _variadic_sum_jvp(axes, primals, tangents):
    # A sum is linear: the tangents' sums (plain reductions, which JAX can transpose).
    (terms,), (dterms,) = primals, tangents
    return _variadic_sum(axes, terms), tuple(jnp.sum(t, axis=axes) for t in dterms)


def fused_sums(axes, **terms: jax.Array) -> dict[str, jax.Array]:
    """`{name: sum over axes (keepdims)}` of same-shaped terms, as one reduction.

    One variadic reduction, into which XLA's CPU backend fuses the terms' elementwise
    producers, selects and compares included; a plain sum of such a term first writes it
    out (a logits-sized array), as does a sum of an array another pass also reads. Two
    or more terms make it variadic (one term would be compiled as a plain sum)."""
    axes = tuple(axes)
    names = sorted(terms)
    arrays = jnp.broadcast_arrays(*(terms[k] for k in names))
    sums = _variadic_sum(axes, tuple(arrays))
    return {k: jnp.expand_dims(s, axes) for k, s in zip(names, sums, strict=True)}
