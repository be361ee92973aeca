"""The names jsoftmax shares with jax.nn and optax are drop-ins: the same positional call
gives the same result (or a documented difference, tested in its own test below)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax

from helpers import REF_DTYPE, close, f64, make_logits

X = make_logits((3, 4, 5), REF_DTYPE)
MASK = jnp.asarray(np.random.default_rng(3).random((3, 4, 5)) > 0.3)


# --------------------------------------------------------------------------------------
# softmax / log_softmax(x, axis=-1, where=None)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None])
def test_softmax_positional_call_matches_jax_nn(name, axis):
    ours, theirs = getattr(jsoftmax, name), getattr(jax.nn, name)
    close(ours(X, axis), theirs(X, axis), REF_DTYPE, 4)
    close(ours(X, axis, MASK), theirs(X, axis, MASK), REF_DTYPE, 4)
    g = jax.grad(lambda x: jnp.sum(jnp.where(MASK, ours(x, axis, MASK), 0) * X))(X)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.where(MASK, theirs(x, axis, MASK), 0) * X))(X)
    close(g, g_ref, REF_DTYPE, 8)


def test_softmax_axis_none_is_all_axes():
    p = jsoftmax.softmax(X, None)
    close(jnp.sum(p), 1.0, REF_DTYPE, 8)


# --------------------------------------------------------------------------------------
# logsumexp(a, axis=None, b=None, keepdims=False, return_sign=False, where=None)
# --------------------------------------------------------------------------------------

B = jnp.asarray(np.random.default_rng(4).uniform(-1.0, 2.0, (3, 4, 5)), REF_DTYPE)


def test_logsumexp_default_axis_is_all_axes():
    out = jsoftmax.logsumexp(X)
    assert out.shape == ()
    close(out, jax.nn.logsumexp(X), REF_DTYPE)


@pytest.mark.parametrize("axis", [None, -1, 1, (0, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_logsumexp_positional_call_matches_jax_nn(axis, keepdims):
    b = jnp.abs(B)
    close(
        jsoftmax.logsumexp(X, axis, b, keepdims, False, MASK),
        jax.nn.logsumexp(X, axis, b, keepdims, False, MASK),
        REF_DTYPE,
        4,
    )
    g = jax.grad(lambda x, b: jnp.sum(jsoftmax.logsumexp(x, axis, b, keepdims)), (0, 1))(X, b)
    g_ref = jax.grad(lambda x, b: jnp.sum(jax.nn.logsumexp(x, axis, b, keepdims)), (0, 1))(X, b)
    close(g[0], g_ref[0], REF_DTYPE, 4)
    close(g[1], g_ref[1], REF_DTYPE, 4)


@pytest.mark.parametrize("axis", [None, -1, 0])
def test_logsumexp_return_sign_matches_jax_nn(axis):
    out, sign = jsoftmax.logsumexp(X, axis, B, return_sign=True)
    ref, ref_sign = jax.nn.logsumexp(X, axis, B, return_sign=True)
    close(out, ref, REF_DTYPE, 64)
    np.testing.assert_array_equal(np.asarray(sign), np.asarray(ref_sign))
    # Without return_sign a negative sum is NaN, as in jax.nn.
    plain = jsoftmax.logsumexp(X, axis, B)
    np.testing.assert_array_equal(np.isnan(f64(plain)), np.isnan(f64(jax.nn.logsumexp(X, axis, B))))
    assert np.any(np.asarray(sign) < 0) or axis is None


def test_logsumexp_b_against_float64_sum():
    out = jsoftmax.logsumexp(X, -1, jnp.abs(B))
    ref = np.log(np.sum(f64(jnp.abs(B)) * np.exp(f64(X)), -1))
    close(out, ref, REF_DTYPE, 4)


def test_logsumexp_b_zero_excludes_minus_inf_and_keeps_gradients_finite():
    x = jnp.array([[0.0, -jnp.inf, 1.0], [-jnp.inf, -jnp.inf, -jnp.inf]], REF_DTYPE)
    b = jnp.array([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0]], REF_DTYPE)
    out = jsoftmax.logsumexp(x, -1, b)
    close(out[0], np.log(1 + 2 * np.e), REF_DTYPE)
    assert float(out[1]) == -np.inf
    gx, gb = jax.grad(lambda x, b: jnp.sum(jsoftmax.logsumexp(x, -1, b)[0]), (0, 1))(x, b)
    assert np.all(np.isfinite(f64(gx))) and np.all(np.isfinite(f64(gb)))


# --------------------------------------------------------------------------------------
# cross_entropy(logits, labels, axis=-1, where=None) as optax's two functions.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0, (1, 2)])
def test_cross_entropy_integer_labels_positional_call_matches_optax(axis):
    axes = (axis,) if isinstance(axis, int) else axis
    batch = tuple(s for k, s in enumerate(X.shape) if k not in {a % 3 for a in axes})
    n = int(np.prod([X.shape[a] for a in axes]))
    lab = jnp.asarray(np.random.default_rng(5).integers(0, n, batch))
    where = jnp.asarray(np.random.default_rng(6).random(batch) > 0.3)
    close(
        jsoftmax.cross_entropy(X, lab, axis, where),
        optax.softmax_cross_entropy_with_integer_labels(X, lab, axis, where),
        REF_DTYPE,
        4,
    )


@pytest.mark.parametrize("axis", [-1, 0, (1, 2), None])
def test_cross_entropy_probability_labels_positional_call_matches_optax(axis):
    y = jax.nn.softmax(make_logits(X.shape, REF_DTYPE, 7), axis)
    close(
        jsoftmax.cross_entropy(X, y, axis),
        optax.softmax_cross_entropy(X, y, axis),
        REF_DTYPE,
        4,
    )
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else axis
        batch = tuple(s for k, s in enumerate(X.shape) if k not in {a % 3 for a in axes})
        where = jnp.asarray(np.random.default_rng(6).random(batch) > 0.3)
        close(
            jsoftmax.cross_entropy(X, y, axis, where),
            optax.softmax_cross_entropy(X, y, axis, where),
            REF_DTYPE,
            4,
        )


def test_cross_entropy_axis_none_integer_label_indexes_flattened_classes():
    lab = jnp.asarray(17)
    out = jsoftmax.cross_entropy(X, lab, None)
    assert out.shape == ()
    close(out, -jax.nn.log_softmax(X, None).reshape(-1)[17], REF_DTYPE, 4)


# --------------------------------------------------------------------------------------
# The differences that stay by design (docs/howto/migrating.md), each shown here.
# --------------------------------------------------------------------------------------


def test_difference_16bit_losses_are_float32():
    z = make_logits((4, 6), jnp.bfloat16)
    lab = jnp.array([0, 1, 2, 3])
    ours = jsoftmax.cross_entropy(z, lab)
    theirs = optax.softmax_cross_entropy_with_integer_labels(z, lab)
    assert ours.dtype == jnp.float32 and theirs.dtype == jnp.bfloat16
    # The float32 loss is the float64 value rounded once; the bfloat16 one is quantised.
    exact = -np.take_along_axis(
        f64(z) - np.log(np.exp(f64(z)).sum(-1, keepdims=True)), np.asarray(lab)[:, None], -1
    )[:, 0]
    assert np.max(np.abs(f64(ours) - exact)) < np.max(np.abs(f64(theirs) - exact))


def test_difference_label_on_a_masked_class_does_not_count():
    z = make_logits((2, 4), REF_DTYPE)
    where = jnp.array([[True, True, False, True]] * 2)
    lab = jnp.array([2, 0])  # row 0's label is masked
    ours = jsoftmax.cross_entropy(z, lab, -1, where)
    assert float(ours[0]) == 0.0
    theirs = optax.softmax_cross_entropy_with_integer_labels(z, lab, -1, where)
    assert np.isfinite(float(theirs[0])) and float(theirs[0]) != 0.0  # a number, not a loss
    close(ours[1], theirs[1], REF_DTYPE, 4)
    mean = jsoftmax.cross_entropy(z, lab, -1, where, reduction="mean")
    close(mean, ours[1], REF_DTYPE, 4)  # row 0 is not in the denominator


def test_difference_probability_label_gradient_is_zero_on_masked_classes():
    z = make_logits((2, 4), REF_DTYPE)
    y = jax.nn.softmax(make_logits((2, 4), REF_DTYPE, seed=3))
    where = jnp.array([[True, False, True, True], [True, True, True, False]])
    ours = jax.grad(lambda y: jnp.sum(jsoftmax.cross_entropy(z, y, -1, where)))(y)
    theirs = jax.grad(lambda y: jnp.sum(optax.softmax_cross_entropy(z, y, -1, where)))(y)
    assert np.all(np.asarray(ours)[~np.asarray(where)] == 0.0)
    assert np.all(np.isnan(np.asarray(theirs)[~np.asarray(where)]))
    close(jnp.where(where, ours, 0), jnp.where(where, theirs, 0), REF_DTYPE, 4)


def test_difference_minus_inf_logits_give_finite_losses():
    z = jnp.array([[-jnp.inf, 0.0, 1.0]], REF_DTYPE)
    y = jnp.array([[0.0, 0.5, 0.5]], REF_DTYPE)
    ours = jsoftmax.cross_entropy(z, y)
    theirs = optax.softmax_cross_entropy(z, y)
    assert np.isnan(float(theirs[0]))  # 0 * -inf
    close(ours, [-(0.5 * np.log(1 / (1 + np.e)) + 0.5 * np.log(np.e / (1 + np.e)))], REF_DTYPE)


def test_difference_out_of_range_labels_raise():
    z = make_logits((2, 3), REF_DTYPE)
    lab = jnp.array([0, 3])
    with pytest.raises(IndexError, match="labels"):
        jsoftmax.cross_entropy(z, lab)
    # optax's gather fills an out-of-range index with NaN: the same NaN as jsoftmax's
    # under jax.jit, but no error eagerly.
    theirs = optax.softmax_cross_entropy_with_integer_labels(z, lab)
    assert np.isnan(float(theirs[1]))
    assert np.isnan(float(jax.jit(jsoftmax.cross_entropy)(z, lab)[1]))


def test_difference_default_rule_is_reverse_mode():
    z = make_logits((3,), REF_DTYPE)
    t = jnp.ones_like(z)
    with pytest.raises(TypeError):
        jax.jvp(jsoftmax.softmax, (z,), (t,))
    ours = jax.jvp(lambda z: jsoftmax.softmax(z, rule="jvp"), (z,), (t,))
    close(ours[1], jax.jvp(jax.nn.softmax, (z,), (t,))[1], REF_DTYPE, 4)
    # jax.hessian works with either rule.
    close(
        jax.hessian(lambda z: jsoftmax.softmax(z)[0])(z),
        jax.hessian(lambda z: jax.nn.softmax(z)[0])(z),
        REF_DTYPE,
        4,
    )


def test_difference_per_example_where_broadcasts_to_the_batch():
    z = make_logits((2, 3, 4), REF_DTYPE)
    lab = jnp.zeros((2, 3), jnp.int32)
    where = jnp.array([True, False, True])
    ours = jsoftmax.cross_entropy(z, lab, -1, where)
    ref = optax.softmax_cross_entropy_with_integer_labels(
        z, lab, -1, jnp.broadcast_to(where, (2, 3))
    )
    close(ours, ref, REF_DTYPE, 4)
