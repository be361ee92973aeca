"""Tests of the explicit Jacobian builders, partials, diagonal and O(n) products."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax

from helpers import REF_DTYPE, f64, fast_subset, make_logits, np_softmax, tol


def _np_jacobian(x, axis=-1):
    """float64 NumPy reference, batch + (n, n)."""
    x = np.moveaxis(f64(x), axis, -1)
    e = np.exp(x - x.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    return p[..., :, None] * (np.eye(p.shape[-1]) - p[..., None, :])


# Entries p_i (d_ij - p_j), a few roundings each, against a reference (rtol, atol).
JAC_TOL = tol(REF_DTYPE, dict(rtol=1e-12, atol=1e-15), dict(rtol=2e-6, atol=1e-8))
# Two evaluations of the same expression (jit or vmap, or rebuilt from p).
SAME_RTOL = tol(REF_DTYPE, 1e-14, 5e-7)


def _per_row(f, batch_ndim):
    for _ in range(batch_ndim):
        f = jax.vmap(f)
    return f


AUTODIFF = {
    "jacrev_vjp": lambda: jax.jacrev(lambda z: jsoftmax.softmax(z, rule="vjp")),
    "jacfwd_jvp": lambda: jax.jacfwd(lambda z: jsoftmax.softmax(z, rule="jvp")),
    "jacrev_jvp": lambda: jax.jacrev(lambda z: jsoftmax.softmax(z, rule="jvp")),
    "jacfwd_nn": lambda: jax.jacfwd(jax.nn.softmax),
    "jacrev_nn": lambda: jax.jacrev(jax.nn.softmax),
}


@pytest.mark.parametrize("n", fast_subset([1, 2, 5, 512], [1, 5]))
@pytest.mark.parametrize("method", sorted(AUTODIFF))
def test_explicit_jacobian_matches_autodiff_and_float64(n, method):
    x = make_logits((n,), REF_DTYPE)
    J = jsoftmax.jacobian(x)
    assert J.shape == (n, n)
    chex.assert_trees_all_close(J, AUTODIFF[method]()(x), **JAC_TOL)
    np.testing.assert_allclose(J, _np_jacobian(x), **JAC_TOL)


@pytest.mark.parametrize("shape,axis", [((4, 6), -1), ((6, 4), 0), ((2, 5, 3), 1)])
def test_batched_and_non_last_axis(shape, axis):
    x = make_logits(shape, REF_DTYPE)
    J = jsoftmax.jacobian(x, axis)
    n = shape[axis]
    batch = tuple(s for k, s in enumerate(shape) if k != axis % len(shape))
    chex.assert_shape(J, batch + (n, n))
    np.testing.assert_allclose(J, _np_jacobian(x, axis), **JAC_TOL)
    x_last = jnp.moveaxis(x, axis, -1)
    ref = _per_row(AUTODIFF["jacfwd_jvp"](), len(batch))(x_last)
    chex.assert_trees_all_close(J, ref, **JAC_TOL)


def test_float32_against_float64_reference():
    x = make_logits((3, 700), jnp.float32)
    J = jsoftmax.jacobian(x)
    assert J.dtype == jnp.float32
    # Errors scale with max p (every entry is a product of probabilities).
    err = np.abs(np.asarray(J, np.float64) - _np_jacobian(x)).max()
    p_max = float(jsoftmax.softmax(x).max())
    assert err <= 16 * np.finfo(np.float32).eps * p_max


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_jacobian(dtype):
    x = make_logits((4, 64), dtype)
    J = jsoftmax.jacobian(x)
    assert J.dtype == dtype
    ref = _np_jacobian(jnp.asarray(x, jnp.float32))
    err = np.abs(np.asarray(J, np.float64) - ref).max()
    assert err <= 2 * float(jnp.finfo(dtype).eps) * ref.max()


def test_structural_identities():
    x = make_logits((5, 40), REF_DTYPE)
    J = np.asarray(jsoftmax.jacobian(x))
    atol = tol(REF_DTYPE, 1e-15, 1e-7)  # a few roundings of the largest entry
    np.testing.assert_allclose(J, np.swapaxes(J, -1, -2), atol=0)  # symmetric
    np.testing.assert_allclose(J.sum(-1), 0, atol=atol)  # rows sum to zero
    np.testing.assert_allclose(J.sum(-2), 0, atol=atol)  # columns too
    eig = np.linalg.eigvalsh(J)
    assert eig.min() >= -atol  # positive semi-definite
    # The all-ones vector is in the null space.
    np.testing.assert_allclose(J @ np.ones(40, J.dtype), 0, atol=atol)


def test_regression_index_convention_is_dp_i_dz_j():
    # A common slip writes J_ij = dp_i/dz_i. J[i, j] must be dp_i/dz_j: perturb z_j only.
    x = make_logits((4,), REF_DTYPE)
    J = jsoftmax.jacobian(x)
    h = 1e-6
    # Central differences of the float64 NumPy softmax: accurate to about 1e-10.
    rtol, atol = tol(REF_DTYPE, 1e-7, 2e-6), tol(REF_DTYPE, 1e-10, 1e-7)
    for j in range(4):
        e = np.eye(4)[j] * h
        column = (np_softmax(f64(x) + e) - np_softmax(f64(x) - e)) / (2 * h)
        np.testing.assert_allclose(J[:, j], column, rtol=rtol, atol=atol)


def test_jacobian_from_probs_matches_jacobian():
    x = make_logits((3, 4, 6), REF_DTYPE)
    p = jsoftmax.softmax(x, axis=1)
    chex.assert_trees_all_close(
        jsoftmax.jacobian_from_probs(p, axis=1),
        jsoftmax.jacobian(x, axis=1),
        rtol=tol(REF_DTYPE, 1e-15, 2.5e-7),
    )


def test_jacobian_with_mask_zeroes_masked_rows_and_columns():
    x = make_logits((6,), REF_DTYPE)
    where = jnp.array([True, False, True, True, False, True])
    J = jsoftmax.jacobian(x, where=where)
    ref = jax.jacfwd(lambda z: jsoftmax.softmax(z, where=where, rule="jvp"))(x)
    chex.assert_trees_all_close(J, ref, **JAC_TOL)
    m = ~np.asarray(where)
    assert np.all(np.asarray(J)[m] == 0) and np.all(np.asarray(J)[:, m] == 0)


def test_jacobian_under_jit_and_vmap():
    x = make_logits((3, 8), REF_DTYPE)
    chex.assert_trees_all_close(
        jax.jit(jsoftmax.jacobian)(x), jax.vmap(jsoftmax.jacobian)(x), rtol=SAME_RTOL
    )


def test_jacobian_diagonal_is_only_the_diagonal():
    x = make_logits((3, 7), REF_DTYPE)
    p = jsoftmax.softmax(x)
    d = jsoftmax.jacobian_diagonal(p)
    J = jsoftmax.jacobian(x)
    chex.assert_trees_all_close(d, jnp.diagonal(J, axis1=-2, axis2=-1), rtol=SAME_RTOL)
    # Regression for a widely copied slip: using p(1 - p) elementwise as "the gradient"
    # is wrong for a non-separable loss; the true VJP uses the off-diagonal terms.
    w = make_logits((3, 7), REF_DTYPE, seed=3)
    true_grad = jax.grad(lambda z: jnp.sum(jsoftmax.softmax(z) * w))(x)
    assert not np.allclose(d * w, true_grad, atol=1e-3)
    # And the gradient of sum(p) = 1 is identically zero.
    g = jax.grad(lambda z: jnp.sum(jsoftmax.softmax(z)))(x)
    np.testing.assert_allclose(g, 0, atol=tol(REF_DTYPE, 1e-15, 5e-7))  # p (1 - sum p)


def test_partial_derivative_matches_dense_entries():
    x = make_logits((2, 5), REF_DTYPE)
    p = jsoftmax.softmax(x)
    J = jsoftmax.jacobian(x)
    for i in range(5):
        for j in (0, 2, 4, -1):
            chex.assert_trees_all_close(
                jsoftmax.partial_derivative(p, i, j), J[:, i, j % 5], rtol=SAME_RTOL
            )


def test_partial_derivative_with_index_arrays_and_axis():
    x = make_logits((5, 3), REF_DTYPE)
    p = jsoftmax.softmax(x, axis=0)
    i = jnp.array([0, 4, 2])
    j = jnp.array([0, 1, 2])
    J = jsoftmax.jacobian(x, axis=0)
    expected = J[jnp.arange(3), i, j]
    chex.assert_trees_all_close(jsoftmax.partial_derivative(p, i, j, axis=0), expected)
    # Two-component case worked by hand: dS_x/dx = S_x S_y, dS_x/dy = -S_x S_y.
    q = jsoftmax.softmax(jnp.array([0.3, -1.1], REF_DTYPE))
    sx, sy = float(q[0]), float(q[1])
    np.testing.assert_allclose(jsoftmax.partial_derivative(q, 0, 0), sx * sy, rtol=SAME_RTOL)
    np.testing.assert_allclose(jsoftmax.partial_derivative(q, 0, 1), -sx * sy, rtol=SAME_RTOL)


@pytest.mark.parametrize("shape,axis", [((9,), -1), ((4, 9), -1), ((9, 4), 0)])
def test_products_match_dense(shape, axis):
    x = make_logits(shape, REF_DTYPE)
    v = make_logits(shape, REF_DTYPE, seed=5)
    p = jsoftmax.softmax(x, axis)
    J = jsoftmax.jacobian(x, axis)
    v_last = jnp.moveaxis(v, axis, -1)
    jv = jnp.moveaxis(jsoftmax.softmax_jvp(p, v, axis), axis, -1)
    vj = jnp.moveaxis(jsoftmax.softmax_vjp(p, v, axis), axis, -1)
    # p_i (v_i - <p, v>) with |v| up to about 9: absolute errors of a few ULP of 9 p_i.
    tols = tol(REF_DTYPE, dict(rtol=1e-12), dict(rtol=2e-6, atol=1e-6))
    chex.assert_trees_all_close(jv, jnp.einsum("...ij,...j->...i", J, v_last), **tols)
    chex.assert_trees_all_close(vj, jnp.einsum("...j,...ji->...i", v_last, J), **tols)


def test_products_match_jax_jvp_and_vjp():
    x = make_logits((3, 11), REF_DTYPE)
    t = make_logits((3, 11), REF_DTYPE, seed=7)
    p, jvp_ref = jax.jvp(jax.nn.softmax, (x,), (t,))
    _, pullback = jax.vjp(jax.nn.softmax, x)
    chex.assert_trees_all_close(jsoftmax.softmax_jvp(p, t), jvp_ref, **JAC_TOL)
    chex.assert_trees_all_close(jsoftmax.softmax_vjp(p, t), pullback(t)[0], **JAC_TOL)


# ------------------------------------------------------------------------------ errors


def test_error_non_integer_index():
    p = jnp.full((4,), 0.25)
    with pytest.raises(TypeError, match="i must be an integer index"):
        jsoftmax.partial_derivative(p, 1.5, 0)
    with pytest.raises(TypeError, match="j must be an integer index"):
        jsoftmax.partial_derivative(p, 0, jnp.array(1.0))


def test_error_index_out_of_range():
    p = jnp.full((4,), 0.25)
    with pytest.raises(IndexError, match="j=4 is out of range"):
        jsoftmax.partial_derivative(p, 0, 4)


def test_error_product_shape_mismatch():
    with pytest.raises(ValueError, match="t must have the same shape as p"):
        jsoftmax.softmax_jvp(jnp.ones((2, 3)) / 3, jnp.ones(3))
    with pytest.raises(ValueError, match="g must have the same shape as p"):
        jsoftmax.softmax_vjp(jnp.ones((2, 3)) / 3, jnp.ones((3, 2)))


def test_error_jacobian_scalar_and_axis():
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        jsoftmax.jacobian(1.0)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        jsoftmax.jacobian(jnp.zeros((2, 2)), axis=2)
    with pytest.raises(TypeError, match="axis must be an int"):
        jsoftmax.jacobian(jnp.zeros((2, 2)), axis=(0, 1))


@pytest.mark.parametrize("n,scale", [(257, 1e3), (257, 3.0), (513, 3.0), (1000, 3.0)])
def test_regression_xla_cpu_broadcast_product(n, scale):
    # XLA's CPU backend (jaxlib 0.10) miscompiled p * (v - <p, v>) when p is broadcast
    # against a batch of directions, as jacfwd/jacrev/vmap build it: for n = 257 an
    # entry of J came out as 1.0 instead of 0, and vmapped products were off by up to
    # 0.9 at n = 513. Every route must match the float64 reference under jit.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(n) * scale, jnp.float32)
    ref = _np_jacobian(x)
    routes = {
        "jacfwd_jvp": jax.jacfwd(lambda z: jsoftmax.softmax(z, rule="jvp")),
        "jacrev_vjp": jax.jacrev(lambda z: jsoftmax.softmax(z, rule="vjp")),
        "jacrev_jvp": jax.jacrev(lambda z: jsoftmax.softmax(z, rule="jvp")),
    }
    for name, f in routes.items():
        err = np.abs(np.asarray(jax.jit(f)(x), np.float64) - ref).max()
        assert err <= 1e-6, (name, err)
    p = jsoftmax.softmax(x)
    V = jnp.asarray(rng.standard_normal((64, n)), jnp.float32)
    for product in (jsoftmax.softmax_jvp, jsoftmax.softmax_vjp):
        out = jax.jit(jax.vmap(lambda v, product=product: product(p, v)))(V)
        np.testing.assert_allclose(out, np.asarray(V, np.float64) @ ref, atol=1e-6)
