r"""Softmax, log-softmax and cross-entropy with the softmax axis split over devices.

Use these functions **inside** `jax.shard_map` when the class (softmax) axis of
the logits is sharded over one or more mesh axes, as in a large-vocabulary language
model whose output layer is split by vocabulary ("vocab-parallel"). Each device holds
a contiguous block of classes; the functions communicate only per-row scalars with
JAX's own collectives (`jax.lax.pmax`, `jax.lax.psum`), never the logits:

==========================  ===================================  ===========================
function                    forward all-reduces (per row)        backward all-reduces
==========================  ===================================  ===========================
`softmax`                 max, sum of exponentials             $\langle g, p\rangle$
`log_softmax`             max, sum of exponentials             $\sum_i g_i$
`cross_entropy`           max, sum of exponentials with the    none (the cotangent
                            target logit, or $\sum q$ and  $(\sum q)p - q$ is
                            $\sum q(s - M)$ for            local)
                            probability labels (and the
                            options' per-row sums)
`linear_cross_entropy`    as `cross_entropy` with integer    `dx` (`N * H` values)
                            labels
==========================  ===================================  ===========================

Every forward all-reduce carries one scalar per row. The forward pass is the merge
rule of [`jsoftmax.merge_partials`][] applied across devices (`jsoftmax._merge`):
each device computes its block's row max and sum of exponentials in one local pass,
then the maxima are all-reduced and the sums, rescaled to the global max, are
all-reduced (with any other per-row sum riding in the same all-reduce). `softmax`
and `log_softmax` are `jax.custom_vjp` rules that save one logits-sized array
(the local block of probabilities, or of log-probabilities) for the backward pass;
their backward rules are the single-device ones of `jsoftmax._formulas` with every
sum over the softmax axis replaced by a local sum followed by an all-reduce. The
losses use the per-row formulas of `jsoftmax._losses` (the same options as
[`jsoftmax.cross_entropy`][]) on the merged statistics; `cross_entropy` saves its
block of logits, `linear_cross_entropy` its inputs, plus a few numbers per row.

Outside `jax.shard_map`, [`jsoftmax.softmax`][] and friends already work on
arrays placed with `jax.sharding.NamedSharding` under `jax.jit`: XLA
inserts the same two all-reduces. This module is for code that is written per shard.

**Class count not divisible by the number of shards.** `jax.shard_map` needs
the class axis to split evenly, so pad it at the end (any values, e.g. with
`jax.numpy.pad`) to a multiple of the shard count and pass the true count as
`num_classes`: padded entries are then masked (probability 0, gradient 0, never a
target). Without padding, `jax.shard_map` raises before anything is computed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _custom, _formulas, _linear, _losses, _merge, _softmax
from jsoftmax._checks import Reduction

__all__ = ["cross_entropy", "linear_cross_entropy", "log_softmax", "softmax"]

Axes = tuple[int, ...]
AxisName = str | tuple[str, ...]


# --------------------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------------------


def _check_axis_name(axis_name) -> AxisName:
    """A mesh axis name (str) or a non-empty tuple of distinct names, made hashable."""
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    if isinstance(axis_name, str) and axis_name:
        return axis_name
    if (
        isinstance(axis_name, tuple)
        and axis_name
        and all(isinstance(a, str) and a for a in axis_name)
    ):
        if len(set(axis_name)) != len(axis_name):
            raise ValueError(f"axis_name={axis_name!r} names the same mesh axis twice.")
        return axis_name[0] if len(axis_name) == 1 else axis_name
    raise TypeError(
        "axis_name must be the name of the mesh axis the softmax axis is split over "
        f"(a non-empty str) or a non-empty tuple of such names, got {axis_name!r}."
    )


def _num_shards(axis_name: AxisName, fname: str) -> int:
    """The number of shards along `axis_name`; a clear error outside shard_map."""
    try:
        return int(lax.axis_size(axis_name))
    except NameError as e:
        raise ValueError(
            f"jsoftmax.sharded.{fname}: axis_name={axis_name!r} is not a mesh axis bound "
            "here. Call it inside jax.shard_map over a mesh that has this axis, with the "
            "softmax axis of the input sharded over it (for jit-sharded arrays use "
            f"jsoftmax.{fname} instead)."
        ) from e


def _check_num_classes(num_classes, local: int, shards: int) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be a Python int or None, got {num_classes!r}.")
    total = local * shards
    if not 1 <= int(num_classes) <= total:
        raise ValueError(
            f"num_classes={int(num_classes)} must lie in [1, {total}]: the split axis holds "
            f"{local} classes on each of {shards} shards."
        )
    return None if int(num_classes) == total else int(num_classes)


def _global_index(shape, axis: int, axis_name: AxisName) -> jax.Array:
    """Global class index of every local entry: shard index * local size + local index."""
    local = shape[axis]
    offset = lax.axis_index(axis_name) * local
    return offset + lax.broadcasted_iota(jnp.int32, shape, axis)


def _mask(shape, axis: int, axis_name: AxisName, where, num_classes):
    """Combines `where` with the mask of padded classes (global index >= num_classes)."""
    if num_classes is None:
        return where
    real = _global_index(shape, axis, axis_name) < num_classes
    return real if where is None else jnp.logical_and(where, real)


# --------------------------------------------------------------------------------------
# The global pieces: every reduction over the softmax axis is local, then all-reduced.
# --------------------------------------------------------------------------------------


def _global_sum(a: jax.Array, axes: Axes, axis_name: AxisName) -> jax.Array:
    """Sum over the whole split softmax axis: local partial sum, then one all-reduce."""
    return lax.psum(jnp.sum(a, axis=axes, keepdims=True), axis_name)


def _global_dot(a: jax.Array, b: jax.Array, axes: Axes, axis_name: AxisName) -> jax.Array:
    r"""$\langle a, b\rangle$ over the whole split axis (`_formulas._dot` + psum)."""
    return lax.psum(_formulas._dot(a, b, axes), axis_name)


def _local_stats(x, where, axes: Axes):
    """`(s - m, exp(s - m), m, sum exp(s - m))` of this device's block, `m` its row max.

    The single-device pass (`jsoftmax._softmax._shifted_exp`: one fused
    max-exp-sum, float32 for 16-bit input, masked entries `-inf` before `exp`, a
    block without a finite entry summing to 0, `+inf`/NaN propagating). No
    communication: the blocks' statistics are merged by `jsoftmax._merge.merge_across`.
    """
    shifted, e, local_total, _, m = _softmax._shifted_exp(x, where, None, axes)
    return shifted, e, m, local_total


def _values(x, where, axes: Axes, axis_name: AxisName, log: bool):
    shifted, e, m, local_total = _local_stats(x, where, axes)
    # All-reduces: the row max, then the sum of the blocks' rescaled sums.
    m_all, total = _merge.merge_across(m, local_total, axis_name)
    if log:
        return shifted + _merge.log_scale(m, m_all, total)
    return e * _merge.scale(m, m_all, total)


# --------------------------------------------------------------------------------------
# softmax / log_softmax: custom_vjp, one output-sized residual, one psum backward.
# --------------------------------------------------------------------------------------


@partial(_custom.custom_vjp, nondiff_argnums=(2, 3, 4))
def _softmax_kernel(x, where, axes: Axes, axis_name: AxisName, log: bool):
    return _values(x, where, axes, axis_name, log).astype(x.dtype)


def _softmax_kernel_fwd(x, where, axes, axis_name, log):
    out = _softmax_kernel(x, where, axes, axis_name, log)
    return out, out


def _softmax_kernel_bwd(axes, axis_name, log, out, g):
    cdt = _checks.accumulation_dtype(out.dtype)
    out_c, g = out.astype(cdt), g.astype(cdt)
    if log:
        g = jnp.where(out_c > -jnp.inf, g, jnp.zeros((), cdt))  # masked outputs are constants
        total = partial(_global_sum, axis_name=axis_name)
        g_s = _formulas.log_vjp(jnp.exp(out_c), g, axes, total=total)
    else:
        dot = partial(_global_dot, axis_name=axis_name)
        g_s = _formulas.jac_product(out_c, g, axes, dot=dot)
    return g_s.astype(out.dtype), None


_softmax_kernel.defvjp(_softmax_kernel_fwd, _softmax_kernel_bwd)


def _dispatch(x, axis_name, axis, where, num_classes, log: bool):
    fname = "log_softmax" if log else "softmax"
    axis_name = _check_axis_name(axis_name)
    x = _checks.as_float_array(x)
    axes = _checks.canonical_axes(axis, x.ndim)
    where = _checks.check_where(where, x.shape)
    shards = _num_shards(axis_name, fname)
    if num_classes is not None and len(axes) != 1:
        raise ValueError("num_classes needs a single softmax axis (an int axis).")
    num_classes = _check_num_classes(num_classes, x.shape[axes[0]], shards)
    if any(x.shape[a] == 0 for a in axes):
        return jnp.zeros(x.shape, x.dtype)
    where = _mask(x.shape, axes[0], axis_name, where, num_classes)
    return _softmax_kernel(x, where, axes, axis_name, log)


def softmax(
    x_shard: ArrayLike,
    axis_name: AxisName,
    axis: int | tuple[int, ...] = -1,
    *,
    where: ArrayLike | None = None,
    num_classes: int | None = None,
) -> jax.Array:
    r"""Softmax over an axis split across devices; call inside `jax.shard_map`.

    $$
    p_i = \frac{\exp(z_i - m)}{\sum_{d}\sum_{k \in d} \exp(z_k - m)}, \qquad
    m = \max_d \max_{k \in d} z_k,
    $$

    where `d` runs over the shards along `axis_name`. Each shard computes its block's
    max $m_d$ and sum $t_d = \sum_{k\in d}\exp(z_k - m_d)$ in one local pass;
    the max is all-reduced with `jax.lax.pmax` (on stop-gradient values) and the
    normaliser $\sum_d t_d\, e^{m_d - m}$ with `jax.lax.psum` (the merge of
    [`jsoftmax.merge_partials`][]): two all-reduces of one scalar per row. The backward pass
    $\bar z = p \odot (g - \langle g, p\rangle)$ all-reduces one scalar per row,
    $\langle g, p\rangle$, and reuses the saved local probabilities.

    Args:
      x_shard: this device's block of logits, any rank >= 1; its `axis` holds a
        contiguous slice of the classes (shard `i` along `axis_name` holds classes
        `i * n_local` to `(i + 1) * n_local - 1`).
      axis_name: the mesh axis name (or tuple of names, major first, as in the
        `jax.sharding.PartitionSpec`) that the softmax axis is split over.
      axis: the local softmax axis (or a tuple of axes normalised together).
      where: optional boolean mask broadcastable to `x_shard`; `False` entries get
        probability 0 and gradient 0.
      num_classes: the true number of classes when the split axis was padded at the end
        to a multiple of the shard count; classes with a global index
        `>= num_classes` are masked. Needs an int `axis`.

    Returns:
      This device's block of probabilities, shape and dtype of `x_shard`.

    Note:
      * Same edge-case behaviour as [`jsoftmax.softmax`][]: rows with no unmasked
        finite entry (on any shard) are all zeros with zero gradient; `+inf` or NaN
        in an unmasked entry makes the whole row NaN on every shard; float16/bfloat16
        are computed in float32.
      * Reverse mode only (a `jax.custom_vjp`).
      * Raises `ValueError` when `axis_name` is not bound, i.e. outside
        `jax.shard_map`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from jsoftmax import sharded
      >>> mesh = jax.make_mesh((1,), ("vocab",))   # any number of devices dividing 8
      >>> f = jax.jit(jax.shard_map(lambda z: sharded.softmax(z, "vocab"), mesh=mesh,
      ...                           in_specs=P(None, "vocab"), out_specs=P(None, "vocab")))
      >>> x = jnp.log(jnp.arange(1.0, 9.0, dtype=jnp.float32))[None]
      >>> x = jax.device_put(x, jax.NamedSharding(mesh, P(None, "vocab")))
      >>> with jnp.printoptions(precision=4):
      ...     print(f(x))
      [[0.0278 0.0556 0.0833 0.1111 0.1389 0.1667 0.1944 0.2222]]
    """
    return _dispatch(x_shard, axis_name, axis, where, num_classes, log=False)


def log_softmax(
    x_shard: ArrayLike,
    axis_name: AxisName,
    axis: int | tuple[int, ...] = -1,
    *,
    where: ArrayLike | None = None,
    num_classes: int | None = None,
) -> jax.Array:
    r"""Log-softmax over an axis split across devices; call inside `jax.shard_map`.

    $$
    y_i = (z_i - m) - \log\sum_d\sum_{k\in d}\exp(z_k - m), \qquad
    \bar z = g - p\sum_{d}\sum_{i \in d} g_i.
    $$

    Forward: two all-reduces of one scalar per row (max, sum of exponentials).
    Backward: one (the sum of the cotangent); the saved residual is the local block of
    log-probabilities.

    Args:
      x_shard: this device's contiguous block of logits (see [`softmax`][jsoftmax.sharded.softmax]).
      axis_name: the mesh axis name(s) the softmax axis is split over.
      axis: the local softmax axis (or a tuple of axes).
      where: optional boolean mask broadcastable to `x_shard`; masked entries give
        `-inf` and gradient 0.
      num_classes: the true class count when the split axis was padded at the end.

    Returns:
      This device's block of log-probabilities, shape and dtype of `x_shard`.

    Note:
      As [`jsoftmax.log_softmax`][]: masked and `-inf` entries give `-inf` (the
      cotangent arriving there is ignored); a row with no finite entry is `-inf`
      with zero gradient; `+inf`/NaN give NaN. Reverse mode only.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from jsoftmax import sharded
      >>> mesh = jax.make_mesh((1,), ("vocab",))
      >>> f = jax.jit(jax.shard_map(lambda z: sharded.log_softmax(z, "vocab"), mesh=mesh,
      ...                           in_specs=P(None, "vocab"), out_specs=P(None, "vocab")))
      >>> x = jnp.zeros((1, 8), jnp.float32)
      >>> x = jax.device_put(x, jax.NamedSharding(mesh, P(None, "vocab")))
      >>> with jnp.printoptions(precision=4):
      ...     print(f(x))
      [[-2.0794 -2.0794 -2.0794 -2.0794 -2.0794 -2.0794 -2.0794 -2.0794]]
    """
    return _dispatch(x_shard, axis_name, axis, where, num_classes, log=True)


# --------------------------------------------------------------------------------------
# cross_entropy: Megatron-style vocab-parallel loss with the options of
# jsoftmax.cross_entropy. Each shard reduces its block of classes to per-row numbers;
# one pmax and one psum merge them; the per-row loss is jsoftmax._losses.integer_loss.
# --------------------------------------------------------------------------------------


def _target_mask(labels, shape, axis: int, axis_name: AxisName) -> jax.Array:
    """`True` at the label's entry of this shard's block (nowhere on the other shards)."""
    local_label = labels - lax.axis_index(axis_name) * shape[axis]
    return lax.broadcasted_iota(jnp.int32, shape, axis) == jnp.expand_dims(local_label, axis)


def _pick_local(a, target_here, axis: int):
    """This shard's share of `a` at the label (0 on the shards without it), keepdims."""
    a = jnp.broadcast_to(a, target_here.shape)
    return jnp.sum(jnp.where(target_here, a, jnp.zeros((), a.dtype)), axis, keepdims=True)


