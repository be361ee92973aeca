r"""Post-training losses fused with the output layer: token log-probabilities with the
entropy, and the distillation divergence, without the $N \times V$ logits.

The chunk loop of [`jsoftmax._chunks`][jsoftmax._chunks] reduces each chunk of the
vocabulary to the per-row statistics of [`jsoftmax._kernel`][jsoftmax._kernel]; the
backward passes recompute each chunk's logits and accumulate `dx`, `dw` and `db` from
the formulas of [`jsoftmax._formulas`][jsoftmax._formulas], as the dense functions of
`jsoftmax._post` do on whole rows.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _chunks, _custom, _formulas, _kernel, _linear, _merge, _pass, _post
from jsoftmax._checks import Reduction

# --------------------------------------------------------------------------------------
# Token log-probabilities (shared with jsoftmax.sharded.linear_token_log_probs).
# --------------------------------------------------------------------------------------


def lp_forward(x, w, bias, idx, in_range, t, cap, with_entropy, size, va, limit=None, merge=None):
    """`((log p_y, entropy or None), row numbers)`, one number a row, of the labels at
    column `idx` of `w` (-1: another shard's; NaN where `in_range` is False), merged
    across chunks and by `merge`; `t` the `(rows, 1)` temperature or None."""
    cdt = _chunks.compute_dtype(x, w)
    t = None if t is None else t.astype(cdt)

    def stats_fn(c, u):
        fp = _pass.exp_pass(u, None, (1,), t)
        return _kernel.piece_stats(fp, (1,), entropy=with_entropy)

    st = _chunks.scan_stats(x, w, bias, stats_fn, size, va, cap, cdt, t, limit)
    st = st._replace(label=_chunks.label_logits(x, w, bias, idx, va, cap, cdt, limit))
    if merge is not None:
        st = merge(st)
    lp, excluded = _kernel.log_prob(st, t)
    lp = jnp.where(in_range, lp, jnp.full((), jnp.nan, cdt))
    h = _kernel.entropy(st, t)[:, 0] if with_entropy else None
    mean_gap = _kernel.mean_gap(st) if with_entropy else None
    return (lp[:, 0], h), (st.m, _merge.log_total(st.total), mean_gap, excluded)


def lp_backward(x, w, bias, idx, in_range, t, cap, g, stats, size, va, limit=None):
    """`(dx, dw, db)` of `g[0] * log p_y + g[1] * H` (`g[1]` None without the entropy;
    NaN where `in_range` is False)."""
    cdt = _chunks.compute_dtype(x, w)
    t = None if t is None else t.astype(cdt)
    m, log_total, mean_gap, excluded = stats
    row = _kernel.Row(m, log_total, None, None, None)
    g_lp = jnp.where(in_range, g[0].astype(cdt)[:, None], jnp.full((), jnp.nan, cdt))
    g_lp = jnp.where(excluded, jnp.zeros((), cdt), g_lp)  # log p_y = -inf: a constant
    g_h = None if g[1] is None else g[1].astype(cdt)[:, None]

    def grad_fn(c, u, valid):
        p = _kernel.probs(u, row, t)
        g_s = _formulas.log_prob_cotangent(p, c.onehot(idx), g_lp)
        if g_h is not None:
            centred = jnp.where(valid, u - m - mean_gap, jnp.zeros((), cdt))
            centred = centred if t is None else centred / t
            g_s = g_s + _formulas.entropy_cotangent(p, centred, g_h)
        return g_s if t is None else g_s / t

    dx, dw, db = _chunks.scan_grads(x, w, bias, grad_fn, size, va, cap, cdt, limit)
    return dx.astype(x.dtype), dw, db


def row_temperature(temperature, batch):
    """None, or a positive `(rows, 1)` array (not differentiated)."""
    if temperature is None:
        return None
    t = _checks.prepare_temperature(temperature, batch + (1,), (len(batch),))
    if t is None:
        return None
    return lax.stop_gradient(t.reshape(-1, 1))


@partial(_custom.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _lp(x, w, bias, labels, t, cap, with_entropy, size, va):
    return _lp_fwd(x, w, bias, labels, t, cap, with_entropy, size, va)[0]


def _lp_fwd(x, w, bias, labels, t, cap, with_entropy, size, va):
    idx, in_range = _kernel.label_index(labels, w.shape[va], 1)
    out, stats = lp_forward(x, w, bias, idx, in_range, t, cap, with_entropy, size, va)
    return out, (x, w, bias, labels, t, stats)


def _lp_bwd(cap, with_entropy, size, va, residuals, g):
    x, w, bias, labels, t, stats = residuals
    idx, in_range = _kernel.label_index(labels, w.shape[va], 1)
    dx, dw, db = lp_backward(x, w, bias, idx, in_range, t, cap, g, stats, size, va)
    return dx, dw, db, None, None


_lp.defvjp(_lp_fwd, _lp_bwd)


def linear_token_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: ArrayLike | None = None,
    logit_softcap: float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_axis: int = 1,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""[`token_log_probs`][jsoftmax.token_log_probs] of the output layer `x @ w + bias`,
    without building the logits.

    The vocabulary is visited in chunks (as by
    [`linear_cross_entropy`][jsoftmax.linear_cross_entropy]): each chunk's logits are
    reduced to the row maximum, the sum of exponentials and, for the entropy, the
    softmax-weighted sum of the logits, merged across chunks; the label's logit is
    gathered ($O(NH)$). A `jax.custom_vjp` keeps the inputs and three numbers per row;
    the backward pass recomputes each chunk's logits and accumulates `dx`, `dw` and `db`
    from $g_{\log p}(e_y - p) - g_H\,p\odot(s - \langle p, s\rangle)$, divided by $T$.
    Memory beyond the inputs and `dw`: one chunk of logits.

    Args:
      x: hidden states, shape `(..., H)`.
      w: the output layer's kernel, `(H, V)`, or `(V, H)` with `vocab_axis=0`.
      labels: integer class indices (the sampled tokens), shape `x.shape[:-1]`.
      bias: optional `(V,)`; $-\infty$ entries are excluded classes.
      temperature: None (1), a positive number, or an array broadcastable to
        `x.shape[:-1]`; not differentiated.
      logit_softcap: None or $\kappa > 0$.
      return_entropy: also return the entropy per row.
      chunk_size: vocabulary columns per chunk (by default about `2**20` logits).
      vocab_axis: the vocabulary axis of `w`.

    Returns:
      The log-probabilities (shape `x.shape[:-1]`), and with `return_entropy` the pair
      `(log_probs, entropy)`; float32 for 16-bit inputs. Gradients in `x`, `w`, `bias`.

    Note:
      * A log-probability is never above 0: the gathered label logit (which rounds
        differently from a chunk's matmul) is clamped to the row maximum.
      * A label on an excluded class gives $-\infty$ with zero gradients from it.
        Out-of-range labels raise `IndexError` when concrete, and give NaN under
        `jax.jit`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> x = jax.random.normal(jax.random.key(0), (4, 8))
      >>> w = jax.random.normal(jax.random.key(1), (8, 1000)) / 3
      >>> y = jnp.array([3, 999, 0, 512])
      >>> fused = jsoftmax.linear_token_log_probs(x, w, y, chunk_size=128)
      >>> dense = jsoftmax.token_log_probs(x @ w, y)
      >>> print(bool(jnp.allclose(fused, dense, rtol=1e-5)))
      True
    """
    x, w, bias, va = _linear.check_inputs(x, w, bias, vocab_axis)
    labels = _linear.check_int_labels(labels, x)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}.")
    cap = _checks.loss_options(logit_softcap=logit_softcap).logit_softcap
    vocab = w.shape[va]
    batch = x.shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    t = row_temperature(temperature, batch)
    lab = labels.reshape(rows)
    _checks.check_label_range(lab, vocab, None)
    size = _chunks.chunk_size(chunk_size, rows, vocab)
    cdt = _chunks.compute_dtype(x, w)
    if rows == 0 or vocab == 0:
        zeros = jnp.zeros(batch, cdt)
        return (zeros, zeros) if return_entropy else zeros
    lp, h = _lp(x.reshape(rows, -1), w, bias, lab, t, cap, return_entropy, size, va)
    if not return_entropy:
        return lp.reshape(batch)
    assert h is not None
    return lp.reshape(batch), h.reshape(batch)


