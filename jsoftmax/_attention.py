r"""`attention`: softmax attention in blocks of queries and keys, exact, in O(T) memory.

The forward pass loops over chunks of queries and, for each, over the chunks of keys it
can see, merging each block's scores into running row statistics with the log-sum-exp
merge of `jsoftmax._merge` (the online softmax). A `jax.custom_vjp` saves the inputs,
the output and the per-row log-sum-exp; its backward pass recomputes each block's
probabilities in FlashAttention-2's order (key chunks outside, query chunks inside) and
applies the softmax VJP row by row, with the row's inner product taken from the output
(`jsoftmax._formulas.attention_score_cotangent`). Blocks that no query of the chunk can
see (causality, the window, the sequence lengths, the segment ids) are skipped in both
passes: a per-chunk list of visible chunks is computed on the device from the positions,
so it also works with traced positions (ring attention's global offsets).

Internal layout: the query heads are split as `N = K * G` (key head `n // G`), so
`query` is `(B, T, K, G, H)` and a key head is never copied per group. A chunk of rows
is sliced from the inputs as they are and moved to `(B, K, T_c, ...)` (a copy of one
chunk); a block of scores is `(B, K, T_c, G, S_c)`, the layout the batched matrix
product writes, so the scores themselves are never transposed.

The kernel (`kernel`, with `Inputs` and `Config`) takes the positions as arrays and
returns the log-sum-exp, so a caller can run it on one block of a longer sequence (keys
held by another device, say) with global positions, even traced ones, and merge the
results with `jsoftmax.merge_partials`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _custom, _formulas, _losses, _merge


class Config(NamedTuple):
    """The static part of a kernel call (hashable: a `nondiff_argnum`)."""

    scale: float
    causal: bool
    window: tuple[int, int] | None
    softcap: float | None
    q_chunk: int
    k_chunk: int


class Inputs(NamedTuple):
    """The arrays of a kernel call, in the kernel's layout.

    `q` `(B, T, K, G, H)`, `k` `(B, S, K, H)`, `v` `(B, S, K, Hv)`; `bias` and `mask`
    `(Bb, Kb, Gb, Tb, Sb)` with each dimension full or 1 (or None); `q_pos` `(Bp, T)`,
    `kv_pos` `(Bp', S)` integer positions; `q_seg` `(Bs, T)` and `kv_seg` `(Bs', S)`
    (both or neither); `q_len`, `kv_len` `(B,)` (or None); `sinks` `(K, G)` (or None).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    q_pos: jax.Array
    kv_pos: jax.Array
    q_seg: jax.Array | None
    kv_seg: jax.Array | None
    q_len: jax.Array | None
    kv_len: jax.Array | None
    sinks: jax.Array | None


def compute_dtype(dtype) -> np.dtype:
    """The dtype the kernel computes in: float32 for 16-bit inputs, else the input's."""
    return _checks.accumulation_dtype(dtype)


# --------------------------------------------------------------------------------------
# Chunks: padding, slicing and which blocks can hold a visible key.
# --------------------------------------------------------------------------------------


def _pad_to(a: jax.Array | None, axis: int, size: int, value=0):
    """`a` padded along `axis` to `size` with `value` (unchanged if already that long or
    if the axis has size 1, i.e. broadcasts)."""
    if a is None or a.shape[axis] in (1, size):
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, pad, constant_values=value)


def _slice(a, start, size: int, axis: int):
    """`size` entries of `a` along `axis` from `start`; an axis of size 1 is kept."""
    if a.shape[axis] == 1:
        return a
    return lax.dynamic_slice_in_dim(a, start, size, axis=axis)


class _Chunked(NamedTuple):
    """Padded inputs and the chunk geometry: `nq` chunks of `tq` queries, `nk` of `tk`
    keys; `t`, `s` are the true lengths (rows and columns past them are invalid)."""

    x: Inputs
    t: int
    s: int
    tq: int
    tk: int
    nq: int
    nk: int