def _merge_and_loss(m, total, axis_name, carried, in_range, ex_ok, n_valid, opts):
    r"""Merges this shard's per-row statistics and returns `(loss, row_ok, row_w, kw)`.

    `carried(m_all)` gives this shard's share of the per-row sums (a dict): `"target"`
    ($s_y - M$ at the label, 0 elsewhere), optionally `"bad"` (the label's class
    is excluded), `"w_y"` (the label's class weight), and with label smoothing
    `"centred"` ($\sum_\mathrm{valid} w_i (s_i - M)$), `"count"` and `"W"` (the
    number and total weight of valid classes). They ride in the all-reduce of the sums
    of exponentials (`jsoftmax._merge.merge_across`). `n_valid` is the static
    number of valid classes when no `"count"` is carried. All keepdims.
    """
    m_all, total, sums = _merge.merge_across(m, total, axis_name, extra=carried)
    cdt = total.dtype
    target = sums["target"]
    row_ok = ex_ok
    if "bad" in sums:
        good = (sums["bad"] == 0) | ~in_range  # out of range: NaN, not ignored
        row_ok = good if row_ok is None else row_ok & good
    row_w = sums.get("w_y")
    smooth = kw = None
    if opts.alpha:
        count = sums.get("count", jnp.asarray(n_valid, cdt))
        count = jnp.maximum(count, 1)
        total_w = sums.get("W", count)
        k = _formulas.smoothing_mass(opts.alpha, count)
        # sum_valid w_i (s_i - s_y) = sum_valid w_i (s_i - M) - W (s_y - M)
        centred = sums["centred"] - total_w * target
        smooth, kw = (k, total_w, centred), (k, total_w)
    log_total = jnp.log(_losses._nonzero(total))
    loss = _losses.integer_loss(log_total, m_all, m_all + target, in_range, row_w, smooth, opts)
    loss = _losses._mask_rows(loss, row_ok)
    return loss, (m_all, total), row_ok, row_w, kw


