"""jsoftmax.attention against a dense reference written from the definitions (float64
where enabled, with `jax.grad` of it for the gradients) and against
`jax.nn.dot_product_attention(implementation="xla")` for the options both have."""

from __future__ import annotations

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from jsoftmax import _attention_kernel

from helpers import REF_DTYPE, X64, f64, fast_subset, saved_residuals

# float64: every value and gradient within 1e-9 of the reference, relative to the largest
# entry of the reference; float32 (JSOFTMAX_TEST_X64=0): a few float32 roundings of
# sums over up to a few hundred keys.
RTOL = 1e-9 if X64 else 2e-5


def assert_rel(a, b, rtol=RTOL, name=""):
    """max |a - b| <= rtol * max |b| (same shapes; -inf entries must match exactly)."""
    a, b = f64(a), f64(b)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    inf = np.isinf(b)
    np.testing.assert_array_equal(a[inf], b[inf], err_msg=name)
    a, b = a[~inf], b[~inf]
    if b.size == 0:
        return
    err = float(np.max(np.abs(a - b)))
    scale = max(float(np.max(np.abs(b))), 1e-300)
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"


# --------------------------------------------------------------------------------------
# The reference: dense scores of shape (B, N, T, S), from the definitions.
# --------------------------------------------------------------------------------------


def reference(
    q,
    k,
    v,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal=False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    q_positions=None,
    kv_positions=None,
    logit_softcap=None,
    sinks=None,
    dtype=REF_DTYPE,
):
    """`(out, lse)` of batched inputs `(B, T, N, H)`, `(B, S, K, H)`, `(B, S, K, Hv)`.

    z = scale * q.k + bias, soft-capped; key j is visible to query i under every
    option; p = exp(z) / (exp(sink) + sum_visible exp(z)); out = p v; lse = log of the
    denominator. A row with nothing in its denominator gives out 0 and lse -inf (with
    finite gradients: every select is doubled).
    """
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    head = np.arange(n) // (n // kh)  # query head n reads key head n // (N / K)
    k, v = k[:, :, head], v[:, :, head]
    scale = 1 / math.sqrt(h) if scale is None else scale
    z = scale * jnp.einsum("btnh,bsnh->bnts", q, k)
    if bias is not None:
        z = z + bias.astype(dtype)
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    vis = np.ones((1, 1, t, s), bool)
    qp = np.arange(t) if q_positions is None else np.asarray(q_positions)
    kp = np.arange(s) if kv_positions is None else np.asarray(kv_positions)
    qp = np.broadcast_to(qp, (b, t))[:, None, :, None]
    kp = np.broadcast_to(kp, (b, s))[:, None, None, :]
    if is_causal:
        vis = vis & (kp <= qp)
    if local_window_size is not None:
        left, right = (
            (local_window_size,) * 2 if isinstance(local_window_size, int) else local_window_size
        )
        vis = vis & (kp >= qp - left) & (kp <= qp + right)
    if query_seq_lengths is not None:
        vis = vis & (
            np.arange(t)[None, None, :, None] < np.asarray(query_seq_lengths)[:, None, None, None]
        )
    if key_value_seq_lengths is not None:
        kvl = np.asarray(key_value_seq_lengths)[:, None, None, None]
        vis = vis & (np.arange(s)[None, None, None, :] < kvl)
    if q_segment_ids is not None:
        qs = np.broadcast_to(np.asarray(q_segment_ids), (b, t))[:, None, :, None]
        ks = np.broadcast_to(np.asarray(kv_segment_ids), (b, s))[:, None, None, :]
        vis = vis & (qs == ks)
    if mask is not None:
        vis = vis & np.asarray(mask)
    vis = np.broadcast_to(vis, (b, n, t, s))
    zv = jnp.where(vis, z, -jnp.inf)
    m = jnp.max(zv, axis=-1, keepdims=True, initial=-jnp.inf)
    if sinks is not None:
        sink = sinks.astype(dtype)[None, :, None, None]
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(vis, jnp.exp(jnp.where(vis, z, 0.0) - m), 0.0)
    den = jnp.sum(e, axis=-1, keepdims=True)
    if sinks is not None:
        den = den + jnp.exp(sink - m)
    empty = den == 0
    safe = jnp.where(empty, 1.0, den)
    out = jnp.einsum("bnts,bsnh->btnh", e / safe, v)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe))[..., 0]
    return out, jnp.transpose(lse, (0, 2, 1))


