"""jsoftmax.linear_cross_entropy against the dense path and a float64 reference (float32
where float64 is off, except for the bfloat16 checks)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax
from jsoftmax._chunks import default_chunk_size

from helpers import REF_DTYPE, ce_reference, f64, fast_subset, make_logits, saved_residuals, tol

N, H, V = 12, 8, 50


def _inputs(n=N, h=H, v=V, dtype=REF_DTYPE, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h))
    w = rng.standard_normal((h, v)) / np.sqrt(h) * 2
    b = rng.standard_normal(v) / 2
    lab = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    return *(jnp.asarray(a, dtype) for a in (x, w, b)), lab


def reference(x, w, b, labels, *, dtype=REF_DTYPE, **options):
    """Dense logits x @ w + b in ``dtype``, then the cross-entropy of ``ce_reference``
    (-inf bias entries are excluded classes, as -inf logits)."""
    z = x.astype(dtype) @ w.astype(dtype)
    if b is not None:
        z = z + b.astype(dtype)[None, :]
    return ce_reference(z, labels, dtype=dtype, **options)


OPTIONS = {
    "plain": {},
    "ignore": dict(ignore_index=-100),
    "weights": dict(weights=jnp.linspace(0.5, 2.0, V)),
    "smoothing": dict(alpha=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(cap=2.0),
    "all": dict(
        ignore_index=-100, weights=jnp.linspace(0.5, 2.0, V), alpha=0.2, z_loss=1e-2, cap=3.0
    ),
}


def _kw(opts):
    names = {"alpha": "label_smoothing", "cap": "logit_softcap"}
    return {names.get(k, k): v for k, v in opts.items()}


# (rtol, atol) against the reference in REF_DTYPE.
REF_TOL = tol(REF_DTYPE, (1e-11, 1e-12), (1e-5, 1e-6))


def _close(a, b, rtol=REF_TOL[0], atol=REF_TOL[1]):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol, atol)


# Chunks that do not divide V (7, 16), divide it (10, 25), or cover it (50, 64).
CASES = [
    (combo, reduction, chunk)
    for i, combo in enumerate(OPTIONS)
    for reduction, chunk in [
        (("none", "mean", "sum")[i % 3], (7, 10, 16)[i % 3]),
        (("mean", "sum", "none")[i % 3], (64, 25, 50)[i % 3]),
    ]
]


@pytest.mark.parametrize(
    "combo,reduction,chunk",
    fast_subset(
        CASES, [("plain", "none", 7), ("all", "none", 7), ("all", "mean", 64)], unpack=True
    ),
)
def test_matches_dense_reference(combo, reduction, chunk):
    opts = OPTIONS[combo]
    x, w, b, lab = _inputs()
    if "ignore_index" in opts:
        lab = lab.at[jnp.array([1, 5])].set(-100)
    b = b.at[-3:].set(-jnp.inf)  # a padded vocabulary
    lab = jnp.where(lab >= V - 3, 0, lab)

    def ours(x, w, b):
        return jsoftmax.linear_cross_entropy(
            x, w, lab, bias=b, reduction=reduction, chunk_size=chunk, **_kw(opts)
        )

    def ref(x, w, b):
        return reference(x, w, b, lab, reduction=reduction, **opts)

    f = jax.jit(ours) if chunk in (7, 25, 50) else ours
    _close(f(x, w, b), ref(x, w, b))
    cot = jnp.linspace(0.5, 1.5, N) if reduction == "none" else 1.0
    g = jax.grad(lambda *a: jnp.sum(f(*a) * cot), (0, 1, 2))(x, w, b)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), (0, 1, 2))(x, w, b)
    for a, r in zip(g, g_ref, strict=True):
        _close(a, r)
    assert np.all(np.asarray(g[2][-3:]) == 0) and np.all(np.asarray(g[1][:, -3:]) == 0)


def test_equals_cross_entropy_of_the_logits_with_leading_axes():
    x, w, b, lab = _inputs(n=24)
    x3, lab3 = x.reshape(2, 3, 4, H), lab.reshape(2, 3, 4)
    kw = dict(
        ignore_index=7,
        label_smoothing=0.1,
        z_loss=1e-3,
        logit_softcap=4.0,
        weights=jnp.linspace(1.0, 2.0, V),
    )
    out = jsoftmax.linear_cross_entropy(x3, w, lab3, bias=b, chunk_size=16, **kw)
    b3 = b.reshape(1, 1, 1, V)
    dense = jsoftmax.cross_entropy(x3 @ w + b3, lab3, **kw)
    assert out.shape == (2, 3, 4)
    _close(out, dense)
    for reduction in ("sum", "mean"):
        _close(
            jsoftmax.linear_cross_entropy(x3, w, lab3, bias=b, reduction=reduction, **kw),
            jsoftmax.cross_entropy(x3 @ w + b3, lab3, reduction=reduction, **kw),
        )


def test_matches_optax_dense_path_float32():
    x, w, b, lab = _inputs(n=64, h=16, v=300, dtype=jnp.float32)
    f = jax.jit(
        lambda x, w: jsoftmax.linear_cross_entropy(x, w, lab, reduction="mean", chunk_size=128)
    )
    g = lambda x, w: optax.softmax_cross_entropy_with_integer_labels(x @ w, lab).mean()  # noqa: E731
    _close(f(x, w), g(x, w), 2e-6, 2e-6)
    for a, r in zip(jax.grad(f, (0, 1))(x, w), jax.grad(g, (0, 1))(x, w), strict=True):
        _close(a, r, 1e-5, 1e-6)


def test_bfloat16_error_no_worse_than_dense_float32_from_bf16_logits():
    x, w, b, lab = _inputs(n=64, h=32, v=1000, dtype=jnp.bfloat16, seed=3)
    # The reference alone is computed with float64 enabled (also in JAX's default config).
    with jax.enable_x64(True):
        x64, w64 = jnp.asarray(f64(x)), jnp.asarray(f64(w))
        ref = lambda x, w: reference(x, w, None, lab, dtype=jnp.float64)  # noqa: E731
        exact = f64(ref(x64, w64))  # float64 from the bfloat16 inputs
        gx_ref, gw_ref = (f64(g) for g in jax.grad(lambda x, w: ref(x, w).sum(), (0, 1))(x64, w64))
    fused = jsoftmax.linear_cross_entropy(x, w, lab, chunk_size=128)
    assert fused.dtype == jnp.float32
    dense_logits = (x @ w).astype(jnp.float32)  # what a user's dense path computes
    dense = optax.softmax_cross_entropy_with_integer_labels(dense_logits, lab)
    err_fused = float(np.max(np.abs(f64(fused) - exact)))
    err_dense = float(np.max(np.abs(f64(dense) - exact)))
    assert err_fused <= err_dense + 1e-6, (err_fused, err_dense)
    gx, gw = jax.grad(lambda x, w: jsoftmax.linear_cross_entropy(x, w, lab).sum(), (0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    _close(gw, gw_ref, 0, 4 * eps * float(np.max(np.abs(gw_ref))))
    _close(gx, gx_ref, 0, 4 * eps * float(np.max(np.abs(gx_ref))))


def test_no_logits_sized_residual_and_memory_fraction():
    n, h, v = 256, 32, 4096
    x, w, b, lab = _inputs(n=n, h=h, v=v, dtype=jnp.float32)
    res = saved_residuals(
        lambda x, w: jsoftmax.linear_cross_entropy(x, w, lab, chunk_size=256).sum(), x, w
    )
    for aval, line in res:
        assert aval.size < n * v, line  # nothing with N*V elements
    fused = jax.jit(
        jax.value_and_grad(
            lambda x, w: jsoftmax.linear_cross_entropy(x, w, lab, chunk_size=256).mean(), (0, 1)
        )
    )
    dense = jax.jit(
        jax.value_and_grad(lambda x, w: jsoftmax.cross_entropy(x @ w, lab).mean(), (0, 1))
    )
    t_fused = fused.lower(x, w).compile().memory_analysis().temp_size_in_bytes
    t_dense = dense.lower(x, w).compile().memory_analysis().temp_size_in_bytes
    # The dense path keeps N*V logits (4 MiB here); the fused one a chunk (N*256).
    assert t_dense >= n * v * 4
    assert t_fused <= t_dense / 4, (t_fused, t_dense)


def test_tied_embeddings_without_a_transposed_copy():
    n, h, v = 128, 64, 8192
    x, _, _, lab = _inputs(n=n, h=h, v=v, dtype=jnp.float32)
    emb = make_logits((v, h), jnp.float32, seed=9, scale=1 / 8)

    def tied(x, e):
        return jsoftmax.linear_cross_entropy(x, e, lab, chunk_size=512, vocab_axis=0).mean()

    def via_transpose(x, e):
        return jsoftmax.linear_cross_entropy(x, e.T, lab, chunk_size=512).mean()

    step = jax.jit(jax.value_and_grad(tied, (0, 1)))
    temp = step.lower(x, emb).compile().memory_analysis().temp_size_in_bytes
    assert temp < v * h * 4 / 2, temp  # a transposed copy alone would be v * h * 4 bytes
    (val, (gx, ge)) = step(x, emb)
    val_t, (gx_t, ge_t) = jax.value_and_grad(via_transpose, (0, 1))(x, emb)
    ref, (gx_r, ge_r) = jax.value_and_grad(
        lambda x, e: jsoftmax.cross_entropy(x @ e.T, lab).mean(), (0, 1)
    )(x, emb)
    assert ge.shape == emb.shape
    for a, b in [(val, ref), (gx, gx_r), (ge, ge_r), (val_t, ref), (ge_t, ge_r)]:
        _close(a, b, 2e-5, 2e-6)
    # The check can fail: through embedding.T, XLA copies the table.
    copied = jax.jit(jax.value_and_grad(via_transpose, (0, 1)))
    assert copied.lower(x, emb).compile().memory_analysis().temp_size_in_bytes >= v * h * 4


def test_edge_cases():
    x, w, b, lab = _inputs()
    # All labels ignored: mean 0, zero gradients.
    ign = jnp.full((N,), -1)
    f = lambda x, w: jsoftmax.linear_cross_entropy(  # noqa: E731
        x, w, ign, ignore_index=-1, reduction="mean", chunk_size=16
    )
    assert float(f(x, w)) == 0.0
    for g in jax.grad(f, (0, 1))(x, w):
        assert np.all(np.asarray(g) == 0)
    # N = 0.
    x0 = jnp.zeros((0, H), REF_DTYPE)
    assert jsoftmax.linear_cross_entropy(x0, w, jnp.zeros((0,), jnp.int32)).shape == (0,)
    assert (
        float(jsoftmax.linear_cross_entropy(x0, w, jnp.zeros((0,), jnp.int32), reduction="mean"))
        == 0.0
    )
    # V = 1: loss 0 (one class), gradient 0.
    w1 = w[:, :1]
    out = jsoftmax.linear_cross_entropy(x, w1, jnp.zeros((N,), jnp.int32))
    _close(out, jnp.zeros(N))
    # Out-of-range labels.
    with pytest.raises(IndexError, match="out of range"):
        jsoftmax.linear_cross_entropy(x, w, lab.at[0].set(V))
    out = jax.jit(jsoftmax.linear_cross_entropy)(x, w, lab.at[0].set(V))
    assert np.isnan(out[0]) and np.all(np.isfinite(np.asarray(out[1:])))


def test_errors_name_the_argument():
    x, w, b, lab = _inputs()
    lce = jsoftmax.linear_cross_entropy
    with pytest.raises(ValueError, match="w must have shape"):
        lce(x, w[:-1], lab)
    with pytest.raises(ValueError, match=r"w must have shape \(H, V\)"):
        lce(x, w[None], lab)
    with pytest.raises(ValueError, match="vocab_axis must be 1"):
        lce(x, w, lab, vocab_axis=2)
    with pytest.raises(ValueError, match="labels must have x's batch shape"):
        lce(x, w, lab[:-1])
    with pytest.raises(TypeError, match="labels must be integer"):
        lce(x, w, lab.astype(jnp.float32))
    with pytest.raises(ValueError, match="bias must have one entry per class"):
        lce(x, w, lab, bias=b[:-1])
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        lce(x, w, lab, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be None or a positive int"):
        lce(x, w, lab, chunk_size=1.5)
    with pytest.raises(ValueError, match="weights must have one entry per class"):
        lce(x, w, lab, weights=jnp.ones(V + 1))
    with pytest.raises(ValueError, match="reduction must be one of"):
        lce(x, w, lab, reduction="avg")
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        lce(jnp.float32(1.0), w, lab)


def test_default_chunk_size_rule_and_no_retracing():
    assert default_chunk_size(2048, 32768) == 512
    assert default_chunk_size(8192, 131072) == 128
    assert default_chunk_size(16, 100_000) == 8192
    assert default_chunk_size(2048, 300) == 300
    x, w, b, lab = _inputs()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, w):
        return jax.value_and_grad(
            lambda x, w: jsoftmax.linear_cross_entropy(x, w, lab, reduction="mean"), (0, 1)
        )(x, w)

    for k in range(3):
        step(x + k, w)
