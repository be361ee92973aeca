r"""`linear_cross_entropy`: the output layer and the cross-entropy fused.

The logits `x @ w + b` of a large vocabulary are never built. The forward pass loops
over chunks of the vocabulary (`lax.scan`): each chunk's logits are computed with
float32 accumulation, reduced to per-row statistics (row maximum and sum of
exponentials, merged across chunks with the log-sum-exp merge of
`jsoftmax._merge`) and dropped; the target logit comes from a gather of `w`'s
columns. A `jax.custom_vjp` saves only the inputs and per-row numbers; its
backward pass recomputes each chunk's logits and accumulates `dx`, `dw` and `db`
from the fused cotangent of `jsoftmax._losses`, the same formulas (and so the same
option semantics) as [`jsoftmax.cross_entropy`][].
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _custom, _formulas, _losses, _merge
from jsoftmax._checks import Reduction
from jsoftmax._softmax import _nonzero  # a row without any valid column: p = 0, loss +inf

# Elements of one chunk's logits: 2**20 float32 values (4 MiB), see _default_chunk.
_CHUNK_ELEMENTS = 1 << 20


def default_chunk_size(rows: int, vocab: int) -> int:
    """The default vocabulary chunk: about `2**20` logits (4 MiB in float32) per chunk.

    The power of two nearest below `2**20 / rows`, clipped to `[128, 8192]` and to
    the vocabulary size. E.g. 512 columns for 2048 rows, 128 for 8192 rows or more.
    """
    per_row = max(_CHUNK_ELEMENTS // max(rows, 1), 1)
    chunk = 1 << int(math.floor(math.log2(per_row)))
    return int(min(max(chunk, 128), 8192, vocab))


def _chunks(vocab: int, chunk: int) -> tuple[int, int]:
    """`(number of chunks, chunk)`; the last chunk is shifted back to end at `vocab`
    (its columns already covered by the previous chunk are skipped), so `w` is never
    padded or copied."""
    chunk = min(chunk, vocab)
    return -(-vocab // chunk), chunk


def _columns(k, vocab: int, chunk: int):
    """`(start, fresh)`: the first column of chunk `k` and which of its columns no
    earlier chunk covered, shape `(1, chunk)`."""
    start = jnp.minimum(k * chunk, vocab - chunk)
    cols = start + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    return start, cols, cols >= k * chunk


def _slice(a, start, chunk: int, axis: int):
    return lax.dynamic_slice_in_dim(a, start, chunk, axis=axis)


def _chunk_logits(x, w, bias, start, chunk: int, va: int, opts, cdt):
    """`softcap(x @ w[:, chunk] + b[chunk])` with `cdt` (float32 or wider) accumulation;
    `va` is the vocabulary axis of `w` (1 for `(H, V)`, 0 for `(V, H)`)."""
    z = lax.dot_general(
        x, _slice(w, start, chunk, va), (((1,), (1 - va,)), ((), ())), preferred_element_type=cdt
    )
    if bias is not None:
        z = z + _slice(bias, start, chunk, 0).astype(cdt)[None, :]
    return z if opts.softcap is None else _formulas.softcap(z, opts.softcap)


def _chunk_valid(bias, fresh, start, chunk: int, limit=None):
    """Columns that count in this chunk: fresh ones whose bias is not `-inf` (and, with
    `limit`, whose index is below it: the padding of a sharded vocabulary)."""
    if limit is not None:
        cols = start + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        fresh = fresh & (cols < limit)
    if bias is None:
        return fresh
    return fresh & (_slice(bias, start, chunk, 0) > -jnp.inf)[None, :]


def _chunk_weights(weights, valid, start, chunk: int, cdt):
    """The class weights of the chunk's valid columns (0 elsewhere); None for unit
    weights without padding."""
    if weights is None:
        return valid.astype(cdt)
    return jnp.where(valid, _slice(weights, start, chunk, 0).astype(cdt)[None, :], 0)


def _target_logit(x, w, bias, idx, va: int, opts, cdt):
    """`softcap(x_r . w[:, y_r] + b[y_r])` per row from a gather of `w`'s columns."""
    w_y = jnp.take(w, idx, axis=va)  # (H, N) or (N, H): O(N H)
    spec = "nh,hn->n" if va == 1 else "nh,nh->n"
    z = jnp.einsum(spec, x, w_y, preferred_element_type=cdt)
    if bias is not None:
        z = z + bias[idx].astype(cdt)
    z = z[:, None]
    return z if opts.softcap is None else _formulas.softcap(z, opts.softcap)