def run_reference(f, *args):
    """`jax.jit(f)(*args)` compiled without XLA's backend optimisations: a reference's
    values do not depend on them, and it compiles several times faster."""
    compiled = jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0})
    return compiled(*args)


# --------------------------------------------------------------------------------------
# Inputs and the options.
# --------------------------------------------------------------------------------------

B, T, S, N, K, H = 2, 23, 19, 4, 2, 8


def inputs(b=B, t=T, s=S, n=N, kh=K, h=H, hv=None, dtype=REF_DTYPE, seed=0):
    rng = np.random.default_rng(seed)
    hv = h if hv is None else hv
    q = rng.standard_normal((b, t, n, h))
    k = rng.standard_normal((b, s, kh, h))
    v = rng.standard_normal((b, s, kh, hv))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _rng(seed=1):
    return np.random.default_rng(seed)


def _options(t=T, s=S, b=B, n=N):
    """name -> (keyword arguments, differentiable arrays among them)."""
    rng = _rng()
    bias_full = jnp.asarray(rng.standard_normal((b, n, t, s)), REF_DTYPE)
    bias_row = jnp.asarray(rng.standard_normal((1, n, 1, s)), REF_DTYPE)
    mask = rng.random((b, 1, t, s)) < 0.7
    mask[0, 0, 3] = False  # a fully masked row
    seg_q = np.sort(rng.integers(0, 3, (b, t)), axis=1)
    seg_k = np.sort(rng.integers(0, 3, (b, s)), axis=1)
    sinks = jnp.asarray(rng.standard_normal(n), REF_DTYPE)
    return {
        "plain": {},
        "bias": dict(bias=bias_full),
        "bias broadcast": dict(bias=bias_row),
        "mask": dict(mask=jnp.asarray(mask)),
        "causal": dict(is_causal=True),
        "scale": dict(scale=0.7),
        "query_seq_lengths": dict(query_seq_lengths=jnp.asarray([t - 5, t], jnp.int32)),
        "key_value_seq_lengths": dict(key_value_seq_lengths=jnp.asarray([s - 7, 3], jnp.int32)),
        "window": dict(local_window_size=(4, 2)),
        "segments": dict(q_segment_ids=jnp.asarray(seg_q), kv_segment_ids=jnp.asarray(seg_k)),
        "positions": dict(
            is_causal=True,
            q_positions=jnp.arange(s - t, s),  # a KV cache: the last T of S positions
            kv_positions=jnp.arange(s),
        ),
        "batched positions": dict(
            local_window_size=(3, 3),
            q_positions=jnp.asarray(rng.integers(0, 30, (b, t))),
            kv_positions=jnp.asarray(rng.integers(0, 30, (b, s))),
        ),
        "softcap": dict(logit_softcap=1.5),
        "sinks": dict(sinks=sinks),
    }


def _all_together(t=T, s=S, b=B, n=N):
    o = _options(t, s, b, n)
    return {
        **o["bias"],
        **o["mask"],
        **o["segments"],
        "scale": 0.9,
        "is_causal": True,
        "query_seq_lengths": jnp.asarray([t - 2, t], jnp.int32),
        "key_value_seq_lengths": jnp.asarray([s, s - 4], jnp.int32),
        "local_window_size": (3, 1),
        "q_positions": jnp.arange(t) + (s - t),
        "logit_softcap": 2.0,
        "sinks": o["sinks"]["sinks"],
    }


OPTIONS = _options()
OPTION_NAMES = list(OPTIONS) + ["all together"]


def _opts(name, **shape):
    return _all_together(**shape) if name == "all together" else _options(**shape)[name]


def _split(opts):
    """The differentiable arrays (bias, sinks) apart from the other options."""
    diff = {key: opts[key] for key in ("bias", "sinks") if key in opts}
    rest = {key: val for key, val in opts.items() if key not in diff}
    return diff, rest


def _loss_parts(out, lse, seed=2):
    """A scalar with cotangents on every output and every finite lse entry."""
    rng = _rng(seed)
    w_o = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
    w_l = jnp.asarray(rng.standard_normal(lse.shape), lse.dtype)
    finite = jnp.isfinite(lse)
    return jnp.sum(out * w_o) + jnp.sum(jnp.where(finite, jnp.where(finite, lse, 0) * w_l, 0))


