"""The attention check of `python -m jsoftmax verify` (`jsoftmax.tools.verify`).

`jsoftmax.attention` on one small grouped-query causal case per dtype: its
Jacobians in `q`, `k`, `v` (`jax.jacrev` through its custom backward pass)
against `jax.jacrev` of a dense float64 attention written from the definition, and the
merge ([`jsoftmax.merge_partials`][]) of its results over two halves of the keys
against the whole. The errors come back as plain numbers; `verify` makes them rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax

# (B, T, S, N, K, H, Hv): 6 queries at positions 2..7 of 8 keys (a KV cache), 4 query
# heads over 2 key heads, chunks of (4, 3) that divide neither length.
SHAPE = (1, 6, 8, 4, 2, 4, 3)


def _f64(a) -> np.ndarray:
    """`a` as a NumPy float64 array (16-bit arrays through float32)."""
    a = jnp.asarray(a)
    if jnp.finfo(a.dtype).bits < 32:
        a = a.astype(jnp.float32)
    return np.asarray(a).astype(np.float64)


def _dense(q, k, v, q_pos, k_pos):
    """Causal attention from the definition, dense, in the inputs' dtype: out and lse."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    z = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    z = jnp.where(k_pos[None, :] <= q_pos[:, None], z, -jnp.inf)
    lse = jax.scipy.special.logsumexp(z, axis=-1)
    out = jnp.einsum("bnts,bsnh->btnh", jnp.exp(z - lse[..., None]), v)
    return out, jnp.swapaxes(lse, 1, 2)


def errors(dtype_name: str, rng: np.random.Generator):
    """`[(quantity, method, shape, max abs error, normalised error), ...]`: the
    Jacobians (normalised by their largest reference entry) and the merged halves
    (output and lse, each normalised by its own largest entry; the worse of the two)."""
    b, t, s, n, kh, h, hv = SHAPE
    dtype = jnp.dtype(dtype_name)
    q, k, v = (
        jnp.asarray(rng.standard_normal(shape), dtype)
        for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, hv))
    )
    q_pos, k_pos = np.arange(s - t, s), np.arange(s)

    def attention(q, k, v, kv_positions=k_pos):
        return jsoftmax.attention(
            q,
            k,
            v,
            is_causal=True,
            q_positions=q_pos,
            kv_positions=kv_positions,
            return_lse=True,
            chunk_size=(4, 3),
        )

    with jax.enable_x64(True):
        args64 = tuple(jnp.asarray(_f64(a)) for a in (q, k, v))
        dense = lambda q, k, v: _dense(q, k, v, q_pos, k_pos)[0]  # noqa: E731
        jac_ref = [np.asarray(j) for j in jax.jit(jax.jacrev(dense, (0, 1, 2)))(*args64)]
        out_ref, lse_ref = (np.asarray(a) for a in jax.jit(_dense)(*args64, q_pos, k_pos))
    jac = jax.jit(jax.jacrev(lambda q, k, v: attention(q, k, v)[0], (0, 1, 2)))(q, k, v)
    scale = max(float(np.abs(j).max()) for j in jac_ref)
    err = max(float(np.abs(_f64(a) - r).max()) for a, r in zip(jac, jac_ref, strict=True))
    shape = (b, t, n, h)
    found = [
        ("attention d out / d (q, k, v)", "jacrev(jsoftmax.attention)", shape, err, err / scale)
    ]
    halves = jax.jit(attention)
    parts = [
        halves(q, k[:, sl], v[:, sl], k_pos[sl]) for sl in (slice(0, s // 2), slice(s // 2, s))
    ]
    out, lse = jax.jit(jsoftmax.merge_partials)(
        jnp.stack([p[0] for p in parts]), jnp.stack([p[1] for p in parts])
    )
    errs = [float(np.abs(_f64(a) - r).max()) for a, r in ((out, out_ref), (lse, lse_ref))]
    rel = max(errs[0] / float(np.abs(out_ref).max()), errs[1] / float(np.abs(lse_ref).max()))
    found.append(
        (
            "attention (out, lse), key halves merged",
            "jsoftmax.merge_partials(attention halves)",
            shape,
            max(errs),
            rel,
        )
    )
    return found