def _valid_totals(weights, bias, vocab: int, cdt, limit=None):
    """`(count, W)`: the number of valid columns (bias not `-inf`, index below
    `limit`) and their total class weight (`count` without weights)."""
    valid = None if bias is None else bias > -jnp.inf
    if limit is not None:
        below = jnp.arange(vocab) < limit
        valid = below if valid is None else valid & below
    count = jnp.asarray(vocab, cdt) if valid is None else jnp.sum(valid).astype(cdt)
    if weights is None:
        return count, count
    w = weights.astype(cdt)
    return count, jnp.sum(w if valid is None else jnp.where(valid, w, 0))


def _smoothing_totals(weights, bias, vocab: int, alpha: float, cdt):
    """`(k, W)` of `jsoftmax._losses.integer_loss` over the whole vocabulary."""
    count, total_w = _valid_totals(weights, bias, vocab, cdt)
    count = jnp.maximum(count, 1)
    total_w = count if weights is None else total_w
    return _formulas.smoothing_mass(alpha, count), total_w


def _varying_axes(a) -> frozenset:
    """The mesh axes `a` varies over inside `jax.shard_map` (empty outside)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _vary_like(tree, ref):
    """`tree` cast to vary over the mesh axes `ref` varies over inside
    `jax.shard_map` (the carries of a scan over one shard's columns); unchanged
    elsewhere."""
    axes = tuple(sorted(_varying_axes(ref)))
    return lax.pcast(tree, axes, to="varying") if axes else tree


def _compute_dtype(x, w) -> np.dtype:
    return np.dtype(_checks.accumulation_dtype(jnp.promote_types(x.dtype, w.dtype)))


@partial(_custom.custom_vjp, nondiff_argnums=(7, 8, 9))
def _lce(x, w, bias, labels, weights, row_ok, row_w, opts, chunk: int, va: int) -> jax.Array:
    return _lce_fwd(x, w, bias, labels, weights, row_ok, row_w, opts, chunk, va)[0]


def forward_stats(x, w, bias, weights, centre, opts, chunk: int, va: int, cdt, limit=None):
    """Per-row `(m, total, centred)` over `w`'s columns, one chunk at a time.

    `m` and `total` are the row maximum and sum of exponentials of the (soft-capped)
    logits of the valid columns, merged across chunks by
    `jsoftmax._merge.merge_running`; with label smoothing `centred` is
    `jsoftmax._losses.smoothing_sum` centred on the per-row `centre` (else 0).
    `w` may be one shard of a vocabulary split over devices: `limit` then excludes
    its columns at or past it (padding). All `(rows, 1)`.
    """
    rows, vocab = x.shape[0], w.shape[va]
    n_chunks, chunk = _chunks(vocab, chunk)

    def body(carry, k):
        running, centred = carry
        start, _, fresh = _columns(k, vocab, chunk)
        u = _chunk_logits(x, w, bias, start, chunk, va, opts, cdt)
        valid = _chunk_valid(bias, fresh, start, chunk, limit)
        s = jnp.where(valid, u, -jnp.inf)
        m = jnp.max(s, axis=1, keepdims=True, initial=jnp.finfo(cdt).min)
        total = jnp.sum(jnp.exp(s - m), axis=1, keepdims=True)
        running = _merge.merge_running(running, (lax.stop_gradient(m), total))
        if opts.alpha:
            w_c = None if weights is None else _chunk_weights(weights, valid, start, chunk, cdt)
            centred = centred + _losses.smoothing_sum(u, centre, valid, w_c, 1)
        return (running, centred), None

    init = _vary_like((_merge.empty_stats((rows, 1), cdt), jnp.zeros((rows, 1), cdt)), w)
    ((m, total), centred), _ = lax.scan(body, init, jnp.arange(n_chunks))
    return m, total, centred


def _lce_fwd(x, w, bias, labels, weights, row_ok, row_w, opts, chunk, va):
    cdt = _compute_dtype(x, w)
    vocab = w.shape[va]
    idx, in_range = _losses._label_index(labels, vocab, 1)
    s_label = _target_logit(x, w, bias, idx[:, 0], va, opts, cdt)
    row_w_k = None if row_w is None else row_w[:, None].astype(cdt)
    m, total, centred = forward_stats(x, w, bias, weights, s_label, opts, chunk, va, cdt)
    log_total = jnp.log(_nonzero(total))
    smooth = None
    if opts.alpha:
        k, total_w = _smoothing_totals(weights, bias, vocab, opts.alpha, cdt)
        smooth = (k, total_w, centred)
    loss = _losses.integer_loss(log_total, m, s_label, in_range, row_w_k, smooth, opts)
    out = _losses._mask_rows(loss[:, 0], row_ok)
    return out, (x, w, bias, labels, weights, row_ok, row_w, m, total)


def _lce_bwd(opts, chunk, va, residuals, g):
    x, w, bias, labels, weights, row_ok, row_w, m, total = residuals
    cdt = _compute_dtype(x, w)
    vocab = w.shape[va]
    idx, in_range = _losses._label_index(labels, vocab, 1)
    row_w_k = None if row_w is None else row_w[:, None].astype(cdt)
    g = _losses._mask_rows(g.astype(cdt), row_ok)[:, None]
    ok = None if row_ok is None else row_ok[:, None]
    k_w = _smoothing_totals(weights, bias, vocab, opts.alpha, cdt) if opts.alpha else None
    dx, dw, db = backward_sums(
        x, w, bias, weights, idx, in_range, row_w_k, g, ok, m, total, k_w, opts, chunk, va, cdt
    )
    return dx.astype(x.dtype), dw, db, None, None, None, None


def backward_sums(
    x,
    w,
    bias,
    weights,
    idx,
    in_range,
    row_w,
    g,
    ok,
    m,
    total,
    k_w,
    opts,
    chunk,
    va,
    cdt,
    limit=None,
):
    """`(dx, dw, db)` accumulated over `w`'s columns, one chunk at a time, from the
    fused cotangent `jsoftmax._losses.integer_cotangent` with the row statistics
    `m`, `total` (of the whole vocabulary) and the label's column `idx` in this
    `w` (-1: none). `dx` is in `cdt`: for a shard of a split vocabulary it is this
    shard's part, to be summed over the shards. All per-row arguments are `(rows, 1)`;
    `g` is the loss's cotangent, 0 where the row does not count (`ok`)."""
    vocab = w.shape[va]
    n_chunks, chunk = _chunks(vocab, chunk)
    lse = m + jnp.log(_nonzero(total)) if opts.z_loss else None
    inv_total = 1 / _nonzero(total)

    def body(carry, k):
        dx, dw, db = carry
        start, cols, fresh = _columns(k, vocab, chunk)
        u = _chunk_logits(x, w, bias, start, chunk, va, opts, cdt)
        valid = _chunk_valid(bias, fresh, start, chunk, limit)
        p = jnp.exp(jnp.where(valid, u, -jnp.inf) - m) * inv_total
        onehot = (cols == idx) & fresh
        smooth = None
        if opts.alpha:
            smooth = (k_w[0], k_w[1], _chunk_weights(weights, valid, start, chunk, cdt))
        g_s = _losses.integer_cotangent(p, onehot, in_range, row_w, smooth, lse, opts) * g
        # Selects: skipped columns, and rows that do not count, get exactly 0.
        g_s = jnp.where(valid, g_s, jnp.zeros((), cdt))
        g_s = _losses._mask_rows(g_s, ok)
        if opts.softcap is not None:
            g_s = g_s * _formulas.softcap_derivative(u, opts.softcap)
        # The matmuls take the inputs' dtype with float32 accumulation (no float32 GEMM
        # for 16-bit inputs).
        g_in = g_s.astype(jnp.promote_types(x.dtype, w.dtype))
        w_c = _slice(w, start, chunk, va)
        dims = (((1,), (va,)), ((), ()))
        dx = dx + lax.dot_general(g_in, w_c, dims, preferred_element_type=cdt)
        a, b = (x, g_in) if va == 1 else (g_in, x)  # dw_c = x^T g_s in w's layout
        dw_c = lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=cdt)
        dw_c = (_slice(dw, start, chunk, va).astype(cdt) + dw_c).astype(dw.dtype)
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=va)
        if db is not None:
            db_c = (_slice(db, start, chunk, 0).astype(cdt) + jnp.sum(g_s, axis=0)).astype(db.dtype)
            db = lax.dynamic_update_slice_in_dim(db, db_c, start, axis=0)
        return (dx, dw, db), None

    init = (
        jnp.zeros(x.shape, cdt),
        jnp.zeros(w.shape, w.dtype),
        None if bias is None else jnp.zeros(bias.shape, bias.dtype),
    )
    (dx, dw, db), _ = lax.scan(body, _vary_like(init, w), jnp.arange(n_chunks))
    return dx, dw, db


