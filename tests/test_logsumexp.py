"""Tests of jsoftmax.logsumexp: values, both custom rules, masks, edge cases, errors.

References: float64 NumPy, 50-digit mpmath, jax.nn.logsumexp (values and autodiff), and
the identity d logsumexp / dz = softmax(z).
"""

import chex
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoftmax

from helpers import REF_DTYPE, f64, fast_subset, make_logits, saved_residuals, tol

RULES = ("vjp", "jvp")
DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64]
SHAPES = [((7,), -1), ((4, 9), -1), ((4, 9), 0), ((2, 5, 3), 1), ((3, 2, 4, 5), (0, 2))]
# The fast suite's shapes: a non-last axis and a tuple of axes.
FAST_SHAPES = fast_subset(SHAPES, [SHAPES[2], SHAPES[4]], unpack=True)


def _np_logsumexp(x, axis, keepdims=False):
    """float64 NumPy log-sum-exp (row max shifted out; rows of -inf give -inf)."""
    x = f64(x)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis)


def _np_softmax(x, axis):
    x = f64(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _tol(dtype, x, axis):
    """Absolute error bound: 1 ULP of the result for 16-bit dtypes (float32 accumulation,
    one rounding); for float32/float64 the rounding of log(sum) (n eps) and of m + log."""
    eps = float(jnp.finfo(dtype).eps)
    ref = _np_logsumexp(x, axis)
    n = np.prod([np.shape(x)[a] for a in np.atleast_1d(axis)])
    if jnp.finfo(dtype).bits < 32:
        return eps * np.abs(ref) + 2 * n * 2.0**-23
    return eps * np.abs(ref) + 4 * n * eps


# ------------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", fast_subset(DTYPES, [jnp.bfloat16, jnp.float32]), ids=str)
@pytest.mark.parametrize("shape,axis", FAST_SHAPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("jit", [False, True])
def test_values_match_float64_reference_and_jax_nn(dtype, shape, axis, rule, jit):
    x = make_logits(shape, dtype)
    f = lambda z: jsoftmax.logsumexp(z, axis, rule=rule)
    out = jax.jit(f)(x) if jit else f(x)
    ref = _np_logsumexp(x, axis)
    assert out.dtype == dtype and out.shape == ref.shape
    err = np.abs(np.asarray(out, np.float64) - ref)
    assert np.all(err <= _tol(dtype, x, axis)), err.max()
    if dtype in (jnp.float32, jnp.float64):
        chex.assert_trees_all_close(out, jax.nn.logsumexp(x, axis), rtol=4 * jnp.finfo(dtype).eps)


@pytest.mark.parametrize("keepdims", [False, True])
def test_keepdims_and_tuple_axis(keepdims):
    x = make_logits((3, 4, 5), REF_DTYPE)
    out = jsoftmax.logsumexp(x, axis=(0, 2), keepdims=keepdims)
    ref = jax.nn.logsumexp(x, axis=(0, 2), keepdims=keepdims)
    assert out.shape == ref.shape == ((1, 4, 1) if keepdims else (4,))
    rtol = tol(REF_DTYPE, 1e-14, 5e-7)
    chex.assert_trees_all_close(out, ref, rtol=rtol)
    # Equivalent to reducing the flattened axes.
    flat = jnp.moveaxis(x, 1, 0).reshape(4, -1)
    chex.assert_trees_all_close(out.reshape(4), jsoftmax.logsumexp(flat, axis=-1), rtol=rtol)


@pytest.mark.x64  # float64 rows, up to 1.7e308
def test_matches_mpmath_within_the_rounding_bound():
    # Wide, dominant, near-tie and near-overflow rows against 50-digit arithmetic. The
    # bound: 1/2 ULP of the result plus (2n + 1) eps for log(sum) of n terms.
    mpmath.mp.dps = 50
    rng = np.random.default_rng(3)
    rows = [
        rng.standard_normal(8) * 1000,
        np.array([80.0, 0, -1, 3, 2, -5, 1, 0.5]),
        1.0 + np.arange(8) * 1e-15,
        np.array([1.7e308, 1.7e308, 1.0e308, 0, -1.7e308, 1, 2, 3]),
        np.array([-745.0, -746, -744, -800, -700, -710, -720, -730]),
    ]
    x = np.stack(rows).astype(np.float64)
    for rule in RULES:
        out = np.asarray(jsoftmax.logsumexp(jnp.asarray(x), axis=-1, rule=rule))
        for r, row in enumerate(x):
            exact = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in row))
            err = abs(mpmath.mpf(float(out[r])) - exact)
            ulp = np.spacing(abs(out[r]))
            assert err <= 0.5 * ulp + 17 * np.finfo(np.float64).eps, (rule, r, float(err))


