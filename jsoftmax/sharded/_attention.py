r"""`attention`: ring attention, the sequence split over devices (inside `shard_map`).

Each device holds a contiguous block of the queries and of the keys and values. The
key/value blocks travel around the ring of devices with `lax.ppermute` (device $d$
sends to $d + 1$); at ring step $r$ device $d$ holds the block of device $d - r$ and
runs the blocked kernel of `jsoftmax._attention_kernel` on its queries against it,
with global positions, merging the step's output and log-sum-exp into the running ones
with the merge rule of `jsoftmax._merge`. The backward pass is a `jax.custom_vjp`: it
sends the blocks around the ring again, each with the accumulators of its `dk` and
`dv`, which arrive back at the block's owner after the full circle. Per step it runs
the kernel's backward with the global output and log-sum-exp, which is exactly the
block's share of the FlashAttention backward. Nothing is gathered: a device holds its
own blocks, one received block (and the one in flight) and its accumulators.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _attention, _attention_kernel, _chunks, _custom, _formulas, _merge
from jsoftmax._attention_kernel import Config, Inputs
from jsoftmax.sharded import _common
from jsoftmax.sharded._common import AxisName


class _Ring(NamedTuple):
    """The static part of a call: the kernel's configuration and the ring."""

    cfg: Config
    axis_name: AxisName
    shards: int


def _shift(tree, ring: _Ring, name: str):
    """Each device's arrays sent to the next device of the ring (the last to the first),
    under the name scope `name` (it shows in profiles and in the compiled program)."""
    pairs = _common.ring_permutation(ring.axis_name, ring.shards)
    with jax.named_scope(name):
        return lax.ppermute(tree, ring.axis_name, pairs)


def _positions(block, t: int) -> jax.Array:
    """The global positions `(1, t)` of the sequence block held first by device `block`."""
    return (block * t + jnp.arange(t, dtype=jnp.int32))[None]


def _if_visible(src, dst, t: int, cfg: Config, compute, skip):
    """`compute()` if a query of device `dst`'s block may see a key of device `src`'s
    block (from the blocks' ranges of positions: causality and the window), else
    `skip()`, which computes nothing (`lax.cond`)."""
    if not cfg.causal and cfg.window is None:
        return compute()
    q_lo, k_lo = dst * t, src * t
    q_hi, k_hi = q_lo + (t - 1), k_lo + (t - 1)
    ok = _attention_kernel.positions_visible(q_lo, q_hi, k_lo, k_hi, cfg)
    return lax.cond(ok, compute, skip)


class _Local(NamedTuple):
    """A device's part of one call: its queries (in the compute dtype), their segment
    ids and positions, its ring index and the block length."""

    q: jax.Array
    q_seg: jax.Array | None
    q_pos: jax.Array
    me: jax.Array
    t: int

    @classmethod
    def of(cls, q, q_seg, ring: _Ring, cdt):
        me = lax.axis_index(ring.axis_name)
        t = q.shape[1]
        return cls(q.astype(cdt), q_seg, _positions(me, t), me, t)

    def inputs(self, block, src, cdt) -> Inputs:
        """The kernel's inputs for the local queries against `block` = `(k, v, kv_seg)`
        of device `src` (keys and values in the compute dtype, so that the results
        and the gradients come back in it)."""
        k, v, kv_seg = block
        k, v = k.astype(cdt), v.astype(cdt)
        kv_pos = _positions(src, self.t)
        return Inputs(
            self.q, k, v, None, None, self.q_pos, kv_pos, self.q_seg, kv_seg, None, None, None
        )


def _ring_loop(step, carry, block, ring: _Ring):
    """The ring: `carry = step(r, block_r, carry)` for `r = 0 .. P-1`, where `block_r`
    is the block of device `me - r` (`block_0 = block`, the own one); the next block is
    already on its way while a step computes. `P - 1` sends of the blocks."""

    def body(r, state):
        carry, block = state
        following = _shift(block, ring, "ring_kv")
        return step(r, block, carry), following

    carry, block = lax.fori_loop(0, ring.shards - 1, body, (carry, block))
    return step(ring.shards - 1, block, carry)


def _sink_stats(sinks, like: jax.Array) -> jax.Array:
    """The sink logits `(K, G)` broadcast to the rows' statistics `like` `(B, T, K, G)`."""
    return jnp.broadcast_to(sinks.astype(like.dtype), like.shape)


def _forward(q, k, v, q_seg, kv_seg, sinks, ring: _Ring):
    cfg = ring.cfg
    cdt = _attention_kernel.compute_dtype(jnp.result_type(q, k, v))
    loc = _Local.of(q, q_seg, ring, cdt)
    b, t, kh, g, _ = q.shape
    empty = (jnp.zeros((b, t, kh, g, v.shape[-1]), cdt), jnp.full((b, t, kh, g), -jnp.inf, cdt))

    def step(r, block, state):
        src = (loc.me - r) % ring.shards

        def merged():
            x = loc.inputs(block, src, cdt)
            out, lse = _attention_kernel.forward(x, cfg)
            return _merge.merge_two(state[0], state[1], out, lse)

        return _if_visible(src, loc.me, loc.t, cfg, merged, lambda: state)

    out, lse = _ring_loop(step, _chunks.vary_like(empty, loc.q), (k, v, kv_seg), ring)
    if sinks is not None:
        # The sinks join the denominators once: a piece with value 0 and log-sum-exp s.
        out, lse = _merge.merge_two(out, lse, jnp.zeros_like(out), _sink_stats(sinks, lse))
    return out.astype(q.dtype), lse