def _chunked(x: Inputs, cfg: Config) -> _Chunked:
    t, s = x.q.shape[1], x.k.shape[1]
    tq, tk = min(cfg.q_chunk, t), min(cfg.k_chunk, s)
    nq, nk = -(-t // tq), -(-s // tk)
    tp, sp = nq * tq, nk * tk
    padded = x._replace(
        q=_pad_to(x.q, 1, tp),
        k=_pad_to(x.k, 1, sp),
        v=_pad_to(x.v, 1, sp),
        bias=_pad_to(_pad_to(x.bias, 3, tp), 4, sp),
        mask=_pad_to(_pad_to(x.mask, 3, tp, False), 4, sp, False),
        q_pos=_pad_to(x.q_pos, 1, tp),
        kv_pos=_pad_to(x.kv_pos, 1, sp),
        q_seg=_pad_to(x.q_seg, 1, tp),
        kv_seg=_pad_to(x.kv_seg, 1, sp),
    )
    return _Chunked(padded, t, s, tq, tk, nq, nk)


def _valid(index, true_length: int, lengths):
    """Which indices (shape `(1, n)`) are real and below the per-batch `lengths`:
    shape `(B or 1, n)`."""
    ok = index < true_length
    if lengths is not None:
        ok = ok & (index < lengths[:, None])
    return ok


def _row_col_valid(c: _Chunked):
    tp, sp = c.nq * c.tq, c.nk * c.tk
    rows = _valid(jnp.arange(tp)[None, :], c.t, c.x.q_len)
    cols = _valid(jnp.arange(sp)[None, :], c.s, c.x.kv_len)
    return rows, cols


def block_table(c: _Chunked, cfg: Config) -> jax.Array:
    """`(nq, nk)` booleans: whether block `(i, j)` may hold a visible (query, key) pair.

    Conservative (a block marked True may still be wholly masked, e.g. by `mask`), never
    wrong the other way: from each chunk's range of positions and of segment ids over
    its valid rows or columns, per batch entry.
    """
    x = c.x
    rows, cols = _row_col_valid(c)

    def per_chunk(a, valid, n, size, fill, reduce):
        a = jnp.where(valid, a, fill)
        return reduce(a.reshape(a.shape[0], n, size), axis=-1)

    big, small = np.iinfo(np.int32).max, np.iinfo(np.int32).min
    row_any = jnp.any(rows.reshape(rows.shape[0], c.nq, c.tq), axis=-1)[:, :, None]
    col_any = jnp.any(cols.reshape(cols.shape[0], c.nk, c.tk), axis=-1)[:, None, :]
    ok = row_any & col_any
    if cfg.causal or cfg.window is not None:
        qp, kp = x.q_pos.astype(jnp.int32), x.kv_pos.astype(jnp.int32)
        q_max = per_chunk(qp, rows, c.nq, c.tq, small, jnp.max)[:, :, None]
        q_min = per_chunk(qp, rows, c.nq, c.tq, big, jnp.min)[:, :, None]
        k_max = per_chunk(kp, cols, c.nk, c.tk, small, jnp.max)[:, None, :]
        k_min = per_chunk(kp, cols, c.nk, c.tk, big, jnp.min)[:, None, :]
        if cfg.causal:
            ok = ok & (k_min <= q_max)
        if cfg.window is not None:
            left, right = cfg.window
            ok = ok & (k_max >= q_min - left) & (k_min <= q_max + right)
    if x.q_seg is not None and x.kv_seg is not None:
        qs, ks = x.q_seg.astype(jnp.int32), x.kv_seg.astype(jnp.int32)
        qs_max = per_chunk(qs, rows, c.nq, c.tq, small, jnp.max)[:, :, None]
        qs_min = per_chunk(qs, rows, c.nq, c.tq, big, jnp.min)[:, :, None]
        ks_max = per_chunk(ks, cols, c.nk, c.tk, small, jnp.max)[:, None, :]
        ks_min = per_chunk(ks, cols, c.nk, c.tk, big, jnp.min)[:, None, :]
        ok = ok & (qs_min <= ks_max) & (ks_min <= qs_max)
    return jnp.any(ok, axis=0)


def visit_order(table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For each row of `table`, the indices of its True entries first (ascending), and
    their count: the chunks to visit, `order[r, :count[r]]`."""
    order = jnp.argsort(~table, axis=1, stable=True).astype(jnp.int32)
    return order, jnp.sum(table, axis=1, dtype=jnp.int32)


def _all_visible(c: _Chunked, cfg: Config) -> bool:
    """Whether every (query, key) pair is visible, known from the static configuration
    (no option that hides keys, chunks that divide both lengths)."""
    x = c.x
    hides = (
        cfg.causal
        or cfg.window is not None
        or x.mask is not None
        or x.q_seg is not None
        or x.q_len is not None
        or x.kv_len is not None
    )
    return not hides and c.nq * c.tq == c.t and c.nk * c.tk == c.s


def _block_visible(c: _Chunked, cfg: Config, i, j, transposed: bool = False):
    """Which (query, key) pairs of block `(i, j)` are visible, shaped like the block's
    scores, `(B', K', T_c, G', S_c)` or transposed `(B', K', S_c, T_c, G')`, with size-1
    axes where nothing varies; None when all are."""
    x = c.x
    if _all_visible(c, cfg):
        return None
    q0, k0 = i * c.tq, j * c.tk
    r = q0 + jnp.arange(c.tq)[None, :]
    col = k0 + jnp.arange(c.tk)[None, :]
    vis = _valid(r, c.t, x.q_len)[:, :, None] & _valid(col, c.s, x.kv_len)[:, None, :]
    if cfg.causal or cfg.window is not None:
        qp = _slice(x.q_pos, q0, c.tq, 1)[:, :, None]
        kp = _slice(x.kv_pos, k0, c.tk, 1)[:, None, :]
        if cfg.causal:
            vis = vis & (kp <= qp)
        if cfg.window is not None:
            left, right = cfg.window
            vis = vis & (kp >= qp - left) & (kp <= qp + right)
    if x.q_seg is not None and x.kv_seg is not None:
        qs = _slice(x.q_seg, q0, c.tq, 1)[:, :, None]
        ks = _slice(x.kv_seg, k0, c.tk, 1)[:, None, :]
        vis = vis & (qs == ks)
    # (B', T_c, S_c) -> (B', 1, T_c, 1, S_c), or (B', 1, S_c, T_c, 1) transposed.
    vis = jnp.swapaxes(vis, 1, 2)[:, None, :, :, None] if transposed else vis[:, None, :, None, :]
    if x.mask is not None:
        vis = vis & _block_of(x.mask, c, q0, k0, transposed)
    return vis


def _block_of(a, c: _Chunked, q0, k0, transposed: bool = False):
    """The block of a `(Bb, Kb, Gb, Tb, Sb)` bias or mask in the scores' layout:
    `(Bb, Kb, T_c, Gb, S_c)`, or `(Bb, Kb, S_c, T_c, Gb)` transposed (size-1 axes
    kept)."""
    blk = _slice(_slice(a, q0, c.tq, 3), k0, c.tk, 4)
    return jnp.transpose(blk, (0, 1, 4, 3, 2) if transposed else (0, 1, 3, 2, 4))


# --------------------------------------------------------------------------------------
# One block: scores, logits, visibility.
# --------------------------------------------------------------------------------------


def _chunk_rows(a, i, size: int, cdt):
    """Chunk `i` of `a` `(B, T, K, ...)` along axis 1, moved to `(B, K, T_c, ...)`."""
    return jnp.swapaxes(lax.dynamic_slice_in_dim(a, i * size, size, axis=1), 1, 2).astype(cdt)


def _logits(q_c, k_c, c: _Chunked, cfg: Config, i, j, cdt, transposed: bool = False):
    """`(u, visible)` of block `(i, j)`: the (biased, soft-capped) logits and which
    entries are visible, `(B, K, T_c, G, S_c)`, or `(B, K, S_c, T_c, G)` transposed (the
    backward pass's layout: its products then contract over the minor axes). `q_c`
    `(B, K, T_c, G, H)`, `k_c` `(B, K, S_c, H)`."""
    if transposed:
        z = jnp.einsum("bksh,bkqgh->bksqg", k_c, q_c, preferred_element_type=cdt)
    else:
        z = jnp.einsum("bkqgh,bksh->bkqgs", q_c, k_c, preferred_element_type=cdt)
    z = z * jnp.asarray(cfg.scale, cdt)
    if c.x.bias is not None:
        z = z + _block_of(c.x.bias, c, i * c.tq, j * c.tk, transposed).astype(cdt)
    if cfg.softcap is not None:
        z = _formulas.softcap(z, cfg.softcap)
    return z, _block_visible(c, cfg, i, j, transposed)


# --------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------


def _initial_stats(x: Inputs, shape, cdt):
    """`(m, total)` of a row before any key: empty, or the sink's own term."""
    m, total = _merge.empty_stats(shape, cdt)
    if x.sinks is None:
        return m, total
    sink = x.sinks.astype(cdt)[None, :, None, :, None]  # (1, K, 1, G, 1)
    m_sink = jnp.maximum(sink, jnp.finfo(cdt).min)
    return (
        jnp.broadcast_to(m_sink, shape),
        jnp.broadcast_to(jnp.exp(sink - m_sink), shape),
    )


def forward(x: Inputs, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """`(out, lse)`: `out` `(B, T, K, G, Hv)` in `q`'s dtype, `lse` `(B, T, K, G)` in the
    compute dtype (`-inf` for a row without any visible key or sink)."""
    c = _chunked(x, cfg)
    x = c.x
    cdt = compute_dtype(jnp.result_type(x.q, x.k, x.v))
    b, _, kh, g, _ = x.q.shape
    hv = x.v.shape[-1]
    order, count = visit_order(block_table(c, cfg))

    def query_chunk(i, carry):
        out, lse = carry
        q_c = _chunk_rows(x.q, i, c.tq, cdt)  # (B, K, T_c, G, H)
        m, total = _initial_stats(x, (b, kh, c.tq, g, 1), cdt)
        acc = jnp.zeros((b, kh, c.tq, g, hv), cdt)

        def key_chunk(j, state):
            m, total, acc = state
            k_c = _chunk_rows(x.k, j, c.tk, cdt)
            v_c = _chunk_rows(x.v, j, c.tk, cdt)
            u, vis = _logits(q_c, k_c, c, cfg, i, j, cdt)
            s = u if vis is None else jnp.where(vis, u, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
            p = jnp.exp(s - m_new)
            total = _merge.rescale(m, total, m_new) + jnp.sum(p, axis=-1, keepdims=True)
            acc = _merge.rescale(m, acc, m_new) + jnp.einsum(
                "bkqgs,bksv->bkqgv", p, v_c, preferred_element_type=cdt
            )
            return m_new, total, acc

        m, total, acc = lax.fori_loop(
            jnp.int32(0), count[i], lambda n, st: key_chunk(order[i, n], st), (m, total, acc)
        )
        o = acc / jnp.where(total == 0, jnp.ones((), cdt), total)
        lse_c = _merge.lse_of(m, total)[..., 0]  # (B, K, T_c, G)
        out = lax.dynamic_update_slice_in_dim(
            out, jnp.swapaxes(o, 1, 2).astype(out.dtype), i * c.tq, axis=1
        )
        lse = lax.dynamic_update_slice_in_dim(lse, jnp.swapaxes(lse_c, 1, 2), i * c.tq, axis=1)
        return out, lse

    tp = c.nq * c.tq
    init = (jnp.zeros((b, tp, kh, g, hv), x.q.dtype), jnp.zeros((b, tp, kh, g), cdt))
    out, lse = lax.fori_loop(jnp.int32(0), jnp.int32(c.nq), query_chunk, init)
    return out[:, : c.t], lse[:, : c.t]


# --------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------


def _add_bias_block(dbias, ds_t, c: _Chunked, i, j):
    """`dbias` `(Bb, Kb, Gb, Tb, Sb)` plus the block's score cotangent `ds_t`
    `(B, K, S_c, T_c, G)` summed over the axes the bias broadcasts along."""
    ds = jnp.transpose(ds_t, (0, 1, 4, 3, 2))  # (B, K, G, T_c, S_c)
    axes = tuple(a for a in range(5) if dbias.shape[a] == 1 != ds.shape[a])
    ds = jnp.sum(ds, axis=axes, keepdims=True) if axes else ds
    zero = jnp.zeros((), jnp.int32)
    rows = i * c.tq if dbias.shape[3] > 1 else zero
    cols = j * c.tk if dbias.shape[4] > 1 else zero
    start = (zero, zero, zero, rows, cols)
    old = lax.dynamic_slice(dbias, start, ds.shape)
    return lax.dynamic_update_slice(dbias, old + ds.astype(dbias.dtype), start)


def backward(x: Inputs, cfg: Config, out, lse, d_out, d_lse):
    """The cotangents of `q`, `k`, `v`, `bias` and `sinks` (`None` for those absent)."""
    cdt = compute_dtype(jnp.result_type(x.q, x.k, x.v))
    # D_i = <dP_i, P_i> = rowsum(dO_i * O_i), less the lse's own cotangent (dlse / dz = p).
    d_row = _formulas.attention_row_term(out.astype(cdt), d_out.astype(cdt), d_lse.astype(cdt))
    d_sinks = None
    if x.sinks is not None:
        d_sinks = _formulas.sink_cotangent(x.sinks.astype(cdt)[None, None], lse, d_row)
        d_sinks = jnp.sum(d_sinks, axis=(0, 1)).astype(x.sinks.dtype)
    c = _chunked(x, cfg)
    pad_rows = partial(_pad_to, axis=1, size=c.nq * c.tq)
    lse_safe = pad_rows(jnp.where(lse == -jnp.inf, jnp.zeros((), cdt), lse))
    d_row = pad_rows(d_row)
    d_out = pad_rows(d_out)
    x = c.x
    order, count = visit_order(block_table(c, cfg).T)

    def key_chunk(j, carry):
        dq, dk, dv, dbias = carry
        k_c = _chunk_rows(x.k, j, c.tk, cdt)  # (B, K, S_c, H)
        v_c = _chunk_rows(x.v, j, c.tk, cdt)

        def query_chunk(i, state):
            # The block is computed transposed, (B, K, S_c, T_c, G): dV, dP and dK then
            # contract over its minor axes, and dQ is formed transposed, K^T dS, which
            # contracts over its major axis; no block of scores is ever transposed.
            dq, dk_c, dv_c, dbias = state
            q_c = _chunk_rows(x.q, i, c.tq, cdt)
            do_c = _chunk_rows(d_out, i, c.tq, cdt)
            lse_c = _chunk_rows(lse_safe, i, c.tq, cdt)[:, :, None]
            d_c = _chunk_rows(d_row, i, c.tq, cdt)[:, :, None]
            u, vis = _logits(q_c, k_c, c, cfg, i, j, cdt, transposed=True)
            p = jnp.exp((u if vis is None else jnp.where(vis, u, -jnp.inf)) - lse_c)
            dv_c = dv_c + jnp.einsum("bksqg,bkqgv->bksv", p, do_c, preferred_element_type=cdt)
            dp = jnp.einsum("bksv,bkqgv->bksqg", v_c, do_c, preferred_element_type=cdt)
            ds = _formulas.attention_score_cotangent(p, dp, d_c)
            if cfg.softcap is not None:
                ds = ds * _formulas.softcap_derivative(u, cfg.softcap)
            if dbias is not None:
                dbias = _add_bias_block(dbias, ds, c, i, j)
            ds = ds * jnp.asarray(cfg.scale, cdt)
            dq_c = jnp.einsum("bksh,bksqg->bkhqg", k_c, ds, preferred_element_type=cdt)
            dq_old = lax.dynamic_slice_in_dim(dq, i * c.tq, c.tq, axis=3)
            dq = lax.dynamic_update_slice_in_dim(dq, dq_old + dq_c, i * c.tq, axis=3)
            dk_c = dk_c + jnp.einsum("bksqg,bkqgh->bksh", ds, q_c, preferred_element_type=cdt)
            return dq, dk_c, dv_c, dbias

        b, kh = x.k.shape[0], x.k.shape[2]
        init = (
            dq,
            jnp.zeros((b, kh, c.tk, x.k.shape[-1]), cdt),
            jnp.zeros((b, kh, c.tk, x.v.shape[-1]), cdt),
            dbias,
        )
        dq, dk_c, dv_c, dbias = lax.fori_loop(
            jnp.int32(0), count[j], lambda n, st: query_chunk(order[j, n], st), init
        )
        dk = lax.dynamic_update_slice_in_dim(dk, jnp.swapaxes(dk_c, 1, 2), j * c.tk, axis=1)
        dv = lax.dynamic_update_slice_in_dim(dv, jnp.swapaxes(dv_c, 1, 2), j * c.tk, axis=1)
        return dq, dk, dv, dbias

    b, tp, kh, g, h = x.q.shape
    init = (
        jnp.zeros((b, kh, h, tp, g), cdt),  # dq transposed, as the blocks make it; moved once
        jnp.zeros(x.k.shape, cdt),
        jnp.zeros(x.v.shape, cdt),
        None if x.bias is None else jnp.zeros(x.bias.shape, cdt),
    )
    dq, dk, dv, dbias = lax.fori_loop(jnp.int32(0), jnp.int32(c.nk), key_chunk, init)
    dq = jnp.transpose(dq, (0, 3, 1, 4, 2))[:, : c.t].astype(x.q.dtype)
    dk = dk[:, : c.s].astype(x.k.dtype)
    dv = dv[:, : c.s].astype(x.v.dtype)
    if dbias is not None and x.bias is not None:
        tb = c.t if x.bias.shape[3] > 1 else 1
        sb = c.s if x.bias.shape[4] > 1 else 1
        dbias = dbias[:, :, :, :tb, :sb].astype(x.bias.dtype)
    return dq, dk, dv, dbias, d_sinks


# --------------------------------------------------------------------------------------
# The custom rule.
# --------------------------------------------------------------------------------------


@partial(_custom.custom_vjp, nondiff_argnums=(1,))
def kernel(x: Inputs, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """`(out, lse)` of attention over `x` (see `Inputs`), differentiable in `q`, `k`,
    `v`, `bias` and `sinks` (and through `lse`)."""
    return forward(x, cfg)


def _kernel_fwd(x: Inputs, cfg: Config):
    out, lse = forward(x, cfg)
    return (out, lse), (x, out, lse)


def _kernel_bwd(cfg: Config, residuals, cotangents):
    x, out, lse = residuals
    d_out, d_lse = cotangents
    dq, dk, dv, dbias, d_sinks = backward(x, cfg, out, lse, d_out, d_lse)
    zero = {name: None for name in Inputs._fields}
    grads = Inputs(**{**zero, "q": dq, "k": dk, "v": dv, "bias": dbias, "sinks": d_sinks})
    return (grads,)


kernel.defvjp(_kernel_fwd, _kernel_bwd)

# Called through jit (the configuration static): an eager call then reuses the compiled
# loops instead of tracing them anew each time; under an outer jit it is inlined.
_kernel_jit = jax.jit(kernel, static_argnums=(1,))


# --------------------------------------------------------------------------------------
# Public API: argument checks, then the kernel.
# --------------------------------------------------------------------------------------

# The default block: about 2**18 scores (1 MiB of float32) over the batch and heads.
_BLOCK_SCORES = 1 << 18


def default_chunks(heads: int, t: int, s: int) -> tuple[int, int]:
    """The default `(query_chunk, key_chunk)` for `heads = B * N` query heads.

    Square blocks of about `2**18` scores over all heads: the power of two nearest below
    `sqrt(2**18 / heads)`, clipped to `[64, 512]` and to `T` and `S`. E.g. 256 for one
    sequence of 4 heads, 64 for 64 heads or more. On a CPU the time hardly depends on it
    between 64 and 512; memory grows with it.
    """
    side = math.sqrt(_BLOCK_SCORES / max(heads, 1))
    chunk = 1 << int(math.floor(math.log2(max(side, 1.0))))
    chunk = min(max(chunk, 64), 512)
    return max(1, min(chunk, t)), max(1, min(chunk, s))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_qkv(query, key, value):
    q = _checks.as_array(query, "query")
    k = _checks.as_array(key, "key")
    v = _checks.as_array(value, "value")
    for name, a in (("query", q), ("key", k), ("value", v)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be a real floating array, got dtype {a.dtype}.")
    if q.ndim not in (3, 4):
        raise ValueError(
            f"query must have shape (B, T, N, H) or (T, N, H), got {q.shape} (rank {q.ndim})."
        )
    layout = "(B, S, K, H)" if q.ndim == 4 else "(S, K, H)"
    if k.ndim != q.ndim:
        raise ValueError(f"key must have shape {layout} like query's rank {q.ndim}, got {k.shape}.")
    if v.ndim != q.ndim:
        raise ValueError(
            f"value must have shape {layout[:-2]}Hv) like query's rank {q.ndim}, got {v.shape}."
        )
    if q.ndim == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"key must have query's batch size B = {q.shape[0]}, got shape {k.shape}.")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"key must have query's head dimension H = {q.shape[-1]}, got shape {k.shape}."
        )
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"value must match key's shape {k.shape[:-1]} but for its last axis (Hv), "
            f"got {v.shape}."
        )
    n, kh = q.shape[-2], k.shape[-2]
    if kh == 0 or n % kh:
        raise ValueError(
            f"query's number of heads N = {n} must be a multiple of key's K = {kh} "
            "(grouped-query attention: query head n reads key head n // (N / K))."
        )
    return q, k, v


def _broadcast_4d(a, name: str, target: tuple[int, ...]):
    """`a` (rank <= 4) with leading 1s to rank 4, checked to broadcast to `target`."""
    if a.ndim > 4:
        raise ValueError(f"{name} must have at most 4 dimensions (B, N, T, S), got {a.shape}.")
    a = a.reshape((1,) * (4 - a.ndim) + a.shape)
    if any(d not in (1, t) for d, t in zip(a.shape, target, strict=True)):
        raise ValueError(
            f"{name} of shape {a.shape} does not broadcast to (B, N, T, S) = {target}."
        )
    return a


def _check_bias(bias, target):
    if bias is None:
        return None
    bias = _checks.as_array(bias, "bias")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"bias must be a real floating array, got dtype {bias.dtype}.")
    return _broadcast_4d(bias, "bias", target)


def _check_mask(mask, target):
    if mask is None:
        return None
    mask = _checks.as_bool_mask(_checks.as_array(mask, "mask"), "mask")
    return _broadcast_4d(mask, "mask", target)


def _split_heads(a, kh: int, g: int):
    """A `(Bb, Nb, Tb, Sb)` bias or mask as `(Bb, Kb, Gb, Tb, Sb)`."""
    if a is None:
        return None
    if a.shape[1] == 1:
        return a[:, :, None]
    return a.reshape(a.shape[0], kh, g, *a.shape[2:])


def _check_int_array(a, name: str):
    a = _checks.as_array(a, name)
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}.")
    return a


def _check_per_position(a, name: str, b: int, length: int, axis_name: str):
    """Positions or segment ids: `(L,)` or `(B, L)`, returned as `(1 or B, L)`."""
    if a is None:
        return None
    a = _check_int_array(a, name)
    if a.shape == (length,):
        return a[None]
    if a.ndim == 2 and a.shape[1] == length and a.shape[0] in (1, b):
        return a
    raise ValueError(
        f"{name} must have shape ({axis_name},) or (B, {axis_name}) = ({length},) or "
        f"({b}, {length}), got {a.shape}."
    )


def _check_lengths(a, name: str, b: int):
    if a is None:
        return None
    a = _check_int_array(a, name)
    if a.ndim > 1 or a.shape not in ((), (1,), (b,)):
        raise ValueError(f"{name} must have shape (B,) = ({b},), got {a.shape}.")
    return jnp.broadcast_to(a, (b,))


def _check_window(window):
    if window is None:
        return None
    if _is_int(window):
        window = (window, window)
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(_is_int(w) for w in window)
    ):
        raise TypeError(
            f"local_window_size must be an int or a pair of ints (left, right), got {window!r}."
        )
    left, right = (int(w) for w in window)
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size must be non-negative, got {window!r}.")
    return left, right


def _check_scale(scale, h: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(h) if h else 1.0
    if isinstance(scale, (bool, np.bool_)) or not isinstance(
        scale, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"scale must be None or a real number, got {scale!r}.")
    if not np.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}.")
    return float(scale)


def _check_chunk_size(chunk_size, heads: int, t: int, s: int) -> tuple[int, int]:
    if chunk_size is None:
        return default_chunks(heads, t, s)
    sizes = chunk_size if isinstance(chunk_size, (tuple, list)) else (chunk_size, chunk_size)
    if len(sizes) != 2 or not all(_is_int(c) for c in sizes):
        raise TypeError(
            "chunk_size must be None, a positive int or a pair (query_chunk, key_chunk) of "
            f"positive ints, got {chunk_size!r}."
        )
    if any(int(c) <= 0 for c in sizes):
        raise ValueError(f"chunk_size must be positive, got {chunk_size!r}.")
    return max(1, min(int(sizes[0]), t)), max(1, min(int(sizes[1]), s))


def _check_sinks(sinks, n: int):
    if sinks is None:
        return None
    sinks = _checks.as_array(sinks, "sinks")
    if not jnp.issubdtype(sinks.dtype, jnp.floating):
        raise TypeError(f"sinks must be a real floating array, got dtype {sinks.dtype}.")
    if sinks.shape != (n,):
        raise ValueError(
            f"sinks must have one logit per query head, shape ({n},), got {sinks.shape}."
        )
    return sinks


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return bool(value)


def attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
    q_positions: ArrayLike | None = None,
    kv_positions: ArrayLike | None = None,
    logit_softcap: float | None = None,
    sinks: ArrayLike | None = None,
    return_lse: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Softmax attention computed in blocks, exact, in memory linear in the sequence length.

    A drop-in for `jax.nn.dot_product_attention` (its arguments come first, with the same
    meaning) that never builds the $(B, N, T, S)$ scores. For query $i$ and head $n$
    (reading key head $n \,/\!/\, (N/K)$),

    $$
    z_{ij} = \mathrm{softcap}\big(\text{scale}\; q_i \cdot k_j + b_{ij}\big), \qquad
    o_i = \sum_{j \in V(i)} \frac{e^{z_{ij}}}{e^{\sigma} + \sum_{j' \in V(i)} e^{z_{ij'}}}\, v_j ,
    $$

    with $\mathrm{softcap}(z) = c \tanh(z / c)$ when `logit_softcap` $= c$ is given,
    $\sigma$ the head's sink logit (no sink: $e^{\sigma} = 0$) and $V(i)$ the keys query
    $i$ sees: those allowed by every option given (`mask`; `is_causal`:
    $\mathrm{pos}_k(j) \le \mathrm{pos}_q(i)$; `local_window_size` $(l, r)$:
    $\mathrm{pos}_q(i) - l \le \mathrm{pos}_k(j) \le \mathrm{pos}_q(i) + r$; the sequence
    lengths; equal segment ids). The log-sum-exp of the row,
    $\ell_i = \log\big(e^{\sigma} + \sum_{j \in V(i)} e^{z_{ij}}\big)$, comes back with
    `return_lse=True`.

    The keys are processed in chunks merged with the online softmax (the merge rule of
    [`jsoftmax.merge_partials`][]); reverse mode saves the inputs, the output and
    $\ell$, and the backward pass recomputes each block, applying the softmax VJP row by
    row with its inner product read from the output:

    $$
    dS_{ij} = P_{ij}\,(dP_{ij} - D_i), \qquad dP = dO\, V^\top, \qquad
    D_i = dO_i \cdot O_i - d\ell_i .
    $$

    Blocks that causality, the window, the sequence lengths or the segment ids leave
    wholly invisible are skipped in both passes.

    Args:
      query: `(B, T, N, H)`, or `(T, N, H)` without a batch axis.
      key: `(B, S, K, H)` (or `(S, K, H)`); `N` must be a multiple of `K`
        (grouped-query attention, without copying `key` or `value`).
      value: `(B, S, K, Hv)` (or `(S, K, Hv)`); `Hv` may differ from `H`.
      bias: optional, added to the scaled scores; any shape of rank at most 4 that
        broadcasts to `(B, N, T, S)`. It is sliced block by block, never broadcast in
        memory; its gradient comes back in its own shape.
      mask: optional boolean, `True` keeps a key; broadcasts to `(B, N, T, S)` like
        `bias`.
      scale: the factor of $q \cdot k$; default $1/\sqrt{H}$.
      is_causal: query $i$ sees keys at positions up to its own.
      query_seq_lengths: optional `(B,)` integers: queries at or past the length see no
        key (their output is 0).
      key_value_seq_lengths: optional `(B,)` integers: keys at or past the length are
        not seen.
      local_window_size: `(left, right)`, or an int `w` for `(w, w)`: query $i$ sees keys
        at positions in $[\mathrm{pos}_q(i) - l, \mathrm{pos}_q(i) + r]$.
      q_segment_ids: optional integers `(T,)` or `(B, T)`; with `kv_segment_ids`
        (`(S,)` or `(B, S)`), a query sees only keys of its own segment (packed
        sequences).
      kv_segment_ids: see `q_segment_ids`.
      q_positions: optional integer positions of the queries, `(T,)` or `(B, T)`;
        default `0, ..., T-1`. Used by `is_causal` and `local_window_size`; e.g. a KV
        cache of `S` keys holding `T` new queries: `q_positions = arange(S - T, S)`.
      kv_positions: optional positions of the keys, `(S,)` or `(B, S)`; default
        `0, ..., S-1`.
      logit_softcap: optional positive $c$: scores become $c \tanh(z / c)$ (Gemma 2).
      sinks: optional `(N,)`, a learned logit per head that joins every row's softmax
        denominator with a zero value (attention sinks, gpt-oss); differentiable.
      return_lse: also return $\ell$, shape `(B, T, N)` (or `(T, N)`), differentiable,
        so results over disjoint sets of keys merge exactly with
        [`jsoftmax.merge_partials`][].
      chunk_size: `(query_chunk, key_chunk)`, or an int for both; `T` and `S` need not be
        multiples. Default: square blocks of about $2^{18}$ scores over the batch and
        heads (256 for `B * N = 4`), a power of two in $[64, 512]$.

    Returns:
      The output `(B, T, N, Hv)` (or `(T, N, Hv)`) in `query`'s dtype; with
      `return_lse=True`, `(output, lse)` where `lse` is float32 for 16-bit inputs (else
      the inputs' dtype). 16-bit inputs are computed in float32.

    Note:
      * A query that sees no key (and has no sink) gives output 0 and `lse = -inf`, with
        zero, finite gradients. `jax.nn.dot_product_attention` returns the mean of the
        values there (its masked scores are a large negative number, not $-\infty$), and
        0 only for queries past `query_seq_lengths`.
      * `is_causal` with `T != S` aligns the first query with the first key (top-left),
        as `jax.nn` does; pass `q_positions` for another alignment.
      * Gradients flow to `query`, `key`, `value`, `bias` and `sinks`; masks, lengths,
        positions and segment ids are not differentiated. Reverse mode only (no
        `jax.jvp`).
      * Memory beyond the inputs and outputs: a few blocks of
        `B * N * query_chunk * key_chunk` scores and O(T) per-row statistics.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> kq, kk, kv = jax.random.split(jax.random.key(0), 3)
      >>> q = jax.random.normal(kq, (2, 300, 4, 16), jnp.float32)
      >>> k = jax.random.normal(kk, (2, 300, 2, 16), jnp.float32)
      >>> v = jax.random.normal(kv, (2, 300, 2, 16), jnp.float32)
      >>> out = jsoftmax.attention(q, k, v, is_causal=True, chunk_size=128)
      >>> ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
      >>> print(out.shape, bool(jnp.allclose(out, ref, atol=1e-5)))
      (2, 300, 4, 16) True
      >>> out, lse = jsoftmax.attention(q, k, v, return_lse=True)
      >>> with jnp.printoptions(precision=4):
      ...     print(lse.shape, lse[0, 0])
      (2, 300, 4) [6.194  6.3246 6.4287 6.2812]
    """
    q, k, v = _check_qkv(query, key, value)
    batched = q.ndim == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    target = (b, n, t, s)
    bias_4 = _check_bias(bias, target)
    mask_4 = _check_mask(mask, target)
    cfg_scale = _check_scale(scale, h)
    causal = _check_flag(is_causal, "is_causal")
    return_lse = _check_flag(return_lse, "return_lse")
    q_len = _check_lengths(query_seq_lengths, "query_seq_lengths", b)
    kv_len = _check_lengths(key_value_seq_lengths, "key_value_seq_lengths", b)
    window = _check_window(local_window_size)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        missing = "kv_segment_ids" if kv_segment_ids is None else "q_segment_ids"
        raise ValueError(f"{missing} is missing: segment ids need both q_ and kv_segment_ids.")
    q_seg = _check_per_position(q_segment_ids, "q_segment_ids", b, t, "T")
    kv_seg = _check_per_position(kv_segment_ids, "kv_segment_ids", b, s, "S")
    q_pos = _check_per_position(q_positions, "q_positions", b, t, "T")
    kv_pos = _check_per_position(kv_positions, "kv_positions", b, s, "S")
    cap = _losses._check_softcap(logit_softcap)
    sinks_n = _check_sinks(sinks, n)
    tq, tk = _check_chunk_size(chunk_size, b * n, t, s)
    cdt = compute_dtype(jnp.result_type(q, k, v))
    if min(b, t, s, n) == 0:
        out, lse = _empty(q, v, sinks_n, cdt)
    else:
        x = Inputs(
            q=q.reshape(b, t, kh, g, h),
            k=k,
            v=v,
            bias=_split_heads(bias_4, kh, g),
            mask=_split_heads(mask_4, kh, g),
            q_pos=jnp.arange(t, dtype=jnp.int32)[None] if q_pos is None else q_pos,
            kv_pos=jnp.arange(s, dtype=jnp.int32)[None] if kv_pos is None else kv_pos,
            q_seg=q_seg,
            kv_seg=kv_seg,
            q_len=q_len,
            kv_len=kv_len,
            sinks=None if sinks_n is None else sinks_n.reshape(kh, g),
        )
        cfg = Config(cfg_scale, causal, window, cap, tq, tk)
        out, lse = _kernel_jit(x, cfg)
        out = out.reshape(b, t, n, v.shape[-1])
        lse = lse.reshape(b, t, n)
    if not batched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _empty(q, v, sinks, cdt):
    """No query, key or head: output 0; `lse` is the sink alone (or `-inf`)."""
    b, t, n, _ = q.shape
    out = jnp.zeros((b, t, n, v.shape[-1]), q.dtype)
    if sinks is None:
        return out, jnp.full((b, t, n), -jnp.inf, cdt)
    return out, jnp.broadcast_to(sinks.astype(cdt), (b, t, n))