def _value_and_grads(fn, q, k, v, diff, rest):
    def loss(q, k, v, diff):
        out, lse = fn(q, k, v, **diff, **rest)
        return _loss_parts(out, lse), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(q, k, v, diff)
    return out, lse, grads


def _attention_lse(q, k, v, **kw):
    return jsoftmax.attention(q, k, v, return_lse=True, **kw)


def _check_against_reference(q, k, v, opts, chunk_size):
    diff, rest = _split(opts)
    fn = jax.jit(
        lambda q, k, v, diff: _value_and_grads(
            lambda *a, **kw: _attention_lse(*a, chunk_size=chunk_size, **kw), q, k, v, diff, rest
        )
    )
    out, lse, grads = fn(q, k, v, diff)
    ref_out, ref_lse, ref_grads = run_reference(
        lambda q, k, v, diff: _value_and_grads(reference, q, k, v, diff, rest), q, k, v, diff
    )
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    assert_rel(out, ref_out, name="out")
    assert_rel(lse, ref_lse, name="lse")
    for name, g, r in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3], strict=True):
        assert_rel(g, r, name=name)
    for key in diff:
        assert grads[3][key].shape == diff[key].shape
        assert_rel(grads[3][key], ref_grads[3][key], name=f"d{key}")
    chex.assert_tree_all_finite(grads)


# --------------------------------------------------------------------------------------
# Values, lse and gradients against the reference.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", fast_subset(OPTION_NAMES, ["plain", "all together"]))
def test_each_option_matches_reference(name):
    # T = 23 and S = 19 in chunks of 8 and 5: neither divides; grouped-query heads (4 / 2).
    q, k, v = inputs()
    _check_against_reference(q, k, v, _opts(name), (8, 5))


@pytest.mark.parametrize("chunk_size", fast_subset([1, (7, 3), (23, 19), 64, None], [None]))
def test_chunk_sizes(chunk_size):
    q, k, v = inputs()
    _check_against_reference(q, k, v, _all_together(), chunk_size)


@pytest.mark.parametrize(
    "shape",
    fast_subset(
        [
            dict(t=9, s=31, n=6, kh=3, h=8, hv=5),  # Hv != H, T < S
            dict(t=31, s=9, n=4, kh=1, h=4, hv=12),  # multi-query, T > S
            dict(t=16, s=16, n=3, kh=3, h=8),  # one head per key head, chunks divide
        ],
        [dict(t=9, s=31, n=6, kh=3, h=8, hv=5)],
    ),
)
def test_shapes_match_reference(shape):
    q, k, v = inputs(b=2, **shape)
    t, s, n = shape["t"], shape["s"], shape["n"]
    opts = _all_together(t=t, s=s, n=n) | {"local_window_size": (5, 5)}
    _check_against_reference(q, k, v, opts, (4, 8))


@pytest.mark.parametrize("batched", fast_subset([False, True], [False]))
def test_unbatched_input(batched):
    # (T, N, H) input: the batched result of a batch of one, without the batch axis.
    q, k, v = (a[:1] for a in inputs())
    opts = {key: val for key, val in _all_together(b=1).items() if not key.endswith("lengths")}
    ref_out, ref_lse = run_reference(lambda q, k, v: reference(q, k, v, **opts), q, k, v)
    if not batched:
        q, k, v = q[0], k[0], v[0]
        ref_out, ref_lse = ref_out[0], ref_lse[0]
        opts = opts | {key: opts[key][0] for key in ("bias", "mask")}
        opts |= {key: opts[key][0] for key in ("q_segment_ids", "kv_segment_ids")}
    out, lse = jax.jit(lambda q, k, v: _attention_lse(q, k, v, chunk_size=(8, 5), **opts))(q, k, v)
    assert out.shape == q.shape[:-1] + (v.shape[-1],) and lse.shape == q.shape[:-1]
    assert_rel(out, ref_out, name="out")
    assert_rel(lse, ref_lse, name="lse")


# --------------------------------------------------------------------------------------
# Rows that see no key.
# --------------------------------------------------------------------------------------


