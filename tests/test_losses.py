"""Tests for jsoftmax.cross_entropy and jsoftmax.cross_entropy_hessian."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jsoftmax

from helpers import (
    REF_DTYPE,
    close,
    fast_subset,
    make_logits,
    np_log_softmax,
    np_softmax,
    saved_residuals,
    tol,
)

RULE_MODES = {"vjp": ["rev"], "jvp": ["fwd", "rev"]}


def _probs(shape, dtype=REF_DTYPE, seed=1):
    return jnp.asarray(np_softmax(make_logits(shape, dtype, seed, scale=1.0)), dtype)


def _reference(x, y, axis=-1, *, where=None, alpha=0.0, temperature=1.0):
    """Plain cross-entropy -sum(y_eff * log_softmax(x / T)) for dense float targets."""
    x = jnp.moveaxis(x, axis, -1)
    y = jnp.moveaxis(y, axis, -1)
    t = jnp.asarray(temperature)[..., None] if jnp.ndim(temperature) else temperature
    if where is not None:
        where = jnp.moveaxis(jnp.broadcast_to(where, jnp.moveaxis(x, -1, axis).shape), axis, -1)
        m = jnp.sum(where, -1, keepdims=True)
        y = jnp.where(where, (1 - alpha) * y + alpha / jnp.maximum(m, 1), 0)
        x = jnp.where(where, x, -1e30)  # exp underflows to exactly 0 (float32 and float64)
    else:
        y = (1 - alpha) * y + alpha / x.shape[-1]
    return -jnp.sum(y * jax.nn.log_softmax(x / t), axis=-1)


# --------------------------------------------------------------------------------------
# Values against optax and gradients against autodiff of the plain formula.
# --------------------------------------------------------------------------------------


OPTAX_CASES = [
    (jnp.float32, "vjp", True),
    (jnp.float32, "jvp", False),
    (jnp.float64, "vjp", False),
    (jnp.float64, "jvp", True),
]


@pytest.mark.parametrize("dtype,rule,jit", fast_subset(OPTAX_CASES, OPTAX_CASES[:2], unpack=True))
def test_matches_optax(dtype, rule, jit):
    x = make_logits((6, 5), dtype)
    lab = jnp.array([0, 4, 2, 2, 1, 3])
    y = _probs((6, 5), dtype)
    ce = jax.jit(jsoftmax.cross_entropy, static_argnames="rule") if jit else jsoftmax.cross_entropy
    out_i = ce(x, lab, rule=rule)
    out_f = ce(x, y, rule=rule)
    assert out_i.shape == (6,) and out_i.dtype == dtype and out_f.dtype == dtype
    close(out_i, optax.softmax_cross_entropy_with_integer_labels(x, lab), dtype, 4)
    close(out_f, optax.softmax_cross_entropy(x, y), dtype, 4)
    g = jax.grad(lambda x: jnp.sum(ce(x, lab, rule=rule) * jnp.arange(6)))(x)
    g_ref = jax.grad(
        lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, lab) * jnp.arange(6))
    )(x)
    close(g, g_ref, dtype, 4)


@pytest.mark.parametrize(
    "rule,axis", fast_subset([("vjp", -1), ("jvp", 0), ("vjp", 1)], [("jvp", 0)], unpack=True)
)
def test_gradients_vs_reference(rule, axis):
    shape = (3, 4, 5)
    x = make_logits(shape, REF_DTYPE)
    y = _probs(shape)
    y = y / jnp.sum(y, axis=axis, keepdims=True)
    batch = tuple(s for k, s in enumerate(shape) if k != axis % 3)
    t = jnp.asarray(0.5 + np.random.default_rng(3).random(batch), REF_DTYPE)
    w = make_logits(batch, REF_DTYPE, seed=4, scale=1.0)

    def ours(x, y, t):
        return jnp.sum(w * jsoftmax.cross_entropy(x, y, axis, temperature=t, rule=rule))

    def ref(x, y, t):
        return jnp.sum(w * _reference(x, y, axis, temperature=t))

    close(ours(x, y, t), ref(x, y, t), REF_DTYPE)
    for arg in range(3):
        close(jax.grad(ours, arg)(x, y, t), jax.grad(ref, arg)(x, y, t), REF_DTYPE, 10)
    # Integer labels: the reference with one-hot targets.
    lab = jnp.argmax(y, axis=axis)
    onehot = jnp.moveaxis(jax.nn.one_hot(lab, shape[axis], dtype=REF_DTYPE), -1, axis)
    g = jax.grad(lambda x: jnp.sum(w * jsoftmax.cross_entropy(x, lab, axis, rule=rule)))(x)
    close(g, jax.grad(lambda x: jnp.sum(w * _reference(x, onehot, axis)))(x), REF_DTYPE, 10)


@pytest.mark.x64  # float32 finite differences carry errors near check_grads' tolerance
@pytest.mark.slow  # finite differences of order 2; the analytic Hessian checks are fast
@pytest.mark.parametrize("rule", ["vjp", "jvp"])
def test_check_grads_order2(rule):
    x = make_logits((3, 4), jnp.float64)
    y = _probs((3, 4))
    lab = jnp.array([0, 3, 1])
    modes = RULE_MODES[rule]
    f = lambda x, y, t: jsoftmax.cross_entropy(x, y, temperature=t, rule=rule)  # noqa: E731
    check_grads(jax.jit(f), (x, y, jnp.array([0.7, 1.3, 2.0])), order=2, modes=modes)
    where = jnp.array([[True, True, False, True]] * 3)
    g = lambda x, t: jsoftmax.cross_entropy(  # noqa: E731
        x, lab, where=where, temperature=t, label_smoothing=0.1, rule=rule
    )
    check_grads(jax.jit(g), (x, 1.5), order=2, modes=modes)


def test_hessian_forward_mode():
    x = make_logits((2, 4), REF_DTYPE)
    y = _probs((2, 4))
    ours = jax.hessian(lambda x: jsoftmax.cross_entropy(x, y, rule="jvp", temperature=1.7).sum())
    ref = jax.hessian(lambda x: _reference(x, y, temperature=1.7).sum())
    close(ours(x), ref(x), REF_DTYPE, 10)
    with pytest.raises(TypeError):  # custom_vjp cannot be forward-differentiated
        jax.jvp(lambda x: jsoftmax.cross_entropy(x, y), (x,), (x,))


def test_label_smoothing_and_masks_vs_reference():
    x = make_logits((4, 5), REF_DTYPE)
    lab = jnp.array([1, 0, 4, 2])
    onehot = jax.nn.one_hot(lab, 5, dtype=REF_DTYPE)
    where = jnp.array(
        [[True] * 5, [True, False, True, True, False], [False, True, True, True, True], [True] * 5]
    )
    for alpha in (0.0, 0.3, 1.0):
        for w in (None, where):
            f = lambda x, w=w, a=alpha: jsoftmax.cross_entropy(  # noqa: E731
                x, lab, where=w, label_smoothing=a
            )
            r = lambda x, w=w, a=alpha: _reference(x, onehot, where=w, alpha=a)  # noqa: E731
            close(f(x), r(x), REF_DTYPE, 10)
            gf = jax.grad(lambda x, f=f: f(x).sum())(x)
            close(gf, jax.grad(lambda x, r=r: r(x).sum())(x), REF_DTYPE)
    # alpha = 1: uniform target over the valid classes, labels irrelevant.
    uniform = jsoftmax.cross_entropy(x, lab, where=where, label_smoothing=1.0)
    logp = jax.nn.log_softmax(jnp.where(where, x, -1e30))
    expected = -jnp.sum(jnp.where(where, logp, 0), -1) / jnp.sum(where, -1)
    close(uniform, expected, REF_DTYPE)


# --------------------------------------------------------------------------------------
# Residuals.
# --------------------------------------------------------------------------------------


def _output_sized_saved(f, *args, shape):
    res = saved_residuals(f, *args)
    return [r for r in res if r[0].shape == shape and "from the argument" not in r[1]]


def test_residuals_are_the_logits_and_per_row_values_only():
    # The backward pass recomputes p from the logits (which are in memory anyway) and a
    # per-row log-normaliser: no new logits-sized array is saved. optax keeps more.
    x = make_logits((8, 6), REF_DTYPE)
    lab = jnp.arange(8) % 6
    y = _probs((8, 6))
    where = x > -3
    t = jnp.full((8,), 1.5)
    cases = {
        "int": lambda x: jsoftmax.cross_entropy(x, lab).sum(),
        "float": lambda x, y: jsoftmax.cross_entropy(x, y).sum(),
        "int_where_t": lambda x, w: jsoftmax.cross_entropy(x, lab, where=w, temperature=t).sum(),
        "float_smooth": lambda x, y: jsoftmax.cross_entropy(x, y, label_smoothing=0.1).sum(),
    }
    args = {"int": (x,), "float": (x, y), "int_where_t": (x, where), "float_smooth": (x, y)}
    for name, f in cases.items():
        res = saved_residuals(f, *args[name])
        big = [r for r in res if r[0].shape == (8, 6) and jnp.issubdtype(r[0].dtype, jnp.floating)]
        assert len(big) <= 2, (name, res)  # the logits (and float labels, an input)
        assert all("from the argument" in r[1] for r in big), (name, res)
        assert all(r[0].size <= 8 for r in res if r not in big and r[0].shape != (8, 6))
    n_optax = len(
        _output_sized_saved(
            lambda x: optax.softmax_cross_entropy_with_integer_labels(x, lab).sum(), x, shape=(8, 6)
        )
    )
    n_ours = len(_output_sized_saved(cases["int"], x, shape=(8, 6)))
    assert n_ours == 0 and n_optax >= 1


# --------------------------------------------------------------------------------------
# Edge cases.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
def test_neg_inf_logits(rule):
    x = jnp.array([[-jnp.inf, 1.0, 2.0, -jnp.inf], [0.5, -jnp.inf, -1.0, 0.0]])
    lab = jnp.array([2, 3])
    y = jnp.array([[0.0, 0.4, 0.6, 0.0], [0.2, 0.0, 0.3, 0.5]])
    f = lambda x: jsoftmax.cross_entropy(x, lab, rule=rule)  # noqa: E731
    loss, g = f(x), jax.grad(lambda x: f(x).sum())(x)
    chex.assert_tree_all_finite((loss, g))
    # Equal to the loss over the finite classes only.
    keep = [(0, [1, 2]), (1, [0, 2, 3])]
    for row, cols in keep:
        sub = x[row, jnp.array(cols)]
        k = cols.index(int(lab[row]))
        ref_g = jax.grad(lambda s, k=k: -jax.nn.log_softmax(s)[k])(sub)
        close(loss[row], -jax.nn.log_softmax(sub)[k], REF_DTYPE)
        close(g[row, jnp.array(cols)], ref_g, REF_DTYPE)
        assert np.all(np.delete(np.asarray(g[row]), cols) == 0)
    gf = jax.grad(lambda x: jsoftmax.cross_entropy(x, y, rule=rule).sum())(x)
    chex.assert_tree_all_finite((jsoftmax.cross_entropy(x, y, rule=rule), gf))
    # A -inf logit is an excluded class: a label on it makes the row not count (as a
    # label on a masked class, or a padded class of linear_cross_entropy) ...
    lab2 = jnp.array([0, 1])
    loss2 = jsoftmax.cross_entropy(x, lab2, rule=rule)
    np.testing.assert_array_equal(np.asarray(loss2), [0.0, 0.0])
    for kw in ({}, {"temperature": 2.0}):  # the plain backward pass does not select
        g2 = jax.grad(lambda x, kw=kw: jsoftmax.cross_entropy(x, lab2, rule=rule, **kw).sum())(x)
        np.testing.assert_array_equal(np.asarray(g2), np.zeros(x.shape))
    # ... and label smoothing gives it no mass: the same loss as masking it.
    smoothed = jsoftmax.cross_entropy(x, lab, label_smoothing=0.1, rule=rule)
    chex.assert_tree_all_finite(smoothed)
    masked = jsoftmax.cross_entropy(x, lab, where=x > -jnp.inf, label_smoothing=0.1)
    close(smoothed, masked, REF_DTYPE)


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
@pytest.mark.parametrize("t", [0.3, 2.0, 1e30])
def test_temperature_with_neg_inf_logits_and_empty_rows(rule, t):
    # The exponentials of -inf logits are exactly 0 at any temperature (also in a row
    # without finite logits, whose shift is the lowest finite value), and neither the
    # logits' nor the temperature's gradient meets 0 * inf there.
    x = jnp.array(
        [[-jnp.inf, 1.0, 2.0, -jnp.inf], [0.5, -jnp.inf, -1.0, 0.0], [-jnp.inf] * 4],
        REF_DTYPE,
    )
    lab = jnp.array([2, 3, 0])
    temp = jnp.asarray(t, REF_DTYPE)

    def f(x, temp):
        return jsoftmax.cross_entropy(x, lab, temperature=temp, rule=rule)

    loss = f(x, temp)
    g_x, g_t = jax.grad(lambda x, temp: f(x, temp).sum(), (0, 1))(x, temp)
    chex.assert_tree_all_finite((loss, g_x, g_t))
    ref_t = 0.0
    for row, cols in [(0, [1, 2]), (1, [0, 2, 3])]:
        k = cols.index(int(lab[row]))

        def ref(s, temp, k=k):
            return -jax.nn.log_softmax(s / temp)[k]

        sub = x[row, jnp.array(cols)]
        r_x, r_t = jax.grad(ref, (0, 1))(sub, temp)
        close(loss[row], ref(sub, temp), REF_DTYPE)
        close(g_x[row, jnp.array(cols)], r_x, REF_DTYPE)
        assert np.all(np.delete(np.asarray(g_x[row]), cols) == 0)
        ref_t += float(r_t)
    close(g_t, ref_t, REF_DTYPE)
    # The row without finite logits does not count: loss and gradient exactly 0.
    assert float(loss[2]) == 0.0 and np.all(np.asarray(g_x[2]) == 0)
    # softmax and log_softmax: exact zeros (-inf) there, finite derivatives.
    p = jsoftmax.softmax(x, temperature=temp, rule=rule)
    lp = jsoftmax.log_softmax(x, temperature=temp, rule=rule)
    np.testing.assert_array_equal(np.asarray(p)[np.isinf(np.asarray(x))], 0.0)
    np.testing.assert_array_equal(np.asarray(lp)[np.isinf(np.asarray(x))], -np.inf)
    dp = jax.grad(
        lambda x, temp: jnp.sum(jsoftmax.softmax(x, temperature=temp, rule=rule) ** 2), (0, 1)
    )
    chex.assert_tree_all_finite(dp(x, temp))


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
def test_fully_masked_rows_and_masked_label(rule):
    x = make_logits((3, 4), REF_DTYPE)
    where = jnp.array([[False] * 4, [True, True, False, True], [True] * 4])
    lab = jnp.array([1, 2, 0])  # row 1 points at a masked class
    y = _probs((3, 4))
    t = jnp.array([1.0, 2.0, 0.5], REF_DTYPE)
    for labels in (lab, y):
        f = lambda x, t, labels=labels: jsoftmax.cross_entropy(  # noqa: E731
            x, labels, where=where, temperature=t, label_smoothing=0.2, rule=rule
        )
        loss = f(x, t)
        gx, gt = jax.grad(lambda x, t, f=f: f(x, t).sum(), (0, 1))(x, t)
        chex.assert_tree_all_finite((loss, gx, gt))
        assert loss[0] == 0 and np.all(np.asarray(gx[0]) == 0) and gt[0] == 0
    loss = jsoftmax.cross_entropy(x, lab, where=where, rule=rule)
    g = jax.grad(lambda x: jsoftmax.cross_entropy(x, lab, where=where, rule=rule).sum())(x)
    assert loss[1] == 0 and np.all(np.asarray(g[1]) == 0)


def test_out_of_range_labels():
    x = make_logits((3, 4), REF_DTYPE)
    for bad in ([0, 4, 1], [0, -1, 1]):
        with pytest.raises(IndexError, match="labels has entries out of range"):
            jsoftmax.cross_entropy(x, jnp.array(bad))
    # Under jit the values cannot be checked: that row is NaN, the others unaffected.
    for rule in ("vjp", "jvp"):
        f = jax.jit(lambda x, lab: jsoftmax.cross_entropy(x, lab, rule=rule))  # noqa: B023
        lab = jnp.array([0, 4, -1])
        loss = f(x, lab)
        g = jax.grad(lambda x, f=f, lab=lab: f(x, lab).sum())(x)
        assert np.isnan(loss[1]) and np.isnan(loss[2])
        assert np.all(np.isnan(g[1:]))
        close(loss[0], -jax.nn.log_softmax(x[0])[0], REF_DTYPE)
        close(g[0], jax.nn.softmax(x[0]) - jnp.array([1.0, 0, 0, 0], REF_DTYPE), REF_DTYPE)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision(dtype):
    x = make_logits((4, 7), jnp.float32).astype(dtype)
    lab = jnp.array([0, 6, 3, 3])
    loss = jsoftmax.cross_entropy(x, lab)
    g = jax.grad(lambda x: jsoftmax.cross_entropy(x, lab).sum())(x)
    # The loss comes back in float32 (computed there, not rounded to 16 bits: a
    # bfloat16 loss near 8 would be quantised to 1/16); the gradient in the logits' dtype.
    assert loss.dtype == jnp.float32 and g.dtype == dtype
    # float64 NumPy: -log p[label] and p - onehot(label).
    ref = -np_log_softmax(x)[np.arange(4), lab]
    ref_g = np_softmax(x) - np.eye(7)[lab]
    eps = float(jnp.finfo(dtype).eps)
    eps32 = float(jnp.finfo(jnp.float32).eps)
    np.testing.assert_allclose(np.asarray(loss, np.float64), ref, rtol=4 * eps32, atol=4 * eps32)
    np.testing.assert_allclose(np.asarray(g, np.float64), ref_g, rtol=0, atol=8 * eps)
    # 100 000 equal float16 logits: log(1e5), finite gradient.
    big = jnp.zeros((1, 100_000), jnp.float16)
    out = jsoftmax.cross_entropy(big, jnp.array([7]))
    np.testing.assert_allclose(float(out[0]), np.log(1e5), rtol=1e-3)
    chex.assert_tree_all_finite(
        jax.grad(lambda x: jsoftmax.cross_entropy(x, jnp.array([7]))[0])(big)
    )


def test_n_equals_one_and_vmap():
    x = make_logits((3, 1), REF_DTYPE)
    assert np.all(np.asarray(jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.int32))) == 0)
    g = jax.grad(lambda x: jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.int32)).sum())(x)
    assert np.all(np.asarray(g) == 0)
    x = make_logits((5, 4), REF_DTYPE)
    lab = jnp.array([0, 1, 2, 3, 0])
    close(
        jax.vmap(lambda r, k: jsoftmax.cross_entropy(r, k))(x, lab),
        jsoftmax.cross_entropy(x, lab),
        REF_DTYPE,
    )


def test_temperature_limits():
    x = make_logits((2, 5), REF_DTYPE)
    y = _probs((2, 5))
    for t in (1e-3, 1e3):
        for rule in ("vjp", "jvp"):
            f = lambda x, t, rule=rule: jsoftmax.cross_entropy(  # noqa: E731
                x, y, temperature=t, rule=rule
            ).sum()
            r = lambda x, t: _reference(x, y, temperature=t).sum()  # noqa: E731
            close(f(x, t), r(x, t), REF_DTYPE, 100)
            for arg in (0, 1):
                a, b = jax.grad(f, arg)(x, t), jax.grad(r, arg)(x, t)
                rtol = tol(REF_DTYPE, 1e-10, 4e-6)
                np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)))


def test_errors():
    x = jnp.zeros((3, 4), jnp.float32)
    with pytest.raises(ValueError, match="labels of shape \\(4,\\) do not match"):
        jsoftmax.cross_entropy(x, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="have a class axis"):
        jsoftmax.cross_entropy(x, jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="float labels .* must have the shape of logits"):
        jsoftmax.cross_entropy(x, jnp.zeros((3, 5), jnp.float32))
    with pytest.raises(ValueError, match="integer dtype"):
        jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.float32))
    with pytest.raises(TypeError, match="labels must be integer class indices or real"):
        jsoftmax.cross_entropy(x, jnp.zeros((3, 4), bool))
    with pytest.raises(ValueError, match="temperature must be positive"):
        jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.int32), temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.int32), temperature=jnp.array([1.0, -1, 1]))
    for bad in (jnp.inf, jnp.nan):  # regression: an infinite entry of an array was accepted
        with pytest.raises(ValueError, match="temperature must be positive and finite"):
            jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.int32), temperature=jnp.array([1, bad, 1]))
        with pytest.raises(ValueError, match="temperature must be positive and finite"):
            jsoftmax.token_log_probs(x, jnp.zeros(3, jnp.int32), temperature=jnp.array([bad]))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\]"):
            jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.int32), label_smoothing=bad)
    with pytest.raises(TypeError, match="label_smoothing must be a number in"):
        jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.int32), label_smoothing=jnp.ones(2) / 10)
    with pytest.raises(ValueError, match="rule must be"):
        jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.int32), rule="fwd")
    with pytest.raises(ValueError, match="where of shape"):
        jsoftmax.cross_entropy(x, jnp.zeros(3, jnp.int32), where=jnp.ones(5, bool))


# --------------------------------------------------------------------------------------
# The Hessian operator.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", fast_subset([-1, 0], [0]))
def test_cross_entropy_hessian(axis):
    x = make_logits((4, 3), REF_DTYPE) / 2  # moderate probabilities: the dense pinv cuts none
    lab = jnp.array([0, 2, 1, 1]) if axis == -1 else jnp.array([0, 2, 1])
    t = jnp.array([0.8, 1.0, 2.0, 1.5] if axis == -1 else [0.8, 1.0, 2.0], REF_DTYPE)
    B = lab.shape[0]

    def mean_ce(x):
        return jsoftmax.cross_entropy(x, lab, axis, temperature=t, rule="jvp").mean()

    H = jsoftmax.cross_entropy_hessian(x, axis, temperature=t, scale=1 / B)
    xl = jnp.moveaxis(x, axis, -1)
    full_l = jax.jit(jax.hessian(lambda xl: mean_ce(jnp.moveaxis(xl, -1, axis))))(xl)
    blocks = jnp.stack([full_l[b, :, b, :] for b in range(B)])
    close(H.dense(), blocks, REF_DTYPE)
    # Off-diagonal blocks are zero: the loss is separable over rows.
    eye = jnp.eye(B)[:, None, :, None]
    assert np.all(np.asarray(full_l * (1 - eye)) == 0)
    # Newton step on the logits vs the dense pseudo-inverse.
    g = jax.grad(mean_ce)(x)
    gl = jnp.moveaxis(g, axis, -1)
    ref = jnp.einsum("bij,bj->bi", jnp.linalg.pinv(blocks), gl)
    close(jnp.moveaxis(H.pinv_solve(g), axis, -1), ref, REF_DTYPE, 100)
    # Hessian-vector product.
    v = make_logits(x.shape, REF_DTYPE, seed=9)
    hv = jax.jvp(jax.grad(mean_ce), (x,), (v,))[1]
    close(H @ v, hv, REF_DTYPE, 10)
    plain = jsoftmax.cross_entropy_hessian(x, axis)
    assert plain.scale is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_regression_gradient_near_dtype_max_keeps_the_normaliser(dtype):
    # The backward pass rebuilds log p from the logits; m + log(sum) would round the
    # log-sum away next to the dtype's maximum and give p = 1 for every near-max entry.
    big = float(jnp.finfo(dtype).max)
    x = jnp.array([[big, big, big, -big]], dtype)
    lab = jnp.array([1])
    g = jax.grad(lambda z: jsoftmax.cross_entropy(z, lab).sum())(x)
    expected = np.array([[1 / 3, 1 / 3 - 1, 1 / 3, 0.0]])
    np.testing.assert_allclose(np.asarray(g, np.float64), expected, rtol=4 * np.finfo(dtype).eps)
    loss = jsoftmax.cross_entropy(x, lab)
    np.testing.assert_allclose(np.asarray(loss, np.float64), [np.log(3.0)], rtol=1e-6)
