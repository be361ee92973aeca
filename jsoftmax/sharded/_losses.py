"""`cross_entropy`: Megatron-style vocab-parallel loss with the options of
`jsoftmax.cross_entropy`, inside `shard_map`. Each shard reduces its block of classes to
the per-row statistics of `jsoftmax._kernel`; one `pmax` and one `psum` merge them; the
loss and its cotangent are the kernel's."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _ce, _checks, _custom, _kernel
from jsoftmax._checks import Reduction
from jsoftmax.sharded import _common
from jsoftmax.sharded._common import AxisName


def _label_layout(labels, n: int, axis: int, axis_name: AxisName, n_classes: int):
    """`(index, here, in_range)` of integer labels on this shard's block of `n` classes,
    each with a size-1 class axis: the label's index in the block (outside `[0, n)` where
    another shard holds it), whether this shard holds it, and whether it is a class."""
    local = jnp.expand_dims(labels - _common.offset(n, axis_name), axis)
    in_range = jnp.expand_dims((labels >= 0) & (labels < n_classes), axis)
    return local, (local >= 0) & (local < n), in_range


@partial(_custom.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ce_kernel(x, labels, where, temperature, weights, ex_ok, coefs, flags, axis_name, n_classes):
    args = (x, labels, where, temperature, weights, ex_ok, coefs, flags, axis_name, n_classes)
    return _ce_fwd(*args)[0]


def _ce_fwd(x, labels, where, temperature, weights, ex_ok, coefs, flags, axis_name, n_classes):
    axis = flags.axis
    label_at = None
    if _kernel.is_integer(labels):
        n = x.shape[axis]
        local, here, in_range = _label_layout(labels, n, axis, axis_name, n_classes)
        idx = jnp.clip(local, 0, n - 1)

        def pick(a):
            # A gather on this shard's block (one value per row), 0 where another
            # shard holds the label; the shards' values are summed by the merge.
            a = jnp.take_along_axis(jnp.broadcast_to(a, x.shape), idx, axis=axis)
            return jnp.where(here, a, jnp.zeros((), a.dtype))

        label_at = (pick, in_range)
    merge = partial(_kernel.merge_devices, axis_name=axis_name, temperature=temperature)
    args = (x, labels, where, temperature, weights, ex_ok, coefs, flags)
    out, saved, fp = _ce.forward(*args, label_at=label_at, merge_stats=merge)
    return out, (saved, fp.m)


def _ce_kernel_fwd(
    x, labels, where, temperature, weights, ex_ok, coefs, flags, axis_name, n_classes
):
    args = (x, labels, where, temperature, weights, ex_ok, coefs, flags, axis_name, n_classes)
    return _ce_fwd(*args)


def _ce_kernel_bwd(flags, axis_name, n_classes, residuals, g):
    # d loss / d s = (sum q + 2 c b lse) p - q: local, from the merged row statistics
    # (and d loss / d y = -(1 - alpha) w log p for probability labels, local too). Only
    # the temperature's derivative (a sum over the classes) needs an all-reduce.
    saved, m_local = residuals
    labels, n = saved.labels, saved.logits.shape[flags.axis]
    label_at = None
    if _kernel.is_integer(labels):
        local, _, in_range = _label_layout(labels, n, flags.axis, axis_name, n_classes)
        label_at = (local, in_range)
    g_z, g_labels, g_t = _ce.backward(saved, flags, m_local, g[0], label_at)
    if g_t is not None:
        g_t = lax.psum(g_t, axis_name).astype(saved.temperature.dtype)
    return g_z, g_labels, None, g_t, None, None, None


_ce_kernel.defvjp(_ce_kernel_fwd, _ce_kernel_bwd)


def cross_entropy(
    logits_shard: ArrayLike,
    labels: ArrayLike,
    axis_name: AxisName,
    axis: int = -1,
    *,
    where: ArrayLike | None = None,
    num_classes: int | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    temperature: ArrayLike = 1.0,
    ignore_index: int | None = None,
    weights: ArrayLike | None = None,
    z_loss: float | ArrayLike = 0.0,
    logit_softcap: float | None = None,
    reduction: Reduction = "none",
    data_axis_name: AxisName | None = None,
) -> jax.Array:
    r"""Vocab-parallel softmax cross-entropy; call inside `jax.shard_map`.

    The loss of [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy] (same options, same
    formulas, the same per-row kernel) with the class axis split over `axis_name`:

    $$
    \ell = \sum_i q_i\,(\mathrm{lse} - s_i) + c\,b\,\mathrm{lse}^2, \qquad
    \frac{\partial \ell}{\partial s} = \Bigl(\sum_i q_i + 2c\,b\,\mathrm{lse}\Bigr)\,p - q,
    $$

    with $s = \mathrm{softcap}(z)/T$ and $q = w_y(1-\alpha)e_y + \frac{\alpha}{m}w$ for
    an integer label $y$ (a **global** class index), or
    $q = w\odot\bigl((1-\alpha)\,y + \frac{\alpha}{m}\bigr)$ for probability labels $y$
    (split over the devices like the logits). Shard `i` along `axis_name` holds classes
    `i * n_local ... (i + 1) * n_local - 1`. Forward: one all-reduce of the row max,
    then one all-reduce carrying, per row, the sum of exponentials, the label's logit
    (from the shard holding $y$, 0 from the others) or, for probability labels, the
    shard's parts of $\sum_i q_i$ and $\sum_i q_i (s_i - M)$, and whatever the options
    need (the label's class weight, the number and weight of valid classes and their
    centred sum for label smoothing). Backward: $g\,\partial\ell/\partial s$ (and for
    probability labels $\partial\ell/\partial y_i = -(1-\alpha)\,w_i\log p_i$) from the
    merged row statistics, with **no communication** (with a `temperature`, one
    all-reduce of $\langle \partial\ell/\partial s, s\rangle$ per row for its
    derivative).

    Args:
      logits_shard: this device's contiguous block of logits, any rank >= 1.
      labels: either an integer array of global class indices with the shape of
        `logits_shard` without `axis` (the local batch block, the same on every shard
        of `axis_name`), or real probabilities (a target vector per row, not required
        to be normalised; differentiable) with the shape of `logits_shard`: this
        shard's block of the targets, split like the logits (the same `in_specs`).
      axis_name: the mesh axis name(s) the class axis is split over.
      axis: the local class axis (an int).
      where: optional boolean mask, by the rule of
        [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy]: with fewer dimensions than
        `logits_shard` a per-example mask broadcastable to the batch shape (masked
        examples behave like `ignore_index`); with its rank a mask of this shard's
        entries (masked classes are left out of the normaliser, get gradient 0 and no
        target mass).
      num_classes: the true class count when the class axis was padded at the end to a
        multiple of the shard count; padded classes are masked.
      label_smoothing: as in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy].
      temperature: as in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy].
      ignore_index: as in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy].
      weights: per-class weights of **this shard's block** of classes, shape
        `(n_local,)` (a `(n,)` vector sharded like the class axis, e.g. with `in_specs`
        `P(axis_name)`). Not differentiated.
      z_loss: as in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy].
      logit_softcap: as in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy].
      reduction: `"none"`, `"sum"` or `"mean"` (weighted, as in
        [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy]) over the rows of this
        `shard_map` block. When the rows are also split over a data axis, pass it as
        `data_axis_name` to sum (and average) over every row of that axis; without it
        each data shard gets the mean of its own rows, and the global mean is the
        `psum` over the data axis of the sums divided by the `psum` of the counted
        rows' weights (not the mean of the means).
      data_axis_name: `None` or the mesh axis name(s) the rows are split over; used by
        `"sum"` and `"mean"` only (one more all-reduce of two scalars). The result is
        then the same on every device.

    Returns:
      Per-example losses, shape of `logits_shard` without `axis`, or their sum or mean
      (a scalar); dtype as [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy]: float32
      for 16-bit logits, else the logits' dtype promoted with float labels. They are
      equal on every shard of `axis_name`, so an `out_specs` that does not mention
      `axis_name` fits.

    Note:
      * A label outside `[0, C)` (`C` = `num_classes`, or the global size of the split
        axis) other than `ignore_index` gives a NaN loss and NaN gradient for that row,
        never a silently wrong loss (labels are traced inside `jax.shard_map`, so they
        cannot be checked eagerly); a label on a padded class (`>= num_classes`) is
        out of range.
      * As in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy]: a label on an
        excluded class (masked by `where`, or a $-\infty$ logit) makes the row not count:
        loss 0, zero gradient, left out of the `"mean"` denominator; a fully masked row
        therefore gives 0.
      * Probability labels: a row without any valid class (on any shard) gives 0, with
        zero gradients, and is not in the `"mean"` denominator; every other counted
        row has weight 1. Excluded classes get no target mass, whatever the labels hold
        there. `ignore_index` is for integer labels only (a `ValueError` otherwise);
        mask examples with a per-example `where`.
      * NaN among the valid logits of a counted row gives NaN, and so does $+\infty$
        without `logit_softcap` (which maps it to $\kappa$).
      * float16/bfloat16 logits: computed in float32 and the loss is returned in
        float32 (a 16-bit loss would be quantised); gradients come back in the logits'
        dtype.
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
    axis_name = _common.check_axis_name(axis_name)
    x = _checks.as_float_array(logits_shard, "logits_shard")
    axis = _checks.canonical_axis(axis, x.ndim)
    labels = _checks.as_array(labels, "labels")
    opts = _checks.loss_options(
        label_smoothing, z_loss, logit_softcap, ignore_index, reduction, labels.dtype
    )
    labels = _checks.check_labels(
        labels,
        x.shape,
        axis,
        opts.ignore_index,
        logits_name="logits_shard",
        float_hint=": this shard's block of the targets, split over axis_name like the logits",
    )
    where, example_mask = _checks.split_where(where, x.shape, (axis,))
    shards = _common.num_shards(axis_name, "cross_entropy")
    data_axis_name = _common.check_data_axis_name(data_axis_name, axis_name, "cross_entropy")
    if x.shape[axis] == 0:
        raise ValueError("logits_shard has an empty class axis; cross-entropy is undefined.")
    num_classes = _common.check_num_classes(num_classes, x.shape[axis], shards)
    weights = _checks.check_weights(
        weights,
        x.shape[axis],
        " weights holds this shard's block of class weights (the full vector split like "
        "the classes, e.g. in_specs P(axis_name)).",
    )
    t = _checks.prepare_temperature(temperature, x.shape, (axis,))  # None for T = 1
    where = _common.pad_mask(x.shape, axis, axis_name, where, num_classes)
    n_classes = x.shape[axis] * shards if num_classes is None else num_classes
    ex_ok = example_mask
    if _kernel.is_integer(labels):
        labels = labels.astype(jnp.result_type(int))  # int64 under x64: no wrap
        if opts.ignore_index is not None:
            ex_ok = _kernel.both(ex_ok, labels != opts.ignore_index)
    else:
        # Probability labels are differentiated: their cotangent is local, so they must
        # vary over the mesh axes the logits vary over (and the logits over theirs).
        x, labels = _common.varying((x, labels), ())
    flags, coefs = _kernel.flags_and_coefs(opts, axis)
    per_row, weight = _ce_kernel(
        x, labels, where, t, weights, ex_ok, coefs, flags, axis_name, n_classes
    )
    return _common.reduce(per_row, weight, opts.reduction, data_axis_name)