def _row_weight(row_ok, row_w, shape, dtype):
    """The weight of each row in the `"mean"` denominator (0 for rows that do not count)."""
    w = jnp.ones(shape, dtype) if row_w is None else row_w.astype(dtype)
    return lax.stop_gradient(_losses._mask_rows(w, row_ok))


def _smoothing_sums(sums, fp, m_all, where, w_b, shape, axis: int, cdt):
    r"""Adds this shard's label-smoothing sums to `sums`: `"centred"`
    ($\sum_\mathrm{valid} w_i (s_i - M)$), and with a mask or class weights the
    number `"count"` and total weight `"W"` of its valid classes."""
    sums["centred"] = _losses.smoothing_sum(fp.shifted, m_all - fp.m, where, w_b, axis)
    if where is not None:
        sums["count"] = jnp.sum(where, axis, keepdims=True, dtype=cdt)
    if w_b is not None:
        sums["W"] = jnp.sum(jnp.broadcast_to(w_b, shape), axis, keepdims=True)
    return sums


def _integer_rows(fp, labels, weights, where, w_b, ok, n_global, opts, axis_name, shape, cdt):
    """Integer labels: `(loss, (M, T), row_ok, row_w, kw)` after the merge."""
    axis = opts.axis
    target_here = _target_mask(labels, shape, axis, axis_name)

    def carried(m_all):
        # Per-row sums riding in the all-reduce of the rescaled sums of exponentials.
        sums = {"target": _pick_local(fp.shifted + (fp.m - m_all), target_here, axis)}
        if where is not None:  # a label on an excluded class: the row does not count
            sums["bad"] = _pick_local((~where).astype(cdt), target_here, axis)
        if weights is not None:
            raw = _losses._class_weights(weights, None, axis, len(shape), cdt)
            sums["w_y"] = _pick_local(raw, target_here, axis)
        if opts.alpha:
            _smoothing_sums(sums, fp, m_all, where, w_b, shape, axis, cdt)
        return sums

    in_range = jnp.expand_dims((labels >= 0) & (labels < n_global), axis)
    return _merge_and_loss(fp.m, fp.total, axis_name, carried, in_range, ok, n_global, opts)


