"""`jsoftmax.attention`: the public function, its argument checks, and the call into
the blocked kernel of `jsoftmax._attention_kernel`."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jsoftmax import _checks
from jsoftmax._attention_kernel import Config, Inputs, compute_dtype, default_chunks, kernel_jit


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_qkv(query, key, value):
    q = _checks.floating_array(query, "query")
    k = _checks.floating_array(key, "key")
    v = _checks.floating_array(value, "value")
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
    bias = _checks.floating_array(bias, "bias")
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


def _check_per_position(a, name: str, b: int, length: int, axis_name: str, wide=False):
    """Positions or segment ids: `(L,)` or `(B, L)`, returned as `(1 or B, L)`; with
    `wide`, in JAX's default integer type (for positions: signed, so that a position
    minus a window's left size does not wrap, and int64 under x64, not truncated)."""
    if a is None:
        return None
    a = _check_int_array(a, name)
    a = a.astype(jnp.result_type(int)) if wide else a
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
    scale = _checks.concrete_scalar(scale, "fiu")
    if isinstance(scale, (bool, np.bool_)) or not isinstance(
        scale, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"scale must be None or a real number known at trace time (it is static), "
            f"got {scale!r}."
        )
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
    sinks = _checks.floating_array(sinks, "sinks")
    if sinks.shape != (n,):
        raise ValueError(
            f"sinks must have one logit per query head, shape ({n},), got {sinks.shape}."
        )
    return sinks


def _check_flag(value, name: str) -> bool:
    value = _checks.concrete_scalar(value, "b")
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return bool(value)


class Checked(NamedTuple):
    """The checked arguments that `attention` and `jsoftmax.sharded.attention` share:
    `q`, `k`, `v` with a batch axis (added when `batched` is False), segment ids as
    `(1 or B, L)`, `sinks` `(N,)` (or None) and `chunks` `(query_chunk, key_chunk)`."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    batched: bool
    scale: float
    causal: bool
    window: tuple[int, int] | None
    q_seg: jax.Array | None
    kv_seg: jax.Array | None
    softcap: float | None
    sinks: jax.Array | None
    return_lse: bool
    chunks: tuple[int, int]


def check_common(
    query,
    key,
    value,
    scale,
    is_causal,
    local_window_size,
    q_segment_ids,
    kv_segment_ids,
    logit_softcap,
    sinks,
    return_lse,
    chunk_size,
) -> Checked:
    """The checks of the arguments every attention function takes (errors name them)."""
    q, k, v = _check_qkv(query, key, value)
    batched = q.ndim == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]
    b, t, n, h = q.shape
    s = k.shape[1]
    cfg_scale = _check_scale(scale, h)
    causal = _check_flag(is_causal, "is_causal")
    return_lse = _check_flag(return_lse, "return_lse")
    window = _check_window(local_window_size)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        missing = "kv_segment_ids" if kv_segment_ids is None else "q_segment_ids"
        raise ValueError(f"{missing} is missing: segment ids need both q_ and kv_segment_ids.")
    q_seg = _check_per_position(q_segment_ids, "q_segment_ids", b, t, "T")
    kv_seg = _check_per_position(kv_segment_ids, "kv_segment_ids", b, s, "S")
    cap = _checks.check_softcap(logit_softcap)
    sinks_n = _check_sinks(sinks, n)
    chunks = _check_chunk_size(chunk_size, b * n, t, s)
    return Checked(
        q, k, v, batched, cfg_scale, causal, window, q_seg, kv_seg, cap, sinks_n, return_lse, chunks
    )


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
        multiples. Default: square blocks of about $2^{20}$ scores over the batch and
        heads (512 for `B * N = 4`), a power of two in $[64, 512]$.

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
    options = (scale, is_causal, local_window_size, q_segment_ids, kv_segment_ids)
    c = check_common(query, key, value, *options, logit_softcap, sinks, return_lse, chunk_size)
    q, k, v = c.q, c.k, c.v
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    target = (b, n, t, s)
    bias_4 = _check_bias(bias, target)
    mask_4 = _check_mask(mask, target)
    q_len = _check_lengths(query_seq_lengths, "query_seq_lengths", b)
    kv_len = _check_lengths(key_value_seq_lengths, "key_value_seq_lengths", b)
    q_pos = _check_per_position(q_positions, "q_positions", b, t, "T", wide=True)
    kv_pos = _check_per_position(kv_positions, "kv_positions", b, s, "S", wide=True)
    sinks_n, batched = c.sinks, c.batched
    cdt = compute_dtype(jnp.result_type(q, k, v))
    if min(b, t, s, n) == 0:
        out, lse = empty(q, v, sinks_n, cdt)
    else:
        x = Inputs(
            q=q.reshape(b, t, kh, g, h),
            k=k,
            v=v,
            bias=_split_heads(bias_4, kh, g),
            mask=_split_heads(mask_4, kh, g),
            q_pos=jnp.arange(t, dtype=jnp.int32)[None] if q_pos is None else q_pos,
            kv_pos=jnp.arange(s, dtype=jnp.int32)[None] if kv_pos is None else kv_pos,
            q_seg=c.q_seg,
            kv_seg=c.kv_seg,
            q_len=q_len,
            kv_len=kv_len,
            sinks=None if sinks_n is None else sinks_n.reshape(kh, g),
        )
        cfg = Config(c.scale, c.causal, c.window, c.softcap, *c.chunks)
        out, lse = kernel_jit(x, cfg)
        out = out.reshape(b, t, n, v.shape[-1])
        lse = lse.reshape(b, t, n)
    if not batched:
        out, lse = out[0], lse[0]
    return (out, lse) if c.return_lse else out


def empty(q, v, sinks, cdt):
    """No query, key or head: output 0; `lse` is the sink alone (or `-inf`)."""
    b, t, n, _ = q.shape
    out = jnp.zeros((b, t, n, v.shape[-1]), q.dtype)
    if sinks is None:
        return out, jnp.full((b, t, n), -jnp.inf, cdt)
    return out, jnp.broadcast_to(sinks.astype(cdt), (b, t, n))
