r"""Softmax computed in pieces, merged exactly: `merge_partials` and its statistics.

A softmax over a row split into pieces (vocabulary chunks, devices, key blocks of an
attention) is merged from per-piece statistics. A piece is summarised by a **shift**
`m` (its maximum, or any bound used to stabilise `exp`) and a **sum-exp**
`total = sum_i exp(x_i - m)` over its entries; its log-sum-exp is
`m + log(total)`. Pieces $k$ merge by one rule,

$$
M = \max_k m_k, \qquad T = \sum_k t_k\, e^{m_k - M}, \qquad
\mathrm{lse} = M + \log T,
$$

and a piece's own softmax-weighted result $o_k$ enters the merged one with weight
$w_k = t_k e^{m_k - M} / T$ (for a piece given by its log-sum-exp, $m_k =
\mathrm{lse}_k$ and $t_k = 1$, so $w_k = e^{\mathrm{lse}_k - \mathrm{lse}}$).

Everything is built on `merge_stats`, which takes the two reductions as
arguments:

* over an array axis ([`merge_partials`][jsoftmax.merge_partials]): `jnp.max` / `jnp.sum`;
* over devices ([`jsoftmax.sharded`][], `merge_across`): `lax.pmax` of the
  per-row shifts, then one `lax.psum` of the rescaled sums (the losses carry their
  other per-row statistics in the same all-reduce, `jsoftmax._kernel.merge`);
* across the steps of a `jax.lax.scan` over chunks (a chunked loss): the
  per-row statistics of `jsoftmax._kernel` (`merge_pair`), built on
  `rescale`.

A piece without entries (all masked) has `total = 0` and any shift (the kernels of
`jsoftmax._softmax` give the lowest finite value; a log-sum-exp of `-inf` is
read as such a piece): it contributes nothing, and a merge of nothing but such pieces
is again `total = 0`, whose log-sum-exp is `-inf`. Every select on emptiness is
doubled ("double where"), so a derivative taken through these helpers stays finite.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _formulas

# --------------------------------------------------------------------------------------
# The statistics of pieces and the one merge rule.
# --------------------------------------------------------------------------------------


def rescale(m: jax.Array, total: jax.Array, m_new: jax.Array, temperature=None) -> jax.Array:
    """`total * exp(m - m_new)`: a piece's sum-exp re-expressed against the shift `m_new`
    (`exp((m - m_new) / T)` with a `temperature` `T`, for shifts in the units of the
    logits before the temperature divides them).

    An empty piece (`total == 0`) gives 0 whatever `m` and `m_new` hold (also
    `-inf` for both); NaN propagates, and so does `m = m_new = +inf`
    (`exp(inf - inf)`). `m <= m_new` is assumed (`m_new` is a merged maximum).
    """
    empty = total == 0
    gap = jnp.where(empty, jnp.zeros((), m.dtype), m - m_new)
    if temperature is not None:
        gap = gap / temperature.astype(gap.dtype)
    return jnp.where(empty, jnp.zeros((), total.dtype), total * jnp.exp(gap))


def merge_stats(
    m: jax.Array, total: jax.Array, *, reduce_max: Callable, reduce_sum: Callable
) -> tuple[jax.Array, jax.Array]:
    r"""The merge rule: `M = reduce_max(m)`, `T = reduce_sum(rescale(m, total, M))`.

    Args:
      m: per-piece shifts (see the module docstring).
      total: per-piece sum-exps.
      reduce_max: reduces the shifts over the pieces, e.g.
        `partial(jnp.max, axis=k, keepdims=True)` or
        `partial(lax.pmax, axis_name=name)`. Its result is treated as a constant
        shift (`stop_gradient`): derivatives flow through `T`, which is exact
        because the merged log-sum-exp does not depend on the shift.
      reduce_sum: reduces the rescaled sums over the pieces.

    Returns:
      `(M, T)`. The losses merge more per-row statistics the same way
      (`jsoftmax._kernel.merge`).
    """
    m_new = lax.stop_gradient(reduce_max(lax.stop_gradient(m)))
    return m_new, reduce_sum(rescale(m, total, m_new))


def lse_of(m: jax.Array, total: jax.Array) -> jax.Array:
    """`m + log(total)`: `-inf` for `total == 0`, `+inf` for `m = +inf`, NaN kept.

    The logarithm never sees 0 (double where), so the derivative is finite for empty
    pieces.
    """
    empty = total == 0
    log_total = jnp.log(jnp.where(empty, jnp.ones((), total.dtype), total))
    lse = jnp.where(empty, jnp.full((), -jnp.inf, total.dtype), m + log_total)
    return jnp.where(m == jnp.inf, m, lse)


def _nonzero(total: jax.Array) -> jax.Array:
    """`total` with 0 replaced by 1 (rows without entries then divide 0 by 1)."""
    return jnp.where(total == 0, jnp.ones((), total.dtype), total)


def scale(m: jax.Array, m_new: jax.Array, total_new: jax.Array) -> jax.Array:
    """`exp(m - m_new) / T`: turns a piece's own exponentials `exp(x - m)` into the
    merged softmax, `p = exp(x - m) * scale`. A merged row without entries gives
    `exp(x - m) = 0` and so `p = 0`."""
    return jnp.exp(m - m_new) / _nonzero(total_new)


def log_total(total: jax.Array) -> jax.Array:
    """`log T`, with `T = 0` (a merged row without entries) read as 1."""
    return jnp.log(_nonzero(total))


def log_scale(m: jax.Array, m_new: jax.Array, total_new: jax.Array) -> jax.Array:
    """`(m - m_new) - log T`: the log-domain `scale`, `log p = (x - m) + log_scale`.

    The shift difference and `log T` stay apart, so a huge shift does not round
    `log T` away, and on the piece holding the maximum (`m = m_new`) this is exactly
    `-log T`.
    """
    return (m - m_new) - log_total(total_new)


def merge_across(m: jax.Array, total: jax.Array, axis_name) -> tuple[jax.Array, jax.Array]:
    """`merge_stats` over devices: `lax.pmax` of the shifts, then one `lax.psum` of the
    rescaled sums. Call inside `jax.shard_map`; `m` and `total` are this device's
    per-row statistics."""
    return merge_stats(
        m,
        total,
        reduce_max=partial(lax.pmax, axis_name=axis_name),
        reduce_sum=partial(lax.psum, axis_name=axis_name),
    )


def _sum_over(axis: int):
    return partial(jnp.sum, axis=axis, keepdims=True)


def merge_over(m: jax.Array, total: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """`merge_stats` over an array axis (kept with size 1)."""
    return merge_stats(
        m, total, reduce_max=partial(jnp.max, axis=axis, keepdims=True), reduce_sum=_sum_over(axis)
    )


def _count(lse: jax.Array) -> jax.Array:
    """The sum-exp of a piece given by its log-sum-exp: 1, or 0 for an empty piece."""
    return (lse != -jnp.inf).astype(lse.dtype)


def merge_two(
    value_a: jax.Array, lse_a: jax.Array, value_b: jax.Array, lse_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Two pieces' results (`value`, one trailing result axis more than `lse`) and
    log-sum-exps merged: the rule of `merge_partials` for a pair of pieces, without a
    derivative rule of its own (for the forward pass of a custom rule, e.g. ring
    attention's steps). An empty piece (`lse = -inf`) contributes nothing."""
    lse = jnp.stack([lse_a, lse_b])
    count = _count(lse)
    m, total = merge_over(lse, count, 0)
    w = (rescale(lse, count, m) / _nonzero(total))[..., None]
    value = w[0] * value_a + w[1] * value_b
    return value, lse_of(m, total)[0]


