r"""Softmax, log-softmax and cross-entropy with the softmax axis split over devices.

Use these functions **inside** :func:`jax.shard_map` when the class (softmax) axis of
the logits is sharded over one or more mesh axes, as in a large-vocabulary language
model whose output layer is split by vocabulary ("vocab-parallel"). Each device holds
a contiguous block of classes; the functions communicate only per-row scalars with
JAX's own collectives (:func:`jax.lax.pmax`, :func:`jax.lax.psum`), never the logits:

=========================  ===================================  ==========================
function                   forward all-reduces (per row)        backward all-reduces
=========================  ===================================  ==========================
``softmax``                max, sum of exponentials             :math:`\langle g, p\rangle`
``log_softmax``            max, sum of exponentials             :math:`\sum_i g_i`
``cross_entropy``          max, sum of exponentials,            none: :math:`p - y` is local
                           target logit
=========================  ===================================  ==========================

Every all-reduce carries one scalar per row. The forward pass is the merge rule of
:func:`jsoftmax.merge_partials` applied across devices (:mod:`jsoftmax._merge`): each
device computes its block's row max and sum of exponentials in one local pass, then
the maxima are all-reduced and the sums, rescaled to the global max, are all-reduced.
Each function is a :func:`jax.custom_vjp` that saves one logits-sized array (the local
block of probabilities, or of log-probabilities) for the backward pass. The backward
rules are the single-device ones of :mod:`jsoftmax._formulas` with every sum over the
softmax axis replaced by a local sum followed by an all-reduce.

Outside :func:`jax.shard_map`, :func:`jsoftmax.softmax` and friends already work on
arrays placed with :class:`jax.sharding.NamedSharding` under :func:`jax.jit`: XLA
inserts the same two all-reduces. This module is for code that is written per shard.

**Class count not divisible by the number of shards.** :func:`jax.shard_map` needs
the class axis to split evenly, so pad it at the end (any values, e.g. with
:func:`jax.numpy.pad`) to a multiple of the shard count and pass the true count as
``num_classes``: padded entries are then masked (probability 0, gradient 0, never a
target). Without padding, :func:`jax.shard_map` raises before anything is computed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _formulas, _merge, _softmax

__all__ = ["cross_entropy", "log_softmax", "softmax"]

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
    """The number of shards along ``axis_name``; a clear error outside shard_map."""
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
    """Combines ``where`` with the mask of padded classes (global index >= num_classes)."""
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
    r""":math:`\langle a, b\rangle` over the whole split axis (``_formulas._dot`` + psum)."""
    return lax.psum(_formulas._dot(a, b, axes), axis_name)


def _local_stats(x, where, axes: Axes):
    """``(s - m, exp(s - m), m, sum exp(s - m))`` of this device's block, ``m`` its row max.

    The single-device pass (:func:`jsoftmax._softmax._shifted_exp`: one fused
    max-exp-sum, float32 for 16-bit input, masked entries ``-inf`` before ``exp``, a
    block without a finite entry summing to 0, ``+inf``/NaN propagating). No
    communication: the blocks' statistics are merged by :func:`jsoftmax._merge.merge_across`.
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


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
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
    r"""Softmax over an axis split across devices; call inside :func:`jax.shard_map`.

    .. math::
        p_i = \frac{\exp(z_i - m)}{\sum_{d}\sum_{k \in d} \exp(z_k - m)}, \qquad
        m = \max_d \max_{k \in d} z_k,

    where ``d`` runs over the shards along ``axis_name``. Each shard computes its block's
    max :math:`m_d` and sum :math:`t_d = \sum_{k\in d}\exp(z_k - m_d)` in one local pass;
    the max is all-reduced with :func:`jax.lax.pmax` (on stop-gradient values) and the
    normaliser :math:`\sum_d t_d\, e^{m_d - m}` with :func:`jax.lax.psum` (the merge of
    :func:`jsoftmax.merge_partials`): two all-reduces of one scalar per row. The backward pass
    :math:`\bar z = p \odot (g - \langle g, p\rangle)` all-reduces one scalar per row,
    :math:`\langle g, p\rangle`, and reuses the saved local probabilities.

    Args:
      x_shard: this device's block of logits, any rank >= 1; its ``axis`` holds a
        contiguous slice of the classes (shard ``i`` along ``axis_name`` holds classes
        ``i * n_local`` to ``(i + 1) * n_local - 1``).
      axis_name: the mesh axis name (or tuple of names, major first, as in the
        :class:`jax.sharding.PartitionSpec`) that the softmax axis is split over.
      axis: the local softmax axis (or a tuple of axes normalised together).
      where: optional boolean mask broadcastable to ``x_shard``; ``False`` entries get
        probability 0 and gradient 0.
      num_classes: the true number of classes when the split axis was padded at the end
        to a multiple of the shard count; classes with a global index
        ``>= num_classes`` are masked. Needs an int ``axis``.

    Returns:
      This device's block of probabilities, shape and dtype of ``x_shard``.

    Note:
      * Same edge-case behaviour as :func:`jsoftmax.softmax`: rows with no unmasked
        finite entry (on any shard) are all zeros with zero gradient; ``+inf`` or NaN
        in an unmasked entry makes the whole row NaN on every shard; float16/bfloat16
        are computed in float32.
      * Reverse mode only (a :func:`jax.custom_vjp`).
      * Raises ``ValueError`` when ``axis_name`` is not bound, i.e. outside
        :func:`jax.shard_map`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from jsoftmax import sharded
      >>> mesh = jax.make_mesh((1,), ("vocab",))   # any number of devices dividing 8
      >>> f = jax.shard_map(lambda z: sharded.softmax(z, "vocab"), mesh=mesh,
      ...                   in_specs=P(None, "vocab"), out_specs=P(None, "vocab"))
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
    r"""Log-softmax over an axis split across devices; call inside :func:`jax.shard_map`.

    .. math::
        y_i = (z_i - m) - \log\sum_d\sum_{k\in d}\exp(z_k - m), \qquad
        \bar z = g - p\sum_{d}\sum_{i \in d} g_i.

    Forward: two all-reduces of one scalar per row (max, sum of exponentials).
    Backward: one (the sum of the cotangent); the saved residual is the local block of
    log-probabilities.

    Args:
      x_shard: this device's contiguous block of logits (see :func:`softmax`).
      axis_name: the mesh axis name(s) the softmax axis is split over.
      axis: the local softmax axis (or a tuple of axes).
      where: optional boolean mask broadcastable to ``x_shard``; masked entries give
        ``-inf`` and gradient 0.
      num_classes: the true class count when the split axis was padded at the end.

    Returns:
      This device's block of log-probabilities, shape and dtype of ``x_shard``.

    Note:
      As :func:`jsoftmax.log_softmax`: masked and ``-inf`` entries give ``-inf`` (the
      cotangent arriving there is ignored); a row with no finite entry is ``-inf``
      with zero gradient; ``+inf``/NaN give NaN. Reverse mode only.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from jsoftmax import sharded
      >>> mesh = jax.make_mesh((1,), ("vocab",))
      >>> f = jax.shard_map(lambda z: sharded.log_softmax(z, "vocab"), mesh=mesh,
      ...                   in_specs=P(None, "vocab"), out_specs=P(None, "vocab"))
      >>> x = jnp.zeros((1, 8), jnp.float32)
      >>> x = jax.device_put(x, jax.NamedSharding(mesh, P(None, "vocab")))
      >>> with jnp.printoptions(precision=4):
      ...     print(f(x))
      [[-2.0794 -2.0794 -2.0794 -2.0794 -2.0794 -2.0794 -2.0794 -2.0794]]
    """
    return _dispatch(x_shard, axis_name, axis, where, num_classes, log=True)


# --------------------------------------------------------------------------------------
# cross_entropy: Megatron-style vocab-parallel loss; backward p - onehot, no psum.
# --------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ce_kernel(x, labels, where, axis: int, axis_name: AxisName, n_classes: int | None):
    return _ce_fwd(x, labels, where, axis, axis_name, n_classes)[0]


def _ce_fwd(x, labels, where, axis: int, axis_name: AxisName, n_classes: int | None):
    shifted, e, m, local_total = _local_stats(x, where, (axis,))
    cdt = shifted.dtype
    local = x.shape[axis]
    n_global = local * lax.axis_size(axis_name) if n_classes is None else n_classes
    # The target logit lives on exactly one shard; the others contribute 0.
    local_label = labels - lax.axis_index(axis_name) * local  # in [0, local) on one shard
    target_here = lax.broadcasted_iota(jnp.int32, x.shape, axis) == jnp.expand_dims(
        local_label, axis
    )

    def carried(m_all):
        # Per-row sums that ride in the all-reduce of the rescaled sums of exponentials:
        # the target logit against the merged max and, with a mask, a flag for a label
        # on a masked class (it carries no target mass: an "ignore" label).
        target = jnp.where(target_here, shifted + (m - m_all), jnp.zeros((), cdt))
        if where is None:
            return (jnp.sum(target, axis=axis),)
        return jnp.sum(target, axis=axis), jnp.any(target_here & ~where, axis=axis).astype(cdt)

    m_all, total, sums = _merge.merge_across(m, local_total, axis_name, extra=carried)
    target = sums[0]
    if where is None:
        ignored = jnp.zeros(labels.shape, bool)
        live = jnp.any(target_here, axis=axis)
    else:
        ignored = sums[1] > 0
        live = jnp.any(target_here & where, axis=axis)
    valid = (labels >= 0) & (labels < n_global)
    zero, nan = jnp.zeros((), cdt), jnp.full((), jnp.nan, cdt)
    log_total = jnp.squeeze(_merge.log_total(total), axis)
    loss = jnp.where(valid, jnp.where(ignored, zero, log_total - target), nan)
    p = e * _merge.scale(m, m_all, total)
    # The backward pass subtracts the one-hot only on the shard holding the label, and
    # only if that class is not masked; elsewhere the index is -1 (no match). The
    # per-row scale is 1, 0 for an ignored label, NaN for an out-of-range one.
    onehot_index = jnp.where(live, local_label, -1)
    scale = jnp.where(valid, jnp.where(ignored, zero, jnp.ones((), cdt)), nan)
    return loss.astype(x.dtype), (p.astype(x.dtype), onehot_index, scale)


def _ce_kernel_fwd(x, labels, where, axis, axis_name, n_classes):
    return _ce_fwd(x, labels, where, axis, axis_name, n_classes)


def _ce_kernel_bwd(axis, axis_name, n_classes, residuals, g):
    # d loss / d z = p - onehot(label): purely local, no communication. The residuals
    # are the local block of probabilities plus two batch-sized arrays.
    del axis_name, n_classes
    p, onehot_index, scale = residuals
    cdt = _checks.accumulation_dtype(p.dtype)
    iota = lax.broadcasted_iota(jnp.int32, p.shape, axis)
    onehot = (iota == jnp.expand_dims(onehot_index, axis)).astype(cdt)
    g = g.astype(cdt) * scale
    grad = (p.astype(cdt) - onehot) * jnp.expand_dims(g, axis)
    return grad.astype(p.dtype), None, None


_ce_kernel.defvjp(_ce_kernel_fwd, _ce_kernel_bwd)


def cross_entropy(
    logits_shard: ArrayLike,
    labels: ArrayLike,
    axis_name: AxisName,
    axis: int = -1,
    *,
    where: ArrayLike | None = None,
    num_classes: int | None = None,
) -> jax.Array:
    r"""Vocab-parallel softmax cross-entropy with integer labels; call inside :func:`jax.shard_map`.

    .. math::
        \ell = \log\sum_d\sum_{k\in d} \exp(z_k - m) - (z_y - m), \qquad
        \frac{\partial \ell}{\partial z} = p - e_y,

    with :math:`m` the global row max and :math:`y` the label, a **global** class index.
    Shard ``i`` along ``axis_name`` holds classes ``i * n_local ... (i + 1) * n_local - 1``;
    the shard holding :math:`y` contributes :math:`z_y - m`, the others 0. Forward:
    all-reduces of the row max, of the sum of exponentials and of the target logit (one
    scalar per row each). Backward: :math:`g\,(p - e_y)` from the saved local block of
    probabilities, with **no communication**.

    Args:
      logits_shard: this device's contiguous block of logits, any rank >= 1.
      labels: integer array of global class indices with the shape of ``logits_shard``
        without ``axis`` (the local batch block, the same on every shard of
        ``axis_name``).
      axis_name: the mesh axis name(s) the class axis is split over.
      axis: the local class axis (an int).
      where: optional boolean mask broadcastable to ``logits_shard``; masked classes
        are left out of the normaliser and get gradient 0.
      num_classes: the true class count when the class axis was padded at the end to a
        multiple of the shard count; padded classes are masked.

    Returns:
      Per-example losses, shape of ``logits_shard`` without ``axis``, dtype of the
      logits (16-bit input is computed in float32). They are equal on every shard of
      ``axis_name``, so an ``out_specs`` that does not mention ``axis_name`` fits.

    Note:
      * A label outside ``[0, C)`` (``C`` = ``num_classes``, or the global size of the
        split axis) gives a NaN loss and NaN gradient for that row, never a silently
        wrong loss (labels are traced inside :func:`jax.shard_map`, so they cannot be
        checked eagerly).
      * As in :func:`jsoftmax.cross_entropy`: a label on a masked (or padded) class
        carries no target mass, so the row's loss is 0 with zero gradient (an "ignore"
        label); a fully masked row therefore gives 0. A label on an unmasked ``-inf``
        logit gives loss ``+inf`` with the finite gradient :math:`g\,(p - e_y)`.
      * ``+inf`` or NaN among the unmasked logits of a row gives NaN.
      * The saved residual is the local block of probabilities in the logits' dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from jsoftmax import sharded
      >>> mesh = jax.make_mesh((1,), ("vocab",))
      >>> f = jax.shard_map(lambda z, y: sharded.cross_entropy(z, y, "vocab"), mesh=mesh,
      ...                   in_specs=(P(None, "vocab"), P()), out_specs=P())
      >>> z = jax.device_put(jnp.zeros((2, 8), jnp.float32),
      ...                    jax.NamedSharding(mesh, P(None, "vocab")))
      >>> y = jax.device_put(jnp.array([0, 7]), jax.NamedSharding(mesh, P()))
      >>> with jnp.printoptions(precision=4):
      ...     print(f(z, y))
      [2.0794 2.0794]
    """
    axis_name = _check_axis_name(axis_name)
    x = _checks.as_float_array(logits_shard, "logits_shard")
    axis = _checks.canonical_axis(axis, x.ndim)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices, got dtype {labels.dtype}. "
            "For probability targets use jsoftmax.sharded.log_softmax."
        )
    batch = x.shape[:axis] + x.shape[axis + 1 :]
    if labels.shape != batch:
        raise ValueError(
            f"labels must have the shape of logits_shard without axis {axis}, i.e. "
            f"{batch}; got {labels.shape}."
        )
    where = _checks.check_where(where, x.shape)
    shards = _num_shards(axis_name, "cross_entropy")
    if x.shape[axis] == 0:
        raise ValueError("logits_shard has an empty class axis; cross-entropy is undefined.")
    num_classes = _check_num_classes(num_classes, x.shape[axis], shards)
    where = _mask(x.shape, axis, axis_name, where, num_classes)
    return _ce_kernel(x, labels.astype(jnp.int32), where, axis, axis_name, num_classes)
