"""`linear_cross_entropy`: the output layer and the cross-entropy fused, with the
vocabulary split over devices (inside `shard_map`). Each device runs the chunk loop of
`jsoftmax._chunks` over its own columns; the devices then merge per-row statistics."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jsoftmax import _checks, _chunks, _custom, _kernel, _linear
from jsoftmax._checks import Reduction
from jsoftmax.sharded import _common
from jsoftmax.sharded._common import AxisName


@partial(_custom.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _lce_kernel(x, w, bias, labels, weights, ex_ok, coefs, flags, axis_name, size, n_classes):
    args = (x, w, bias, labels, weights, ex_ok, coefs, flags, axis_name, size, n_classes)
    return _lce_fwd(*args)[0]


def _lce_fwd(x, w, bias, labels, weights, ex_ok, coefs, flags, axis_name, size, n_classes):
    cdt = _chunks.compute_dtype(x, w)
    local = w.shape[1]
    idx, in_range, limit = _common.label_layout(labels, local, axis_name, n_classes)
    w_y = None
    if weights is not None:
        w_y = jnp.where(idx >= 0, weights[jnp.maximum(idx, 0)].astype(cdt), 0)
    ok = None if ex_ok is None else ex_ok[:, None]
    loss, ok, weight, row = _linear.ce_forward(
        x,
        w,
        bias,
        idx,
        in_range,
        w_y,
        weights,
        ok,
        coefs,
        flags,
        size,
        1,
        cdt,
        limit=limit,
        merge=lambda st: _kernel.merge_devices(st, axis_name),
    )
    residuals = (x, w, bias, labels, weights, ok, row)
    return (loss[:, 0], weight[:, 0]), residuals


def _lce_kernel_fwd(x, w, bias, labels, weights, ex_ok, coefs, flags, axis_name, size, n_classes):
    args = (x, w, bias, labels, weights, ex_ok, coefs, flags, axis_name, size, n_classes)
    return _lce_fwd(*args)


def _lce_kernel_bwd(flags, axis_name, size, n_classes, residuals, g):
    # dw and db stay on their shard; dx, a sum over the vocabulary, is this shard's part
    # (summed over the shards by the transpose of the varying cast in the caller).
    x, w, bias, labels, weights, ok, row = residuals
    idx, in_range, limit = _common.label_layout(labels, w.shape[1], axis_name, n_classes)
    args = (idx, in_range, weights, ok, row, g[0], flags, size, 1)
    return _linear.ce_backward(x, w, bias, *args, limit=limit)


_lce_kernel.defvjp(_lce_kernel_fwd, _lce_kernel_bwd)


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
    label_smoothing: float | ArrayLike = 0.0,
    z_loss: float | ArrayLike = 0.0,
    logit_softcap: float | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    data_axis_name: AxisName | None = None,
) -> jax.Array:
    r"""The output layer and the cross-entropy fused, vocabulary split over devices; call
    inside `jax.shard_map`.

    [`jsoftmax.linear_cross_entropy`][jsoftmax.linear_cross_entropy] in the
    vocab-parallel (Megatron) layout: the kernel `w` of shape `(H, V)` is split along
    `V` over `axis_name` (and `bias`, `weights` alike); every shard holds the same rows
    of `x`. Each device runs the chunk loop of the fused loss over its own columns (its
    block of logits is never built either), reducing them to per-row statistics; the
    devices then exchange only per-row numbers, merged by the log-sum-exp merge of
    [`jsoftmax.merge_partials`][jsoftmax.merge_partials]:

    $$
    M = \max_d m_d, \qquad T = \sum_d t_d\, e^{m_d - M}, \qquad
    \ell = \sum_i q_i\,(M + \log T - s_i) + c\,b\,(M + \log T)^2,
    $$

    with $s = \mathrm{softcap}(x w + b)$ and $q$, $b$ as in
    [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy]. Forward: one all-reduce of the
    row maxima, then one carrying the rescaled sums of exponentials with the label's
    logit (from the shard holding the label, read from its chunk's logits) and the
    per-row numbers the options need. Backward: each shard recomputes its chunks'
    logits and accumulates `dw` and `db` for its own columns (they stay on their shard)
    and its part of `dx`, which is summed over `axis_name` in one all-reduce of `N * H`
    values. Nothing of size `N * V` is built or communicated.

    Args:
      x: hidden states, shape `(..., H)`, the same on every shard of `axis_name` (rows
        may be split over other mesh axes).
      w_shard: this shard's block of the kernel, shape `(H, V_local)`: columns
        `i * V_local ... (i + 1) * V_local - 1` on shard `i` along `axis_name`
        (`in_specs` `P(None, axis_name)`).
      labels: integer **global** class indices, shape `x.shape[:-1]`.
      axis_name: the mesh axis name(s) the vocabulary is split over.
      bias_shard: optional `(V_local,)`, split like `w`; $-\infty$ entries mark excluded
        classes as in [`jsoftmax.linear_cross_entropy`][jsoftmax.linear_cross_entropy].
      num_classes: the true vocabulary size when `V` was padded at the end to a
        multiple of the shard count; columns with a global index `>= num_classes` are
        excluded (their values do not matter; their gradients are 0).
      ignore_index: as in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy].
      weights: per-class weights of this shard's columns, shape `(V_local,)`.
      label_smoothing: as in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy].
      z_loss: as in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy].
      logit_softcap: as in [`jsoftmax.cross_entropy`][jsoftmax.cross_entropy].
      reduction: as in [`jsoftmax.sharded.cross_entropy`][jsoftmax.sharded.cross_entropy]:
        `"mean"` is over the rows of this `shard_map` block, or over every row of
        `data_axis_name`.
      chunk_size: vocabulary columns per chunk of the local loop (by default about
        `2**20` logits per chunk, as in
        [`jsoftmax.linear_cross_entropy`][jsoftmax.linear_cross_entropy], from the rows
        and the local vocabulary).
      data_axis_name: the mesh axis of the rows, for `reduction="mean"` over all of them.

    Returns:
      The loss per row (shape `x.shape[:-1]`), or its sum or mean; the same on every
      shard of `axis_name`. float32 for 16-bit inputs. Gradients come back in the
      dtypes of `x`, `w_shard` and `bias_shard`.

    Note:
      * Labels are traced inside `jax.shard_map`: an out-of-range label other than
        `ignore_index` gives a NaN row (loss and gradients), never an error; a label
        on a padded column (`>= num_classes`) is out of range.
      * A label on an excluded class (a $-\infty$ bias) makes the row not count
        (loss 0, zero gradients, not in the `"mean"` denominator).
      * The loss is never negative (the label's logit comes from its chunk's logits).
      * Needs `jax.shard_map`'s default `check_vma=True`: the sums of `dx` over
        `axis_name` (and of `dw` over data axes) are derived from it.
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
    inputs = (x, w_shard, bias_shard, labels, axis_name, num_classes, chunk_size)
    f = _common.fused_inputs(*inputs, "linear_cross_entropy", "cross-entropy is")
    opts = _checks.loss_options(
        label_smoothing, z_loss, logit_softcap, ignore_index, reduction, f.label_dtype
    )
    data_axis_name = _common.check_data_axis_name(
        data_axis_name, f.axis_name, "linear_cross_entropy"
    )
    weights = _checks.check_weights(
        weights,
        f.w.shape[1],
        " weights holds this shard's block of class weights (the full vector split like "
        "the classes, e.g. in_specs P(axis_name)).",
    )
    ex_ok = None if opts.ignore_index is None else f.labels != opts.ignore_index
    flags, coefs = _kernel.flags_and_coefs(opts, 1)
    args = (f.x, f.w, f.bias, f.labels, weights, ex_ok, coefs, flags)
    if f.x.shape[0] == 0:  # no rows: the chunk loop would have nothing to carry
        per_row = weight = jnp.zeros((0,), _chunks.compute_dtype(f.x, f.w))
    else:
        per_row, weight = _lce_kernel(*args, f.axis_name, f.size, f.n_classes)
    out = _common.reduce(per_row, weight, opts.reduction, data_axis_name)
    return out.reshape(f.batch) if opts.reduction == "none" else out