def _prob_rows(fp, labels, where, w_b, ok, n_global, opts, axis_name, shape, cdt):
    r"""Probability labels: `(loss, (M, T), row_ok, (mass, k))` after the merge.

    With $q = (1-\alpha)\,w y + k\,w$ (`w` the class weights times the mask)
    the loss `jsoftmax._losses.prob_loss` needs $\sum q$ and
    $\sum q (s - M)$. The smoothing mass $k = \alpha / m$ depends on the
    global number $m$ of valid classes, so each shard sums the two parts apart:
    $\sum (1-\alpha) w y$ and $\sum (1-\alpha) w y (s - M)$ (`"mass"`,
    `"cross"`), and the smoothing sums of `_smoothing_sums`; they ride in the
    all-reduce of the sums of exponentials and are combined after it.
    """
    axis, alpha = opts.axis, opts.alpha
    q_y = _losses.prob_targets(labels, w_b, None, alpha, cdt)  # (1 - alpha) w y

    def carried(m_all):
        mass, cross = _losses.target_sums(q_y, fp.shifted + (fp.m - m_all), axis)
        sums = {"mass": mass, "cross": cross}
        if alpha:
            _smoothing_sums(sums, fp, m_all, where, w_b, shape, axis, cdt)
        elif where is not None:
            sums["count"] = jnp.sum(where, axis, keepdims=True, dtype=cdt)
        return sums

    m_all, total, sums = _merge.merge_across(fp.m, fp.total, axis_name, extra=carried)
    mass, cross = sums["mass"], sums["cross"]
    row_ok = ok
    if where is not None:  # a row without any valid class does not count
        live = sums["count"] > 0
        row_ok = live if row_ok is None else row_ok & live
    k = None
    if alpha:
        count = jnp.maximum(sums.get("count", jnp.asarray(n_global, cdt)), 1)
        k = _formulas.smoothing_mass(alpha, count)
        mass = mass + k * sums.get("W", count)
        cross = cross + k * sums["centred"]
    loss = _losses.prob_loss(jnp.log(_losses._nonzero(total)), m_all, mass, cross, opts)
    return _losses._mask_rows(loss, row_ok), (m_all, total), row_ok, (mass, k)


@partial(_custom.custom_vjp, nondiff_argnums=(6, 7, 8))
def _ce_kernel(x, labels, where, temperature, weights, ex_ok, opts, axis_name, n_classes):
    return _ce_fwd(x, labels, where, temperature, weights, ex_ok, opts, axis_name, n_classes)[0]


def _ce_fwd(x, labels, where, temperature, weights, ex_ok, opts, axis_name, n_classes):
    axis = opts.axis
    cdt = _losses._compute_dtype(x, labels)
    fp, _ = _losses._forward_pass(x, where, temperature, opts, cdt)
    n_global = x.shape[axis] * lax.axis_size(axis_name) if n_classes is None else n_classes
    w_b = _losses._class_weights(weights, where, axis, x.ndim, cdt)
    ok = None if ex_ok is None else jnp.expand_dims(ex_ok, axis)
    args = (where, w_b, ok, n_global, opts, axis_name, x.shape, cdt)
    if _losses._is_integer(labels):
        loss, stats, row_ok, row_w, extra = _integer_rows(fp, labels, weights, *args)
    else:
        loss, stats, row_ok, extra = _prob_rows(fp, labels, *args)
        row_w = None
    weight = _row_weight(row_ok, row_w, loss.shape, cdt)
    out_dtype = _losses._out_dtype(x, labels)  # float32 for 16-bit logits
    out = (jnp.squeeze(loss, axis).astype(out_dtype), jnp.squeeze(weight, axis))
    residuals = (x, labels, where, temperature, weights, row_ok, row_w, *stats, extra)
    return out, residuals


def _ce_kernel_fwd(x, labels, where, temperature, weights, ex_ok, opts, axis_name, n_classes):
    return _ce_fwd(x, labels, where, temperature, weights, ex_ok, opts, axis_name, n_classes)


def _ce_kernel_bwd(opts, axis_name, n_classes, residuals, g):
    # d loss / d s = (sum q + 2 c lse) p - q: local, from the merged per-row statistics
    # (and d loss / d y = -(1 - alpha) w log p for probability labels, local too).
    # Only the temperature's derivative (a sum over the classes) needs an all-reduce.
    x, labels, where, temperature, weights, row_ok, row_w, m, total, extra = residuals
    axis = opts.axis
    cdt = total.dtype
    z = x.astype(cdt)
    shifted = _softmax._scaled_logits(_losses._capped(z, opts), where, temperature) - m
    if cdt == x.dtype:
        p = jnp.exp(shifted) * (1 / _losses._nonzero(total))
    else:
        p = jnp.exp(shifted - jnp.log(_losses._nonzero(total)))
    u = z  # the soft-capped logits, read only with a cap
    if opts.softcap is not None:
        u = _losses._capped(lax.optimization_barrier(z), opts)  # as jsoftmax.cross_entropy
    fp = _losses._Pass(z, u, shifted, total, m)
    w_b = _losses._class_weights(weights, where, axis, x.ndim, cdt)
    lse = m + jnp.log(_losses._nonzero(total)) if opts.z_loss else None
    integer = _losses._is_integer(labels)
    if integer:
        n_global = x.shape[axis] * lax.axis_size(axis_name) if n_classes is None else n_classes
        in_range = jnp.expand_dims((labels >= 0) & (labels < n_global), axis)
        onehot = _target_mask(labels, x.shape, axis, axis_name)
        smooth = None if extra is None else extra + (w_b,)
        g_s = _losses.integer_cotangent(p, onehot, in_range, row_w, smooth, lse, opts)
    else:
        mass, k = extra
        q = _losses.prob_targets(labels, w_b, k, opts.alpha, cdt)
        g_s = _formulas.ce_cotangent(p, q, mass, lse, opts.z_loss)
    g = jnp.expand_dims(g[0].astype(cdt), axis)
    g_s = _losses._mask_rows(g_s * g, row_ok)
    if where is not None:
        g_s = jnp.where(where, g_s, jnp.zeros((), cdt))
    g_z, g_t = _losses._chain_to_logits(fp, g_s, temperature, opts)
    g_z = _losses._mask_rows(g_z, row_ok)
    if g_t is not None:
        g_t = lax.psum(g_t, axis_name).astype(temperature.dtype)
    g_labels = None
    if not integer:
        g_y = _losses._label_cotangent(fp, weights, where, opts) * g
        g_labels = _losses._mask_rows(g_y, row_ok).astype(labels.dtype)
    return g_z.astype(x.dtype), g_labels, None, g_t, None, None


