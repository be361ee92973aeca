"""`softmax` and `log_softmax` over an axis split across devices (inside `shard_map`)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jsoftmax import _checks, _custom, _formulas, _merge, _pass
from jsoftmax.sharded import _common
from jsoftmax.sharded._common import Axes, AxisName


def _values(x, where, axes: Axes, axis_name: AxisName, log: bool):
    # This device's max-exp-sum pass, then two all-reduces: the row max, then the sum of
    # the blocks' rescaled sums (the merge rule of jsoftmax.merge_partials).
    fp = _pass.exp_pass(x, where, axes)
    m_all, total = _merge.merge_across(fp.m, fp.total, axis_name)
    if log:
        return fp.d + _merge.log_scale(fp.m, m_all, total)
    return fp.e * _merge.scale(fp.m, m_all, total)


@partial(_custom.custom_vjp, nondiff_argnums=(2, 3, 4))
def _softmax_kernel(x, where, axes: Axes, axis_name: AxisName, log: bool):
    return _values(x, where, axes, axis_name, log).astype(x.dtype)


def _softmax_kernel_fwd(x, where, axes, axis_name, log):
    # The values directly, so forward mode can differentiate this rule (jax.hessian).
    out = _values(x, where, axes, axis_name, log).astype(x.dtype)
    return out, out


def _softmax_kernel_bwd(axes, axis_name, log, out, g):
    cdt = _checks.accumulation_dtype(out.dtype)
    out_c, g = out.astype(cdt), g.astype(cdt)
    if log:
        g = jnp.where(out_c > -jnp.inf, g, jnp.zeros((), cdt))  # masked outputs are constants
        total = partial(_common.global_sum, axis_name=axis_name)
        g_s = _formulas.log_vjp(jnp.exp(out_c), g, axes, total=total)
    else:
        dot = partial(_common.global_dot, axis_name=axis_name)
        g_s = _formulas.jac_product(out_c, g, axes, dot=dot)
    return g_s.astype(out.dtype), None


_softmax_kernel.defvjp(_softmax_kernel_fwd, _softmax_kernel_bwd)


def _dispatch(x, axis_name, axis, where, num_classes, log: bool):
    fname = "log_softmax" if log else "softmax"
    axis_name = _common.check_axis_name(axis_name)
    x = _checks.as_float_array(x, "x_shard")
    axes = _checks.canonical_axes(axis, x.ndim)
    where = _checks.check_where(where, x.shape)
    shards = _common.num_shards(axis_name, fname)
    if num_classes is not None and len(axes) != 1:
        raise ValueError("num_classes needs a single softmax axis (an int axis).")
    num_classes = _common.check_num_classes(num_classes, x.shape[axes[0]], shards)
    if x.size == 0:
        return jnp.zeros(x.shape, x.dtype)
    where = _common.pad_mask(x.shape, axes[0], axis_name, where, num_classes)
    return _softmax_kernel(x, where, axes, axis_name, log)


def softmax(
    x_shard: ArrayLike,
    axis_name: AxisName,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    num_classes: int | None = None,
) -> jax.Array:
    r"""Softmax over an axis split across devices; call inside `jax.shard_map`.

    $$
    p_i = \frac{\exp(z_i - m)}{\sum_{d}\sum_{k \in d} \exp(z_k - m)}, \qquad
    m = \max_d \max_{k \in d} z_k,
    $$

    where $d$ runs over the shards along `axis_name`. Each shard computes its block's max
    $m_d$ and sum $t_d = \sum_{k\in d}\exp(z_k - m_d)$ in one local pass; the max is
    all-reduced with `lax.pmax` (on stop-gradient values) and the normaliser
    $\sum_d t_d\, e^{m_d - m}$ with `lax.psum` (the merge of
    [`merge_partials`][jsoftmax.merge_partials]): two all-reduces of one scalar per row.
    The backward pass $\bar z = p \odot (g - \langle g, p\rangle)$ all-reduces one
    scalar per row, $\langle g, p\rangle$, and reuses the saved local probabilities.

    Args:
      x_shard: this device's block of logits, any rank >= 1; its `axis` holds a
        contiguous slice of the classes (shard `i` along `axis_name` holds classes
        `i * n_local` to `(i + 1) * n_local - 1`).
      axis_name: the mesh axis name (or tuple of names, major first, as in the
        `PartitionSpec`) that the softmax axis is split over.
      axis: the local softmax axis (or a tuple of axes normalised together).
      where: optional boolean mask broadcastable to `x_shard`; `False` entries get
        probability 0 and gradient 0.
      num_classes: the true number of classes when the split axis was padded at the
        end to a multiple of the shard count; classes with a global index
        `>= num_classes` are masked. Needs an int `axis`.

    Returns:
      This device's block of probabilities, shape and dtype of `x_shard`.

    Note:
      * Same edge-case behaviour as [`jsoftmax.softmax`][jsoftmax.softmax]: rows with
        no unmasked finite entry (on any shard) are all zeros with zero gradient;
        $+\infty$ or NaN in an unmasked entry makes the whole row NaN on every shard;
        float16/bfloat16 are computed in float32.
      * A `jax.custom_vjp`: reverse mode, and forward mode over it (`jax.hessian`).
      * Raises `ValueError` when `axis_name` is not bound, i.e. outside `jax.shard_map`.

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
    where: ArrayLike | None = None,
    *,
    num_classes: int | None = None,
) -> jax.Array:
    r"""Log-softmax over an axis split across devices; call inside `jax.shard_map`.

    $$
    y_i = (z_i - m) - \log\sum_d\sum_{k\in d}\exp(z_k - m), \qquad
    \bar z = g - p\sum_{d}\sum_{i \in d} g_i.
    $$

    Forward: two all-reduces of one scalar per row (max, sum of exponentials). Backward:
    one (the sum of the cotangent); the saved residual is the local block of
    log-probabilities.

    Args:
      x_shard: this device's contiguous block of logits (see [`softmax`][jsoftmax.sharded.softmax]).
      axis_name: the mesh axis name(s) the softmax axis is split over.
      axis: the local softmax axis (or a tuple of axes).
      where: optional boolean mask broadcastable to `x_shard`; masked entries give
        $-\infty$ and gradient 0.
      num_classes: the true class count when the split axis was padded at the end.

    Returns:
      This device's block of log-probabilities, shape and dtype of `x_shard`.

    Note:
      As [`jsoftmax.log_softmax`][jsoftmax.log_softmax]: masked and $-\infty$ entries
      give $-\infty$ (the cotangent arriving there is ignored); a row with no finite
      entry is $-\infty$ with zero gradient; $+\infty$/NaN give NaN.

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
