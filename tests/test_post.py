"""Post-training losses: token_log_probs, kl_divergence and their fused and sharded
versions, against dense references written from the definitions (autodiff of plain
jax.nn code in float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jsoftmax

from helpers import REF_DTYPE, close, cpu_device_count, fast_subset, mesh_of, put, tol

# --------------------------------------------------------------------------------------
# References from the definitions.
# --------------------------------------------------------------------------------------


def _scaled(z, t, cap):
    z = jnp.asarray(z, REF_DTYPE)
    if cap is not None:
        z = jnp.where(z > -jnp.inf, cap * jnp.tanh(z / cap), z)
    t = jnp.asarray(1.0 if t is None else t, REF_DTYPE)
    return z / (t[:, None] if t.ndim else t)


def ref_log_probs(z, labels, t=None, cap=None):
    """(log p_y, H) per row over the last axis."""
    s = _scaled(z, t, cap)
    lp = jax.nn.log_softmax(s, axis=-1)
    p = jnp.exp(lp)
    h = -jnp.sum(jnp.where(p > 0, p * lp, 0.0), axis=-1)
    return jnp.take_along_axis(lp, labels[:, None], axis=-1)[:, 0], h


def ref_divergence(zs, zt, beta, t=1.0):
    lps = jax.nn.log_softmax(jnp.asarray(zs, REF_DTYPE) / t, axis=-1)
    lpt = jax.nn.log_softmax(jnp.asarray(zt, REF_DTYPE) / t, axis=-1)
    ps, pt = jnp.exp(lps), jnp.exp(lpt)
    if beta == 0:
        return jnp.sum(pt * (lpt - lps), axis=-1)
    if beta == 1:
        return jnp.sum(ps * (lps - lpt), axis=-1)
    lm = jnp.log(beta * pt + (1 - beta) * ps)
    return beta * jnp.sum(pt * (lpt - lm), -1) + (1 - beta) * jnp.sum(ps * (lps - lm), -1)


def _data(n=6, h=5, v=37, ht=3, seed=0, dtype=REF_DTYPE):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h)), dtype)
    w = jnp.asarray(rng.standard_normal((h, v)), dtype)
    b = jnp.asarray(rng.standard_normal(v), dtype)
    tx = jnp.asarray(rng.standard_normal((n, ht)), dtype)
    tw = jnp.asarray(rng.standard_normal((ht, v)), dtype)
    y = jnp.asarray(rng.integers(0, v, n))
    return x, w, b, tx, tw, y


REL = tol(REF_DTYPE, 1e-9, 2e-5)

# --------------------------------------------------------------------------------------
# Values and gradients.
# --------------------------------------------------------------------------------------

LP_OPTIONS = {
    "plain": {},
    "temperature": dict(temperature=1.7),
    "row_temperature": dict(temperature=np.linspace(0.5, 2.0, 6)),
    "softcap": dict(logit_softcap=3.0),
    "all": dict(temperature=0.8, logit_softcap=2.5),
}


@pytest.mark.parametrize("name", fast_subset(list(LP_OPTIONS), ["all", "plain"]))
@pytest.mark.parametrize("va", fast_subset([1, 0], [1]))
def test_linear_token_log_probs_match_dense_reference(name, va):
    kw = LP_OPTIONS[name]
    x, w, b, _, _, y = _data()
    t, cap = kw.get("temperature"), kw.get("logit_softcap")
    w_in = w if va == 1 else w.T
    c = (1.0, -0.4)

    def fused(x, w, b):
        lp, h = jsoftmax.linear_token_log_probs(
            x, w, y, bias=b, return_entropy=True, chunk_size=8, vocab_axis=va, **kw
        )
        return lp, h

    def dense(x, w, b):
        return jsoftmax.token_log_probs(x @ (w if va == 1 else w.T) + b[None], y,
                                        return_entropy=True, **kw)  # fmt: skip

    def ref(x, w, b):
        return ref_log_probs(x @ (w if va == 1 else w.T) + b[None], y, t, cap)

    for f in (fused, dense):
        out = f(x, w_in, b)
        for a, r in zip(out, ref(x, w_in, b), strict=True):
            close(a, r, REF_DTYPE, atol_scale=4)
        loss = lambda *a, f=f: sum(ci * o.sum() for ci, o in zip(c, f(*a), strict=True))  # noqa: E731
        ref_loss = lambda *a: sum(ci * o.sum() for ci, o in zip(c, ref(*a), strict=True))  # noqa: E731
        g = jax.grad(loss, (0, 1, 2))(x, w_in, b)
        g_ref = jax.grad(ref_loss, (0, 1, 2))(x, w_in, b)
        for a, r in zip(g, g_ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=REL, atol=REL)


def test_token_log_probs_where_and_axis():
    z = jnp.asarray(np.random.default_rng(1).standard_normal((5, 4, 3)), REF_DTYPE)
    y = jnp.asarray(np.random.default_rng(2).integers(0, 5, (4, 3)))
    keep = jnp.array([True, False, True])  # per row, broadcast over the batch
    lp, h = jsoftmax.token_log_probs(z, y, axis=0, where=keep, return_entropy=True)
    zl = jnp.moveaxis(z, 0, -1).reshape(-1, 5)
    r_lp, r_h = ref_log_probs(zl, y.reshape(-1))
    mask = np.broadcast_to(np.asarray(keep), (4, 3)).reshape(-1)
    close(lp.reshape(-1), np.where(mask, r_lp, 0.0), REF_DTYPE)
    close(h.reshape(-1), np.where(mask, r_h, 0.0), REF_DTYPE)
    g = jax.grad(lambda z: jsoftmax.token_log_probs(z, y, axis=0, where=keep).sum())(z)
    assert np.all(np.asarray(g)[:, :, 1] == 0.0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("va", fast_subset([1, 0], [1]))
def test_kl_divergence_dense_and_fused_match_reference(beta, va):
    x, w, b, tx, tw, _ = _data()
    t = 1.3
    keep = jnp.array([True, True, False, True, True, True])
    w_in, tw_in = (w, tw) if va == 1 else (w.T, tw.T)

    def ref(x, w, b=b):
        return ref_divergence(x @ w + b[None], tx @ tw, beta, t)

    def fused(x, w_in):
        return jsoftmax.linear_kl_divergence(
            x, w_in, tx, tw_in, bias=b, beta=beta, temperature=t, where=keep,
            chunk_size=8, vocab_axis=va,
        )  # fmt: skip

    out = fused(x, w_in)
    close(out, jnp.where(keep, ref(x, w), 0.0), REF_DTYPE, atol_scale=4)
    dense = jsoftmax.kl_divergence(x @ w + b[None], tx @ tw, beta=beta, temperature=t)
    close(dense, ref(x, w), REF_DTYPE, atol_scale=4)
    # A reduction forms the gradient in its forward pass over chunks of whole rows: 8
    # columns of 6 rows make chunks of one row (48 // 37), 25 columns chunks of 4 rows
    # (the last one padded).
    for red, cs in (("sum", 8), ("mean", 8), ("sum", 25), ("mean", 25)):
        got = jax.grad(
            lambda x, w, b, red=red, cs=cs: jsoftmax.linear_kl_divergence(
                x, w, tx, tw_in, bias=b, beta=beta, temperature=t, where=keep,
                reduction=red, chunk_size=cs, vocab_axis=va,
            ), (0, 1, 2),
        )(x, w_in, b)  # fmt: skip
        denom = 5.0 if red == "mean" else 1.0
        want = jax.grad(
            lambda x, w, b, d=denom: jnp.sum(
                jnp.where(keep, ref(x, w if va == 1 else w.T, b), 0.0)
            ) / d,
            (0, 1, 2),
        )(x, w_in, b)  # fmt: skip
        for a, r in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=REL, atol=REL)
        value = jsoftmax.linear_kl_divergence(
            x, w_in, tx, tw_in, bias=b, beta=beta, temperature=t, where=keep,
            reduction=red, chunk_size=cs, vocab_axis=va,
        )  # fmt: skip
        close(value, jnp.sum(jnp.where(keep, ref(x, w), 0.0)) / denom, REF_DTYPE, atol_scale=4)
    # The teacher is a constant.
    gt = jax.grad(lambda tx: jsoftmax.linear_kl_divergence(x, w_in, tx, tw_in, beta=beta,
                                                           vocab_axis=va).sum())(tx)  # fmt: skip
    assert np.all(np.asarray(gt) == 0.0)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_reduced_fused_divergence_under_jit_vmap_and_grad(beta):
    # The reduced divergence forms its gradient in the forward pass; vmap over a batch of
    # problems and jit must give each problem's eager answer, and the gradient that of a
    # loop of the per-row divergence (the vocabulary loop, another code path).
    x, w, b, tx, tw, _ = _data(n=6, v=37)
    xs, txs = jnp.stack([x, 2 * x, -x]), jnp.stack([tx, tx, 0.5 * tx])

    def loss(x, w, tx):
        return jsoftmax.linear_kl_divergence(
            x, w, tx, tw, bias=b, beta=beta, reduction="mean", chunk_size=25
        )

    eager = [loss(xs[i], w, txs[i]) for i in range(3)]
    batched = jax.jit(jax.vmap(loss, (0, None, 0)))(xs, w, txs)
    close(batched, jnp.stack(eager), REF_DTYPE)
    grad = jax.jit(jax.vmap(jax.grad(loss, (0, 1)), (0, None, 0)))(xs, w, txs)
    for i in range(3):
        want = jax.grad(
            lambda x, w, tx=txs[i]: jnp.mean(
                jsoftmax.linear_kl_divergence(x, w, tx, tw, bias=b, beta=beta, chunk_size=8)
            ), (0, 1),
        )(xs[i], w)  # fmt: skip
        for a, r in zip((grad[0][i], grad[1][i]), want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=REL, atol=REL)


def test_16bit_inputs_give_float32_and_log_probs_never_above_zero():
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.standard_normal((64, 512)), dtype)
        w = jnp.asarray(rng.standard_normal((512, 256)), dtype)
        y = jnp.argmax(jnp.dot(x, w, preferred_element_type=jnp.float32), -1)  # the maximum
        lp, h = jsoftmax.linear_token_log_probs(x, w, y, return_entropy=True, chunk_size=96)
        assert lp.dtype == jnp.float32 and h.dtype == jnp.float32
        assert float(jnp.max(lp)) <= 0.0 and float(jnp.min(h)) >= 0.0
        dense = jsoftmax.token_log_probs(jnp.dot(x, w), y)
        assert dense.dtype == jnp.float32 and float(jnp.max(dense)) <= 0.0
        kl = jsoftmax.kl_divergence(jnp.dot(x, w), jnp.dot(x, w))
        assert kl.dtype == jnp.float32


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fused_gradients_keep_the_16bit_dtypes(reduction, dtype):
    # Regression: with a reduction, linear_kl_divergence's dx came back float32.
    rng = np.random.default_rng(1)
    x, tx = (jnp.asarray(rng.standard_normal((6, 8)), dtype) for _ in range(2))
    w, tw = (jnp.asarray(rng.standard_normal((8, 21)), dtype) for _ in range(2))
    b = jnp.zeros((21,), dtype)

    def loss(x, w, b):
        out = jsoftmax.linear_kl_divergence(
            x, w, tx, tw, bias=b, beta=0.5, reduction=reduction, chunk_size=8
        )
        return jnp.sum(out)

    grads = jax.grad(loss, (0, 1, 2))(x, w, b)
    assert [g.dtype for g in grads] == [dtype] * 3
    want = jax.grad(loss, (0, 1, 2))(*(a.astype(jnp.float32) for a in (x, w, b)))
    for g, r in zip(grads, want, strict=True):  # the same inputs, rounded once at the end
        eps = float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=2 * eps, atol=2 * eps)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_divergence_second_derivative_matches_dense(beta):
    # Regression: with beta = 1 the columns that the last, clamped chunk reads again gave
    # NaN (the select of the cross sum stood outside its product).
    rng = np.random.default_rng(14)
    x, w = (jnp.asarray(rng.standard_normal(s), REF_DTYPE) for s in ((5, 4), (4, 11)))
    tx, tw = (jnp.asarray(rng.standard_normal(s), REF_DTYPE) for s in ((5, 3), (3, 11)))

    def second(loss):
        return jax.grad(lambda w: jnp.sum(jax.grad(loss)(w) ** 2))(w)

    fused = second(
        lambda w: jnp.sum(jsoftmax.linear_kl_divergence(x, w, tx, tw, beta=beta, chunk_size=4))
    )
    dense = second(lambda w: jnp.sum(jsoftmax.kl_divergence(x @ w, tx @ tw, beta=beta)))
    close(fused, dense, REF_DTYPE)


def test_excluded_label_is_minus_inf_with_zero_gradient():
    z = jnp.array([[0.0, -jnp.inf, 1.0]], REF_DTYPE)
    lp, h = jsoftmax.token_log_probs(z, jnp.array([1]), return_entropy=True)
    assert float(lp[0]) == -np.inf and np.isfinite(float(h[0]))
    g = jax.grad(lambda z: jsoftmax.token_log_probs(z, jnp.array([1]))[0])(z)
    assert np.all(np.asarray(g) == 0.0)


# --------------------------------------------------------------------------------------
# Sharded.
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(cpu_device_count() < 8, reason="needs 8 CPU devices")
@pytest.mark.parametrize("shape", fast_subset([(8,), (2, 4)], [(8,)]))
def test_sharded_linear_token_log_probs_match_one_device(shape):
    names = ("v",) if len(shape) == 1 else ("b", "v")
    mesh = mesh_of(shape, names)
    n, h, v = 8, 4, 64
    x, w, b, _, _, y = _data(n=n, h=h, v=v)
    t = 1.3
    specs = (P(names[0] if len(shape) == 2 else None), P(None, "v"), P("v"),
             P(names[0] if len(shape) == 2 else None))  # fmt: skip

    def body(x, w, b, y):
        return jsoftmax.sharded.linear_token_log_probs(
            x, w, y, "v", bias_shard=b, temperature=t, logit_softcap=4.0,
            return_entropy=True, chunk_size=3,
        )  # fmt: skip

    f = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(specs[0], specs[0]))
    args = [put(a, mesh, s) for a, s in zip((x, w, b, y), specs, strict=True)]
    c = (1.0, 0.3)

    def loss(f):
        return lambda x, w, b, y: sum(ci * o.sum() for ci, o in zip(c, f(x, w, b, y), strict=True))

    one = lambda x, w, b, y: jsoftmax.linear_token_log_probs(  # noqa: E731
        x, w, y, bias=b, temperature=t, logit_softcap=4.0, return_entropy=True
    )
    with jax.set_mesh(mesh):
        out = jax.jit(f)(*args)
        g = jax.jit(jax.grad(loss(f), (0, 1, 2)))(*args)
    ref = one(x, w, b, y)
    for a, r in zip(out, ref, strict=True):
        close(np.asarray(a), r, REF_DTYPE)
    g_ref = jax.grad(loss(one), (0, 1, 2))(x, w, b, y)
    for a, r in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=REL, atol=REL)


# --------------------------------------------------------------------------------------
# Memory (structural: compiled temporaries).
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fused_temporaries_are_ten_times_below_the_dense_path():
    n, h, v = 2048, 256, 32768
    f32 = jnp.float32
    x, w = jax.ShapeDtypeStruct((n, h), f32), jax.ShapeDtypeStruct((h, v), f32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp(f, *args):
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    def lp_loss(fused):
        def f(x, w, y):
            if fused:
                lp, ent = jsoftmax.linear_token_log_probs(x, w, y, return_entropy=True)
            else:
                lp, ent = jsoftmax.token_log_probs(x @ w, y, return_entropy=True)
            return jnp.mean(lp) + 0.01 * jnp.mean(ent)

        return jax.grad(f, (0, 1))

    assert temp(lp_loss(False), x, w, y) >= 10 * temp(lp_loss(True), x, w, y)

    def kl_loss(fused):
        def f(x, w, tx, tw):
            if fused:
                return jsoftmax.linear_kl_divergence(x, w, tx, tw, beta=0.5, reduction="mean")
            return jnp.mean(jsoftmax.kl_divergence(x @ w, tx @ tw, beta=0.5))

        return jax.grad(f, (0, 1))

    assert temp(kl_loss(False), x, w, x, w) >= 10 * temp(kl_loss(True), x, w, x, w)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion")
def test_entropy_writes_no_logits_sized_temporary():
    # The entropy's sum and the row total are one fused reduction: as separate sums
    # XLA:CPU wrote out the exponentials and the gaps (8 MiB here, as the same values
    # computed from jax.nn.log_softmax do).
    z = jnp.zeros((256, 4096), jnp.float32)
    y = jnp.zeros((256,), jnp.int32)

    def temp(f):
        return jax.jit(f).lower(z).compile().memory_analysis().temp_size_in_bytes

    def both(z):
        return jsoftmax.token_log_probs(z, y, return_entropy=True)

    def step(z):
        return jax.value_and_grad(lambda z: sum(jnp.sum(a) for a in both(z)))(z)

    assert temp(both) < z.nbytes // 8
    assert temp(step) < z.nbytes // 8


# --------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    x, w, b, tx, tw, y = _data()
    z = x @ w
    with pytest.raises(IndexError, match="labels"):
        jsoftmax.token_log_probs(z, y.at[0].set(99))
    with pytest.raises(IndexError, match="labels"):
        jsoftmax.linear_token_log_probs(x, w, y.at[0].set(-1))
    with pytest.raises(ValueError, match="beta"):
        jsoftmax.kl_divergence(z, z, beta=1.5)
    with pytest.raises(ValueError, match="beta"):
        jsoftmax.linear_kl_divergence(x, w, tx, tw, beta=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        jsoftmax.kl_divergence(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        jsoftmax.token_log_probs(z, y, temperature=-1.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        jsoftmax.kl_divergence(z, z[:, :5])
    with pytest.raises(ValueError, match="teacher_x"):
        jsoftmax.linear_kl_divergence(x, w, tx[:3], tw)
    with pytest.raises(ValueError, match="teacher_w"):
        jsoftmax.linear_kl_divergence(x, w, tx, tw[:, :5])
    with pytest.raises(TypeError, match="labels"):
        jsoftmax.token_log_probs(z, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="where"):
        jsoftmax.linear_kl_divergence(x, w, tx, tw, where=jnp.ones(4, bool))


# --------------------------------------------------------------------------------------
# Eager, jit, vmap and grad agree (property).
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    st.sampled_from([1, 3]),
    st.sampled_from([1, 2, 9]),
    st.sampled_from([None, 0.7]),
    st.sampled_from([0.0, 0.5, 1.0]),
    st.booleans(),
)
def test_eager_jit_vmap_agree(rows, v, t, beta, neg_inf):
    rng = np.random.default_rng(rows * 31 + v)
    z = jnp.asarray(rng.standard_normal((2, rows, v)) * 3, jnp.float32)
    zt = jnp.asarray(rng.standard_normal((2, rows, v)) * 3, jnp.float32)
    if neg_inf and v > 1:
        z = z.at[:, :, 0].set(-jnp.inf)
    y = jnp.asarray(rng.integers(min(1, v - 1), v, (2, rows)))

    def f(z, zt, y):
        lp, h = jsoftmax.token_log_probs(z, y, temperature=t, return_entropy=True)
        kl = jsoftmax.kl_divergence(z, zt, beta=beta, temperature=1.0 if t is None else t)
        return lp, h, kl

    eager = f(z, zt, y)
    for other in (jax.jit(f)(z, zt, y), jax.vmap(f)(z, zt, y)):
        for a, b in zip(eager, other, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    g = jax.grad(lambda z: sum(jnp.sum(o) for o in f(z, zt, y)))(z)
    assert np.all(np.isfinite(np.asarray(g)))