_ce_kernel.defvjp(_ce_kernel_fwd, _ce_kernel_bwd)


def _reduce(per_row, weight, reduction: Reduction, data_axis_name):
    """`reduction` of the per-row losses; over every row of `data_axis_name` too."""
    if reduction == "none":
        return per_row
    if data_axis_name is None:
        return _losses.reduce_rows(per_row, None, weight, reduction)
    # One all-reduce of two scalars: this block's sum and its total row weight.
    sums = lax.psum((jnp.sum(per_row)[None], jnp.sum(weight)[None]), data_axis_name)
    return _losses.reduce_rows(sums[0], None, sums[1], reduction)


def _check_data_axis_name(data_axis_name, axis_name, fname: str):
    if data_axis_name is None:
        return None
    name = _check_axis_name(data_axis_name)
    names = set(name if isinstance(name, tuple) else (name,))
    split = set(axis_name if isinstance(axis_name, tuple) else (axis_name,))
    if names & split:
        raise ValueError(
            f"data_axis_name={data_axis_name!r} must name mesh axes that the rows are split "
            f"over, not the class axis_name={axis_name!r}."
        )
    _num_shards(name, fname)
    return name


def _check_shard_labels(labels, x, axis: int, ignore_index):
    """Integer global class indices with the batch shape, or float probabilities with
    the shape of this shard's block of logits."""
    labels = _checks.as_array(labels, "labels")
    batch = x.shape[:axis] + x.shape[axis + 1 :]
    if labels.dtype == jnp.bool_ or not (
        jnp.issubdtype(labels.dtype, jnp.integer) or jnp.issubdtype(labels.dtype, jnp.floating)
    ):
        raise TypeError(
            "labels must be integer class indices or real probabilities, got dtype "
            f"{labels.dtype}. Convert one-hot booleans with labels.astype(logits_shard.dtype)."
        )
    if _losses._is_integer(labels):
        if labels.shape != batch:
            hint = (
                " For probability targets of the logits' shape pass float labels, e.g. "
                "labels.astype(logits_shard.dtype)."
                if labels.shape == x.shape
                else ""
            )
            raise ValueError(
                f"integer labels must have the shape of logits_shard without axis {axis}, "
                f"i.e. {batch}; got {labels.shape}.{hint}"
            )
        return labels
    if ignore_index is not None:
        raise ValueError(
            "ignore_index applies to integer class labels; got float (probability) labels. "
            "Mask examples of probability labels with a batch-shaped where instead."
        )
    if labels.shape != x.shape:
        hint = " For class indices use an integer dtype." if labels.shape == batch else ""
        raise ValueError(
            "float labels (probabilities) must have the shape of logits_shard, "
            f"{x.shape}: this shard's block of the targets, split over axis_name like the "
            f"logits; got {labels.shape}.{hint}"
        )
    return labels


def _check_shard_weights(weights, local: int):
    """Class weights of this shard's block of classes, shape `(local,)`."""
    if weights is None:
        return None
    try:
        return _losses._check_weights(weights, local)
    except ValueError:
        raise ValueError(
            f"weights must hold this shard's block of class weights, shape ({local},) (the "
            f"full vector split like the classes, e.g. in_specs P(axis_name)), got shape "
            f"{jnp.shape(weights)}."
        ) from None


