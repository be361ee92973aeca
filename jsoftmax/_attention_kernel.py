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

from jsoftmax import _checks, _chunks, _custom, _formulas, _merge


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


def _vary(tree, x: Inputs):
    """`tree` (a loop's initial carry) cast to vary over the mesh axes any of `x`'s
    arrays varies over inside `jax.shard_map` (a block of ring attention), so the loop's
    carry keeps its type; unchanged elsewhere."""
    axes = frozenset().union(*(_chunks.varying_axes(a) for a in jax.tree.leaves(x)))

    def cast(a):
        missing = tuple(sorted(axes - _chunks.varying_axes(a)))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


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


def chunked(x: Inputs, cfg: Config) -> _Chunked:
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


def positions_visible(q_lo, q_hi, k_lo, k_hi, cfg: Config):
    """Whether causality and the window let some query position in `[q_lo, q_hi]` see
    some key position in `[k_lo, k_hi]` (broadcast); with `q_lo = q_hi` and
    `k_lo = k_hi`, whether that query sees that key. True without either option."""
    ok = jnp.bool_(True)
    if cfg.causal:
        ok = ok & (k_lo <= q_hi)
    if cfg.window is not None:
        left, right = cfg.window
        ok = ok & (k_hi >= q_lo - left) & (k_lo <= q_hi + right)
    return ok


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

    wide = jnp.result_type(int)  # positions and segment ids compared untruncated
    big, small = np.iinfo(wide).max, np.iinfo(wide).min
    row_any = jnp.any(rows.reshape(rows.shape[0], c.nq, c.tq), axis=-1)[:, :, None]
    col_any = jnp.any(cols.reshape(cols.shape[0], c.nk, c.tk), axis=-1)[:, None, :]
    ok = row_any & col_any

    def ranges(qa, ka):
        """`(q_min, q_max, k_min, k_max)` of each query block and key block."""
        qa, ka = qa.astype(wide), ka.astype(wide)
        return (
            per_chunk(qa, rows, c.nq, c.tq, big, jnp.min)[:, :, None],
            per_chunk(qa, rows, c.nq, c.tq, small, jnp.max)[:, :, None],
            per_chunk(ka, cols, c.nk, c.tk, big, jnp.min)[:, None, :],
            per_chunk(ka, cols, c.nk, c.tk, small, jnp.max)[:, None, :],
        )

    if cfg.causal or cfg.window is not None:
        ok = ok & positions_visible(*ranges(x.q_pos, x.kv_pos), cfg)
    if x.q_seg is not None and x.kv_seg is not None:
        qs_min, qs_max, ks_min, ks_max = ranges(x.q_seg, x.kv_seg)
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
        vis = vis & positions_visible(qp, qp, kp, kp, cfg)
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
    m = jnp.full(shape, jnp.finfo(cdt).min, cdt)
    total = jnp.zeros(shape, cdt)
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
    c = chunked(x, cfg)
    x = c.x
    cdt = compute_dtype(jnp.result_type(x.q, x.k, x.v))
    b, _, kh, g, _ = x.q.shape
    hv = x.v.shape[-1]
    order, count = visit_order(block_table(c, cfg))

    def query_chunk(i, carry):
        out, lse = carry
        q_c = _chunk_rows(x.q, i, c.tq, cdt)  # (B, K, T_c, G, H)
        m, total = _initial_stats(x, (b, kh, c.tq, g, 1), cdt)
        m, total, acc = _vary((m, total, jnp.zeros((b, kh, c.tq, g, hv), cdt)), x)

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
    init = _vary(init, x)
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


def backward(x: Inputs, cfg: Config, out, lse, d_out, d_lse, grads=None):
    """The cotangents of `q`, `k`, `v`, `bias` and `sinks` (`None` for those absent).

    `grads`: optional `(dq, dk, dv)` in the compute dtype, shaped like `q`, `k`, `v`,
    that the cotangents of `q`, `k` and `v` are added to (the accumulators of ring
    attention, updated in place rather than summed with a fresh copy).
    """
    cdt = compute_dtype(jnp.result_type(x.q, x.k, x.v))
    # D_i = <dP_i, P_i> = rowsum(dO_i * O_i), less the lse's own cotangent (dlse / dz = p).
    d_row = _formulas.attention_row_term(out.astype(cdt), d_out.astype(cdt), d_lse.astype(cdt))
    d_sinks = None
    if x.sinks is not None:
        d_sinks = _formulas.sink_cotangent(x.sinks.astype(cdt)[None, None], lse, d_row)
        d_sinks = jnp.sum(d_sinks, axis=(0, 1)).astype(x.sinks.dtype)
    c = chunked(x, cfg)
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
        if grads is None:
            dk_c = jnp.zeros((b, kh, c.tk, x.k.shape[-1]), cdt)
            dv_c = jnp.zeros((b, kh, c.tk, x.v.shape[-1]), cdt)
        else:  # the chunk's running sums
            dk_c, dv_c = _chunk_rows(dk, j, c.tk, cdt), _chunk_rows(dv, j, c.tk, cdt)
        init = (dq, *_vary((dk_c, dv_c), x), dbias)
        dq, dk_c, dv_c, dbias = lax.fori_loop(
            jnp.int32(0), count[j], lambda n, st: query_chunk(order[j, n], st), init
        )
        dk = lax.dynamic_update_slice_in_dim(dk, jnp.swapaxes(dk_c, 1, 2), j * c.tk, axis=1)
        dv = lax.dynamic_update_slice_in_dim(dv, jnp.swapaxes(dv_c, 1, 2), j * c.tk, axis=1)
        return dq, dk, dv, dbias

    b, tp, kh, g, h = x.q.shape
    dbias = None if x.bias is None else jnp.zeros(x.bias.shape, cdt)
    if grads is None:
        # dq transposed, as the blocks make it; moved once.
        init = (
            jnp.zeros((b, kh, h, tp, g), cdt),
            jnp.zeros(x.k.shape, cdt),
            jnp.zeros(x.v.shape, cdt),
        )
    else:
        dq0, dk0, dv0 = (a.astype(cdt) for a in grads)
        sp = x.k.shape[1]
        init = (
            _pad_to(jnp.transpose(dq0, (0, 2, 4, 1, 3)), 3, tp),
            _pad_to(dk0, 1, sp),
            _pad_to(dv0, 1, sp),
        )
    init = _vary((*init, dbias), x)
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
kernel_jit = jax.jit(kernel, static_argnums=(1,))


# The default block: about 2**20 scores (4 MiB of float32) over the batch and heads.
_BLOCK_SCORES = 1 << 20


def default_chunks(heads: int, t: int, s: int) -> tuple[int, int]:
    """The default `(query_chunk, key_chunk)` for `heads = B * N` query heads.

    Square blocks of about `2**20` scores over all heads: the power of two nearest below
    `sqrt(2**20 / heads)`, clipped to `[64, 512]` and to `T` and `S`. E.g. 512 for one
    sequence of 4 heads, 128 for 32 or 64 heads, 64 for more than 64. Memory grows
    with it; on a 2-core CPU, blocks of 512 for 4 heads made the training step about
    1.5x faster than blocks of 256 (fewer, larger matrix products).
    """
    side = math.sqrt(_BLOCK_SCORES / max(heads, 1))
    chunk = 1 << int(math.floor(math.log2(max(side, 1.0))))
    chunk = min(max(chunk, 64), 512)
    return max(1, min(chunk, t)), max(1, min(chunk, s))
