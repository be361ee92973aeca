r"""`linear_cross_entropy`: the output layer and the cross-entropy fused.

The logits `x @ w + b` of a large vocabulary are never built: the chunk loop of
[`jsoftmax._chunks`][jsoftmax._chunks] reduces each chunk of the vocabulary to the row
statistics of [`jsoftmax._kernel`][jsoftmax._kernel], merged across chunks; the label's
logit is read from its chunk's logits (the same values as the row maximum, so the loss
is never negative). A `jax.custom_vjp` saves only the inputs and per-row numbers; its
backward pass recomputes each chunk's logits and accumulates `dx`, `dw` and `db` from
the kernel's fused cotangent: the same formulas, and so the same option semantics, as
[`cross_entropy`][jsoftmax.cross_entropy].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jsoftmax import _checks, _chunks, _custom, _kernel
from jsoftmax._checks import Reduction
from jsoftmax._kernel import Flags


def check_inputs(x, w, bias, vocab_axis, *, w_name: str = "w", bias_name: str = "bias"):
    """`(x, w, bias, va)` checked: `x` `(..., H)`, `w` `(H, V)` (`va = 1`) or `(V, H)`
    (`va = 0`), `bias` `(V,)`."""
    if isinstance(vocab_axis, (bool, np.bool_)) or vocab_axis not in (0, 1, -1, -2):
        raise ValueError(
            f"vocab_axis must be 1 ({w_name} of shape (H, V)) or 0 ({w_name} of shape "
            f"(V, H)), got {vocab_axis!r}."
        )
    va = int(vocab_axis) % 2
    layout = "(H, V)" if va == 1 else "(V, H)"
    x = _checks.as_float_array(x, "x")
    w = _checks.floating_array(w, w_name, layout)
    if w.ndim != 2:
        raise ValueError(f"{w_name} must have shape {layout} (vocab_axis={va}), got {w.shape}.")
    if w.shape[1 - va] != x.shape[-1]:
        hint = " For tied embeddings of shape (V, H) pass vocab_axis=0." if va == 1 else ""
        raise ValueError(
            f"{w_name} must have shape {layout} with H = x.shape[-1] = {x.shape[-1]}, got "
            f"{w.shape}.{hint}"
        )
    vocab = w.shape[va]
    if bias is not None:
        bias = _checks.floating_array(bias, bias_name)
        if bias.shape != (vocab,):
            raise ValueError(
                f"{bias_name} must have one entry per class, shape ({vocab},), got {bias.shape}."
            )
    return x, w, bias, va


def check_int_labels(labels, x) -> jax.Array:
    """Integer class indices with `x`'s batch shape (`x` without its last axis)."""
    labels = _checks.as_array(labels, "labels")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices, got dtype {labels.dtype} "
            "(the fused losses take integer labels only)."
        )
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels must have x's batch shape {x.shape[:-1]} (x without its last axis), "
            f"got {labels.shape}."
        )
    return labels


def ce_forward(
    x,
    w,
    bias,
    idx,
    in_range,
    w_y,
    weights,
    row_ok,
    coefs,
    flags,
    size,
    va,
    cdt,
    limit=None,
    merge=None,
):
    """`(loss, ok, weight, row)`: the per-row fused cross-entropy of the labels at
    column `idx` of `w` (`(rows, 1)`), merged across chunks (and by `merge`, e.g. over
    devices). `ok` says which rows count, `weight` their weight in the mean."""
    coefs = _kernel.coefs_as(coefs, cdt)
    stats_fn = _chunks.ce_stats_fn(weights, flags, cdt)
    st = _chunks.scan_stats(x, w, bias, stats_fn, size, va, flags.softcap, cdt, limit=limit)
    label = _chunks.label_logits(x, w, bias, idx, va, flags.softcap, cdt, limit)
    st = st._replace(label=label, w_y=w_y)
    if merge is not None:
        st = merge(st)
    loss, excluded, row = _kernel.integer_loss(st, coefs, flags)
    loss = jnp.where(in_range, loss, jnp.full((), jnp.nan, cdt))
    ok = _kernel.both(row_ok, ~excluded | ~in_range)
    weight = _kernel.row_weight(ok, st.w_y, loss.shape, cdt)
    return _kernel.mask_rows(loss, ok), ok, weight, row