def cross_entropy(
    logits_shard: ArrayLike,
    labels: ArrayLike,
    axis_name: AxisName,
    axis: int = -1,
    *,
    where: ArrayLike | None = None,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    temperature: ArrayLike = 1.0,
    ignore_index: int | None = None,
    weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: Reduction = "none",
    data_axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Vocab-parallel softmax cross-entropy; call inside `jax.shard_map`.

    The loss of [`jsoftmax.cross_entropy`][] (same options, same formulas) with the
    class axis split over `axis_name`:

    $$
    \ell = \sum_i q_i\,(\mathrm{lse} - s_i) + c\,\mathrm{lse}^2, \qquad
    \frac{\partial \ell}{\partial s} = \Bigl(\sum_i q_i + 2c\,\mathrm{lse}\Bigr)\,p - q,
    $$

    with $s = \mathrm{softcap}(z)/T$ and $q = w_y(1-\alpha)e_y +
    \frac{\alpha}{m}w$ for an integer label $y$ (a **global** class index), or
    $q = w\odot\bigl((1-\alpha)\,y + \frac{\alpha}{m}\bigr)$ for probability
    labels $y$ (split over the devices like the logits). Shard `i` along
    `axis_name` holds classes `i * n_local ... (i + 1) * n_local - 1`. Forward: one
    all-reduce of the row max, then one all-reduce carrying, per row, the sum of
    exponentials, the target logit (from the shard holding $y$, 0 from the
    others) or, for probability labels, the shard's parts of $\sum_i q_i$ and
    $\sum_i q_i (s_i - M)$, and whatever the options need (a flag for a label on
    a masked class, the label's class weight, the smoothing sum
    $\sum_i w_i (s_i - M)$, the number and weight of valid classes). Backward:
    $g\,\partial\ell/\partial s$ (and for probability labels
    $\partial\ell/\partial y_i = -(1-\alpha)\,w_i\log p_i$) from the merged row
    statistics, with **no communication** (with a `temperature`, one all-reduce of
    $\langle \partial\ell/\partial s, s\rangle$ per row for its derivative).

    Args:
      logits_shard: this device's contiguous block of logits, any rank >= 1.
      labels: either an integer array of global class indices with the shape of
        `logits_shard` without `axis` (the local batch block, the same on every
        shard of `axis_name`), or real probabilities (a target vector per row, not
        required to be normalised; differentiable) with the shape of `logits_shard`:
        this shard's block of the targets, split like the logits (the same
        `in_specs`).
      axis_name: the mesh axis name(s) the class axis is split over.
      axis: the local class axis (an int).
      where: optional boolean mask. Broadcastable to `logits_shard`: masked classes
        are left out of the normaliser, get gradient 0 and no target mass. With exactly
        the batch shape (rank lower than the logits'): a per-example mask, masked
        examples behave like `ignore_index`.
      num_classes: the true class count when the class axis was padded at the end to a
        multiple of the shard count; padded classes are masked.
      label_smoothing: as in [`jsoftmax.cross_entropy`][].
      temperature: as in [`jsoftmax.cross_entropy`][].
      ignore_index: as in [`jsoftmax.cross_entropy`][].
      z_loss: as in [`jsoftmax.cross_entropy`][].
      logit_softcap: as in [`jsoftmax.cross_entropy`][].
      weights: per-class weights of **this shard's block** of classes, shape
        `(n_local,)` (a `(n,)` vector sharded like the class axis, e.g. with
        `in_specs` `P(axis_name)`). Not differentiated.
      reduction: `"none"`, `"sum"` or `"mean"` (weighted, as in
        [`jsoftmax.cross_entropy`][]) over the rows of this `shard_map` block. When
        the rows are also split over a data axis, pass it as `data_axis_name` to sum
        (and average) over every row of that axis; without it each data shard gets the
        mean of its own rows, and the global mean is the `psum` over the data axis of
        the sums divided by the `psum` of the counted rows' weights (not the mean of
        the means).
      data_axis_name: `None` or the mesh axis name(s) the rows are split over; used by
        `"sum"` and `"mean"` only (one more all-reduce of two scalars). The result is
        then the same on every device.

    Returns:
      Per-example losses, shape of `logits_shard` without `axis`, or their sum or
      mean (a scalar); dtype as [`jsoftmax.cross_entropy`][]: float32 for 16-bit
      logits, else the logits' dtype promoted with float labels. They are equal on
      every shard of `axis_name`, so an `out_specs` that does not mention
      `axis_name` fits.

    Note:
      * A label outside `[0, C)` (`C` = `num_classes`, or the global size of the
        split axis) other than `ignore_index` gives a NaN loss and NaN gradient for
        that row, never a silently wrong loss (labels are traced inside
        `jax.shard_map`, so they cannot be checked eagerly).
      * As in [`jsoftmax.cross_entropy`][]: a label on a masked (or padded) class
        carries no target mass, so the row's loss is 0 with zero gradient (an "ignore"
        label), and it is left out of the `"mean"` denominator; a fully masked row
        therefore gives 0. A label on an unmasked `-inf` logit gives loss `+inf`
        with a finite gradient.
      * Probability labels: a row without any unmasked class (on any shard) gives 0,
        with zero gradients, and is not in the `"mean"` denominator; every other
        counted row has weight 1. Masked (and padded) classes get no target mass, but
        a NaN label there still gives NaN ($0 \cdot \mathrm{NaN}$): pad the
        labels with 0. `ignore_index` is for integer labels only (a
        `ValueError` otherwise); mask examples with a batch-shaped `where`.
      * `+inf` or NaN among the unmasked logits of a counted row gives NaN.
      * float16/bfloat16 logits: computed in float32 and the loss is returned in
        float32 (a 16-bit loss would be quantised), as by
        [`jsoftmax.cross_entropy`][]; gradients come back in the logits' dtype.
      * Reverse mode only. The saved residuals are the local block of logits (and of
        probability labels) and a few numbers per row; the backward pass recomputes
        the probabilities.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from jsoftmax import sharded
      >>> mesh = jax.make_mesh((1,), ("vocab",))
      >>> f = jax.jit(jax.shard_map(lambda z, y: sharded.cross_entropy(z, y, "vocab"),
      ...                           mesh=mesh, in_specs=(P(None, "vocab"), P()), out_specs=P()))
      >>> z = jax.device_put(jnp.zeros((2, 8), jnp.float32),
      ...                    jax.NamedSharding(mesh, P(None, "vocab")))
      >>> y = jax.device_put(jnp.array([0, 7]), jax.NamedSharding(mesh, P()))
      >>> with jnp.printoptions(precision=4):
      ...     print(f(z, y))
      [2.0794 2.0794]
      >>> g = jax.jit(jax.shard_map(
      ...     lambda z, y: sharded.cross_entropy(z, y, "vocab", label_smoothing=0.1,
      ...                                        z_loss=1e-2, reduction="mean"),
      ...     mesh=mesh, in_specs=(P(None, "vocab"), P()), out_specs=P()))
      >>> print(f"{g(z, y):.4f}")
      2.1227
      >>> q = jax.nn.softmax(jnp.arange(16.0).reshape(2, 8))  # probability labels
      >>> q = jax.device_put(q, jax.NamedSharding(mesh, P(None, "vocab")))
      >>> h = jax.jit(jax.shard_map(lambda z, q: sharded.cross_entropy(z, q, "vocab"),
      ...                           mesh=mesh, in_specs=(P(None, "vocab"), P(None, "vocab")),
      ...                           out_specs=P()))
      >>> with jnp.printoptions(precision=4):
      ...     print(h(z, q))
      [2.0794 2.0794]
    """
    axis_name = _check_axis_name(axis_name)
    x = _checks.as_float_array(logits_shard, "logits_shard")
    axis = _checks.canonical_axis(axis, x.ndim)
    reduction = _checks.check_reduction(reduction)
    ignore_index = _losses._check_ignore_index(ignore_index)
    labels = _check_shard_labels(labels, x, axis, ignore_index)
    opts = _losses._Options(
        axis,
        _losses._check_label_smoothing(label_smoothing),
        _losses._check_z_loss(z_loss),
        _losses._check_softcap(logit_softcap),
    )
    where, example_mask = _losses._split_where(where, x.shape, (axis,))
    shards = _num_shards(axis_name, "cross_entropy")
    data_axis_name = _check_data_axis_name(data_axis_name, axis_name, "cross_entropy")
    if x.shape[axis] == 0:
        raise ValueError("logits_shard has an empty class axis; cross-entropy is undefined.")
    num_classes = _check_num_classes(num_classes, x.shape[axis], shards)
    weights = _check_shard_weights(weights, x.shape[axis])
    t = _checks.prepare_temperature(temperature, x.shape, (axis,))  # None for T = 1
    where = _mask(x.shape, axis, axis_name, where, num_classes)
    ex_ok = example_mask
    if _losses._is_integer(labels):
        labels = labels.astype(jnp.int32)
        if ignore_index is not None:
            keep = labels != ignore_index
            ex_ok = keep if ex_ok is None else ex_ok & keep
    else:
        # Probability labels are differentiated: their cotangent is local, so they must
        # vary over the mesh axes the logits vary over (and the logits over theirs).
        x, labels = _varying((x, labels), ())
    per_row, weight = _ce_kernel(x, labels, where, t, weights, ex_ok, opts, axis_name, num_classes)
    return _reduce(per_row, weight, reduction, data_axis_name)


# --------------------------------------------------------------------------------------
# linear_cross_entropy: the output layer and the loss fused, vocabulary split by device.
# --------------------------------------------------------------------------------------


@partial(_custom.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _lce_kernel(x, w, bias, labels, weights, ex_ok, opts, axis_name, chunk, n_classes):
    return _lce_fwd(x, w, bias, labels, weights, ex_ok, opts, axis_name, chunk, n_classes)[0]


def _lce_layout(labels, local: int, axis_name, n_classes):
    """`(local label, label here, limit, n_global)` for this shard's block of columns."""
    offset = lax.axis_index(axis_name) * local
    local_label = labels - offset
    here = (local_label >= 0) & (local_label < local)
    limit = None if n_classes is None else n_classes - offset
    n_global = local * lax.axis_size(axis_name) if n_classes is None else n_classes
    return local_label, here, limit, n_global