# --------------------------------------------------------------------------------------
# merge_partials: a custom_jvp (forward and reverse mode).
# --------------------------------------------------------------------------------------


def _merge_primal(values, lse, axis: int):
    """`(value, lse, (w, o, valid))`, pieces axis kept with size 1."""
    count = _count(lse)
    valid = count > 0  # NaN counts as a (poisoned) piece, +inf too
    m, total = merge_over(lse, count, axis)
    w = rescale(lse, count, m) / _nonzero(total)
    o = jnp.where(valid, values, jnp.zeros((), values.dtype))  # empty pieces never contribute
    value = _formulas.dot(w, o, (axis,))
    return value, lse_of(m, total), (w, o, valid)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _merge_kernel(values, lse, axis: int) -> tuple[jax.Array, jax.Array]:
    value, lse_out, _ = _merge_primal(values, lse, axis)
    return value, lse_out


@_merge_kernel.defjvp
def _merge_kernel_jvp(axis, primals, tangents):
    values, lse = primals
    values_dot, lse_dot = tangents
    value, lse_out, (w, o, valid) = _merge_primal(values, lse, axis)
    o_dot = jnp.where(valid, values_dot, jnp.zeros((), values.dtype))
    lse_dot = jnp.where(valid, lse_dot, jnp.zeros((), lse.dtype))
    value_dot, lse_out_dot = _formulas.merge_jvp(w, o, value, o_dot, lse_dot, (axis,))
    return (value, lse_out), (value_dot, lse_out_dot)


