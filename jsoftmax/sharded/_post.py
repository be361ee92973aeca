"""`linear_token_log_probs` with the vocabulary split over devices (inside `shard_map`):
each device runs the chunk loop over its columns; the devices merge per-row statistics
(one `pmax`, one `psum`); the backward pass is local except for `dx`."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jsoftmax import _checks, _chunks, _custom, _kernel, _linear_post
from jsoftmax.sharded import _common
from jsoftmax.sharded._common import AxisName


@partial(_custom.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _lp(x, w, bias, labels, t, cap, with_entropy, axis_name, size, n_classes):
    return _lp_fwd(x, w, bias, labels, t, cap, with_entropy, axis_name, size, n_classes)[0]


def _lp_fwd(x, w, bias, labels, t, cap, with_entropy, axis_name, size, n_classes):
    idx, in_range, limit = _common.label_layout(labels, w.shape[1], axis_name, n_classes)
    t_c = None if t is None else t.astype(_chunks.compute_dtype(x, w))
    merge = partial(_kernel.merge_devices, axis_name=axis_name, temperature=t_c)
    args = (idx, in_range, t, cap, with_entropy, size, 1, limit, merge)
    out, stats = _linear_post.lp_forward(x, w, bias, *args)
    return out, (x, w, bias, labels, t, stats)


def _lp_bwd(cap, with_entropy, axis_name, size, n_classes, residuals, g):
    # dw and db stay on their shard; dx is this shard's part (summed over the shards by
    # the transpose of the varying cast in the caller).
    x, w, bias, labels, t, stats = residuals
    idx, in_range, limit = _common.label_layout(labels, w.shape[1], axis_name, n_classes)
    args = (idx, in_range, t, cap, g, stats, size, 1, limit)
    dx, dw, db = _linear_post.lp_backward(x, w, bias, *args)
    return dx, dw, db, None, None


_lp.defvjp(_lp_fwd, _lp_bwd)


def linear_token_log_probs(
    x: ArrayLike,
    w_shard: ArrayLike,
    labels: ArrayLike,
    axis_name: AxisName,
    *,
    bias_shard: ArrayLike | None = None,
    num_classes: int | None = None,
    temperature: ArrayLike | None = None,
    logit_softcap: float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""[`linear_token_log_probs`][jsoftmax.linear_token_log_probs] with the vocabulary
    split over devices (tensor parallelism of the output layer); call inside
    `jax.shard_map`.

    The kernel `w` of shape `(H, V)` is split along `V` over `axis_name` (and `bias`
    alike); every shard holds the same rows of `x`. Each device reduces its columns to
    per-row statistics in chunks; the devices exchange only per-row numbers: one
    all-reduce of the row maxima, one carrying the rescaled sums of exponentials, the
    label's logit (from the shard holding it) and, for the entropy, the softmax-weighted
    sums of the logits. Backward: each shard recomputes its chunks and accumulates `dw`
    and `db` for its columns and its part of `dx`, summed over `axis_name`.

    Args:
      x: hidden states, `(..., H)`, the same on every shard of `axis_name`.
      w_shard: this shard's block of the kernel, `(H, V_local)` (`in_specs`
        `P(None, axis_name)`).
      labels: integer **global** class indices, shape `x.shape[:-1]`.
      axis_name: the mesh axis name(s) the vocabulary is split over.
      bias_shard: optional `(V_local,)`, split like `w`.
      num_classes: the true vocabulary size when `V` was padded at the end to a
        multiple of the shard count (padded columns are excluded).
      temperature: None (1), a positive number, or an array broadcastable to
        `x.shape[:-1]`; not differentiated.
      logit_softcap: None or $\kappa > 0$.
      return_entropy: also return the entropy per row.
      chunk_size: vocabulary columns per chunk of the local loop.

    Returns:
      The log-probabilities (shape `x.shape[:-1]`), and with `return_entropy` the pair
      `(log_probs, entropy)`; the same on every shard; float32 for 16-bit inputs.

    Note:
      * Labels are traced: an out-of-range label gives a NaN row, never an error.
      * Needs `jax.shard_map`'s default `check_vma=True` (the sum of `dx` over
        `axis_name` is derived from it).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import jsoftmax
      >>> from jsoftmax import sharded
      >>> mesh = jax.make_mesh((1,), ("vocab",))
      >>> x = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 1000)) / 3
      >>> y = jnp.array([3, 999, 0, 512])
      >>> f = jax.jit(jax.shard_map(
      ...     lambda x, w, y: sharded.linear_token_log_probs(x, w, y, "vocab"),
      ...     mesh=mesh, in_specs=(P(), P(None, "vocab"), P()), out_specs=P()))
      >>> w_split = jax.device_put(w, jax.NamedSharding(mesh, P(None, "vocab")))
      >>> lp = f(x, w_split, y)
      >>> print(bool(jnp.allclose(lp, jsoftmax.token_log_probs(x @ w, y), rtol=1e-5)))
      True
    """
    inputs = (x, w_shard, bias_shard, labels, axis_name, num_classes, chunk_size)
    f = _common.fused_inputs(*inputs, "linear_token_log_probs", "the log-probabilities are")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}.")
    cap = _checks.loss_options(logit_softcap=logit_softcap).logit_softcap
    t = _linear_post.row_temperature(temperature, f.batch)
    args = (f.x, f.w, f.bias, f.labels, t, cap, return_entropy)
    if f.x.shape[0] == 0:  # no rows: the chunk loop would have nothing to carry
        lp = h = jnp.zeros((0,), _chunks.compute_dtype(f.x, f.w))
    else:
        lp, h = _lp(*args, f.axis_name, f.size, f.n_classes)
    if not return_entropy:
        return lp.reshape(f.batch)
    assert h is not None
    return lp.reshape(f.batch), h.reshape(f.batch)