def test_rows_without_keys_give_zero_and_minus_inf_with_zero_gradients():
    q, k, v = inputs()
    mask = np.ones((B, 1, T, S), bool)
    mask[0, 0, 5] = False  # row 5 of batch 0: no key
    mask[1, 0, :, :] = False  # batch 1: no key at all
    ql = jnp.asarray([20, T], jnp.int32)  # rows 20.. of batch 0: past the length

    def f(q, k, v):
        return _attention_lse(
            q, k, v, mask=jnp.asarray(mask), query_seq_lengths=ql, chunk_size=(8, 5)
        )

    empty = np.zeros((B, T), bool)
    empty[0, 5] = empty[0, 20:] = empty[1] = True
    # Cotangents on the empty rows only: every gradient is exactly zero and finite.
    w = jnp.where(jnp.asarray(empty)[:, :, None, None], 1.0, 0.0).astype(q.dtype)

    @jax.jit
    def values_and_grads(q, k, v):
        (out, lse), pullback = jax.vjp(f, q, k, v)
        ct = (w * jnp.ones_like(out), jnp.where(jnp.isfinite(lse), 0.0, 1.0).astype(lse.dtype))
        return out, lse, pullback(ct)

    out, lse, grads = values_and_grads(q, k, v)
    np.testing.assert_array_equal(f64(out)[empty], 0.0)
    np.testing.assert_array_equal(f64(lse)[empty], -np.inf)
    assert np.all(np.isfinite(f64(lse)[~empty]))
    for g in grads:
        np.testing.assert_array_equal(f64(g), 0.0)
    # jax.nn gives the mean of the values on a fully masked row instead (documented).
    if not X64:
        nn = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask))
        mean = jnp.repeat(jnp.mean(v, axis=1), N // K, axis=1)
        np.testing.assert_allclose(f64(nn[1, 0]), f64(mean[1]), rtol=1e-5, atol=1e-6)


def test_a_sink_alone_gives_zero_output_and_the_sink_as_lse():
    q, k, v = inputs()
    sinks = jnp.asarray(np.linspace(-1.0, 2.0, N), q.dtype)
    mask = jnp.zeros((1, 1, T, S), bool)

    def loss(q, k, v, sinks):
        out, lse = _attention_lse(q, k, v, mask=mask, sinks=sinks, chunk_size=(8, 5))
        return jnp.sum(lse), (out, lse)

    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))
    (_, (out, lse)), grads = step(q, k, v, sinks)
    np.testing.assert_array_equal(f64(out), 0.0)
    np.testing.assert_array_equal(f64(lse), np.broadcast_to(f64(sinks), (B, T, N)))
    for g in grads[:3]:
        np.testing.assert_array_equal(f64(g), 0.0)
    np.testing.assert_array_equal(f64(grads[3]), float(B * T))  # d lse / d sink = 1


def test_an_int_window_is_symmetric():
    q, k, v = inputs()
    f = jax.jit(jsoftmax.attention, static_argnames=("local_window_size", "chunk_size"))
    a = f(q, k, v, local_window_size=3, chunk_size=(8, 5))
    b = f(q, k, v, local_window_size=(3, 3), chunk_size=(8, 5))
    np.testing.assert_array_equal(f64(a), f64(b))
    ref = reference(q, k, v, local_window_size=(3, 3))[0]
    assert_rel(a, ref, name="out")


def test_empty_axes():
    q, k, v = inputs(t=4, s=0)
    out, lse = _attention_lse(q, k, v)
    assert out.shape == (B, 4, N, H)
    np.testing.assert_array_equal(f64(out), 0.0)
    np.testing.assert_array_equal(f64(lse), -np.inf)
    q, k, v = inputs(t=0, s=5)
    out, lse = _attention_lse(q, k, v)
    assert out.shape == (B, 0, N, H) and lse.shape == (B, 0, N)


# --------------------------------------------------------------------------------------
# return_lse: results over two halves of the keys merge into the whole.
# --------------------------------------------------------------------------------------


