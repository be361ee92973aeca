r"""The vocabulary-chunk loop of the fused output-layer losses.

The logits `x @ w + b` of a large vocabulary are never built: a `lax.scan` visits
chunks of `w`'s columns, computes each chunk's logits with float32 accumulation,
reduces them to per-row statistics of [`jsoftmax._kernel`][jsoftmax._kernel] (merged
across chunks by its merge rule) and drops them. The backward pass recomputes each
chunk's logits and accumulates `dx`, `dw` and `db` from the chunk's cotangent. The
losses pass in what a chunk contributes (`stats_fn`) and its cotangent (`grad_fn`);
the loop, the chunk layout and the matmuls are here, once. `w` may be one device's
block of a vocabulary split over a mesh axis: `limit` then excludes its padded
columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoftmax import _checks, _formulas, _kernel, _pass

# Elements of one chunk's logits: 2**20 float32 values (4 MiB), see default_chunk_size.
_CHUNK_ELEMENTS = 1 << 20


def default_chunk_size(rows: int, vocab: int) -> int:
    """The default vocabulary chunk: about `2**20` logits (4 MiB in float32) per chunk.

    The power of two nearest below `2**20 / rows`, clipped to `[128, 8192]` and to the
    vocabulary size. E.g. 512 columns for 2048 rows, 128 for 8192 rows or more.
    """
    per_row = max(_CHUNK_ELEMENTS // max(rows, 1), 1)
    chunk = 1 << int(math.floor(math.log2(per_row)))
    return int(min(max(chunk, 128), 8192, vocab))


def chunk_size(chunk_size, rows: int, vocab: int) -> int:
    """The checked `chunk_size` argument (None: `default_chunk_size`)."""
    return _checks.check_chunk_size(chunk_size, default_chunk_size(rows, vocab), max(vocab, 1))


def compute_dtype(x, w) -> np.dtype:
    return np.dtype(_checks.accumulation_dtype(jnp.promote_types(x.dtype, w.dtype)))


def rounded(z: jax.Array) -> jax.Array:
    """`z`, a matmul's result, through `max(z, lowest finite)`: the same values (a matmul
    of finite inputs is finite), but no longer a bare product. With H = 1 XLA turns the
    matmul into a product that it recomputes in each pass reading it, and LLVM contracts
    a product followed by the subtraction of the row maximum into a fused multiply-add,
    which does not round the product: the maximum of the rounded products and the exact
    difference disagree (exp(4096) = inf for logits of 1e12 under `jax.jit`)."""
    return jnp.maximum(z, jnp.asarray(jnp.finfo(z.dtype).min, z.dtype))


class Chunk:
    """One chunk of `w`'s columns: where it starts, its columns and which are its own.

    The last chunk is shifted back to end at the vocabulary's end (its columns that an
    earlier chunk covered are not `fresh`), so `w` is never padded or copied.
    """

    def __init__(self, k, vocab: int, size: int, limit=None):
        self.start = jnp.minimum(k * size, vocab - size)
        self.size = size
        self.cols = self.start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
        self.fresh = self.cols >= k * size
        self.limit = limit
        self.keep: jax.Array = self.fresh  # the columns that count, refined by logits()

    def slice(self, a, axis: int):
        return lax.dynamic_slice_in_dim(a, self.start, self.size, axis=axis)

    def logits(self, x, w, bias, va: int, softcap, cdt):
        """`softcap(x @ w[:, chunk] + b[chunk])` with `cdt` (float32 or wider)
        accumulation, `-inf` on the columns that do not count (not fresh, at or past
        `limit`, or a `-inf` bias); `va` is the vocabulary axis of `w` (1: `(H, V)`, 0:
        `(V, H)`).

        The columns are excluded by adding a `(1, chunk)` row of 0 and `-inf` to the
        matmul's result (with the bias), not by a select: the chunk's logits are then
        the only chunk-sized array of the loop, read by every reduction that follows."""
        z = lax.dot_general(
            x, self.slice(w, va), (((1,), (1 - va,)), ((), ())), preferred_element_type=cdt
        )
        z = rounded(z)
        keep = self.fresh
        if self.limit is not None:
            keep = keep & (self.cols < self.limit)
        shift = jnp.where(keep, jnp.zeros((), cdt), -jnp.inf)
        if bias is not None:
            shift = shift + self.slice(bias, 0).astype(cdt)[None, :]
        self.keep = shift > -jnp.inf  # the columns that count, (1, size)
        z = z + shift
        return z if softcap is None else _formulas.softcap(z, softcap)

    def weights(self, weights, cdt):
        """The chunk's class weights, `(1, size)` (None: unit weights)."""
        if weights is None:
            return None
        return self.slice(weights, 0).astype(cdt)[None, :]

    def onehot(self, idx):
        """True at the column of `idx` (per row, `(rows, 1)`), if it is in this chunk."""
        return (self.cols == idx) & self.fresh


