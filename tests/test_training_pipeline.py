"""What a transformer training step needs from jsoftmax (examples/language_model.py).

* A causal ``(T, T)`` mask as ``where`` against ``(batch, heads, T, T)`` attention scores,
  values and gradients, float32 and bfloat16, without saving the broadcast mask.
* A clear error for Flax's float 0/1 masks and for additive masks.
* Mixed precision at the output layer: bfloat16 hidden states with a float32 kernel.
* Flax NNX parameter layouts: ``nnx.Linear``'s ``(H, V)`` kernel and ``nnx.Embed``'s
  ``(V, H)`` table (``vocab_axis=0``), passed as ``nnx.Param`` directly.
* No retracing of a jitted step across batches.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax

from helpers import fast_subset, make_logits, saved_residuals

# The references are float64 computations with JAX: skipped in JAX's default config.
pytestmark = pytest.mark.x64

B, HEADS, T, D = 2, 3, 6, 4


def _attention_inputs(dtype, seed=0):
    scores = make_logits((B, HEADS, T, T), dtype, seed=seed)
    values = make_logits((B, HEADS, T, D), dtype, seed=seed + 1, scale=1.0)
    return scores, values


def _causal():
    return jnp.tril(jnp.ones((T, T), bool))


def _reference_attention(scores, values, mask):
    """float64 jax.nn.softmax with the mask broadcast by hand."""
    full = jnp.broadcast_to(mask, scores.shape)
    p = jax.nn.softmax(scores.astype(jnp.float64), axis=-1, where=full)
    p = jnp.where(full, p, 0.0)
    return jnp.einsum("bhqk,bhkd->bhqd", p, values.astype(jnp.float64))


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)], ids=["float32", "bfloat16"]
)
@pytest.mark.parametrize("mask_shape", fast_subset(["TT", "B1TT"], ["B1TT"]))
def test_causal_mask_broadcasts_over_batch_and_heads(rule, dtype, tol, mask_shape):
    scores, values = _attention_inputs(dtype)
    mask = _causal() if mask_shape == "TT" else jnp.broadcast_to(_causal(), (B, 1, T, T))
    cot = make_logits((B, HEADS, T, D), jnp.float32, seed=2, scale=1.0)

    def attend(s, v):
        p = jsoftmax.softmax(s, where=mask, rule=rule)
        assert p.shape == (B, HEADS, T, T) and p.dtype == dtype
        return jnp.einsum("bhqk,bhkd->bhqd", p, v)

    def objective(fn):
        return lambda s, v: jnp.sum(fn(s, v).astype(jnp.float32) * cot)

    out = jax.jit(attend)(scores, values)
    ref = _reference_attention(scores, values, mask)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=tol, atol=tol)

    grads = jax.jit(jax.grad(objective(attend), (0, 1)))(scores, values)
    ref_grads = jax.grad(
        lambda s, v: jnp.sum(_reference_attention(s, v, mask) * cot.astype(jnp.float64)), (0, 1)
    )(scores.astype(jnp.float64), values.astype(jnp.float64))
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(np.asarray(g, np.float64), r, rtol=tol, atol=tol * scale)
    # Masked (future) keys get exactly zero gradient.
    assert not np.any(np.asarray(grads[0])[..., ~np.asarray(_causal())])


def test_causal_mask_matches_the_additive_mask_in_float32():
    """The code it replaces: an additive -1e9 mask and jax.nn.softmax (exp underflows to 0)."""
    scores, values = _attention_inputs(jnp.float32)
    causal = _causal()

    def additive(s, v):
        p = jax.nn.softmax(s + jnp.where(causal, 0.0, -1e9)[None, None], axis=-1)
        return jnp.sum(jnp.einsum("bhqk,bhkd->bhqd", p, v) ** 2)

    def masked(s, v):
        p = jsoftmax.softmax(s, where=causal)
        return jnp.sum(jnp.einsum("bhqk,bhkd->bhqd", p, v) ** 2)

    value, grads = jax.value_and_grad(masked, (0, 1))(scores, values)
    ref, ref_grads = jax.value_and_grad(additive, (0, 1))(scores, values)
    np.testing.assert_allclose(float(value), float(ref), rtol=2e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        # Both round p_k (g_k - <p, g>) with a dominant p_k near 1 (default precision):
        # errors of a few float32 ULP of the largest gradient component.
        np.testing.assert_allclose(g, r, rtol=2e-6, atol=4e-6 * float(jnp.max(jnp.abs(r))))


def test_broadcast_mask_is_not_saved_for_the_backward_pass():
    """Only the probabilities (and the values of the product) are residuals: no
    (B, heads, T, T) copy of the (T, T) mask."""
    scores, values = _attention_inputs(jnp.float32)

    def attend(s, v):
        return jnp.sum(jsoftmax.softmax(s, where=_causal()) @ v)

    res = saved_residuals(attend, scores, values)
    assert [r.dtype for r, _ in res].count(jnp.bool_) == 0, res
    assert sorted(r.shape for r, _ in res) == sorted([(B, HEADS, T, T), (B, HEADS, T, D)]), res


@pytest.mark.parametrize(
    "fn",
    [
        lambda m: jsoftmax.softmax(jnp.zeros((B, HEADS, T, T), jnp.float32), where=m),
        lambda m: jsoftmax.log_softmax(jnp.zeros((B, HEADS, T, T), jnp.float32), where=m),
        lambda m: jsoftmax.cross_entropy(
            jnp.zeros((T, T), jnp.float32), jnp.zeros((T,), jnp.int32), where=m
        ),
        lambda m: jsoftmax.cross_entropy(
            jnp.zeros((T, T), jnp.float32), jnp.zeros((T,), jnp.int32), where=m[0]
        ),
    ],
    ids=["softmax", "log_softmax", "cross_entropy class mask", "cross_entropy example mask"],
)
def test_float_mask_is_rejected_with_the_conversion(fn):
    """Flax's make_causal_mask gives float32 0/1; an additive mask (0 / -1e9) would invert
    if read as "nonzero keeps". Both are refused with the conversion to use."""
    flax_style = jnp.tril(jnp.ones((T, T), jnp.float32))
    with pytest.raises(TypeError, match=r"where must be a boolean mask.*mask\.astype\(bool\)"):
        fn(flax_style)
    additive = jnp.where(_causal(), 0.0, -1e9).astype(jnp.float32)
    with pytest.raises(TypeError, match=r"additive mask.*where=\(mask == 0\)"):
        fn(additive)


def _head_inputs(seed=0, n=(2, 5), h=8, v=300):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*n, h)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((h, v)) / np.sqrt(h), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    return x, w, labels


def _optax_head_loss(x, w, labels):
    logits = x.astype(jnp.float64) @ w.astype(jnp.float64)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.parametrize("w_dtype", [jnp.float32, jnp.bfloat16], ids=["f32 kernel", "bf16 kernel"])
def test_mixed_precision_output_layer(w_dtype):
    """bfloat16 activations with a float32 parameter (used as is or cast to bfloat16 for
    the matmul, as Flax's dtype=bfloat16 layers do): a float32 loss, gradients in the
    parameter's and the activations' dtypes, equal to the float64 loss of the same
    rounded inputs."""
    x, w, labels = _head_inputs()
    x = x.astype(jnp.bfloat16)

    def loss(x, w):
        return jsoftmax.linear_cross_entropy(x, w.astype(w_dtype), labels, reduction="mean")

    value, (gx, gw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
    assert value.dtype == jnp.float32 and gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    w_used = w.astype(w_dtype)
    ref, (rx, rw) = jax.value_and_grad(_optax_head_loss, (0, 1))(x, w_used, labels)
    np.testing.assert_allclose(float(value), float(ref), rtol=1e-6)
    gx, gw = np.asarray(gx, np.float64), np.asarray(gw, np.float64)
    np.testing.assert_allclose(gx, rx, rtol=1e-2, atol=1e-2 * np.abs(rx).max())
    tol = 1e-5 if w_dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(gw, rw, rtol=tol, atol=tol * np.abs(rw).max())


def test_flax_nnx_layouts():
    """nnx.Linear's kernel (H, V) and nnx.Embed's table (V, H) with vocab_axis=0, passed as
    nnx.Param, differentiated with nnx.grad, against optax on the dense logits."""
    nnx = pytest.importorskip("flax.nnx")
    x, _, labels = _head_inputs()
    head = nnx.Linear(8, 300, use_bias=False, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    table = nnx.Embed(300, 8, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    assert head.kernel.shape == (8, 300) and table.embedding.shape == (300, 8)

    def fused(head, table):
        a = jsoftmax.linear_cross_entropy(x, head.kernel, labels, reduction="mean")
        b = jsoftmax.linear_cross_entropy(
            x, table.embedding, labels, reduction="mean", vocab_axis=0
        )
        return a + 2 * b

    def dense(head, table):
        a = _optax_head_loss(x, head.kernel[...], labels)
        b = _optax_head_loss(x, table.embedding[...].T, labels)
        return a + 2 * b

    value, grads = nnx.value_and_grad(fused, argnums=(0, 1))(head, table)
    ref, ref_grads = nnx.value_and_grad(dense, argnums=(0, 1))(head, table)
    np.testing.assert_allclose(float(value), float(ref), rtol=1e-6)
    got = [grads[0]["kernel"][...], grads[1]["embedding"][...]]
    want = [ref_grads[0]["kernel"][...], ref_grads[1]["embedding"][...]]
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_a_jitted_training_step_traces_once():
    """Masked attention and the fused head in one step: new batches do not retrace."""
    x, w, labels = _head_inputs(n=(B, T))
    mask = _causal()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(w, x, labels):
        def loss(w):
            s = jnp.einsum("bqh,bkh->bqk", x, x)
            h = jsoftmax.softmax(s, where=mask) @ x
            return jsoftmax.linear_cross_entropy(h, w, labels, reduction="mean")

        value, g = jax.value_and_grad(loss)(w)
        return w - 0.1 * g, value

    for seed in range(3):
        x, _, labels = _head_inputs(seed=seed, n=(B, T))
        w, value = step(w, x, labels)
        assert np.isfinite(float(value))