def test_two_halves_merge_into_the_whole():
    q, k, v = inputs()
    sinks = _options()["sinks"]["sinks"]
    cut = 8
    pos = jnp.arange(S)

    def whole(q, k, v):
        return _attention_lse(q, k, v, is_causal=True, chunk_size=(8, 5), sinks=sinks)

    def merged(q, k, v):
        # The sink joins one half only (its denominator term counts once).
        a = _attention_lse(
            q, k[:, :cut], v[:, :cut], is_causal=True, kv_positions=pos[:cut], sinks=sinks
        )
        b = _attention_lse(
            q, k[:, cut:], v[:, cut:], is_causal=True, kv_positions=pos[cut:], chunk_size=4
        )
        return jsoftmax.merge_partials(jnp.stack((a[0], b[0])), jnp.stack((a[1], b[1])), axis=0)

    def values_and_grads(f):
        def loss(q, k, v):
            out, lse = f(q, k, v)
            return _loss_parts(out, lse), (out, lse)

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)

    (_, (out_w, lse_w)), g_w = values_and_grads(whole)
    (_, (out_m, lse_m)), g_m = values_and_grads(merged)
    assert out_m.shape == (B, T, N, H)
    assert_rel(out_m, out_w, name="out")
    assert_rel(lse_m, lse_w, name="lse")
    for name, a, b in zip(("dq", "dk", "dv"), g_m, g_w, strict=True):
        assert_rel(a, b, name=name)


# --------------------------------------------------------------------------------------
# Against jax.nn.dot_product_attention (float32, the options both have).
# --------------------------------------------------------------------------------------

F32_TOL = 1e-5


def _nn_options(t, s, b=B, n=N):
    """Options jax.nn shares, chosen so that every query sees a key (jax.nn's rows
    without a key differ by design)."""
    rng = _rng(3)
    mask = rng.random((b, 1, t, s)) < 0.6
    i = np.arange(t)
    mask[:, :, i, np.minimum(i, s - 1)] = True
    return {
        "plain": {},
        "bias": dict(bias=jnp.asarray(rng.standard_normal((1, n, t, s)), jnp.float32)),
        "mask": dict(mask=jnp.asarray(mask)),
        "causal": dict(is_causal=True),
        "scale": dict(scale=0.3),
        "query_seq_lengths": dict(query_seq_lengths=jnp.asarray([t - 3, 2], jnp.int32)),
        "key_value_seq_lengths": dict(key_value_seq_lengths=jnp.asarray([s - 2, 4], jnp.int32)),
        "window": dict(local_window_size=(4, 1)),
    }


NN_NAMES = [*_nn_options(T, S), "all shared"]


@pytest.mark.parametrize("name", fast_subset(NN_NAMES, ["all shared"]))
def test_matches_jax_nn_in_float32(name):
    q, k, v = inputs(dtype=jnp.float32)
    o = _nn_options(T, S)
    if name == "all shared":
        opts = {**o["bias"], **o["mask"], **o["causal"], **o["scale"], **o["query_seq_lengths"]}
        opts["local_window_size"] = (30, 2)
    else:
        opts = o[name]
    w = jnp.asarray(_rng(4).standard_normal((B, T, N, H)), jnp.float32)

    def step(attention):
        def loss(q, k, v):
            out, lse = attention(q, k, v)
            return jnp.sum(out * w), (out, lse)

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)

    # Every query sees a key under these options, so the loss may weigh every row: rows
    # past query_seq_lengths are 0 in both (and their gradients too).
    (_, (out, lse)), g = step(lambda *a: _attention_lse(*a, chunk_size=(8, 5), **opts))
    (_, (nn_out, nn_lse)), g_nn = step(
        lambda *a: jax.nn.dot_product_attention(
            *a, implementation="xla", return_residual=True, **opts
        )
    )
    seen = np.isfinite(f64(lse))  # rows that see a key (past query_seq_lengths: none)
    rows = seen[..., None] & np.ones(out.shape, bool)
    np.testing.assert_allclose(f64(out)[rows], f64(nn_out)[rows], rtol=F32_TOL, atol=F32_TOL)
    np.testing.assert_array_equal(f64(out)[~rows], 0.0)
    np.testing.assert_array_equal(f64(nn_out)[~rows], 0.0)
    np.testing.assert_allclose(f64(lse)[seen], f64(nn_lse)[seen], rtol=F32_TOL)
    for name_g, a, b in zip(("dq", "dk", "dv"), g, g_nn, strict=True):
        scale = float(np.max(np.abs(f64(b))))
        np.testing.assert_allclose(f64(a), f64(b), atol=F32_TOL * scale, err_msg=name_g)