def test_log_softmax_identity():
    x = make_logits((5, 8), REF_DTYPE)
    lse = jsoftmax.logsumexp(x, axis=-1, keepdims=True)
    t = tol(REF_DTYPE, 1e-13, 1e-6)  # a few ULP of lse (about 4)
    chex.assert_trees_all_close(x - lse, jax.nn.log_softmax(x), rtol=t, atol=t)


@pytest.mark.parametrize("rule", RULES)
def test_shift_invariance(rule):
    x = make_logits((5, 8), REF_DTYPE)
    a = jsoftmax.logsumexp(x, axis=-1, rule=rule)
    rtol = tol(REF_DTYPE, 1e-14, 5e-7)
    chex.assert_trees_all_close(
        jsoftmax.logsumexp(x + 123.0, axis=-1, rule=rule), a + 123.0, rtol=rtol
    )


def test_huge_logits_do_not_overflow():
    x = jnp.array([[3e38, 3e38, -3e38], [1e4, 1e4 + 1.0, -1e4]], jnp.float32)
    out = jsoftmax.logsumexp(x, axis=-1)
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(np.asarray(out, np.float64), _np_logsumexp(x, -1), rtol=1e-6)


@pytest.mark.parametrize("rule", RULES)
def test_vmap_and_jit_match_batched_call(rule):
    x = make_logits((6, 4, 10), REF_DTYPE)
    f = lambda z: jsoftmax.logsumexp(z, axis=-1, rule=rule)
    rtol = tol(REF_DTYPE, 1e-15, 5e-7)
    chex.assert_trees_all_close(jax.vmap(f)(x), f(x), rtol=rtol)
    chex.assert_trees_all_close(jax.jit(f)(x), f(x), rtol=rtol)
    g = jax.vmap(jax.grad(lambda z: jnp.sum(jnp.sin(f(z)))))(x)
    ref = jax.vmap(jax.grad(lambda z: jnp.sum(jnp.sin(jax.nn.logsumexp(z, -1)))))(x)
    rtol, atol = tol(REF_DTYPE, 1e-12, 2e-6), tol(REF_DTYPE, 1e-14, 1e-7)
    chex.assert_trees_all_close(g, ref, rtol=rtol, atol=atol)


