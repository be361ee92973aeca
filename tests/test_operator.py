"""Tests for jsoftmax.SoftmaxJacobian against dense references and autodiff."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from jsoftmax import SoftmaxJacobian

from helpers import close, make_logits


def _ref_dense(x, axis):
    """Per-row Jacobian of jax.nn.softmax by autodiff, batch first, float64."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float64), axis, -1)
    flat = x.reshape(-1, x.shape[-1])
    jac = jax.vmap(jax.jacfwd(jax.nn.softmax))(flat)
    return jac.reshape(x.shape[:-1] + (x.shape[-1],) * 2)


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
    diag = jnp.diagonal(ref, axis1=-2, axis2=-1)
    close(J.diagonal(), jnp.moveaxis(diag, -1, axis), dtype)
    close(J.trace(), jnp.trace(ref, axis1=-2, axis2=-1), dtype)
    p = jax.nn.softmax(x.astype(jnp.float64), axis)
    close(J.trace(), 1 - jnp.sum(p * p, axis), dtype)
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
    v_last = jnp.moveaxis(v, axis, -1).astype(jnp.float64)
    jv = jnp.moveaxis(jnp.einsum("...ij,...j->...i", ref, v_last), -1, axis)
    vj = jnp.moveaxis(jnp.einsum("...i,...ij->...j", v_last, ref), -1, axis)
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
    x = make_logits((2, 5), jnp.float64)
    where = jnp.array([[True, False, True, True, False], [True] * 5])
    J = SoftmaxJacobian.from_logits(x, where=where)
    p = jax.nn.softmax(x, where=where)
    K = SoftmaxJacobian(p)
    chex.assert_trees_all_close(J.dense(), K.dense(), atol=1e-15)
    chex.assert_trees_all_close(J.dense(), jsoftmax.jacobian_from_probs(p), atol=1e-15)
    # Masked classes have zero rows and columns.
    assert np.all(np.asarray(J.dense())[0, 1] == 0) and np.all(np.asarray(J.dense())[0, :, 4] == 0)


def test_scale():
    x = make_logits((3, 4), jnp.float64)
    s = jnp.array([0.5, 2.0, -1.0])
    J = SoftmaxJacobian.from_logits(x, scale=s)
    ref = _ref_dense(x, -1) * s[:, None, None]
    close(J.dense(), ref, jnp.float64)
    v = make_logits((3, 4), jnp.float64, 1)
    close(J @ v, jnp.einsum("bij,bj->bi", ref, v), jnp.float64)
    close(J.trace(), jnp.trace(ref, axis1=-2, axis2=-1), jnp.float64)
    close(J[1, 2], ref[:, 1, 2], jnp.float64)
    close(J.eigenvalues(), jnp.linalg.eigvalsh(ref), jnp.float64, atol_scale=10)
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


@pytest.mark.parametrize("name", list(_eig_cases()))
def test_eigenvalues_match_eigh(name):
    p = _eig_cases()[name].astype(jnp.float64)
    J = SoftmaxJacobian.from_probs(p)
    ref = jnp.linalg.eigvalsh(J.dense())
    ev = J.eigenvalues()
    assert ev.shape == p.shape
    close(ev, ref, jnp.float64, atol_scale=10)
    assert np.all(np.diff(np.asarray(ev), axis=-1) >= 0)


def test_eigenvalues_float32_and_axis():
    x = make_logits((6, 3), jnp.float32)
    J = SoftmaxJacobian.from_logits(x, axis=0)
    ref = jnp.linalg.eigvalsh(J.dense().astype(jnp.float64))
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
    p = jnp.array(p, jnp.float64)
    J = SoftmaxJacobian.from_probs(p)
    b = jnp.array([0.3, -1.0, 2.0, 0.5], jnp.float64)
    ref = jnp.linalg.pinv(J.dense()) @ b
    close(J.pinv_solve(b), ref, jnp.float64, atol_scale=10)
    B = jnp.stack([b, b[::-1], jnp.ones(4)], axis=-1)
    close(J.pinv_solve(B), jnp.linalg.pinv(J.dense()) @ B, jnp.float64, atol_scale=10)


def test_pinv_solve_batched_axis_scale_and_float32():
    x = make_logits((4, 3, 2), jnp.float64)
    s = jnp.array([[0.5, 2.0], [1.0, 3.0], [0.25, 1.0], [4.0, 1.0]])
    J = SoftmaxJacobian.from_logits(x, axis=1, scale=s)
    b = make_logits((4, 3, 2), jnp.float64, 5)
    dense = J.dense()  # (4, 2, 3, 3)
    ref = jnp.einsum("abij,abj->abi", jnp.linalg.pinv(dense), jnp.moveaxis(b, 1, -1))
    close(J.pinv_solve(b), jnp.moveaxis(ref, -1, 1), jnp.float64, atol_scale=10)
    # A right-hand side in the range is reproduced: J @ pinv_solve(b) = b.
    b_range = J @ b
    close(J @ J.pinv_solve(b_range), b_range, jnp.float64, atol_scale=10)
    J32 = SoftmaxJacobian.from_logits(x.astype(jnp.float32), axis=1)
    x32 = J32.pinv_solve(b.astype(jnp.float32))
    assert x32.dtype == jnp.float32
    ref32 = SoftmaxJacobian.from_logits(x, axis=1).pinv_solve(b)
    np.testing.assert_allclose(x32, ref32, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# Pytree behaviour: jit, vmap, grad.
# --------------------------------------------------------------------------------------


def test_pytree_jit_vmap_grad():
    x = make_logits((5, 4), jnp.float64)
    v = make_logits((5, 4), jnp.float64, 1)
    leaves, treedef = jax.tree_util.tree_flatten(SoftmaxJacobian.from_logits(x))
    assert len(leaves) == 1

    J = jax.jit(SoftmaxJacobian.from_logits)(x)
    assert isinstance(J, SoftmaxJacobian)
    close(jax.jit(lambda J, v: J @ v)(J, v), SoftmaxJacobian.from_logits(x) @ v, jnp.float64)

    # vmap over the operator (batch of rows) and over its vectors.
    out = jax.vmap(lambda J, v: J @ v)(J, v)
    close(out, J @ v, jnp.float64)
    J1 = SoftmaxJacobian.from_logits(x[0])
    close(jax.vmap(lambda u: J1 @ u)(v), jnp.stack([J1 @ u for u in v]), jnp.float64)
    Js = SoftmaxJacobian.from_logits(x, scale=2.0)
    close(jax.vmap(lambda J: J.trace())(Js), Js.trace(), jnp.float64)

    # grad through the operator equals autodiff of the plain formula.
    def f(x):
        return jnp.sum(jnp.sin(SoftmaxJacobian.from_logits(x) @ v))

    def f_ref(x):
        p = jax.nn.softmax(x)
        return jnp.sum(jnp.sin(p * (v - jnp.sum(p * v, -1, keepdims=True))))

    close(jax.grad(f)(x), jax.grad(f_ref)(x), jnp.float64)
    close(jax.jacfwd(f)(x), jax.grad(f_ref)(x), jnp.float64)
    # grad with respect to the operator itself gives an operator of cotangents.
    g = jax.grad(lambda J: J.trace().sum())(J)
    assert isinstance(g, SoftmaxJacobian)
    close(g.p, 1 - 2 * J.p, jnp.float64)


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