@pytest.mark.x64
def test_concrete_jax_scalars_as_jax_nn_callers_pass_them():
    # Regression: `scale=1 / jnp.sqrt(h)` and a NumPy or JAX bool were refused.
    q, k, v = inputs(dtype=jnp.float32)
    for kw in (
        dict(scale=1 / jnp.sqrt(jnp.float32(H))),
        dict(scale=np.float32(0.3)),
        dict(is_causal=jnp.bool_(True)),
        dict(is_causal=np.bool_(True), scale=jnp.asarray(0.7)),
    ):
        got = jsoftmax.attention(q, k, v, **kw)
        assert_rel(got, jax.nn.dot_product_attention(q, k, v, **kw), F32_TOL, str(kw))
    with pytest.raises(TypeError, match="scale must be None or a real number known at trace"):
        jax.jit(lambda s: jsoftmax.attention(q, k, v, scale=s))(0.5)


def test_bfloat16_is_as_accurate_as_jax_nn():
    t = s = 96
    q, k, v = inputs(b=1, t=t, s=s, n=4, kh=2, h=32, dtype=jnp.bfloat16, seed=5)
    mask = jnp.asarray(_rng(6).random((1, 1, t, s)) < 0.8) | jnp.eye(t, s, dtype=bool)[None, None]
    out, lse = jax.jit(
        lambda q, k, v: _attention_lse(q, k, v, mask=mask, is_causal=True, chunk_size=32)
    )(q, k, v)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    ref_out, ref_lse = run_reference(
        lambda q, k, v: reference(q, k, v, mask=mask, is_causal=True, dtype=jnp.float64), q, k, v
    )
    nn_out, nn_lse = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=True, implementation="xla", return_residual=True
        )
    )(q, k, v)
    err = np.max(np.abs(f64(out) - f64(ref_out)))
    nn_err = np.max(np.abs(f64(nn_out) - f64(ref_out)))
    assert err <= nn_err, (err, nn_err)
    assert np.max(np.abs(f64(lse) - f64(ref_lse))) <= 1e-5 * np.max(np.abs(f64(ref_lse)))
    assert np.max(np.abs(f64(lse) - f64(ref_lse))) < np.max(np.abs(f64(nn_lse) - f64(ref_lse)))


# --------------------------------------------------------------------------------------
# Transformations, traced positions, residuals, skipped blocks.
# --------------------------------------------------------------------------------------


def _prop(q, k, v, lengths, causal):
    return jsoftmax.attention(
        q, k, v, is_causal=causal, key_value_seq_lengths=lengths, chunk_size=3
    )


# Module-level, so the examples of the property test share their compilations.
_prop_jit = jax.jit(_prop, static_argnums=4)
_prop_vmap = jax.jit(
    jax.vmap(
        lambda q, k, v, ln, causal: _prop(q[None], k[None], v[None], ln[None], causal)[0],
        in_axes=(0, 0, 0, 0, None),
    ),
    static_argnums=4,
)
_prop_grad = jax.jit(jax.grad(lambda *a: jnp.sum(_prop(*a) ** 2), (0, 1, 2)), static_argnums=4)