def test_no_retracing_for_equal_shapes():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(z):
        return jsoftmax.logsumexp(z, axis=-1)

    for seed in range(3):
        f(make_logits((4, 7), jnp.float32, seed=seed)).block_until_ready()


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("shape,axis", FAST_SHAPES, ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_grad_is_softmax_and_matches_jax_nn(shape, axis, rule):
    x = make_logits(shape, REF_DTYPE)
    w = make_logits(jax.nn.logsumexp(x, axis).shape, REF_DTYPE, seed=1)
    loss = lambda f: lambda z: jnp.sum(jnp.sin(f(z)) * w)
    ours = jax.grad(loss(lambda z: jsoftmax.logsumexp(z, axis, rule=rule)))(x)
    ref = jax.grad(loss(lambda z: jax.nn.logsumexp(z, axis)))(x)
    rtol, atol = tol(REF_DTYPE, 1e-12, 2e-6), tol(REF_DTYPE, 1e-14, 1e-7)
    chex.assert_trees_all_close(ours, ref, rtol=rtol, atol=atol)
    # d/dz sum(logsumexp(z)) is the softmax, exactly the identity.
    plain = jax.grad(lambda z: jnp.sum(jsoftmax.logsumexp(z, axis, rule=rule)))(x)
    rtol, atol = tol(REF_DTYPE, 1e-13, 5e-7), tol(REF_DTYPE, 1e-15, 1e-8)
    chex.assert_trees_all_close(plain, jax.nn.softmax(x, axis), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("rule", RULES)
def test_grad_dtype_and_accuracy(dtype, rule):
    x = make_logits((4, 16), dtype)
    g = jax.grad(lambda z: jnp.sum(jsoftmax.logsumexp(z, axis=-1, rule=rule).astype(jnp.float32)))(
        x
    )
    assert g.dtype == dtype
    eps = float(jnp.finfo(dtype).eps)
    p = _np_softmax(x, -1)
    # p is computed in float32 and rounded to the dtype (the vjp residual), then the
    # product with the cotangent 1 is rounded again: within 1 ULP.
    assert np.all(np.abs(np.asarray(g, np.float64) - p) <= eps * p + 2.0**-22)


def test_jvp_rule_forward_mode_matches_jax_nn():
    x = make_logits((3, 6), REF_DTYPE)
    t = make_logits((3, 6), REF_DTYPE, seed=2)
    f = lambda z: jsoftmax.logsumexp(z, axis=-1, rule="jvp")
    out, dout = jax.jvp(f, (x,), (t,))
    ref, dref = jax.jvp(lambda z: jax.nn.logsumexp(z, -1), (x,), (t,))
    rtol, atol = tol(REF_DTYPE, 1e-13, 1e-6), tol(REF_DTYPE, 1e-14, 1e-6)
    chex.assert_trees_all_close((out, dout), (ref, dref), rtol=rtol, atol=atol)
    # <p, t> by the identity
    chex.assert_trees_all_close(dout, jnp.sum(jax.nn.softmax(x) * t, -1), rtol=rtol)


@pytest.mark.parametrize("rule", RULES)
def test_second_derivative_is_the_softmax_jacobian(rule):
    x = make_logits((6,), REF_DTYPE)
    f = lambda z: jsoftmax.logsumexp(z, axis=-1, rule=rule)
    h = jax.hessian(f)(x) if rule == "jvp" else jax.jacrev(jax.grad(f))(x)
    p = _np_softmax(x, -1)
    rtol, atol = tol(REF_DTYPE, 1e-12, 2e-6), tol(REF_DTYPE, 1e-15, 1e-8)
    chex.assert_trees_all_close(f64(h), np.diag(p) - np.outer(p, p), rtol=rtol, atol=atol)
    chex.assert_trees_all_close(h, jax.hessian(jax.nn.logsumexp)(x), rtol=rtol, atol=atol)
    if rule == "jvp":
        chex.assert_trees_all_close(f64(jax.jacfwd(f)(x)), p, rtol=tol(REF_DTYPE, 1e-13, 5e-7))


def test_vjp_rule_cannot_be_forward_differentiated():
    x = make_logits((4,), jnp.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jacfwd(lambda z: jsoftmax.logsumexp(z, axis=-1, rule="vjp"))(x)
    jax.jacfwd(lambda z: jsoftmax.logsumexp(z, axis=-1, rule="jvp"))(x)


@pytest.mark.x64  # float32 finite differences carry errors near check_grads' tolerance
def test_check_grads_order_2():
    x = make_logits((3, 5), jnp.float64)
    check_grads(lambda z: jsoftmax.logsumexp(z, axis=-1, rule="vjp"), (x,), order=2, modes=["rev"])
    check_grads(
        lambda z: jsoftmax.logsumexp(z, axis=-1, rule="jvp"), (x,), order=2, modes=["fwd", "rev"]
    )


@pytest.mark.x64
@pytest.mark.slow  # finite differences of order 2; the analytic checks are fast
def test_check_grads_with_mask_tuple_axis():
    x = make_logits((3, 4, 2), jnp.float64)
    where = jnp.asarray(np.random.default_rng(4).random((3, 4, 2)) > 0.4).at[:, 0, 0].set(True)
    for rule, modes in (("vjp", ["rev"]), ("jvp", ["fwd", "rev"])):
        f = lambda z, rule=rule: jsoftmax.logsumexp(z, (0, 2), where=where, rule=rule)
        check_grads(f, (x,), order=2, modes=modes)


# ---------------------------------------------------------------------------- residuals


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=str)
def test_vjp_rule_saves_exactly_one_array(dtype):
    x = make_logits((8, 32), dtype)
    res = saved_residuals(lambda z: jsoftmax.logsumexp(z, axis=-1), x)
    assert len(res) == 1, res
    ((aval, _),) = res
    assert aval.shape == x.shape and aval.dtype == dtype
    # jax.nn.logsumexp keeps more than that (the exponentials and per-row terms).
    assert len(saved_residuals(lambda z: jax.nn.logsumexp(z, -1), x)) > 1


def test_vjp_rule_with_mask_saves_no_mask():
    x = make_logits((8, 32), jnp.float32)
    where = jnp.arange(32) < 20
    res = saved_residuals(lambda z: jsoftmax.logsumexp(z, axis=-1, where=where), x)
    assert len(res) == 1 and res[0][0].shape == x.shape


# -------------------------------------------------------------------------- masks, inf


@pytest.mark.parametrize("rule", RULES)
def test_mask_matches_jax_nn_where(rule):
    x = make_logits((3, 6), REF_DTYPE)
    where = jnp.array([[True, False, True, True, False, True]] * 3)
    out = jsoftmax.logsumexp(x, axis=-1, where=where, rule=rule)
    rtol = tol(REF_DTYPE, 1e-14, 5e-7)
    chex.assert_trees_all_close(out, jax.nn.logsumexp(x, -1, where=where), rtol=rtol)
    ref = _np_logsumexp(np.where(where, f64(x), -np.inf), -1)
    chex.assert_trees_all_close(f64(out), ref, rtol=rtol)
    g = jax.grad(lambda z: jnp.sum(jsoftmax.logsumexp(z, axis=-1, where=where, rule=rule) ** 2))(x)
    g_ref = jax.grad(lambda z: jnp.sum(jax.nn.logsumexp(jnp.where(where, z, -jnp.inf), -1) ** 2))(x)
    rtol, atol = tol(REF_DTYPE, 1e-12, 2e-6), tol(REF_DTYPE, 1e-15, 1e-7)
    chex.assert_trees_all_close(g, g_ref, rtol=rtol, atol=atol)
    assert np.all(np.asarray(g)[~np.asarray(where)] == 0)


@pytest.mark.parametrize("rule", RULES)
def test_large_masked_values_do_not_leak_nan(rule):
    x = jnp.array([1.0, 2.0, 1e38, jnp.inf, jnp.nan], jnp.float32)
    where = jnp.array([True, True, False, False, False])
    out = jsoftmax.logsumexp(x, axis=-1, where=where, rule=rule)
    np.testing.assert_allclose(out, _np_logsumexp(np.array([1.0, 2.0]), -1), rtol=1e-6)
    g = jax.grad(lambda z: jsoftmax.logsumexp(z, axis=-1, where=where, rule=rule))(x)
    chex.assert_tree_all_finite(g)
    np.testing.assert_allclose(g[:2], _np_softmax(np.array([1.0, 2.0]), -1), rtol=1e-6)
    assert np.all(np.asarray(g[2:]) == 0)


@pytest.mark.parametrize("rule", RULES)
def test_fully_masked_row_gives_neg_inf_with_zero_gradient(rule):
    x = make_logits((3, 4), REF_DTYPE)
    where = jnp.array([[False] * 4, [True, True, False, True], [True] * 4])
    f = lambda z: jsoftmax.logsumexp(z, axis=-1, where=where, rule=rule)
    out = f(x)
    assert out[0] == -jnp.inf
    chex.assert_trees_all_close(out[1:], jax.nn.logsumexp(x[1:], -1, where=where[1:]))
    jac = jax.jacrev(f)(x)
    chex.assert_tree_all_finite(jac)
    assert np.all(np.asarray(jac[0]) == 0)
    # The cotangent of -inf is ignored: a loss that multiplies it by 0 stays finite.
    g = jax.grad(lambda z: jnp.sum(jnp.where(where.any(-1), f(z), 0.0)))(x)
    chex.assert_tree_all_finite(g)
    # Second order too.
    second = (
        jax.hessian(lambda z: f(z)[0])(x)
        if rule == "jvp"
        else jax.jacrev(jax.grad(lambda z: f(z)[0]))(x)
    )
    chex.assert_tree_all_finite(second)
    assert np.all(np.asarray(second) == 0)


@pytest.mark.parametrize("rule", RULES)
def test_neg_inf_entries_behave_as_masked(rule):
    x = jnp.array([[0.5, -jnp.inf, 1.5, -jnp.inf], [-jnp.inf] * 4], REF_DTYPE)
    where = jnp.isfinite(x)
    f = lambda z: jsoftmax.logsumexp(z, axis=-1, rule=rule)
    chex.assert_trees_all_close(f(x), jsoftmax.logsumexp(x, axis=-1, where=where))
    assert f(x)[1] == -jnp.inf
    ref = np.log(np.exp(0.5) + np.exp(1.5))
    chex.assert_trees_all_close(f64(f(x)[0]), ref)
    jac = jax.jacrev(f)(x)
    chex.assert_tree_all_finite(jac)
    assert np.all(np.asarray(jac)[:, ~np.asarray(where)] == 0)


@pytest.mark.parametrize("rule", RULES)
def test_pos_inf_gives_pos_inf_and_nan_gives_nan(rule):
    x = jnp.array(
        [[1.0, jnp.inf, 0.0], [1.0, jnp.nan, 0.0], [jnp.inf, jnp.nan, 0.0], [1.0, 2.0, 3.0]],
        jnp.float32,
    )
    out = np.asarray(jsoftmax.logsumexp(x, axis=-1, rule=rule))
    assert out[0] == np.inf and np.isnan(out[1]) and np.isnan(out[2])
    np.testing.assert_allclose(out[3], _np_logsumexp(np.array([1.0, 2.0, 3.0]), -1), rtol=1e-6)
    assert jax.nn.logsumexp(x[0]) == jnp.inf  # the same value as jax.nn
    g = np.asarray(jax.grad(lambda z: jnp.sum(jsoftmax.logsumexp(z, axis=-1, rule=rule)))(x))
    # The gradient of a row with +inf or NaN is NaN (its softmax); other rows are
    # unaffected.
    assert np.all(np.isnan(g[:3]))
    np.testing.assert_allclose(g[3], _np_softmax(np.array([1.0, 2.0, 3.0]), -1), rtol=1e-6)


def test_n_equals_one():
    x = jnp.array([[3.0], [-7.0]], REF_DTYPE)
    chex.assert_trees_all_close(jsoftmax.logsumexp(x, axis=-1), x[:, 0])
    g = jax.grad(lambda z: jnp.sum(jsoftmax.logsumexp(z, axis=-1)))(x)
    assert np.all(np.asarray(g) == 1)


def test_empty_axis_gives_neg_inf():
    x = jnp.zeros((3, 0), jnp.float32)
    out = jsoftmax.logsumexp(x, axis=-1)
    assert out.shape == (3,) and out.dtype == jnp.float32 and np.all(np.asarray(out) == -np.inf)
    assert jsoftmax.logsumexp(x, axis=-1, keepdims=True).shape == (3, 1)
    assert jax.grad(lambda z: jnp.sum(jsoftmax.logsumexp(z, axis=-1)))(x).shape == (3, 0)


def test_integer_input_is_promoted_to_default_float():
    out = jsoftmax.logsumexp(jnp.array([1, 2, 3], jnp.int32), axis=-1)
    assert out.dtype == jnp.result_type(float)
    ref = _np_logsumexp(np.array([1.0, 2.0, 3.0]), -1)
    np.testing.assert_allclose(out, ref, rtol=tol(out.dtype, 1e-12, 2e-6))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=str)
def test_regression_low_precision_accumulates_in_float32(dtype):
    # A 16-bit sum of 100 000 ones overflows float16 (max 65504) and rounds in bfloat16.
    x = jnp.zeros((100_000,), dtype)
    out = jsoftmax.logsumexp(x, axis=-1)
    assert out.dtype == dtype
    np.testing.assert_allclose(float(out), np.log(1e5), rtol=float(jnp.finfo(dtype).eps))
    g = jax.grad(lambda z: jsoftmax.logsumexp(z, axis=-1).astype(jnp.float32))(x)
    chex.assert_tree_all_finite(g)
    # 1e-5 is subnormal in float16: its spacing there is the smallest subnormal.
    fi = jnp.finfo(dtype)
    tol = dict(rtol=float(fi.eps), atol=float(fi.smallest_subnormal))
    np.testing.assert_allclose(np.asarray(g, np.float64), 1e-5, **tol)


# ------------------------------------------------------------------------------ errors


def test_error_scalar_input():
    with pytest.raises(ValueError, match="a must have at least one dimension"):
        jsoftmax.logsumexp(jnp.float32(1.0), axis=-1)


@pytest.mark.parametrize("axis", [2, -3, (0, 0)])
def test_error_bad_axis(axis):
    with pytest.raises(ValueError, match="axis"):
        jsoftmax.logsumexp(jnp.zeros((2, 3)), axis=axis)


def test_error_where():
    with pytest.raises(ValueError, match=r"where of shape \(4,\) does not broadcast"):
        jsoftmax.logsumexp(jnp.zeros((2, 3)), axis=-1, where=jnp.ones(4, bool))
    with pytest.raises(TypeError, match="where must be a boolean mask"):
        jsoftmax.logsumexp(jnp.zeros((2, 3)), axis=-1, where=jnp.ones(3))


def test_error_unknown_rule_and_complex_input():
    with pytest.raises(ValueError, match="rule must be one of"):
        jsoftmax.logsumexp(jnp.zeros(3), axis=-1, rule="fwd")
    with pytest.raises(TypeError, match="a must be real"):
        jsoftmax.logsumexp(jnp.zeros(3, jnp.complex64), axis=-1)


def test_error_raised_before_tracing():
    with pytest.raises(ValueError, match="axis=5 is out of range"):
        jax.jit(lambda z: jsoftmax.logsumexp(z, axis=5))(jnp.zeros((2, 3)))