@partial(_custom.custom_vjp, nondiff_argnums=(6,))
def _ring_attention(q, k, v, q_seg, kv_seg, sinks, ring: _Ring):
    """`(out, lse)` of ring attention, in the kernel's layout (see `Inputs`)."""
    return _forward(q, k, v, q_seg, kv_seg, sinks, ring)


def _ring_attention_fwd(q, k, v, q_seg, kv_seg, sinks, ring: _Ring):
    out, lse = _forward(q, k, v, q_seg, kv_seg, sinks, ring)
    return (out, lse), (q, k, v, q_seg, kv_seg, sinks, out, lse)


def _ring_attention_bwd(ring: _Ring, residuals, cotangents):
    q, k, v, q_seg, kv_seg, sinks, out, lse = residuals
    d_out, d_lse = cotangents
    cfg = ring.cfg
    cdt = _attention_kernel.compute_dtype(jnp.result_type(q, k, v))
    loc = _Local.of(q, q_seg, ring, cdt)
    d_sinks = None
    if sinks is not None:
        d_row = _formulas.attention_row_term(out.astype(cdt), d_out.astype(cdt), d_lse)
        d_sinks = _formulas.sink_cotangent(_sink_stats(sinks, lse), lse, d_row)
        d_sinks = jnp.sum(d_sinks, axis=(0, 1)).astype(sinks.dtype)

    def step(r, block, carry):
        # `acc`: the dk, dv of the block held, summed over the devices it has visited;
        # it travels on with the block and, after the last step, reaches its owner.
        dq, acc = carry
        src = (loc.me - r) % ring.shards

        def visit():
            x = loc.inputs(block, src, cdt)
            sums = (dq, *acc)  # added to in place
            dq_new, dk, dv, _, _ = _attention_kernel.backward(x, cfg, out, lse, d_out, d_lse, sums)
            return dq_new, (dk, dv)

        dq, acc = _if_visible(src, loc.me, loc.t, cfg, visit, lambda: (dq, acc))
        return dq, _shift(acc, ring, "ring_dkv")

    zeros = (jnp.zeros(loc.q.shape, cdt), (jnp.zeros(k.shape, cdt), jnp.zeros(v.shape, cdt)))
    init = _chunks.vary_like(zeros, loc.q)
    dq, (dk, dv) = _ring_loop(step, init, (k, v, kv_seg), ring)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, d_sinks


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    axis_name: AxisName,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
    logit_softcap: float | None = None,
    sinks: ArrayLike | None = None,
    return_lse: bool = False,
    chunk_size: int | tuple[int, int] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Ring attention: softmax attention with the sequence split over devices; call
    inside `jax.shard_map`.

    [`jsoftmax.attention`][jsoftmax.attention] over a sequence whose blocks live on the
    devices of `axis_name` (context parallelism): device $d$ of $P$ holds the queries,
    keys and values at the global positions $dT, \dots, (d+1)T - 1$. The key/value
    blocks travel around the ring of devices with `lax.ppermute`; at step
    $r = 0, \dots, P-1$ device $d$ holds the block of device $d - r \bmod P$, computes
    its queries' attention over it with the blocked kernel (global positions for
    `is_causal` and `local_window_size`) with the block's log-sum-exp $\ell^{(r)}$,
    and merges it into the running result by the rule of
    [`jsoftmax.merge_partials`][jsoftmax.merge_partials]:

    $$
    \ell = \log\big(e^{\ell_{\text{old}}} + e^{\ell^{(r)}}\big), \qquad
    o = e^{\ell_{\text{old}} - \ell}\, o_{\text{old}} + e^{\ell^{(r)} - \ell}\, o^{(r)} .
    $$

    The sink logits join every row's denominator once, merged after the last step as a
    piece of value 0 and log-sum-exp $\sigma$. The backward pass (a `jax.custom_vjp`)
    sends the blocks around the ring again, each with the accumulators of its `dK` and
    `dV`; every step adds the local queries' share, computed from the saved global
    output and $\ell$ (the FlashAttention backward of one block), and after a full
    circle the accumulators are back on the block's owner. Blocks that causality or the
    window hide from all local queries are skipped (`lax.cond`), and the kernel skips
    the hidden chunks of the others (also those of other segments).

    Communication: $P - 1$ sends of the key and value blocks (and of `kv_segment_ids`)
    forward, the same backward, and $P$ sends of the `dK` and `dV` accumulators (a full
    circle), each to the next device (`collective-permute`). The next block's send is
    issued before the step on the current block, so the two can overlap. Nothing is
    gathered; per-device memory is O(`T`) for `T` local positions.

    Args:
      query: this device's block of queries, `(B, T, N, H)` or `(T, N, H)`.
      key: this device's block of keys, `(B, T, K, H)` (or `(T, K, H)`), the same
        positions as `query`; `N` must be a multiple of `K` (grouped-query attention).
      value: this device's block of values, `(B, T, K, Hv)` (or `(T, K, Hv)`).
      axis_name: the mesh axis name (or tuple of names, major first, as in the
        `PartitionSpec`) that the sequence axis is split over.
      scale: the factor of $q \cdot k$; default $1/\sqrt{H}$.
      is_causal: query $i$ sees keys at global positions up to its own.
      local_window_size: `(left, right)`, or an int `w` for `(w, w)`, in global
        positions, as in [`jsoftmax.attention`][jsoftmax.attention].
      q_segment_ids: optional integers `(T,)` or `(B, T)`, this device's block (split
        like `query`); with `kv_segment_ids`, a query sees only keys of its own segment.
      kv_segment_ids: this device's block of the keys' segment ids, `(T,)` or
        `(B, T)`; they travel with the keys.
      logit_softcap: optional positive $c$: scores become $c \tanh(z / c)$.
      sinks: optional `(N,)`, a learned logit per head in every row's softmax
        denominator (the same on every device); its gradient is summed over the devices.
      return_lse: also return the rows' log-sum-exp, `(B, T, N)` (or `(T, N)`),
        differentiable.
      chunk_size: the kernel's `(query_chunk, key_chunk)` within a block, or an int for
        both (default as in [`jsoftmax.attention`][jsoftmax.attention], from `T`).

    Returns:
      This device's block of the output, `(B, T, N, Hv)` (or `(T, N, Hv)`) in
      `query`'s dtype; with `return_lse=True`, `(output, lse)` (`lse` float32 for
      16-bit inputs). The same values as [`jsoftmax.attention`][jsoftmax.attention] on
      the whole sequence, up to rounding.

    Note:
      * The split is contiguous, so with `is_causal` the last device does $P$ blocks of
        work and the first one block; for balanced work permute the sequence before
        splitting (with `q_segment_ids` or the window this needs positions, which
        [`jsoftmax.attention`][jsoftmax.attention] takes and this function does not).
      * The sinks' gradient is summed over the devices, as `jax.shard_map` sums the
        cotangent of a replicated input.
      * Gradients flow to `query`, `key`, `value` and `sinks`; reverse mode only.
      * Raises `ValueError` when `axis_name` is not bound, i.e. outside
        `jax.shard_map`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import jsoftmax
      >>> from jsoftmax import sharded
      >>> mesh = jax.make_mesh((1,), ("seq",))  # any number of devices dividing T
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 64, 4, 16))
      >>> split = jax.NamedSharding(mesh, P(None, "seq"))  # (B, T, N, H): T split
      >>> ring = jax.jit(jax.shard_map(
      ...     lambda q, k, v: sharded.attention(q, k, v, "seq", is_causal=True),
      ...     mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq")))
      >>> out = ring(*jax.device_put((q, k, v), split))
      >>> ref = jsoftmax.attention(q, k, v, is_causal=True)
      >>> print(out.shape, bool(jnp.allclose(out, ref, atol=1e-6)))
      (2, 64, 4, 16) True
    """
    axis_name = _common.check_axis_name(axis_name)
    options = (scale, is_causal, local_window_size, q_segment_ids, kv_segment_ids)
    c = _attention.check_common(
        query, key, value, *options, logit_softcap, sinks, return_lse, chunk_size
    )
    q, k, v = c.q, c.k, c.v
    b, t, n, h = q.shape
    kh = k.shape[2]
    if k.shape[1] != t:
        raise ValueError(
            f"key must hold the same positions as query: its local sequence length "
            f"{k.shape[1]} differs from query's {t} (query, key and value are split "
            "alike over axis_name)."
        )
    shards = _common.num_shards(axis_name, "attention", "the sequence axis of query, key and value")
    if min(b, t, n) == 0:
        cdt = _attention_kernel.compute_dtype(jnp.result_type(q, k, v))
        out, lse = _attention.empty(q, v, c.sinks, cdt)
    else:
        g = n // kh
        sinks_kg = None if c.sinks is None else c.sinks.reshape(kh, g)
        arrays = (q.reshape(b, t, kh, g, h), k, v, c.q_seg, c.kv_seg, sinks_kg)
        arrays = _common.varying(arrays, _common.axis_tuple(axis_name))
        ring = _Ring(Config(c.scale, c.causal, c.window, c.softcap, *c.chunks), axis_name, shards)
        out, lse = _ring_attention(*arrays, ring)
        out, lse = out.reshape(b, t, n, v.shape[-1]), lse.reshape(b, t, n)
    if not c.batched:
        out, lse = out[0], lse[0]
    return (out, lse) if c.return_lse else out
