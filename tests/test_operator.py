"""Tests for jsoftmax.SoftmaxJacobian against dense references and autodiff."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from jsoftmax import SoftmaxJacobian

from helpers import REF_DTYPE, close, f64, fast_subset, make_logits, np_softmax, tol


def _ref_dense(x, axis):
    """Per-row softmax Jacobian p_i (d_ij - p_j) in float64 NumPy, batch first."""
    p = np_softmax(np.moveaxis(f64(x), axis, -1))
    return p[..., :, None] * (np.eye(p.shape[-1]) - p[..., None, :])


@pytest.mark.parametrize(
    "shape,axis,dtype",
    [((5,), 0, jnp.float64), ((3, 4), -1, jnp.float32), ((4, 3, 2), 1, jnp.float64)],
)
def test_dense_diagonal_trace_entries(shape, axis, dtype):
    x = make_logits(shape, dtype)
    J = SoftmaxJacobian.from_logits(x, axis)
    ref = _ref_dense(x, axis)
    assert J.shape == ref.shape and J.dtype == dtype
    close(J.dense(), ref, dtype)
    diag = np.diagonal(ref, axis1=-2, axis2=-1)
    close(J.diagonal(), np.moveaxis(diag, -1, axis), dtype)
    close(J.trace(), np.trace(ref, axis1=-2, axis2=-1), dtype)
    p = np_softmax(x, axis)
    close(J.trace(), 1 - np.sum(p * p, axis), dtype)
    n = shape[axis]
    for i, j in [(0, 0), (-1, 0), (n - 1, -1)]:
        close(J[i, j], ref[..., i, j], dtype)
    assert J.T is J


@pytest.mark.parametrize(
    "shape,axis,dtype",
    [((5,), 0, jnp.float32), ((3, 4), -1, jnp.float64), ((4, 3, 2), 1, jnp.float32)],
)
def test_products_match_dense(shape, axis, dtype):
    x = make_logits(shape, dtype)
    J = SoftmaxJacobian.from_logits(x, axis)
    ref = _ref_dense(x, axis)  # batch + (n, n)
    v = make_logits(shape, dtype, seed=1)
    v_last = np.moveaxis(f64(v), axis, -1)
    jv = np.moveaxis(np.einsum("...ij,...j->...i", ref, v_last), -1, axis)
    vj = np.moveaxis(np.einsum("...i,...ij->...j", v_last, ref), -1, axis)
    close(J @ v, jv, dtype, atol_scale=10)
    close(v @ J, vj, dtype, atol_scale=10)
    close(J.matvec(v), jv, dtype, atol_scale=10)
    # k vectors: trailing axis for J @ V, leading axis for V @ J.
    k = 3
    V = jnp.stack([v * (c + 1) - c for c in range(k)], axis=-1)
    out = J @ V
    assert out.shape == shape + (k,)
    for c in range(k):
        close(out[..., c], J @ V[..., c], dtype, atol_scale=10)
    W = jnp.moveaxis(V, -1, 0)
    out = W @ J
    assert out.shape == (k,) + shape
    for c in range(k):
        close(out[c], W[c] @ J, dtype, atol_scale=10)
    # A NumPy array on the left also defers to the operator.
    close(np.asarray(v) @ J, vj, dtype, atol_scale=10)


def test_from_probs_equals_constructor_and_where():
    x = make_logits((2, 5), REF_DTYPE)
    where = jnp.array([[True, False, True, True, False], [True] * 5])
    J = SoftmaxJacobian.from_logits(x, where=where)
    p = jax.nn.softmax(x, where=where)
    K = SoftmaxJacobian(p)
    atol = tol(REF_DTYPE, 1e-15, 1e-7)
    chex.assert_trees_all_close(J.dense(), K.dense(), atol=atol)
    chex.assert_trees_all_close(J.dense(), jsoftmax.jacobian_from_probs(p), atol=atol)
    # Masked classes have zero rows and columns.
    assert np.all(np.asarray(J.dense())[0, 1] == 0) and np.all(np.asarray(J.dense())[0, :, 4] == 0)


def test_scale():
    x = make_logits((3, 4), REF_DTYPE)
    s = jnp.array([0.5, 2.0, -1.0], REF_DTYPE)
    J = SoftmaxJacobian.from_logits(x, scale=s)
    ref = _ref_dense(x, -1) * f64(s)[:, None, None]
    close(J.dense(), ref, REF_DTYPE)
    v = make_logits((3, 4), REF_DTYPE, 1)
    close(J @ v, np.einsum("bij,bj->bi", ref, f64(v)), REF_DTYPE)
    close(J.trace(), np.trace(ref, axis1=-2, axis2=-1), REF_DTYPE)
    close(J[1, 2], ref[:, 1, 2], REF_DTYPE)
    close(J.eigenvalues(), np.linalg.eigvalsh(ref), REF_DTYPE, atol_scale=10)
    with pytest.raises(ValueError, match="scale of shape"):
        SoftmaxJacobian.from_logits(x, scale=jnp.ones(4))


# --------------------------------------------------------------------------------------
# Eigenvalues: the secular equation against a dense eigh.
# --------------------------------------------------------------------------------------


def _eig_cases():
    rng = np.random.default_rng(0)
    cases = {
        "random": jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 7)) * 2)),
        "n1": jnp.array([[1.0]]),
        "n2": jnp.array([[0.3, 0.7]]),
        "ties": jnp.array([[0.2, 0.2, 0.2, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25, 0.0]]),
        "zeros": jnp.array([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]]),
        "all_masked": jnp.zeros((1, 4)),
        "spread": jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 30)) * 6)),
    }
    return cases


@pytest.mark.parametrize("name", fast_subset(list(_eig_cases()), ["random", "ties", "all_masked"]))
def test_eigenvalues_match_eigh(name):
    p = _eig_cases()[name].astype(REF_DTYPE)
    J = SoftmaxJacobian.from_probs(p)
    ref = np.linalg.eigvalsh(f64(J.dense()))
    ev = J.eigenvalues()
    assert ev.shape == p.shape
    close(ev, ref, REF_DTYPE, atol_scale=10)
    assert np.all(np.diff(np.asarray(ev), axis=-1) >= 0)


def test_eigenvalues_float32_and_axis():
    x = make_logits((6, 3), jnp.float32)
    J = SoftmaxJacobian.from_logits(x, axis=0)
    ref = np.linalg.eigvalsh(f64(J.dense()))
    ev = J.eigenvalues()
    assert ev.shape == (3, 6) and ev.dtype == jnp.float32
    np.testing.assert_allclose(ev, ref, atol=1e-6)
    # The smallest eigenvalue of a softmax Jacobian is 0 (eigenvector: ones).
    np.testing.assert_allclose(ev[:, 0], 0, atol=1e-6)


# --------------------------------------------------------------------------------------
# Pseudo-inverse solves.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p",
    [
        [0.1, 0.2, 0.3, 0.4],
        [0.0, 0.5, 0.25, 0.25],
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
        [0.7, 0.3, 0.0, 0.0],
    ],
)
def test_pinv_solve_matches_dense_pinv(p):
    p = jnp.array(p, REF_DTYPE)
    J = SoftmaxJacobian.from_probs(p)
    b = jnp.array([0.3, -1.0, 2.0, 0.5], REF_DTYPE)
    ref = jnp.linalg.pinv(J.dense()) @ b
    close(J.pinv_solve(b), ref, REF_DTYPE, atol_scale=10)
    B = jnp.stack([b, b[::-1], jnp.ones(4, REF_DTYPE)], axis=-1)
    close(J.pinv_solve(B), jnp.linalg.pinv(J.dense()) @ B, REF_DTYPE, atol_scale=10)


def test_pinv_solve_batched_axis_scale_and_float32():
    x = make_logits((4, 3, 2), REF_DTYPE)
    s = jnp.array([[0.5, 2.0], [1.0, 3.0], [0.25, 1.0], [4.0, 1.0]], REF_DTYPE)
    J = SoftmaxJacobian.from_logits(x, axis=1, scale=s)
    b = make_logits((4, 3, 2), REF_DTYPE, 5)
    # float64 NumPy: the pseudo-inverse of the scaled Jacobian at x, whose null space (the
    # ones vector) has eigenvalues of rounding size; the others are above 1e-3.
    dense = _ref_dense(x, 1) * f64(s)[..., None, None]  # (4, 2, 3, 3)
    pinv = np.linalg.pinv(dense, rcond=1e-10)
    ref = np.einsum("abij,abj->abi", pinv, np.moveaxis(f64(b), 1, -1))
    close(J.pinv_solve(b), np.moveaxis(ref, -1, 1), REF_DTYPE, atol_scale=10)
    # A right-hand side in the range is reproduced: J @ pinv_solve(b) = b.
    b_range = J @ b
    close(J @ J.pinv_solve(b_range), b_range, REF_DTYPE, atol_scale=10)
    J32 = SoftmaxJacobian.from_logits(x.astype(jnp.float32), axis=1)
    x32 = J32.pinv_solve(b.astype(jnp.float32))
    assert x32.dtype == jnp.float32
    pinv = np.linalg.pinv(_ref_dense(x, 1), rcond=1e-10)
    ref32 = np.einsum("abij,abj->abi", pinv, np.moveaxis(f64(b), 1, -1))
    np.testing.assert_allclose(x32, np.moveaxis(ref32, -1, 1), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# Pytree behaviour: jit, vmap, grad.
# --------------------------------------------------------------------------------------


def test_pytree_jit_vmap_grad():
    x = make_logits((5, 4), REF_DTYPE)
    v = make_logits((5, 4), REF_DTYPE, 1)
    leaves, treedef = jax.tree_util.tree_flatten(SoftmaxJacobian.from_logits(x))
    assert len(leaves) == 1

    J = jax.jit(SoftmaxJacobian.from_logits)(x)
    assert isinstance(J, SoftmaxJacobian)
    close(jax.jit(lambda J, v: J @ v)(J, v), SoftmaxJacobian.from_logits(x) @ v, REF_DTYPE)

    # vmap over the operator (batch of rows) and over its vectors.
    out = jax.vmap(lambda J, v: J @ v)(J, v)
    close(out, J @ v, REF_DTYPE)
    J1 = SoftmaxJacobian.from_logits(x[0])
    close(jax.vmap(lambda u: J1 @ u)(v), jnp.stack([J1 @ u for u in v]), REF_DTYPE)
    Js = SoftmaxJacobian.from_logits(x, scale=2.0)
    close(jax.vmap(lambda J: J.trace())(Js), Js.trace(), REF_DTYPE)

    # grad through the operator equals autodiff of the plain formula.
    def f(x):
        return jnp.sum(jnp.sin(SoftmaxJacobian.from_logits(x) @ v))

    def f_ref(x):
        p = jax.nn.softmax(x)
        return jnp.sum(jnp.sin(p * (v - jnp.sum(p * v, -1, keepdims=True))))

    close(jax.grad(f)(x), jax.grad(f_ref)(x), REF_DTYPE)
    close(jax.jacfwd(f)(x), jax.grad(f_ref)(x), REF_DTYPE)
    # grad with respect to the operator itself gives an operator of cotangents.
    g = jax.grad(lambda J: J.trace().sum())(J)
    assert isinstance(g, SoftmaxJacobian)
    close(g.p, 1 - 2 * J.p, REF_DTYPE)


def test_errors():
    J = SoftmaxJacobian.from_logits(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=re.escape("v has shape (2, 4)")):
        J @ jnp.ones((2, 4))
    with pytest.raises(ValueError, match=re.escape("p.shape = (2, 3)")):
        jnp.ones((3,)) @ J
    with pytest.raises(ValueError, match="b has shape"):
        J.pinv_solve(jnp.ones(3))
    with pytest.raises(IndexError, match="exactly two indices"):
        J[0]
    with pytest.raises(IndexError, match="must be an integer"):
        J[0, :]
    with pytest.raises(IndexError, match="out of range"):
        J[0, 3]
    with pytest.raises(TypeError, match="integer index"):
        J[0.5, 1]
    with pytest.raises(ValueError, match="axis=2"):
        SoftmaxJacobian(jnp.ones((2, 3)) / 3, axis=2)
    with pytest.raises(TypeError, match="p must be"):
        SoftmaxJacobian("abc")
    assert "SoftmaxJacobian(shape=(2, 3, 3)" in repr(J)