@pytest.mark.slow
@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(
    causal=st.booleans(),
    lengths=st.lists(st.integers(0, 7), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_property_eager_jit_vmap_agree_and_gradients_are_finite(causal, lengths, seed):
    # One shape (T = 5, S = 7, 4 heads over 2) and chunk size: the examples draw the
    # inputs and the key lengths (0 included: rows without keys).
    q, k, v = inputs(b=3, t=5, s=7, n=4, kh=2, h=4, seed=seed)
    lengths = jnp.asarray(lengths, jnp.int32)
    eager = _prop(q, k, v, lengths, causal)
    chex.assert_trees_all_close(eager, _prop_jit(q, k, v, lengths, causal), rtol=RTOL, atol=RTOL)
    chex.assert_trees_all_close(eager, _prop_vmap(q, k, v, lengths, causal), rtol=RTOL, atol=RTOL)
    chex.assert_tree_all_finite(_prop_grad(q, k, v, lengths, causal))


def test_traced_positions_and_no_retracing():
    # Positions as traced arguments (what ring attention passes: global offsets).
    q, k, v = inputs()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(q, k, v, offset):
        return jsoftmax.attention(
            q, k, v, is_causal=True, q_positions=jnp.arange(T) + offset, chunk_size=(8, 5)
        )

    for offset in (0, 7, -10):
        out = f(q, k, v, offset)
        pos = np.arange(T) + offset
        ref = run_reference(
            lambda *a, pos=pos: reference(*a, is_causal=True, q_positions=pos)[0], q, k, v
        )
        assert_rel(out, ref, name=f"offset {offset}")


@pytest.mark.parametrize("dtype", ["uint8", "uint32", "int8", "int16", "int64"])
def test_positions_of_any_integer_dtype(dtype):
    # Regression: the window's bounds were computed in the positions' dtype (unsigned
    # and 8-bit positions wrapped, hiding keys), and the chunk table cast int64 to int32.
    if dtype == "int64" and not X64:
        pytest.skip("int64 needs x64")
    q, k, v = inputs(t=12, s=12)
    base = 2**31 if dtype == "int64" else (100 if dtype == "int8" else 0)
    pos = (np.arange(12) + base).astype(dtype)
    for kw in (dict(local_window_size=(1, 2)), dict(is_causal=True, local_window_size=(3, 0))):
        out = jsoftmax.attention(q, k, v, q_positions=pos, kv_positions=pos, chunk_size=4, **kw)
        ref = run_reference(lambda *a, kw=kw: reference(*a, **kw)[0], q, k, v)
        assert_rel(out, ref, name=f"{dtype} {kw}")


def test_residuals_are_the_inputs_the_output_and_the_lse():
    q, k, v = inputs(t=64, s=48)
    bias = jnp.zeros((1, N, 1, 48), q.dtype)
    res = saved_residuals(
        lambda q, k, v, bias: jsoftmax.attention(q, k, v, bias, is_causal=True, chunk_size=16),
        q,
        k,
        v,
        bias,
    )
    sizes = sorted(int(np.prod(r[0].shape)) for r in res)
    largest = max(q.size, k.size, v.size)
    # Nothing of the size of the scores (B * N * T * S = 24576); no block of them either.
    assert max(sizes) <= largest, res
    assert sum(sizes) <= 2 * q.size + k.size + v.size + bias.size + 8 * B * 64 * N, res


def test_blocks_outside_causality_window_and_segments_are_skipped():
    def visits(t, s, cfg, **arrays):
        x = _attention_kernel.Inputs(
            q=jnp.zeros((1, t, 1, 1, 1)),
            k=jnp.zeros((1, s, 1, 1)),
            v=jnp.zeros((1, s, 1, 1)),
            bias=None,
            mask=None,
            q_pos=arrays.get("q_pos", jnp.arange(t)[None]),
            kv_pos=arrays.get("kv_pos", jnp.arange(s)[None]),
            q_seg=arrays.get("q_seg"),
            kv_seg=arrays.get("kv_seg"),
            q_len=arrays.get("q_len"),
            kv_len=arrays.get("kv_len"),
            sinks=None,
        )
        c = _attention_kernel.chunked(x, cfg)
        return np.asarray(_attention_kernel.block_table(c, cfg))

    cfg = _attention_kernel.Config(1.0, True, None, None, 4, 4)
    np.testing.assert_array_equal(visits(16, 16, cfg), np.tril(np.ones((4, 4), bool)))
    window = cfg._replace(causal=False, window=(4, 0))
    np.testing.assert_array_equal(
        visits(16, 16, window), np.eye(4, dtype=bool) | np.eye(4, k=-1, dtype=bool)
    )
    seg = jnp.asarray([[0] * 8 + [1] * 8])
    plain = cfg._replace(causal=False)
    table = visits(16, 16, plain, q_seg=seg, kv_seg=seg)
    np.testing.assert_array_equal(table, np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))
    # A KV cache: 4 new queries at positions 12..15 see every key chunk.
    assert visits(4, 16, cfg, q_pos=jnp.arange(12, 16)[None]).all()
    # Keys past every sequence length are never visited.
    table = visits(16, 16, plain, kv_len=jnp.asarray([5]))
    np.testing.assert_array_equal(table, np.tile([True, True, False, False], (4, 1)))
    order, count = _attention_kernel.visit_order(jnp.asarray(table))
    np.testing.assert_array_equal(np.asarray(count), 2)
    np.testing.assert_array_equal(np.asarray(order)[:, :2], [[0, 1]] * 4)


# --------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------


def _bad_cases():
    q, k, v = inputs(dtype=jnp.float32)
    ok = dict(query=q, key=k, value=v)
    return [
        (dict(ok, key=k[..., :5]), ValueError, "key"),
        (dict(ok, value=v[:, :4]), ValueError, "value"),
        (
            dict(ok, key=k[:, :, :1].repeat(3, 2), value=v[:, :, :1].repeat(3, 2)),
            ValueError,
            "query's number of heads",
        ),
        (dict(ok, query=q[0, 0]), ValueError, "query"),
        (dict(ok, key=k[0]), ValueError, "key"),
        (dict(ok, query=q.astype(jnp.int32)), TypeError, "query"),
        (dict(ok, bias=jnp.zeros((B, N, T, S + 1))), ValueError, "bias"),
        (dict(ok, bias=jnp.zeros((1, 1, 1, 1, 1))), ValueError, "bias"),
        (dict(ok, bias=jnp.zeros((B, N, T, S), jnp.int32)), TypeError, "bias"),
        (dict(ok, mask=jnp.ones((B, N, T - 1, S), bool)), ValueError, "mask"),
        (dict(ok, mask=jnp.ones((B, N, T, S))), TypeError, "mask"),
        (
            dict(
                ok,
                q_segment_ids=jnp.zeros((T + 1,), jnp.int32),
                kv_segment_ids=jnp.zeros(S, jnp.int32),
            ),
            ValueError,
            "q_segment_ids",
        ),
        (
            dict(
                ok,
                q_segment_ids=jnp.zeros(T, jnp.int32),
                kv_segment_ids=jnp.zeros((3, S), jnp.int32),
            ),
            ValueError,
            "kv_segment_ids",
        ),
        (dict(ok, q_segment_ids=jnp.zeros(T, jnp.int32)), ValueError, "kv_segment_ids"),
        (
            dict(ok, q_segment_ids=jnp.zeros(T), kv_segment_ids=jnp.zeros(S)),
            TypeError,
            "q_segment_ids",
        ),
        (dict(ok, q_positions=jnp.arange(T - 1)), ValueError, "q_positions"),
        (dict(ok, kv_positions=jnp.zeros((B, S), jnp.float32)), TypeError, "kv_positions"),
        (dict(ok, query_seq_lengths=jnp.zeros((B, 1), jnp.int32)), ValueError, "query_seq_lengths"),
        (dict(ok, key_value_seq_lengths=jnp.zeros(B)), TypeError, "key_value_seq_lengths"),
        (dict(ok, sinks=jnp.zeros(K)), ValueError, "sinks"),
        (dict(ok, sinks=jnp.zeros((1, N))), ValueError, "sinks"),
        (dict(ok, chunk_size=0), ValueError, "chunk_size"),
        (dict(ok, chunk_size=(4, -1)), ValueError, "chunk_size"),
        (dict(ok, chunk_size=2.5), TypeError, "chunk_size"),
        (dict(ok, local_window_size=(1, 2, 3)), TypeError, "local_window_size"),
        (dict(ok, local_window_size=-1), ValueError, "local_window_size"),
        (dict(ok, logit_softcap=0.0), ValueError, "logit_softcap"),
        (dict(ok, scale="big"), TypeError, "scale"),
        (dict(ok, is_causal="yes"), TypeError, "is_causal"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_naming_the_argument(case):
    kwargs, error, name = _bad_cases()[case]
    with pytest.raises(error, match=name):
        jsoftmax.attention(**kwargs)


def test_bad_input_raises_before_tracing():
    # The checks read shapes and dtypes only: under jit they raise while tracing, naming
    # the argument, before any computation is staged.
    q, k, v = inputs(dtype=jnp.float32)
    with pytest.raises(ValueError, match="sinks"):
        jax.jit(lambda q: jsoftmax.attention(q, k, v, sinks=jnp.zeros(3)))(q)


# --------------------------------------------------------------------------------------
# Memory: compiled temporaries of a training step (structural, no timing).
# --------------------------------------------------------------------------------------


def _step_temporaries(fn, t, b=1, n=4, h=64):
    """Compiled temporary bytes of `jit(grad)` of `sum(attention(q, k, v))` in q, k, v
    (float32, causal): abstract shapes, nothing of that size is allocated."""
    spec = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2)))
    return step.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_training_step_memory_is_linear_in_t_and_far_below_jax_nn():
    def ours(q, k, v):
        return jsoftmax.attention(q, k, v, is_causal=True)

    def theirs(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    temps = {t: _step_temporaries(ours, t) for t in (2048, 4096, 8192)}
    assert temps[8192] <= 5 * temps[2048], temps
    assert 20 * temps[4096] <= _step_temporaries(theirs, 4096), temps