def merge_partials(values: ArrayLike, lse: ArrayLike, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    r"""Merges softmax-weighted partial results computed over pieces of a row, exactly.

    Piece $k$ of a softmax row (a block of keys, a chunk of the vocabulary, the
    classes held by one device) gives its log-sum-exp $\ell_k$ and its result
    under its own softmax, $o_k = \sum_{i\in k} p^{(k)}_i\, v_i$. The result
    under the softmax of the whole row is

    $$
    \ell = \log\sum_k e^{\ell_k}, \qquad
    o = \sum_k e^{\ell_k - \ell}\, o_k ,
    $$

    computed with the maximum $\ell_k$ subtracted first. The merge is associative
    and the order of the pieces does not matter (up to rounding), so merged results can
    be merged again. Its derivatives ($\partial o/\partial o_k = w_k$,
    $\partial o/\partial \ell_k = w_k(o_k - o)$,
    $\partial \ell/\partial \ell_k = w_k$ with $w_k = e^{\ell_k - \ell}$)
    make gradients through a split computation equal those through the unsplit one.
    A `jax.custom_jvp`: forward and reverse mode.

    Args:
      values: the per-piece results, shape `L + T`: the shape `L` of `lse`
        followed by any trailing result axes `T` (none for per-row scalars, e.g.
        `(pieces, queries, head_dim)` for attention).
      lse: the per-piece log-sum-exps, shape `L`; `-inf` marks an empty piece.
      axis: the pieces axis, an axis of `lse` (negative values count from the end
        of `lse`'s shape, not of `values`').

    Returns:
      `(value, lse)` with the pieces axis removed: shapes `L' + T` and `L'`.
      `value` has the dtype of `values`; `lse` has the dtype of `lse`, except
      that 16-bit `lse` comes back as float32. The merge is computed in float32 for
      16-bit inputs (and in the wider dtype of the two otherwise).

    Note:
      * An empty piece (`lse = -inf`) contributes nothing, whatever its `values`
        hold (also NaN), and gets zero gradients. If every piece is empty the result
        is `value = 0` and `lse = -inf`, with zero (finite) gradients.
      * A piece with `lse = +inf` gives `lse = +inf` and a NaN `value`; NaN in
        `lse` gives NaN; NaN in a non-empty piece's `values` gives NaN.
      * An empty pieces axis gives `value = 0` and `lse = -inf`.
      * To merge 16-bit pieces accurately, keep their log-sum-exps in float32 (a
        bfloat16 `lse` near 10 is off by up to 0.03, i.e. 3 % in the weight).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> z = jnp.array([1.0, 2.0, 3.0, 4.0], jnp.float32)
      >>> v = jnp.array([10.0, 20.0, 30.0, 40.0], jnp.float32)
      >>> pieces = z.reshape(2, 2), v.reshape(2, 2)
      >>> o_k = jnp.sum(jsoftmax.softmax(pieces[0]) * pieces[1], axis=-1)
      >>> value, lse = jsoftmax.merge_partials(o_k, jsoftmax.logsumexp(pieces[0], -1))
      >>> unsplit = jnp.sum(jsoftmax.softmax(z) * v), jsoftmax.logsumexp(z)
      >>> with jnp.printoptions(precision=4):
      ...     print(jnp.stack([value, lse]), jnp.stack(unsplit))
      [34.9265  4.4402] [34.9265  4.4402]
    """
    values = _checks.as_float_array(values, "values", scalar=True)
    lse = _checks.as_float_array(lse, "lse", scalar=True)
    if lse.ndim == 0:
        raise ValueError(
            "lse must have at least one dimension (the pieces axis), got a scalar: there "
            "is nothing to merge."
        )
    if values.shape[: lse.ndim] != lse.shape:
        raise ValueError(
            f"values of shape {values.shape} must start with the shape of lse {lse.shape} "
            "(values has shape L + T, lse has shape L: one log-sum-exp per piece and row)."
        )
    axis = _checks.canonical_axis(axis, lse.ndim)
    trailing = values.ndim - lse.ndim
    cdt = _checks.accumulation_dtype(jnp.promote_types(values.dtype, lse.dtype))
    lse_dtype = _checks.accumulation_dtype(lse.dtype)
    out_shape = values.shape[:axis] + values.shape[axis + 1 :]
    if values.shape[axis] == 0:
        return (
            jnp.zeros(out_shape, values.dtype),
            jnp.full(lse.shape[:axis] + lse.shape[axis + 1 :], -jnp.inf, lse_dtype),
        )
    lse_b = lse.astype(cdt).reshape(lse.shape + (1,) * trailing)
    value, lse_out = _merge_kernel(values.astype(cdt), lse_b, axis)
    value = jnp.squeeze(value, axis).astype(values.dtype)
    lse_out = jnp.squeeze(lse_out, (axis,) + tuple(range(lse.ndim, values.ndim)))
    return value, lse_out.astype(lse_dtype)