def _lce_fwd(x, w, bias, labels, weights, ex_ok, opts, axis_name, chunk, n_classes):
    cdt = _linear._compute_dtype(x, w)
    local = w.shape[1]
    local_label, here, limit, n_global = _lce_layout(labels, local, axis_name, n_classes)
    idx = jnp.clip(local_label, 0, local - 1)
    # This shard's column at the (clipped) label: the target logit on the shard holding
    # the label, elsewhere a finite centre for the smoothing sum.
    s_c = _linear._target_logit(x, w, bias, idx, 1, opts, cdt)
    centre = jnp.where(jnp.abs(s_c) < jnp.inf, s_c, jnp.zeros((), cdt))
    m, total, centred = _linear.forward_stats(
        x, w, bias, weights, centre, opts, chunk, 1, cdt, limit
    )
    here_k = here[:, None]
    zero = jnp.zeros((), cdt)

    def carried(m_all):
        sums = {"target": jnp.where(here_k, s_c - m_all, zero)}
        excluded = None
        if limit is not None:
            excluded = local_label >= limit
        if bias is not None:
            padded = bias[idx] == -jnp.inf
            excluded = padded if excluded is None else excluded | padded
        if excluded is not None:  # a label on an excluded column: the row does not count
            sums["bad"] = jnp.where(here & excluded, 1, 0).astype(cdt)[:, None]
        if weights is not None:
            sums["w_y"] = jnp.where(here, weights[idx].astype(cdt), zero)[:, None]
        if opts.alpha:
            count, total_w = _linear._valid_totals(weights, bias, local, cdt, limit)
            # sum_valid w_i (s_i - M) = sum_valid w_i (s_i - centre) + W (centre - M)
            sums["centred"] = centred + total_w * (centre - m_all)
            sums["count"] = count
            if weights is not None:
                sums["W"] = total_w
        return sums

    in_range = ((labels >= 0) & (labels < n_global))[:, None]
    ok = None if ex_ok is None else ex_ok[:, None]
    loss, (m_all, total), row_ok, row_w, kw = _merge_and_loss(
        m, total, axis_name, carried, in_range, ok, n_global, opts
    )
    weight = _row_weight(row_ok, row_w, loss.shape, cdt)
    residuals = (x, w, bias, labels, weights, row_ok, row_w, m_all, total, kw)
    return (loss[:, 0], weight[:, 0]), residuals


def _lce_kernel_fwd(x, w, bias, labels, weights, ex_ok, opts, axis_name, chunk, n_classes):
    return _lce_fwd(x, w, bias, labels, weights, ex_ok, opts, axis_name, chunk, n_classes)


def _lce_kernel_bwd(opts, axis_name, chunk, n_classes, residuals, g):
    # dw and db stay on their shard; dx, a sum over the vocabulary, is this shard's part
    # (summed over the shards by the transpose of the varying cast in the caller).
    x, w, bias, labels, weights, row_ok, row_w, m, total, kw = residuals
    cdt = _linear._compute_dtype(x, w)
    local = w.shape[1]
    local_label, here, limit, n_global = _lce_layout(labels, local, axis_name, n_classes)
    idx = jnp.where(here, local_label, -1)[:, None]
    in_range = ((labels >= 0) & (labels < n_global))[:, None]
    g = _losses._mask_rows(g[0].astype(cdt)[:, None], row_ok)
    dx, dw, db = _linear.backward_sums(
        x,
        w,
        bias,
        weights,
        idx,
        in_range,
        row_w,
        g,
        row_ok,
        m,
        total,
        kw,
        opts,
        chunk,
        1,
        cdt,
        limit,
    )
    return dx.astype(x.dtype), dw, db, None, None, None


_lce_kernel.defvjp(_lce_kernel_fwd, _lce_kernel_bwd)


def _varying_axes(a) -> frozenset:
    """The mesh axes `a` varies over inside `jax.shard_map`."""
    return frozenset(_linear._varying_axes(a))


def _varying(arrays, axis_names):
    """Casts the arrays to vary over the mesh axes any of them (or `axis_names`) varies
    over, so the kernel's cotangents have its inputs' types; autodiff then sums each
    cotangent over the axes its input was cast along (`dx` over the vocabulary axis,
    `dw` over data axes), one all-reduce each."""
    axes = set(axis_names)
    for a in arrays:
        if a is not None:
            axes |= _varying_axes(a)
    out = []
    for a in arrays:
        if a is not None:
            missing = tuple(sorted(axes - _varying_axes(a)))
            if missing:
                a = lax.pcast(a, missing, to="varying")
        out.append(a)
    return out