# --------------------------------------------------------------------------------------
# The distillation divergence.
# --------------------------------------------------------------------------------------


def _teacher_logits(c, teacher, va, cdt):
    tx, tw, tb = teacher
    return c.logits(lax.stop_gradient(tx), lax.stop_gradient(tw), tb, va, None, cdt)


def _kl_stats(x, w, bias, teacher, beta, t, size, va, cdt):
    r"""`(value, (student row, teacher row, kl_s))` per row.

    For $\beta \in \{0, 1\}$ one pass over the chunks: the log-sum-exps of both models
    and the cross sum $\sum_i e^{(a_i - M_a)/T}(a_i - b_i)$ of the model the
    divergence weights by ($a$ the teacher for $\beta = 0$, the student for
    $\beta = 1$), merged like the sums of exponentials. Otherwise two passes: the
    log-sum-exps, then the divergence's terms (they need $\log m$, a function of both
    rows' log-sum-exps).
    """
    single = beta in (0.0, 1.0)

    def lse_fn(c, u):
        fp_s = _pass.exp_pass(u, None, (1,), t)
        fp_t = _pass.exp_pass(_teacher_logits(c, teacher, va, cdt), None, (1,), t)
        stats = _kernel.piece_stats(fp_s, (1,)), _kernel.piece_stats(fp_t, (1,))
        if not single:
            return stats
        a, b = (fp_t, fp_s) if beta == 0.0 else (fp_s, fp_t)
        # The select inside the product: where a.e is 0, a.u - b.u may be -inf - -inf,
        # and a NaN there would reach the second derivative through the product's rule.
        cross = a.e * jnp.where(a.e > 0, a.u - b.u, jnp.zeros((), cdt))
        return stats + (jnp.sum(cross, 1, keepdims=True),)

    def merge(p, q):
        merged = tuple(_kernel.merge_pair(a, b, t) for a, b in zip(p[:2], q[:2], strict=True))
        if not single:
            return merged
        k = 1 if beta == 0.0 else 0  # the weighting model's statistics
        m_new = merged[k].m
        cross = _merge_rescale(p[k].m, p[2], m_new, t) + _merge_rescale(q[k].m, q[2], m_new, t)
        return merged + (cross,)

    out = _chunks.scan_stats(x, w, bias, lse_fn, size, va, None, cdt, merge=merge)
    st_s, st_t = out[0], out[1]
    rows = tuple(_kernel.Row(st.m, _merge.log_total(st.total), None, None, None)
                 for st in (st_s, st_t))  # fmt: skip
    if single:
        a, b = (st_t, st_s) if beta == 0.0 else (st_s, st_t)
        value = _formulas.kl_from_cross(
            out[2], a.total, _kernel.lse_of(a, t), _kernel.lse_of(b, t), t
        )
        return value, (rows, value if beta == 1.0 else None)

    def terms_fn(c, u):
        log_ps, log_pt = _log_probs(c, u, rows, teacher, t, va, cdt)
        terms, kl_s = _formulas.divergence_terms(log_ps, log_pt, beta)
        assert kl_s is not None
        return jnp.sum(terms, 1, keepdims=True), jnp.sum(kl_s, 1, keepdims=True)

    add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731
    value, kl_s = _chunks.scan_stats(x, w, bias, terms_fn, size, va, None, cdt, merge=add)
    return value, (rows, kl_s)