_lce.defvjp(_lce_fwd, _lce_bwd)


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def _check_inputs(x, w, labels, bias, vocab_axis):
    if isinstance(vocab_axis, (bool, np.bool_)) or vocab_axis not in (0, 1, -1, -2):
        raise ValueError(
            f"vocab_axis must be 1 (w of shape (H, V)) or 0 (w of shape (V, H)), "
            f"got {vocab_axis!r}."
        )
    va = int(vocab_axis) % 2
    layout = "(H, V)" if va == 1 else "(V, H)"
    x = _checks.as_float_array(x, "x")
    w = _checks.as_array(w, "w")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"w must be a real floating array {layout}, got dtype {w.dtype}.")
    if w.ndim != 2:
        raise ValueError(f"w must have shape {layout} (vocab_axis={va}), got {w.shape}.")
    if w.shape[1 - va] != x.shape[-1]:
        hint = " For tied embeddings of shape (V, H) pass vocab_axis=0." if va == 1 else ""
        raise ValueError(
            f"w must have shape {layout} with H = x.shape[-1] = {x.shape[-1]}, got {w.shape}.{hint}"
        )
    labels = _checks.as_array(labels, "labels")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"labels must be integer class indices, got dtype {labels.dtype} "
            "(linear_cross_entropy takes integer labels only)."
        )
    if labels.shape != x.shape[:-1]:
        raise ValueError(
            f"labels must have x's batch shape {x.shape[:-1]} (x without its last axis), "
            f"got {labels.shape}."
        )
    vocab = w.shape[va]
    if bias is not None:
        bias = _checks.as_array(bias, "bias")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be a real floating array, got dtype {bias.dtype}.")
        if bias.shape != (vocab,):
            raise ValueError(
                f"bias must have one entry per class, shape ({vocab},), got {bias.shape}."
            )
    return x, w, labels, bias, va