def linear_cross_entropy(
    x: ArrayLike,
    w_shard: ArrayLike,
    labels: ArrayLike,
    axis_name: AxisName,
    *,
    bias_shard: ArrayLike | None = None,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    data_axis_name: AxisName | None = None,
) -> jax.Array:
    r"""The output layer and the cross-entropy fused, vocabulary split over devices; call
    inside `jax.shard_map`.

    [`jsoftmax.linear_cross_entropy`][] in the vocab-parallel (Megatron) layout: the
    kernel `w` of shape `(H, V)` is split along `V` over `axis_name` (and
    `bias`, `weights` alike); every shard holds the same rows of `x`. Each device
    runs the chunked loop of [`jsoftmax.linear_cross_entropy`][] over its own columns
    (its block of logits is never built either), reducing them to per-row statistics;
    the devices then exchange only per-row numbers, merged by the log-sum-exp merge of
    [`jsoftmax.merge_partials`][]:

    $$
    M = \max_d m_d, \qquad T = \sum_d t_d\, e^{m_d - M}, \qquad
    \ell = \sum_i q_i\,(M + \log T - s_i) + c\,(M + \log T)^2,
    $$

    with $s = \mathrm{softcap}(x w + b)$ and $q$ as in
    [`jsoftmax.cross_entropy`][]. Forward: one all-reduce of the row maxima, then one
    carrying the rescaled sums of exponentials with the target logit (from the shard
    holding the label) and the per-row numbers the options need. Backward: each shard
    recomputes its chunks' logits and accumulates `dw` and `db` for its own columns
    (they stay on their shard) and its part of `dx`, which is summed over
    `axis_name` in one all-reduce of `N * H` values. Nothing of size `N * V` is
    built or communicated.

    Args:
      x: hidden states, shape `(..., H)`, the same on every shard of `axis_name`
        (rows may be split over other mesh axes).
      w_shard: this shard's block of the kernel, shape `(H, V_local)`: columns
        `i * V_local ... (i + 1) * V_local - 1` on shard `i` along `axis_name`
        (`in_specs` `P(None, axis_name)`).
      labels: integer **global** class indices, shape `x.shape[:-1]`.
      axis_name: the mesh axis name(s) the vocabulary is split over.
      bias_shard: optional `(V_local,)`, split like `w`; `-inf` entries mark
        excluded classes as in [`jsoftmax.linear_cross_entropy`][].
      num_classes: the true vocabulary size when `V` was padded at the end to a
        multiple of the shard count; columns with a global index `>= num_classes`
        are excluded (their values do not matter; their gradients are 0).
      ignore_index: as in [`jsoftmax.cross_entropy`][].
      label_smoothing: as in [`jsoftmax.cross_entropy`][].
      z_loss: as in [`jsoftmax.cross_entropy`][].
      logit_softcap: as in [`jsoftmax.cross_entropy`][].
      weights: per-class weights of this shard's columns, shape `(V_local,)`.
      reduction: as in [`cross_entropy`][jsoftmax.sharded.cross_entropy]: `"mean"` is
        over the rows of this `shard_map` block, or over every row of `data_axis_name`.
      data_axis_name: the mesh axis of the rows, for `reduction="mean"` over all of them.
      chunk_size: vocabulary columns per chunk of the local loop. Default: about
        `2**20` logits (4 MiB of float32) per chunk for this block's rows, a power of
        two in `[128, 8192]` and at most the local vocabulary size, as in
        [`jsoftmax.linear_cross_entropy`][].

    Returns:
      The loss per row (shape `x.shape[:-1]`), or its sum or mean; the same on every
      shard of `axis_name`. float32 for 16-bit inputs. Gradients come back in the
      dtypes of `x`, `w_shard` and `bias_shard`.

    Note:
      * Labels are traced inside `jax.shard_map`: an out-of-range label other
        than `ignore_index` gives a NaN row (loss and gradients), never an error.
      * A label on an excluded class (padding, `-inf` bias) makes the row not
        count (loss 0, zero gradients, not in the `"mean"` denominator).
      * Needs `jax.shard_map`'s default `check_vma=True`: the sums of `dx`
        over `axis_name` (and of `dw` over data axes) are derived from it.
      * `weights` and `labels` are not differentiated.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import jsoftmax
      >>> from jsoftmax import sharded
      >>> mesh = jax.make_mesh((1,), ("vocab",))
      >>> x = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 1000)) / 3
      >>> labels = jnp.array([3, 999, 0, 512])
      >>> w_split = jax.device_put(w, jax.NamedSharding(mesh, P(None, "vocab")))
      >>> f = jax.jit(jax.shard_map(
      ...     lambda x, w, y: sharded.linear_cross_entropy(x, w, y, "vocab", reduction="mean"),
      ...     mesh=mesh, in_specs=(P(), P(None, "vocab"), P()), out_specs=P()))
      >>> fused = f(x, w_split, labels)
      >>> dense = jsoftmax.cross_entropy(x @ w, labels, reduction="mean")
      >>> print(bool(jnp.allclose(fused, dense, rtol=1e-6)))
      True
    """
    axis_name = _check_axis_name(axis_name)
    x, w, labels, bias, _ = _linear._check_inputs(x, w_shard, labels, bias_shard, 1)
    reduction = _checks.check_reduction(reduction)
    ignore_index = _losses._check_ignore_index(ignore_index)
    opts = _losses._Options(
        1,
        _losses._check_label_smoothing(label_smoothing),
        _losses._check_z_loss(z_loss),
        _losses._check_softcap(logit_softcap),
    )
    shards = _num_shards(axis_name, "linear_cross_entropy")
    data_axis_name = _check_data_axis_name(data_axis_name, axis_name, "linear_cross_entropy")
    local = w.shape[1]
    if local == 0:
        raise ValueError("w_shard has no columns; cross-entropy is undefined.")
    num_classes = _check_num_classes(num_classes, local, shards)
    weights = _check_shard_weights(weights, local)
    batch = x.shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    chunk = _linear._check_chunk_size(chunk_size, rows, local)
    x2 = x.reshape(rows, x.shape[-1])
    lab = labels.reshape(rows).astype(jnp.int32)
    ex_ok = None if ignore_index is None else lab != ignore_index
    x2, w, bias = _varying((x2, w, bias), _axis_tuple(axis_name))
    per_row, weight = _lce_kernel(
        x2, w, bias, lab, weights, ex_ok, opts, axis_name, chunk, num_classes
    )
    out = _reduce(per_row, weight, reduction, data_axis_name)
    return out.reshape(batch) if reduction == "none" else out


def _axis_tuple(axis_name: AxisName) -> tuple[str, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)