@partial(_custom.custom_vjp, nondiff_argnums=(7, 8, 9))
def _lce(x, w, bias, labels, weights, row_ok, coefs, flags: Flags, size: int, va: int):
    return _lce_fwd(x, w, bias, labels, weights, row_ok, coefs, flags, size, va)[0]


def _lce_fwd(x, w, bias, labels, weights, row_ok, coefs, flags, size, va):
    cdt = _chunks.compute_dtype(x, w)
    idx, in_range = _kernel.label_index(labels, w.shape[va], 1)
    w_y = None if weights is None else weights[idx].astype(cdt)
    ok = None if row_ok is None else row_ok[:, None]
    loss, ok, weight, row = ce_forward(
        x, w, bias, idx, in_range, w_y, weights, ok, coefs, flags, size, va, cdt
    )
    return (loss[:, 0], weight[:, 0]), (x, w, bias, labels, weights, ok, row)


def ce_backward(x, w, bias, idx, in_range, weights, ok, row, g, flags, size, va, limit=None):
    """The cotangents `(dx, dw, db, None, ...)` of a fused cross-entropy's inputs from the
    loss's cotangent `g` (per row), the merged `row` and the labels' columns `idx`."""
    cdt = _chunks.compute_dtype(x, w)
    g = _kernel.mask_rows(g.astype(cdt)[:, None], ok)
    grad_fn = _chunks.ce_grad_fn(idx, in_range, weights, row, g, ok, cdt)
    dx, dw, db = _chunks.scan_grads(x, w, bias, grad_fn, size, va, flags.softcap, cdt, limit)
    return dx.astype(x.dtype), dw, db, None, None, None, None


def _lce_bwd(flags, size, va, residuals, g):
    x, w, bias, labels, weights, ok, row = residuals
    idx, in_range = _kernel.label_index(labels, w.shape[va], 1)
    return ce_backward(x, w, bias, idx, in_range, weights, ok, row, g[0], flags, size, va)