def _check_chunk_size(chunk_size, rows: int, vocab: int) -> int:
    if chunk_size is None:
        return default_chunk_size(rows, vocab)
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be None or a positive int, got {chunk_size!r}.")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}.")
    return int(min(chunk_size, vocab))


def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = None,
    weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    vocab_axis: int = 1,
) -> jax.Array:
    r"""Cross-entropy of the output layer `x @ w + bias` without building the logits.

    Equals `jsoftmax.cross_entropy(x @ w + bias, labels, ...)` with the same options
    (see [`jsoftmax.cross_entropy`][] for their definitions):

    $$
    \ell_r = \sum_i q_{ri}\,(\mathrm{lse}_r - s_{ri}) + c\,\mathrm{lse}_r^2, \qquad
    s = \mathrm{softcap}(x w + b),
    $$

    but the $N \times V$ logits are never in memory: the vocabulary is processed
    in chunks of `chunk_size` columns, merged with the log-sum-exp merge
    ([`jsoftmax.merge_partials`][]' rule). Reverse mode saves `x`, `w`, `bias`,
    `labels` and two numbers per row; the backward pass recomputes each chunk's logits
    and accumulates $dx = g_s w_c^\top$, $dw_c = x^\top g_s$ and
    $db_c = \sum_r g_s$ from the fused cotangent
    $g_s = (\sum q + 2c\,\mathrm{lse})\,p - q$. Memory beyond the inputs and
    `dw`: one chunk's logits (`N * chunk_size` float32 values) and O(N H).

    Args:
      x: hidden states, shape `(..., H)`.
      w: the output layer's kernel, shape `(H, V)` (a Flax/Equinox `Linear` kernel),
        or `(V, H)` with `vocab_axis=0` (tied embeddings: pass the embedding table
        itself). Passing `embedding.T` also works, but XLA then makes one transposed
        copy of the table before the chunk loop; `vocab_axis=0` makes none.
      labels: integer class indices, shape `x.shape[:-1]`.
      bias: optional `(V,)`. `-inf` entries mark padded classes: they are excluded
        like masked classes (probability 0, zero gradients, no smoothing mass; a label
        on one makes the row not count).
      ignore_index: as in [`jsoftmax.cross_entropy`][].
      weights: as in [`jsoftmax.cross_entropy`][].
      label_smoothing: as in [`jsoftmax.cross_entropy`][].
      z_loss: as in [`jsoftmax.cross_entropy`][].
      logit_softcap: as in [`jsoftmax.cross_entropy`][].
      reduction: as in [`jsoftmax.cross_entropy`][].
      chunk_size: vocabulary columns per chunk. Default: about `2**20` logits (4 MiB of
        float32) per chunk, the power of two nearest below `2**20 / N` clipped to
        `[128, 8192]` and to `V`. `V` need not be a multiple of it.
      vocab_axis: the vocabulary axis of `w`: 1 (default, `(H, V)`) or 0
        (`(V, H)`). `dw` comes back in `w`'s layout.

    Returns:
      The loss per row (shape `x.shape[:-1]`) or its sum or mean, in float32 for
      16-bit inputs (else the inputs' dtype). Gradients come back in the dtypes of
      `x`, `w` and `bias`; 16-bit matmuls take their inputs as they are, with
      float32 accumulation.

    Note:
      * Out-of-range labels other than `ignore_index` raise `IndexError` when
        concrete and give a NaN row under `jax.jit`, as in
        [`jsoftmax.cross_entropy`][].
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
    x, w, labels, bias, va = _check_inputs(x, w, labels, bias, vocab_axis)
    reduction = _checks.check_reduction(reduction)
    ignore_index = _losses._check_ignore_index(ignore_index)
    alpha = _losses._check_label_smoothing(label_smoothing)
    c = _losses._check_z_loss(z_loss)
    cap = _losses._check_softcap(logit_softcap)
    vocab = w.shape[va]
    weights = _losses._check_weights(weights, vocab)
    batch = x.shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    x2 = x.reshape(rows, x.shape[-1])
    lab = labels.reshape(rows)
    _losses.check_label_range(lab, vocab, ignore_index)
    chunk = _check_chunk_size(chunk_size, rows, vocab) if vocab else 1
    out_dtype = _compute_dtype(x, w)
    if rows == 0 or vocab == 0:
        per_row = jnp.zeros(batch, out_dtype)
        return per_row if reduction == "none" else jnp.zeros((), out_dtype)
    label_ok = None
    if bias is not None:  # a label on a padded (-inf bias) class: the row does not count
        label_ok = (bias > -jnp.inf)[jnp.clip(lab, 0, vocab - 1)]
    row_ok, row_w = _losses._row_weights(
        lab, None, None, weights, ignore_index, 0, vocab, label_ok=label_ok
    )
    opts = _losses._Options(1, alpha, c, cap)
    per_row = _lce(x2, w, bias, lab, weights, row_ok, row_w, opts, chunk, va)
    out = _losses.reduce_rows(per_row, row_ok, row_w, reduction)
    return out.reshape(batch) if reduction == "none" else out
