"""The derivative family: log_softmax, temperature, log_softmax_jacobian, hessian and
softmax_hvp, each against JAX autodiff of a plain reference or a float64 reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoftmax

from helpers import (
    REF_DTYPE,
    X64,
    close,
    fast_subset,
    make_logits,
    np_log_softmax,
    np_softmax,
    saved_residuals,
    tol,
)

RULE_MODES = {"vjp": ["rev"], "jvp": ["fwd", "rev"]}


def _plain_log_softmax(x, axis=-1, t=1.0):
    """The textbook formula, for autodiff references: s - log(sum(exp(s)))."""
    s = x / t
    return s - jnp.log(jnp.sum(jnp.exp(s), axis=axis, keepdims=True))


def _plain_softmax(x, axis=-1, t=1.0):
    e = jnp.exp(x / t)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _np_softmax_hessian(x):
    """float64 NumPy d^2 p_i / dx_j dx_k = p_i (d_ij - p_j)(d_ik - p_k) - p_i p_j (d_jk - p_k)
    over the last axis (the derivative of dp_i/dx_j = p_i (d_ij - p_j))."""
    p = np_softmax(x)
    d = np.eye(p.shape[-1]) - p[..., None, :]  # d[..., i, j] = d_ij - p_j
    pi, pj = p[..., :, None, None], p[..., None, :, None]
    return pi * d[..., :, :, None] * d[..., :, None, :] - pi * pj * d[..., None, :, :]


# --------------------------------------------------------------------------------------
# log_softmax values and derivatives.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,axis,dtype,rule",
    [
        ((7,), 0, jnp.float32, "vjp"),
        ((3, 5), -1, jnp.float64, "jvp"),
        ((4, 3, 2), 1, jnp.float32, "jvp"),
        ((4, 3, 2), 0, jnp.float64, "vjp"),
    ],
)
def test_log_softmax_values(shape, axis, dtype, rule):
    x = make_logits(shape, dtype)
    out = jsoftmax.log_softmax(x, axis, rule=rule)
    assert out.shape == shape and out.dtype == dtype
    close(out, np_log_softmax(x, axis), dtype, 4)
    close(out, jax.nn.log_softmax(x, axis), dtype, 4)
    jitted = jax.jit(lambda x: jsoftmax.log_softmax(x, axis, rule=rule))(x)
    close(jitted, out, dtype, 2)
    if len(shape) > 1:
        vmapped = jax.vmap(lambda r: jsoftmax.log_softmax(r, axis - 1 if axis > 0 else axis))(x)
        if axis != 0:
            close(vmapped, out, dtype, 2)


@pytest.mark.parametrize(
    "rule,axis",
    fast_subset(
        [("vjp", -1), ("jvp", -1), ("vjp", 0), ("jvp", 0)], [("jvp", -1), ("vjp", 0)], unpack=True
    ),
)
def test_log_softmax_derivatives(rule, axis):
    x = make_logits((3, 4), REF_DTYPE)
    w = make_logits((3, 4), REF_DTYPE, seed=1)
    ours = lambda x: jnp.sum(w * jsoftmax.log_softmax(x, axis, rule=rule))  # noqa: E731
    ref = lambda x: jnp.sum(w * _plain_log_softmax(x, axis))  # noqa: E731
    close(jax.grad(ours)(x), jax.grad(ref)(x), REF_DTYPE)
    close(jax.grad(jax.jit(ours))(x), jax.grad(ref)(x), REF_DTYPE)
    if rule == "jvp":
        t = make_logits((3, 4), REF_DTYPE, seed=2)
        f = lambda x: jsoftmax.log_softmax(x, axis, rule=rule)  # noqa: E731
        close(
            jax.jvp(f, (x,), (t,))[1],
            jax.jvp(lambda x: _plain_log_softmax(x, axis), (x,), (t,))[1],
            REF_DTYPE,
        )
    if X64:  # float32 finite differences carry errors near check_grads' tolerance
        check_grads(
            jax.jit(lambda x: jsoftmax.log_softmax(x, axis, rule=rule)), (x,), 2, RULE_MODES[rule]
        )


def test_log_softmax_residual_is_one_output_sized_array():
    x = make_logits((8, 6), jnp.float32)
    for t in (1.0, 2.0):
        res = saved_residuals(lambda x, t=t: jsoftmax.log_softmax(x, temperature=t).sum(), x)
        big = [r for r in res if r[0].shape == (8, 6) and "from the argument" not in r[1]]
        assert len(big) == 1, res


def test_log_softmax_jacobian_vs_autodiff():
    for shape, axis in [((5,), 0), ((3, 4), -1), ((3, 4, 2), 1)]:
        x = make_logits(shape, REF_DTYPE)
        J = jsoftmax.log_softmax_jacobian(x, axis)
        xl = jnp.moveaxis(x, axis, -1)
        f = lambda r: jax.nn.log_softmax(r)  # noqa: E731
        flat = xl.reshape(-1, xl.shape[-1])
        for jac in (jax.jacfwd, jax.jacrev):
            ref = jax.jit(jax.vmap(jac(f)))(flat).reshape(J.shape)
            close(J, ref, REF_DTYPE)
    x32 = make_logits((3, 4), jnp.float32)
    # d log p_i / d x_j = delta_ij - p_j, in float64 NumPy.
    close(jsoftmax.log_softmax_jacobian(x32), np.eye(4) - np_softmax(x32)[:, None], jnp.float32, 4)
    # Masked classes: their rows (constant -inf outputs) are zero.
    where = jnp.array([True, False, True])
    J = jsoftmax.log_softmax_jacobian(jnp.array([0.5, 3.0, -1.0]), where=where)
    sub = jax.jacfwd(jax.nn.log_softmax)(jnp.array([0.5, -1.0]))
    close(J[jnp.ix_(jnp.array([0, 2]), jnp.array([0, 2]))], sub, REF_DTYPE)
    assert np.all(np.asarray(J[1]) == 0) and np.all(np.asarray(J[:, 1]) == 0)


# --------------------------------------------------------------------------------------
# Temperature.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "log,rule,per_row",
    fast_subset(
        [(False, "vjp", False), (True, "jvp", True), (False, "jvp", True), (True, "vjp", False)],
        [(True, "jvp", True), (False, "vjp", False)],
        unpack=True,
    ),
)
def test_temperature(log, rule, per_row):
    x = make_logits((3, 5), REF_DTYPE)
    w = make_logits((3, 5), REF_DTYPE, seed=1)
    t = jnp.array([0.5, 1.0, 2.5], REF_DTYPE) if per_row else jnp.asarray(1.7, REF_DTYPE)
    fn = jsoftmax.log_softmax if log else jsoftmax.softmax
    plain = _plain_log_softmax if log else _plain_softmax
    tt = t[:, None] if per_row else t

    def ours(x, t):
        return jnp.sum(w * fn(x, temperature=t, rule=rule))

    def ref(x, t):
        return jnp.sum(w * plain(x, -1, t[:, None] if per_row else t))

    close(fn(x, temperature=t, rule=rule), plain(x, -1, tt), REF_DTYPE, 4)
    for arg in (0, 1):
        close(jax.grad(ours, arg)(x, t), jax.grad(ref, arg)(x, t), REF_DTYPE, 10)
    if rule == "jvp":
        dx, dt = make_logits((3, 5), REF_DTYPE, seed=2), jnp.ones_like(t) * 0.3
        a = jax.jvp(ours, (x, t), (dx, dt))[1]
        close(a, jax.jvp(ref, (x, t), (dx, dt))[1], REF_DTYPE, 10)
    if X64:  # float32 finite differences carry errors near check_grads' tolerance
        check_grads(jax.jit(ours), (x, t), 2, RULE_MODES[rule])


@pytest.mark.parametrize("t", [1e-3, 1e3])
def test_temperature_limits(t):
    x = make_logits((2, 6), REF_DTYPE) * t  # x / t of order 1: derivatives are not underflow noise
    w = make_logits((2, 6), REF_DTYPE, seed=1)
    for fn, plain in (
        (jsoftmax.softmax, jax.nn.softmax),
        (jsoftmax.log_softmax, jax.nn.log_softmax),
    ):
        for rule in ("vjp", "jvp"):
            ours = lambda x, t, fn=fn, rule=rule: jnp.sum(w * fn(x, temperature=t, rule=rule))  # noqa: E731
            ref = lambda x, t, plain=plain: jnp.sum(w * plain(x / t))  # noqa: E731
            close(fn(x, temperature=t, rule=rule), plain(x / t), REF_DTYPE, 10)
            for arg in (0, 1):
                a, b = jax.grad(ours, arg)(x, t), jax.grad(ref, arg)(x, t)
                chex.assert_tree_all_finite(a)
                rtol = tol(REF_DTYPE, 1e-10, 4e-6)
                np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b))))


def test_temperature_errors():
    x = jnp.zeros((2, 3))
    for fn in (jsoftmax.softmax, jsoftmax.log_softmax):
        for bad in (0.0, -1.0, float("inf")):
            with pytest.raises(ValueError, match="temperature must be positive"):
                fn(x, temperature=bad)
        with pytest.raises(ValueError, match="temperature must be positive"):
            fn(x, temperature=jnp.array([1.0, 0.0]))
        with pytest.raises(ValueError, match="temperature of shape"):
            fn(x, temperature=jnp.ones(3))


# --------------------------------------------------------------------------------------
# Second order.
# --------------------------------------------------------------------------------------


def test_hessian_vs_autodiff():
    for shape, axis in [((4,), 0), ((3, 2, 2), 0)]:
        x = make_logits(shape, REF_DTYPE)
        H = jsoftmax.hessian(x, axis)
        n = shape[axis]
        xl = jnp.moveaxis(x, axis, -1).reshape(-1, n)
        fwd = jax.jit(jax.vmap(jax.hessian(lambda r: jsoftmax.softmax(r, rule="jvp"))))(xl)
        rev = jax.jit(jax.vmap(jax.jacrev(jax.jacrev(lambda r: jsoftmax.softmax(r, rule="vjp")))))(
            xl
        )
        plain = jax.jit(jax.vmap(jax.hessian(jax.nn.softmax)))(xl)
        for ref in (fwd, rev, plain):
            close(H, ref.reshape(H.shape), REF_DTYPE)
    # n = 1: softmax is the constant 1.
    assert np.all(np.asarray(jsoftmax.hessian(jnp.array([0.3]))) == 0)
    close(jax.hessian(lambda r: jsoftmax.softmax(r, rule="jvp"))(jnp.array([0.3])), 0.0, REF_DTYPE)
    x32 = make_logits((2, 4), jnp.float32)
    close(jsoftmax.hessian(x32), _np_softmax_hessian(x32), jnp.float32, 4)


def test_softmax_hvp():
    x = make_logits((3, 5), REF_DTYPE)
    u, v = make_logits((3, 5), REF_DTYPE, seed=1), make_logits((3, 5), REF_DTYPE, seed=2)
    p = jax.nn.softmax(x)
    out = jsoftmax.softmax_hvp(p, u, v)
    close(out, jnp.einsum("bijk,bj,bk->bi", jsoftmax.hessian(x), u, v), REF_DTYPE)
    f = lambda x: jsoftmax.softmax(x, rule="jvp")  # noqa: E731
    jj = jax.jvp(lambda x: jax.jvp(f, (x,), (u,))[1], (x,), (v,))[1]
    close(out, jj, REF_DTYPE)
    plain = jax.jvp(lambda x: jax.jvp(jax.nn.softmax, (x,), (u,))[1], (x,), (v,))[1]
    close(out, plain, REF_DTYPE)
    close(out, jsoftmax.softmax_hvp(p, v, u), REF_DTYPE)
    # Non-last axis.
    xt = x.T
    close(jsoftmax.softmax_hvp(jax.nn.softmax(xt, 0), u.T, v.T, axis=0), out.T, REF_DTYPE)


# --------------------------------------------------------------------------------------
# Edge cases.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
def test_log_softmax_masks_and_fully_masked_rows(rule):
    x = jnp.array([[1.0, 5e30, -2.0, 0.5], [0.0, 1.0, 2.0, 3.0], [1.0, -jnp.inf, 0.0, -jnp.inf]])
    where = jnp.array([[True, False, True, True], [False] * 4, [True] * 4])
    out = jsoftmax.log_softmax(x, where=where, rule=rule)
    assert np.all(np.isneginf(np.asarray(out[1])))
    assert np.isneginf(out[0, 1]) and np.isneginf(out[2, 1]) and np.isneginf(out[2, 3])
    close(out[0, jnp.array([0, 2, 3])], jax.nn.log_softmax(x[0, jnp.array([0, 2, 3])]), REF_DTYPE)
    close(out[2, jnp.array([0, 2])], jax.nn.log_softmax(x[2, jnp.array([0, 2])]), REF_DTYPE)
    w = jnp.where(jnp.isfinite(out), 1.0, 0.0) * make_logits((3, 4), REF_DTYPE, seed=4)
    g = jax.grad(lambda x: jnp.sum(w * jsoftmax.log_softmax(x, where=where, rule=rule)))(x)
    chex.assert_tree_all_finite(g)
    assert np.all(np.asarray(g[1]) == 0) and g[0, 1] == 0
    cols = jnp.array([0, 2, 3])
    ref = jax.grad(lambda r: jnp.sum(w[0, cols] * jax.nn.log_softmax(r)))(x[0, cols])
    close(g[0, cols], ref, REF_DTYPE)


def test_float16_many_equal_logits():
    x = jnp.zeros((100_000,), jnp.float16)
    for rule in ("vjp", "jvp"):
        out = jsoftmax.log_softmax(x, rule=rule)
        assert out.dtype == jnp.float16
        np.testing.assert_allclose(np.asarray(out[:3], np.float64), np.log(1e-5), rtol=1e-3)
        g = jax.grad(
            lambda x, rule=rule: jsoftmax.log_softmax(x, rule=rule)[0].astype(jnp.float32)
        )(x)
        chex.assert_tree_all_finite(g)
        np.testing.assert_allclose(float(g[0]), 1 - 1e-5, rtol=1e-3)


def test_n_equals_one():
    x = jnp.array([[3.0], [-2.0]])
    for rule in ("vjp", "jvp"):
        assert np.all(np.asarray(jsoftmax.log_softmax(x, rule=rule)) == 0)
        g = jax.grad(lambda x, rule=rule: jsoftmax.log_softmax(x, rule=rule).sum())(x)
        assert np.all(np.asarray(g) == 0)
    assert np.all(np.asarray(jsoftmax.log_softmax_jacobian(x)) == 0)
