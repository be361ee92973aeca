"""Regression tests for defects found by review and by fuzzing, one test per defect,
each named after it and each failing before its fix. References are independent of
jsoftmax: optax, jax.nn, NumPy float64, or an identity the correct answer satisfies."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax

from helpers import REF_DTYPE, close, f64, make_logits, np_log_softmax, np_softmax

# --------------------------------------------------------------------------------------
# 1. where: fewer dimensions than the logits is per-example, the logits' rank is a class
#    mask, whatever the batch size (optax's rule).
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [3, 4])
def test_where_lower_rank_is_per_example_whatever_the_batch_size(batch):
    z = make_logits((batch, 3), REF_DTYPE)
    lab = jnp.arange(batch) % 3
    where = jnp.array([True, True, False] + [True] * (batch - 3))
    out = jsoftmax.cross_entropy(z, lab, where=where)
    ref = optax.softmax_cross_entropy_with_integer_labels(z, lab, where=where)
    close(out, ref, REF_DTYPE)
    assert float(out[2]) == 0.0


def test_where_lower_rank_broadcasts_to_the_batch_shape():
    z = make_logits((2, 4, 5), REF_DTYPE)
    lab = jnp.zeros((2, 4), jnp.int32)
    where = jnp.array([True, False, True, True])  # broadcast over the leading batch axis
    out = jsoftmax.cross_entropy(z, lab, where=where)
    full = jnp.broadcast_to(where, (2, 4))  # optax needs the batch shape itself
    ref = optax.softmax_cross_entropy_with_integer_labels(z, lab, where=full)
    close(out, ref, REF_DTYPE)


def test_where_lower_rank_not_broadcasting_to_the_batch_names_where():
    z = make_logits((4, 3), REF_DTYPE)
    with pytest.raises(ValueError, match="where"):
        jsoftmax.cross_entropy(z, jnp.zeros(4, jnp.int32), where=jnp.ones(3, bool))


def test_where_full_rank_is_a_class_mask():
    z = make_logits((4, 3), REF_DTYPE)
    lab = jnp.array([0, 1, 0, 1])
    where = jnp.array([[True, True, False]])
    out = jsoftmax.cross_entropy(z, lab, where=where)
    ref = -np_log_softmax(np.where(np.asarray(where), f64(z), -np.inf))[np.arange(4), lab]
    close(out, ref, REF_DTYPE)


def test_sharded_cross_entropy_where_lower_rank_is_per_example():
    from jax.sharding import PartitionSpec as P

    from helpers import mesh_of, put

    mesh = mesh_of((2,), ("v",))
    z = make_logits((3, 4), REF_DTYPE)
    lab = jnp.array([0, 3, 1])
    where = jnp.array([True, False, True])

    def f(z, lab, where):
        return jsoftmax.sharded.cross_entropy(z, lab, "v", where=where)

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(None, "v"), P(), P()), out_specs=P()))
    out = g(put(z, mesh, P(None, "v")), put(lab, mesh, P()), put(where, mesh, P()))
    close(out, jsoftmax.cross_entropy(z, lab, where=where), REF_DTYPE)


# --------------------------------------------------------------------------------------
# 2. The eager label check reads only the rows that count.
# --------------------------------------------------------------------------------------


def test_eager_label_check_ignores_masked_rows():
    z = make_logits((2, 3), REF_DTYPE)
    lab = jnp.array([0, -100])
    out = jsoftmax.cross_entropy(z, lab, where=lab != -100)
    ref = optax.softmax_cross_entropy_with_integer_labels(
        z, jnp.where(lab < 0, 0, lab), where=lab != -100
    )
    close(out, ref, REF_DTYPE)
    jitted = jax.jit(lambda z, lab: jsoftmax.cross_entropy(z, lab, where=lab != -100))(z, lab)
    close(out, jitted, REF_DTYPE)
    with pytest.raises(IndexError, match="labels"):  # a counted row is still checked
        jsoftmax.cross_entropy(z, jnp.array([5, -100]), where=jnp.array([True, False]))


# --------------------------------------------------------------------------------------
# 3. linear_cross_entropy is never negative (the target logit is read from the same
#    chunk logits as the row maximum).
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("va", [1, 0])
def test_linear_cross_entropy_is_never_negative(dtype, va):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 512)), dtype)
    w = jnp.asarray(rng.standard_normal((512, 256)), dtype)
    lab = jnp.argmax(jnp.dot(x, w, preferred_element_type=jnp.float32), -1)
    w_in = w if va == 1 else w.T
    for kw in [{}, dict(label_smoothing=0.1), dict(logit_softcap=30.0)]:
        out = jsoftmax.linear_cross_entropy(x, w_in, lab, vocab_axis=va, chunk_size=96, **kw)
        assert float(jnp.min(out)) >= 0.0, kw


def test_sharded_linear_cross_entropy_is_never_negative():
    from jax.sharding import PartitionSpec as P

    from helpers import mesh_of, put

    mesh = mesh_of((2,), ("v",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 512)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
    lab = jnp.argmax(x @ w, -1)

    def f(x, w, lab):
        return jsoftmax.sharded.linear_cross_entropy(x, w, lab, "v", chunk_size=64)

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(None, "v"), P()), out_specs=P()))
    out = g(put(x, mesh, P()), put(w, mesh, P(None, "v")), put(lab, mesh, P()))
    assert float(jnp.min(out)) >= 0.0


# --------------------------------------------------------------------------------------
# 4. z-loss under reduction="mean" is weighted like the cross-entropy term.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_z_loss_mean_is_invariant_under_uniform_class_weights(alpha):
    z = make_logits((8, 5), REF_DTYPE)
    lab = jnp.array([0, 1, 2, 3, 4, 0, 1, 2])
    kw = dict(z_loss=0.1, reduction="mean", label_smoothing=alpha)
    a = jsoftmax.cross_entropy(z, lab, **kw)
    b = jsoftmax.cross_entropy(z, lab, weights=2 * jnp.ones(5, REF_DTYPE), **kw)
    close(a, b, REF_DTYPE)
    ga = jax.grad(lambda z: jsoftmax.cross_entropy(z, lab, **kw))(z)
    gb = jax.grad(lambda z: jsoftmax.cross_entropy(z, lab, weights=2 * jnp.ones(5), **kw))(z)
    close(ga, gb, REF_DTYPE)
    x, w = make_logits((8, 4), REF_DTYPE, 1), make_logits((4, 5), REF_DTYPE, 2)
    c = jsoftmax.linear_cross_entropy(x, w, lab, z_loss=0.1, reduction="mean")
    d = jsoftmax.linear_cross_entropy(
        x, w, lab, weights=3 * jnp.ones(5), z_loss=0.1, reduction="mean"
    )
    close(c, d, REF_DTYPE)


def test_z_loss_is_weighted_per_row():
    z = make_logits((3, 4), REF_DTYPE)
    lab = jnp.array([0, 1, 3])
    wts = jnp.array([1.0, 2.0, 0.5, 3.0], REF_DTYPE)
    out = jsoftmax.cross_entropy(z, lab, weights=wts, z_loss=0.1)
    lse = np.log(np.exp(f64(z)).sum(-1))
    wy = f64(wts)[np.asarray(lab)]
    ref = wy * (lse - f64(z)[np.arange(3), lab]) + 0.1 * wy * lse**2
    close(out, ref, REF_DTYPE)


# --------------------------------------------------------------------------------------
# 5. label_smoothing and z_loss may be traced (a schedule inside jit).
# --------------------------------------------------------------------------------------


def test_traced_label_smoothing_and_z_loss():
    z = make_logits((4, 5), REF_DTYPE)
    lab = jnp.array([0, 1, 2, 3])

    @jax.jit
    def f(z, alpha, c):
        return jsoftmax.cross_entropy(z, lab, label_smoothing=alpha, z_loss=c).sum()

    out = f(z, 0.1, 0.01)
    ref = jsoftmax.cross_entropy(z, lab, label_smoothing=0.1, z_loss=0.01).sum()
    close(out, ref, REF_DTYPE)
    close(
        jax.grad(f)(z, 0.1, 0.01),
        jax.grad(lambda z: jsoftmax.cross_entropy(z, lab, label_smoothing=0.1, z_loss=0.01).sum())(
            z
        ),
        REF_DTYPE,
    )
    # Traced zeros are the plain loss.
    close(f(z, 0.0, 0.0), optax.softmax_cross_entropy_with_integer_labels(z, lab).sum(), REF_DTYPE)
    x, w = make_logits((4, 3), REF_DTYPE, 1), make_logits((3, 5), REF_DTYPE, 2)
    lce = jax.jit(
        lambda a, c: jsoftmax.linear_cross_entropy(x, w, lab, label_smoothing=a, z_loss=c)
    )
    close(
        lce(0.1, 0.01),
        jsoftmax.cross_entropy(x @ w, lab, label_smoothing=0.1, z_loss=0.01),
        REF_DTYPE,
    )


# --------------------------------------------------------------------------------------
# 6. jax.hessian through the default (custom_vjp) softmax and log_softmax.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_hessian_through_default_rule(fn):
    z = jnp.array([0.3, -1.2, 2.0], REF_DTYPE)
    f = getattr(jsoftmax, fn)
    ref_f = getattr(jax.nn, fn)
    h = jax.hessian(lambda z: f(z)[0])(z)
    close(h, jax.hessian(lambda z: ref_f(z)[0])(z), REF_DTYPE, 4)


def test_hessian_through_sharded_softmax():
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from helpers import mesh_of

    mesh = mesh_of((2,), ("v",), AxisType.Auto)
    z = make_logits((4,), REF_DTYPE)
    c = jnp.array([1.0, -2.0, 0.5, 3.0], REF_DTYPE)

    def f(z):
        p = jax.shard_map(
            lambda z: jsoftmax.sharded.softmax(z, "v"), mesh=mesh, in_specs=P("v"), out_specs=P("v")
        )(z)
        return jnp.sum(p * c)

    ref = jax.hessian(lambda z: jnp.sum(jax.nn.softmax(z) * c))(z)
    close(jax.jit(jax.hessian(f))(z), ref, REF_DTYPE, 4)


# --------------------------------------------------------------------------------------
# 7. A tuple axis flattens the classes in the order given (optax).
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [(3, 2), (2, 3), (1, 3), (-1, 1)])
def test_tuple_axis_flattens_in_the_order_given(axis):
    z = make_logits((2, 3, 4, 5), REF_DTYPE)
    n = int(np.prod([z.shape[a] for a in axis]))
    batch = tuple(s for k, s in enumerate(z.shape) if k not in {a % 4 for a in axis})
    lab = jnp.asarray(np.random.default_rng(0).integers(0, n, batch))
    out = jsoftmax.cross_entropy(z, lab, axis=axis)
    ref = optax.softmax_cross_entropy_with_integer_labels(z, lab, axis=axis)
    close(out, ref, REF_DTYPE)


# --------------------------------------------------------------------------------------
# 9. A -inf logit is an excluded class in cross_entropy as in linear_cross_entropy.
# --------------------------------------------------------------------------------------


def test_minus_inf_logit_gets_no_smoothing_mass():
    z = jnp.array([[-jnp.inf, 0.0, 1.0]], REF_DTYPE)
    out = jsoftmax.cross_entropy(z, jnp.array([1]), label_smoothing=0.1)
    lp = np_log_softmax(f64(z[:, 1:]))[0]
    ref = -(0.9 * lp[0] + 0.05 * lp.sum())
    close(out, [ref], REF_DTYPE)
    # A label on the -inf class: the row does not count (as a padded class of the fused loss).
    out0 = jsoftmax.cross_entropy(z, jnp.array([0]), label_smoothing=0.1)
    assert float(out0[0]) == 0.0
    g = jax.grad(lambda z: jsoftmax.cross_entropy(z, jnp.array([1]), label_smoothing=0.1).sum())(z)
    assert np.all(np.isfinite(f64(g)))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(label_smoothing=0.1),
        dict(z_loss=1e-2),
        dict(logit_softcap=5.0),
        dict(weights=jnp.array([1.0, 2.0, 0.5, 1.0, 3.0])),
        dict(ignore_index=2),
        dict(label_smoothing=0.2, weights=jnp.array([1.0, 2.0, 0.5, 1.0, 3.0]), z_loss=1e-3),
    ],
)
def test_cross_entropy_equals_linear_cross_entropy_with_minus_inf_bias(kw):
    x, w = make_logits((6, 3), REF_DTYPE, 1), make_logits((3, 5), REF_DTYPE, 2)
    b = jnp.array([0.0, -jnp.inf, 0.5, 0.0, -jnp.inf], REF_DTYPE)
    lab = jnp.array([0, 1, 2, 3, 4, 2])
    fused = jsoftmax.linear_cross_entropy(x, w, lab, bias=b, **kw)
    dense = jsoftmax.cross_entropy(x @ w + b[None], lab, **kw)
    assert not np.any(np.isnan(f64(dense)))
    close(dense, fused, REF_DTYPE, 4)
    for red in ["sum", "mean"]:
        gd = jax.grad(
            lambda x, red=red: jsoftmax.cross_entropy(x @ w + b[None], lab, reduction=red, **kw)
        )(x)
        gf = jax.grad(
            lambda x, red=red: jsoftmax.linear_cross_entropy(x, w, lab, bias=b, reduction=red, **kw)
        )(x)
        close(gd, gf, REF_DTYPE, 4)


def test_probability_labels_on_minus_inf_logits_are_excluded():
    z = jnp.array([[-jnp.inf, 0.0, 1.0]], REF_DTYPE)
    y = jnp.array([[0.2, 0.3, 0.5]], REF_DTYPE)
    out = jsoftmax.cross_entropy(z, y)
    ref = -(f64(y)[0, 1:] * np_log_softmax(f64(z[:, 1:]))[0]).sum()
    close(out, [ref], REF_DTYPE)


# --------------------------------------------------------------------------------------
# 10. Dead code is gone.
# --------------------------------------------------------------------------------------


def test_dead_code_removed():
    from jsoftmax import _merge, _softmax

    assert not hasattr(_softmax, "log_normalizer")
    assert not hasattr(_merge, "merge_lse")


# --------------------------------------------------------------------------------------
# Found by fuzzing.
# --------------------------------------------------------------------------------------


def test_temperature_with_huge_logits_same_eager_and_jit():
    x = jnp.array([[-1.85, 1e20, -0.84]], jnp.float32)
    t = 1.7938
    for fn in [
        lambda x: jsoftmax.softmax(x, temperature=t),
        lambda x: jsoftmax.log_softmax(x, temperature=t),
        lambda x: jsoftmax.cross_entropy(x, jnp.array([1]), temperature=t),
    ]:
        eager, jitted = fn(x), jax.jit(fn)(x)
        np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
        assert not np.any(np.isnan(np.asarray(jitted)))
    np.testing.assert_array_equal(np.asarray(jsoftmax.softmax(x, temperature=t)), [[0, 1, 0]])


def test_linear_cross_entropy_huge_logits_same_eager_and_jit():
    x = jnp.array([[1e6], [-3e5]], jnp.float32)
    w = jnp.array([[1e6, -2e6, 5e5]], jnp.float32)
    lab = jnp.array([0, 1])
    f = lambda x: jsoftmax.linear_cross_entropy(x, w, lab)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(jax.jit(f)(x)))


def test_log_softmax_jacobian_propagates_nan():
    for bad in [jnp.nan, jnp.inf]:
        j = jsoftmax.log_softmax_jacobian(jnp.array([1.0, bad, 0.0], REF_DTYPE))
        assert np.all(np.isnan(f64(j))), j


def test_ignore_index_not_representable_in_label_dtype():
    z = make_logits((2, 5), REF_DTYPE)
    lab = jnp.array([1, 255], jnp.uint8)
    with pytest.raises(ValueError, match="ignore_index"):
        jsoftmax.cross_entropy(z, lab, ignore_index=-1)
    with pytest.raises(ValueError, match="ignore_index"):
        jax.jit(lambda lab: jsoftmax.cross_entropy(z, lab, ignore_index=-1))(lab)
    with pytest.raises(ValueError, match="ignore_index"):
        jsoftmax.cross_entropy(z, jnp.array([1, 2], jnp.int32), ignore_index=2**40)


def test_negative_class_weights_mean_is_sum_over_weights():
    z = make_logits((4, 3), REF_DTYPE)
    lab = jnp.array([0, 1, 2, 0])
    wts = -jnp.ones(3, REF_DTYPE)
    per_row = -np_log_softmax(f64(z))[np.arange(4), lab] * -1.0
    out = jsoftmax.cross_entropy(z, lab, weights=wts, reduction="mean")
    close(out, per_row.sum() / -4.0, REF_DTYPE)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_16bit_derivatives_from_float32_probabilities(dtype):
    z = jnp.array([4.555, -4.895], dtype)
    ref = np_softmax(f64(z))
    j_ref = np.diag(ref) - np.outer(ref, ref)
    for rule in ["vjp", "jvp"]:
        j = jax.jacrev(lambda z, r=rule: jsoftmax.softmax(z, rule=r).astype(jnp.float32))(z)
        # One rounding of the exact value to the 16-bit dtype.
        np.testing.assert_allclose(f64(j), j_ref, rtol=float(jnp.finfo(dtype).eps))
    h = jax.hessian(lambda z: jsoftmax.softmax(z, rule="jvp")[0].astype(jnp.float32))(z)
    p0 = ref[0]
    h_ref = np.array([[1, -1], [-1, 1]]) * p0 * (1 - p0) * (1 - 2 * p0)
    np.testing.assert_allclose(f64(h), h_ref, rtol=2 * float(jnp.finfo(dtype).eps))


# --------------------------------------------------------------------------------------
# Unclear errors become messages naming the argument.
# --------------------------------------------------------------------------------------


def test_partial_derivative_index_shape_error_names_argument():
    p = jsoftmax.softmax(make_logits((3, 4), REF_DTYPE))
    with pytest.raises(ValueError, match=r"\bi\b"):
        jsoftmax.partial_derivative(p, jnp.zeros((2,), jnp.int32), 0)
    with pytest.raises(ValueError, match=r"\bj\b"):
        jsoftmax.partial_derivative(p, 0, jnp.zeros((5,), jnp.int32))
    op = jsoftmax.SoftmaxJacobian(p)
    with pytest.raises(ValueError, match=r"index"):
        op[jnp.zeros((2,), jnp.int32), 0]


def test_tuple_axis_with_empty_batch_returns_empty():
    z = jnp.zeros((0, 3, 4), REF_DTYPE)
    out = jsoftmax.cross_entropy(z, jnp.zeros((0,), jnp.int32), axis=(1, 2))
    assert out.shape == (0,)
    assert jsoftmax.softmax(z, axis=(1, 2)).shape == (0, 3, 4)


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(label_smoothing="0.1"), "label_smoothing"),
        (dict(z_loss=None), "z_loss"),
        (dict(where="mask"), "where"),
        (dict(temperature="1"), "temperature"),
        (dict(weights="w"), "weights"),
    ],
)
def test_string_and_none_options_name_the_argument(kw, name):
    z = make_logits((2, 3), REF_DTYPE)
    with pytest.raises((TypeError, ValueError), match=name):
        jsoftmax.cross_entropy(z, jnp.array([0, 1]), **kw)


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
def test_n1_fully_masked_row(rule):
    # A reduction over one entry: XLA drops the initial value of the row maximum there,
    # so a row whose single entry is masked or -inf must still give 0 / -inf, not NaN.
    for x, where in [(jnp.array([[0.0]]), jnp.array([[False]])), (jnp.array([[-jnp.inf]]), None)]:
        assert float(jsoftmax.softmax(x, -1, where, rule=rule)[0, 0]) == 0.0
        assert float(jsoftmax.log_softmax(x, -1, where, rule=rule)[0, 0]) == -np.inf
        assert float(jsoftmax.logsumexp(x, -1, where=where, rule=rule)[0]) == -np.inf
        g = jax.grad(lambda x, m=where: jsoftmax.logsumexp(x, -1, where=m, rule=rule).sum())(x)
        assert float(g[0, 0]) == 0.0