def _merge_rescale(m, value, m_new, t):
    return _merge.rescale(m, value, m_new, t)


def _log_probs(c, u, rows, teacher, t, va, cdt):
    row_s, row_t = rows
    log_ps = _pass.shifted(u, row_s.m, t) - row_s.log_total
    u_t = _teacher_logits(c, teacher, va, cdt)
    log_pt = _pass.shifted(u_t, row_t.m, t) - row_t.log_total
    return log_ps, log_pt


@partial(_custom.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _kl(x, w, bias, tx, tw, tb, row_ok, beta, t, size, va):
    return _kl_fwd(x, w, bias, tx, tw, tb, row_ok, beta, t, size, va)[0]


def _kl_fwd(x, w, bias, tx, tw, tb, row_ok, beta, t, size, va):
    cdt = _chunks.compute_dtype(x, w)
    t_c = None if t is None else jnp.asarray(t, cdt)
    value, stats = _kl_stats(x, w, bias, (tx, tw, tb), beta, t_c, size, va, cdt)
    ok = None if row_ok is None else row_ok[:, None]
    value = _kernel.mask_rows(value, ok)
    return value[:, 0], (x, w, bias, tx, tw, tb, ok, stats)


def _kl_bwd(beta, t, size, va, residuals, g):
    x, w, bias, tx, tw, tb, ok, (rows, kl_s) = residuals
    cdt = _chunks.compute_dtype(x, w)
    t_c = None if t is None else jnp.asarray(t, cdt)
    g = _kernel.mask_rows(g.astype(cdt)[:, None], ok)

    def grad_fn(c, u, valid):
        log_ps, log_pt = _log_probs(c, u, rows, (tx, tw, tb), t_c, va, cdt)
        g_s = _formulas.divergence_cotangent(log_ps, log_pt, kl_s, beta) * g
        return g_s if t_c is None else g_s / t_c

    dx, dw, db = _chunks.scan_grads(x, w, bias, grad_fn, size, va, None, cdt)
    return dx.astype(x.dtype), dw, db, None, None, None, None


_kl.defvjp(_kl_fwd, _kl_bwd)


@partial(_custom.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _kl_total(x, w, bias, tx, tw, tb, row_ok, beta, t, rows, va):
    return _kl_rows(x, w, bias, tx, tw, tb, row_ok, beta, t, rows, va, grads=False)[0]


def _kl_rows(x, w, bias, tx, tw, tb, row_ok, beta, t, rows, va, grads=True):
    """The divergence summed over the rows that count, and its gradients, in one pass over
    chunks of whole rows (`jsoftmax._chunks.scan_rows`)."""
    cdt = _chunks.compute_dtype(x, w)
    tx, tw, tb = (lax.stop_gradient(a) for a in (tx, tw, tb))
    ok = jnp.ones(x.shape[:1], bool) if row_ok is None else row_ok

    def rows_fn(u, pad_ok, ex):
        tx_c, ok_c = ex
        u_t = _chunks.row_logits(tx_c, tw, tb, va, cdt)
        return _post.kl_rows(u, u_t, (pad_ok & ok_c)[:, None], beta, t)

    return _chunks.scan_rows(x, w, bias, rows_fn, rows, va, cdt, (tx, ok), grads)


def _kl_total_fwd(x, w, bias, tx, tw, tb, row_ok, beta, t, rows, va):
    total, dx, dw, db = _kl_rows(x, w, bias, tx, tw, tb, row_ok, beta, t, rows, va)
    # Scalars of the primal dtypes: the gradients are scaled in the dtype they were
    # accumulated in, then cast to their primals' (16-bit x, w, bias).
    like = tuple(None if a is None else jnp.zeros((), a.dtype) for a in (x, w, bias))
    return total, ((dx, dw, db), like)


def _kl_total_bwd(beta, t, rows, va, residuals, g):
    grads, like = residuals

    def scale(a, primal):
        return None if a is None else (a * g.astype(a.dtype)).astype(primal.dtype)

    dx, dw, db = (scale(a, p) for a, p in zip(grads, like, strict=True))
    return dx, dw, db, None, None, None, None


_kl_total.defvjp(_kl_total_fwd, _kl_total_bwd)


def linear_kl_divergence(
    x: ArrayLike,
    w: ArrayLike,
    teacher_x: ArrayLike,
    teacher_w: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    vocab_axis: int = 1,
) -> jax.Array:
    r"""[`kl_divergence`][jsoftmax.kl_divergence] between a student's and a teacher's
    output layers, without building either's logits.

    The student's logits are `x @ w + bias`, the teacher's
    `teacher_x @ teacher_w + teacher_bias` (the teacher may have another hidden size).
    The teacher is a constant: no gradient flows to it and nothing of it is kept beyond
    its inputs.

    * `reduction="none"`: the vocabulary is visited in chunks. One pass computes both
      log-sum-exps (with $\beta \in \{0, 1\}$ the divergence too), a second one the
      divergence's terms for $0 < \beta < 1$; the backward pass recomputes both
      chunks' logits and accumulates `dx`, `dw` and `db` of the student from
      $\partial D/\partial s$ (see [`kl_divergence`][jsoftmax.kl_divergence]).
      Memory beyond the inputs and `dw`: a chunk of each model's logits.
    * `reduction="sum"` or `"mean"` (a scalar): chunks of whole rows. Each chunk's
      logits give its rows' divergence and, in the same pass, their gradient, which the
      backward pass only scales by the cotangent: four matmuls, as for the dense
      logits, instead of six. Memory beyond the inputs: a chunk of rows of each
      model's logits (by default about `2**22` logits and at least 128 rows; with
      `chunk_size`, the size of that vocabulary chunk over all rows), and the
      gradients, kept from the forward pass (`dw` accumulated in float32).

    Args:
      x: the student's hidden states, `(..., H)`.
      w: the student's output kernel, `(H, V)` (or `(V, H)` with `vocab_axis=0`).
      teacher_x: the teacher's hidden states, `(..., H_t)`, the batch shape of `x`.
      teacher_w: the teacher's output kernel, `(H_t, V)` (or `(V, H_t)`).
      bias: the student's optional `(V,)` bias.
      teacher_bias: the teacher's optional `(V,)` bias.
      beta: $\beta \in [0, 1]$ (0: forward KL, 1: reverse KL).
      temperature: $T > 0$, a Python number, for both models. No $T^2$ factor.
      where: optional per-row boolean mask (padding), broadcastable to `x.shape[:-1]`.
      reduction: `"none"`, `"sum"`, or `"mean"` over the rows that count.
      chunk_size: vocabulary columns per chunk (by default about `2**20` logits);
        with a reduction, the memory of such a chunk sets the rows per chunk.
      vocab_axis: the vocabulary axis of `w` and `teacher_w`.

    Returns:
      The divergence per row (shape `x.shape[:-1]`), or its sum or mean; float32 for
      16-bit inputs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> x, tx = jax.random.normal(jax.random.key(0), (2, 4, 8)), jnp.ones((2, 4, 16))
      >>> w = jax.random.normal(jax.random.key(1), (8, 500)) / 3
      >>> tw = jax.random.normal(jax.random.key(2), (16, 500)) / 3
      >>> fused = jsoftmax.linear_kl_divergence(x, w, tx, tw, beta=0.5, chunk_size=128)
      >>> dense = jsoftmax.kl_divergence(x @ w, tx @ tw, beta=0.5)
      >>> print(fused.shape, bool(jnp.allclose(fused, dense, rtol=1e-4, atol=1e-6)))
      (2, 4) True
    """
    x, w, bias, va = _linear.check_inputs(x, w, bias, vocab_axis)
    tx, tw, tb, _ = _linear.check_inputs(
        teacher_x, teacher_w, teacher_bias, vocab_axis, w_name="teacher_w", bias_name="teacher_bias"
    )
    if tx.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"teacher_x must have x's batch shape {x.shape[:-1]} (any hidden size), got {tx.shape}."
        )
    if tw.shape[va] != w.shape[va]:
        raise ValueError(
            f"teacher_w must have the student's vocabulary, {w.shape[va]} entries along "
            f"vocab_axis={va}, got shape {tw.shape}."
        )
    beta = _post.check_beta(beta)
    t = _post.check_static_temperature(temperature)
    reduction = _checks.check_reduction(reduction)
    batch = x.shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    row_ok = _post.check_row_mask(where, batch)
    vocab = w.shape[va]
    size = _chunks.chunk_size(chunk_size, rows, vocab)
    cdt = _chunks.compute_dtype(x, w)
    if rows == 0 or vocab == 0:
        per_row = jnp.zeros(batch, cdt)
        return per_row if reduction == "none" else jnp.zeros((), cdt)
    row_ok = None if row_ok is None else row_ok.reshape(rows)
    x2, tx2 = x.reshape(rows, -1), tx.reshape(rows, -1)
    if reduction == "none":
        return _kl(x2, w, bias, tx2, tw, tb, row_ok, beta, t, size, va).reshape(batch)
    # A scalar loss: one pass over chunks of whole rows forms the gradient with the value
    # (four matmuls, as for the dense logits), in the memory of a vocabulary chunk.
    row_chunk = _chunks.row_chunk(chunk_size, rows, vocab, size)
    total = _kl_total(x2, w, bias, tx2, tw, tb, row_ok, beta, t, row_chunk, va)
    weight = _kernel.row_weight(row_ok, None, (rows,), cdt)
    return _kernel.reduce_rows(total, weight, reduction)