def varying_axes(a) -> frozenset:
    """The mesh axes `a` varies over inside `jax.shard_map` (empty outside)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary_like(tree, ref):
    """`tree` cast to vary over the mesh axes `ref` varies over inside `jax.shard_map`
    (the carries of a scan over one shard's columns); unchanged elsewhere."""
    axes = tuple(sorted(varying_axes(ref)))
    return lax.pcast(tree, axes, to="varying") if axes else tree


def scan_stats(
    x,
    w,
    bias,
    stats_fn: Callable,
    size: int,
    va: int,
    softcap,
    cdt,
    temperature=None,
    limit=None,
    merge: Callable | None = None,
):
    """The row statistics over `w`'s columns, one chunk at a time.

    `stats_fn(chunk, u)` gives a chunk's statistics from its (soft-capped) logits `u`
    (`-inf` on the columns that do not count): a `RowStats`, merged by
    `jsoftmax._kernel.merge_pair`, or any pytree merged by `merge(running, chunk)` (the
    scan starts from its empty statistics: `RowStats` of an empty piece, zeros
    elsewhere).
    """
    vocab = w.shape[va]
    n_chunks = -(-vocab // size)
    if merge is None:
        merge = lambda a, b: _kernel.merge_pair(a, b, temperature)  # noqa: E731

    def chunk_stats(k):
        c = Chunk(k, vocab, size, limit)
        return stats_fn(c, c.logits(x, w, bias, va, softcap, cdt))

    def body(running, k):
        return merge(running, chunk_stats(k)), None

    shape = jax.eval_shape(chunk_stats, jnp.zeros((), jnp.int32))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    is_stats = lambda a: isinstance(a, _kernel.RowStats)  # noqa: E731
    init = jax.tree.map(
        lambda a: _kernel.empty_like(a) if is_stats(a) else a, zeros, is_leaf=is_stats
    )
    st, _ = lax.scan(body, vary_like(init, w), jnp.arange(n_chunks))
    return st


def scan_grads(
    x,
    w,
    bias,
    grad_fn: Callable[[Chunk, jax.Array, jax.Array], jax.Array],
    size: int,
    va: int,
    softcap,
    cdt,
    limit=None,
):
    """`(dx, dw, db)` accumulated over `w`'s columns, one chunk at a time.

    `grad_fn(chunk, u, valid)` gives the chunk's cotangent with respect to its
    (soft-capped) logits `u` (`-inf` where `valid`, the columns that count, is False);
    it is set to 0 off the valid columns and the soft-cap's derivative is applied here.
    `dx` is in `cdt`: for a shard of a split vocabulary it is this shard's part, to be
    summed over the shards.
    """
    vocab = w.shape[va]
    n_chunks = -(-vocab // size)

    def body(carry, k):
        dx, dw, db = carry
        c = Chunk(k, vocab, size, limit)
        u = c.logits(x, w, bias, va, softcap, cdt)
        valid = u > -jnp.inf
        g = jnp.where(valid, grad_fn(c, u, valid), jnp.zeros((), cdt))
        if softcap is not None:
            g = g * _formulas.softcap_derivative(u, softcap)
        dx_c, dw_c = input_grads(x, c.slice(w, va), g, va, cdt)
        dx = dx + dx_c
        dw_c = (c.slice(dw, va).astype(cdt) + dw_c).astype(dw.dtype)
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c, c.start, axis=va)
        if db is not None:
            db_c = (c.slice(db, 0).astype(cdt) + jnp.sum(g, axis=0)).astype(db.dtype)
            db = lax.dynamic_update_slice_in_dim(db, db_c, c.start, axis=0)
        return (dx, dw, db), None

    init = (
        jnp.zeros(x.shape, cdt),
        jnp.zeros(w.shape, w.dtype),
        None if bias is None else jnp.zeros(bias.shape, bias.dtype),
    )
    (dx, dw, db), _ = lax.scan(body, vary_like(init, w), jnp.arange(n_chunks))
    return dx, dw, db


def row_logits(x, w, bias, va: int, cdt):
    """The whole rows of logits `x @ w + b` (`(rows, V)`, `cdt` accumulation; `va` is
    the vocabulary axis of `w`), `-inf` on the `-inf` bias columns."""
    u = rounded(lax.dot_general(x, w, (((1,), (1 - va,)), ((), ())), preferred_element_type=cdt))
    return u if bias is None else u + bias.astype(cdt)[None, :]


def input_grads(x, w, g, va: int, cdt):
    """`(dx, dw)` of logits `x @ w` from their cotangent `g`: `g @ w^T` and `x^T @ g` in
    `w`'s layout, with the inputs' dtype and `cdt` accumulation (no float32 GEMM for
    16-bit inputs)."""
    g_in = g.astype(jnp.promote_types(x.dtype, w.dtype))
    dx = lax.dot_general(g_in, w, (((1,), (va,)), ((), ())), preferred_element_type=cdt)
    a, b = (x, g_in) if va == 1 else (g_in, x)
    return dx, lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=cdt)


# Rows of one chunk of whole rows (scan_rows): about 2**22 logits (16 MiB in float32), and
# at least 128 rows, since each chunk adds its x^T g to all of dw (H * V values): with
# fewer rows that update, not the matmuls, would bound the time.
_ROW_CHUNK_ELEMENTS = 1 << 22
_MIN_ROW_CHUNK = 128


def row_chunk(chunk_size, rows: int, vocab: int, size: int) -> int:
    """Rows per chunk of `scan_rows`: with an explicit `chunk_size` (checked: `size`),
    the memory of that vocabulary chunk over all rows (`rows * size` logits); by
    default about `2**22` logits, at least 128 rows. At least one row, at most `rows`."""
    if chunk_size is not None:
        per_chunk = (rows * size) // max(vocab, 1)
    else:
        per_chunk = max(_ROW_CHUNK_ELEMENTS // max(vocab, 1), _MIN_ROW_CHUNK)
    return int(max(1, min(rows, per_chunk)))


def scan_rows(x, w, bias, rows_fn: Callable, size: int, va: int, cdt, extras=(), grads=True):
    """`(total, dx, dw, db)` of a sum over rows of a loss of whole rows of logits, with its
    gradient formed in the same pass, one chunk of `size` rows at a time.

    `rows_fn(u, ok, extras)` gives, from a chunk's logits `u = x @ w + b` (`(size, V)`,
    `-inf` on the `-inf` bias columns), the chunk's row values and their cotangent with
    respect to `u`, 0 in the rows that do not count (`ok`, `(size,)`, is False in the
    rows that pad the last chunk); the cotangent is set to 0 on the `-inf` columns
    here, as by `scan_grads`. `extras` are further `(rows, ...)` arrays, chunked like
    `x`. The sum of the values and its gradients in `x`, `w` and `bias` take four
    matmuls, as for the dense logits, where the vocabulary loop (`scan_stats`,
    `scan_grads`) recomputes the logits in the backward pass. For a scalar loss only,
    whose cotangent then scales the gradients. With `grads=False`,
    `(total, None, None, None)`. Memory: a chunk of logits, and `dw` accumulated in
    `cdt`.
    """
    n = x.shape[0]
    k = -(-n // size)
    pad = k * size - n

    def split(a):
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((k, size) + a.shape[1:])

    def body(carry, xs):
        total, dw, db = carry
        x_c, ok, ex = xs
        u = row_logits(x_c, w, bias, va, cdt)
        value, g = rows_fn(u, ok, ex)
        g = jnp.where(u > -jnp.inf, g, jnp.zeros((), cdt))  # excluded classes: no gradient
        total = total + jnp.sum(jnp.where(ok, value, jnp.zeros((), cdt)))
        if not grads:
            return (total, dw, db), None
        dx, dw_c = input_grads(x_c, w, g, va, cdt)
        dw = dw + dw_c
        if db is not None:
            db = db + jnp.sum(g, axis=0)
        return (total, dw, db), dx

    keep = split(jnp.ones((n,), bool))
    xs = (split(x), keep, tuple(split(e) for e in extras))
    zero = jnp.zeros((), cdt)
    dw0 = jnp.zeros(w.shape, cdt) if grads else None
    db0 = jnp.zeros(bias.shape, cdt) if grads and bias is not None else None
    (total, dw, db), dx = lax.scan(body, vary_like((zero, dw0, db0), w), xs)
    if dx is None or dw is None:  # grads=False
        return total, None, None, None
    dx = dx.reshape((k * size,) + dx.shape[2:])[:n]
    db = None if db is None or bias is None else db.astype(bias.dtype)
    return total, dx, dw.astype(w.dtype), db


# --------------------------------------------------------------------------------------
# The cross-entropy of integer labels over chunks (the fused and the sharded fused loss).
# --------------------------------------------------------------------------------------


def ce_stats_fn(weights, flags: _kernel.Flags, cdt, temperature=None):
    """`stats_fn` of a cross-entropy with integer labels: the row maximum and sum of
    exponentials, and with label smoothing the valid columns' count, weight and centred
    sum. The label's logit is not read from the chunk (a second reader of the chunk's
    logits would keep a second chunk-sized array alive): see `label_logits`."""

    def stats_fn(c: Chunk, u):
        fp = _pass.exp_pass(u, None, (1,), temperature)
        st = _kernel.RowStats(fp.m, fp.total)
        if not flags.smoothing:
            return st
        # The valid columns are the same for every row: count them (and their weight)
        # from the chunk's column mask, so that the centred sum is the only other reader
        # of the chunk's logits.
        zero = jnp.zeros((), cdt)
        keep = c.keep
        w_c = c.weights(weights, cdt)
        w_keep = keep.astype(cdt) if w_c is None else jnp.where(keep, w_c, zero)
        count = jnp.broadcast_to(jnp.sum(keep, 1, keepdims=True, dtype=cdt), fp.m.shape)
        gap = jnp.where(u > -jnp.inf, u - fp.m, zero)
        centred = jnp.sum(w_keep * gap, 1, keepdims=True)
        wsum = None
        if w_c is not None:
            wsum = jnp.broadcast_to(jnp.sum(w_keep, 1, keepdims=True), fp.m.shape)
        return st._replace(count=count, wsum=wsum, centred=centred)

    return stats_fn


def label_logits(x, w, bias, idx, va: int, softcap, cdt, limit=None):
    """The (soft-capped) logit of each row's label column `idx` of `w` (`(rows, 1)`): 0
    where `idx` is -1 (a label held by another shard), `-inf` where the column does not
    count (a `-inf` bias, or at or past `limit`).

    A gather of `w`'s columns and a dot product per row, $O(NH)$. It rounds differently
    from the chunk's matmul, by a few ULP, so the kernel clamps the label's logit to the
    row maximum (`jsoftmax._kernel.integer_loss`): the loss is never negative.
    """
    here = idx >= 0
    j = jnp.maximum(idx[:, 0], 0)
    w_y = jnp.take(w, j, axis=va)  # (H, N) or (N, H)
    spec = "nh,hn->n" if va == 1 else "nh,nh->n"
    z = rounded(jnp.einsum(spec, x, w_y, preferred_element_type=cdt)[:, None])
    if bias is not None:
        z = z + bias[j].astype(cdt)[:, None]
    if limit is not None:
        z = jnp.where(j[:, None] < limit, z, -jnp.inf)
    if softcap is not None:
        z = _formulas.softcap(z, softcap)
    return jnp.where(here, z, jnp.zeros((), cdt))


def ce_grad_fn(idx, in_range, weights, row: _kernel.Row, g, ok, cdt, temperature=None):
    """`grad_fn` of a cross-entropy with integer labels: the fused cotangent
    $(\\sum q + 2cb\\,\\mathrm{lse})p - q$ times the loss's cotangent `g` (0 where the
    row does not count, `ok`), divided by the temperature."""

    def grad_fn(c: Chunk, u, valid):
        p = _kernel.probs(u, row, temperature)
        q = _kernel.targets(row, valid, onehot=c.onehot(idx), w=c.weights(weights, cdt))
        g_s = _kernel.score_cotangent(p, q, row)
        g_s = jnp.where(in_range, g_s, jnp.full((), jnp.nan, cdt)) * g
        g_s = _kernel.mask_rows(g_s, ok)
        return g_s if temperature is None else g_s / temperature.astype(cdt)

    return grad_fn