_lce.defvjp(_lce_fwd, _lce_bwd)


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = None,
    weights: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    z_loss: float | ArrayLike = 0.0,
    logit_softcap: float | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    vocab_axis: int = 1,
) -> jax.Array:
    r"""Cross-entropy of the output layer `x @ w + bias` without building the logits.

    Equals `jsoftmax.cross_entropy(x @ w + bias, labels, ...)` with the same options
    (see [`cross_entropy`][jsoftmax.cross_entropy] for their definitions):

    $$
    \ell_r = \sum_i q_{ri}\,(\mathrm{lse}_r - s_{ri}) + c\,b_r\,\mathrm{lse}_r^2, \qquad
    s = \mathrm{softcap}(x w + b),
    $$

    but the $N \times V$ logits are never in memory: the vocabulary is processed in
    chunks of `chunk_size` columns, merged with the log-sum-exp merge
    ([`merge_partials`][jsoftmax.merge_partials]' rule). Reverse mode saves `x`, `w`,
    `bias`, `labels` and a few numbers per row; the backward pass recomputes each
    chunk's logits and accumulates $dx = g_s w_c^\top$, $dw_c = x^\top g_s$ and
    $db_c = \sum_r g_s$ from the fused cotangent $g_s = (\sum q + 2cb\,\mathrm{lse})\,p
    - q$. Memory beyond the inputs and `dw`: one chunk's logits
    (`N * chunk_size` float32 values) and $O(NH)$.

    Args:
      x: hidden states, shape `(..., H)`.
      w: the output layer's kernel, shape `(H, V)` (a Flax/Equinox `Linear` kernel), or
        `(V, H)` with `vocab_axis=0` (tied embeddings: pass the embedding table itself).
        Passing `embedding.T` also works, but XLA then makes one transposed copy of the
        table before the chunk loop; `vocab_axis=0` makes none.
      labels: integer class indices, shape `x.shape[:-1]`.
      bias: optional `(V,)`. $-\infty$ entries mark padded classes: they are excluded
        like masked classes (probability 0, zero gradients, no smoothing mass; a label
        on one makes the row not count), as a $-\infty$ logit in
        [`cross_entropy`][jsoftmax.cross_entropy].
      ignore_index: as in [`cross_entropy`][jsoftmax.cross_entropy].
      weights: as in [`cross_entropy`][jsoftmax.cross_entropy].
      label_smoothing: as in [`cross_entropy`][jsoftmax.cross_entropy] (a number or a
        traced scalar).
      z_loss: as in [`cross_entropy`][jsoftmax.cross_entropy] (a number or a traced
        scalar).
      logit_softcap: as in [`cross_entropy`][jsoftmax.cross_entropy].
      reduction: as in [`cross_entropy`][jsoftmax.cross_entropy].
      chunk_size: vocabulary columns per chunk. By default about `2**20` logits
        (4 MiB of float32) per chunk: the power of two nearest below
        `2**20 / rows`, clipped to `[128, 8192]` (512 columns for 2048 rows). `V` need
        not be a multiple of it.
      vocab_axis: the vocabulary axis of `w`: 1 (default, `(H, V)`) or 0 (`(V, H)`).
        `dw` comes back in `w`'s layout.

    Returns:
      The loss per row (shape `x.shape[:-1]`) or its sum or mean, in float32 for 16-bit
      inputs (else the inputs' dtype). Gradients come back in the dtypes of `x`, `w` and
      `bias`; 16-bit matmuls take their inputs as they are, with float32 accumulation.

    Note:
      * The loss is never negative: the label's logit is read from its chunk's logits,
        the values whose maximum normalises the row.
      * Out-of-range labels other than `ignore_index` raise `IndexError` when concrete
        and give a NaN row under `jax.jit`, as in [`cross_entropy`][jsoftmax.cross_entropy].
      * `weights` and `labels` are not differentiated.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> x = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 1000)) / 3
      >>> labels = jnp.array([3, 999, 0, 512])
      >>> fused = jsoftmax.linear_cross_entropy(x, w, labels, reduction="mean", chunk_size=128)
      >>> dense = jsoftmax.cross_entropy(x @ w, labels, reduction="mean")
      >>> print(bool(jnp.allclose(fused, dense, rtol=1e-6)))
      True
    """
    x, w, bias, va = check_inputs(x, w, bias, vocab_axis)
    labels = check_int_labels(labels, x)
    opts = _checks.loss_options(
        label_smoothing, z_loss, logit_softcap, ignore_index, reduction, labels.dtype
    )
    vocab = w.shape[va]
    weights = _checks.check_weights(weights, vocab)
    batch = x.shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    x2 = x.reshape(rows, x.shape[-1])
    lab = labels.reshape(rows)
    _checks.check_label_range(lab, vocab, opts.ignore_index)
    size = _chunks.chunk_size(chunk_size, rows, vocab)
    out_dtype = _chunks.compute_dtype(x, w)
    if rows == 0 or vocab == 0:
        per_row = jnp.zeros(batch, out_dtype)
        return per_row if opts.reduction == "none" else jnp.zeros((), out_dtype)
    row_ok = None if opts.ignore_index is None else lab != opts.ignore_index
    flags, coefs = _kernel.flags_and_coefs(opts, 1)
    per_row, weight = _lce(x2, w, bias, lab, weights, row_ok, coefs, flags, size, va)
    out = _kernel.reduce_rows(per_row, weight, opts.reduction)
    return out.reshape(batch) if opts.reduction == "none" else out
