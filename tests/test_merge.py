"""Tests of jsoftmax.merge_partials and the private merge statistics of jsoftmax._merge.

A softmax row is split into pieces (random partitions: each entry gets a random piece,
so pieces may be empty), each piece gives its softmax-weighted result and log-sum-exp,
and the merge must equal the unsplit computation: against float64 NumPy for values and
against autodiff of a plain ``jax.nn`` implementation for gradients. Associativity and
order invariance are checked against the merge of all pieces.
"""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

import jsoftmax
from jsoftmax import _kernel, _merge, _pass

from helpers import REF_DTYPE, X64, examples, tol

pytestmark = pytest.mark.slow

DTYPES = [np.float32, np.float64] if X64 else [np.float32]
SETTINGS = settings(max_examples=examples(15), deadline=None, derandomize=True)
# One compilation per example instead of one per operation.
merge = jax.jit(jsoftmax.merge_partials, static_argnames="axis")


def _eps(dtype):
    return float(np.finfo(dtype).eps)


# --------------------------------------------------------------------------------------
# Split a softmax row into pieces and merge; references.
# --------------------------------------------------------------------------------------


def _pieces(x, v, ids, k_pieces):
    """Per-piece ``(o_k, lse_k)`` stacked on a leading axis: ``(K, R) + T`` and ``(K, R)``.

    ``x``: ``(R, n)`` logits, ``v``: ``(R, n) + T`` what the softmax weights, ``ids``:
    ``(R, n)`` the piece of each entry.
    """
    outs, lses = [], []
    for k in range(k_pieces):
        mask = ids == k
        p = jsoftmax.softmax(x, where=mask)
        outs.append(jnp.einsum("rn,rn...->r...", p, v))
        lses.append(jsoftmax.logsumexp(x, -1, where=mask))
    return jnp.stack(outs), jnp.stack(lses)


@partial(jax.jit, static_argnums=(3, 4))
def _split(x, v, ids, k_pieces, axis_pos=0):
    """Pieces on position ``axis_pos`` of ``L = (K, R)``, merged."""
    o, lse = _pieces(x, v, ids, k_pieces)
    o, lse = jnp.moveaxis(o, 0, axis_pos), jnp.moveaxis(lse, 0, axis_pos)
    return jsoftmax.merge_partials(o, lse, axis=axis_pos)


def _np_reference(x, v):
    """float64 ``(sum_i softmax(x)_i v_i, logsumexp(x))`` per row; rows without finite
    entries give ``(0, -inf)``."""
    x = np.asarray(x, np.float64)
    v = np.asarray(v, np.float64)
    m = np.max(x, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    total = e.sum(axis=1, keepdims=True)
    live = total[:, 0] > 0
    p = np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)
    o = np.einsum("rn,rn...->r...", p, v)
    with np.errstate(divide="ignore"):
        lse = np.where(live, m[:, 0] + np.log(total[:, 0]), -np.inf)
    return o, lse


def _ref_loss(c1, c2):
    """A loss of the unsplit ``jax.nn`` computation (rows without finite entries left out)."""

    def loss(x, v):
        live = jnp.any(jnp.isfinite(x), axis=1)
        x = jnp.where(live[:, None], x, 0.0)
        o = jnp.einsum("rn,rn...->r...", jax.nn.softmax(x, axis=1), v)
        o = jnp.where(live.reshape(live.shape + (1,) * (o.ndim - 1)), o, 0.0)
        lse = jax.nn.logsumexp(x, axis=1)
        return jnp.sum(jnp.sin(o) * c1) + jnp.sum(jnp.where(live, lse, 0.0) * c2)

    return loss


def _split_loss(c1, c2, ids, k_pieces, axis_pos=0):
    def loss(x, v):
        o, lse = _split(x, v, ids, k_pieces, axis_pos)
        live = lse > -jnp.inf
        return jnp.sum(jnp.sin(o) * c1) + jnp.sum(jnp.where(live, lse, 0.0) * c2)

    return loss


@st.composite
def split_rows(draw):
    """Random rows (with -inf entries), values with random trailing dims, a random
    partition of each row into K pieces and a random position of the pieces axis."""
    dtype = draw(st.sampled_from(DTYPES))
    rows = draw(st.integers(1, 3))
    n = draw(st.integers(1, 8))
    trailing = draw(st.sampled_from([(), (2,), (2, 3)]))
    width = 32 if dtype == np.float32 else 64
    logit = st.one_of(st.floats(-30, 30, width=width), st.just(-np.inf))
    x = draw(hnp.arrays(dtype, (rows, n), elements=logit))
    v = draw(hnp.arrays(dtype, (rows, n) + trailing, elements=st.floats(-4, 4, width=width)))
    k_pieces = draw(st.integers(1, 4))
    ids = draw(hnp.arrays(np.int32, (rows, n), elements=st.integers(0, k_pieces - 1)))
    axis_pos = draw(st.integers(0, 1))
    return x, v, ids, k_pieces, axis_pos


def _value_tols(dtype, n):
    return dict(rtol=16 * n * _eps(dtype), atol=64 * n * _eps(dtype))


def _lse_tols(dtype, n):
    # |x| <= 30: an absolute error of a few eps times the size of the result.
    return dict(rtol=16 * n * _eps(dtype), atol=16 * n * _eps(dtype))


# --------------------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------------------


@SETTINGS
@given(split_rows())
def test_merged_equals_unsplit_values(case):
    x, v, ids, k_pieces, axis_pos = case
    o, lse = _split(jnp.asarray(x), jnp.asarray(v), ids, k_pieces, axis_pos)
    o_ref, lse_ref = _np_reference(x, v)
    assert o.dtype == x.dtype and lse.dtype == x.dtype
    assert o.shape == o_ref.shape and lse.shape == lse_ref.shape
    n = x.shape[1]
    np.testing.assert_allclose(np.asarray(o, np.float64), o_ref, **_value_tols(x.dtype, n))
    np.testing.assert_allclose(np.asarray(lse, np.float64), lse_ref, **_lse_tols(x.dtype, n))


@SETTINGS
@given(split_rows(), st.data())
def test_merged_equals_unsplit_gradients(case, data):
    x, v, ids, k_pieces, axis_pos = case
    rows = x.shape[0]
    c1 = data.draw(hnp.arrays(x.dtype, v.shape[:1] + v.shape[2:], elements=st.floats(-2, 2)))
    c2 = data.draw(hnp.arrays(x.dtype, (rows,), elements=st.floats(-2, 2)))
    loss = _split_loss(c1, c2, ids, k_pieces, axis_pos)
    gx, gv = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(v))
    x_ref, v_ref = jnp.asarray(x, REF_DTYPE), jnp.asarray(v, REF_DTYPE)
    ref_loss = _ref_loss(jnp.asarray(c1, REF_DTYPE), jnp.asarray(c2, REF_DTYPE))
    rx, rv = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(x_ref, v_ref)
    chex.assert_tree_all_finite((gx, gv))
    n = x.shape[1]
    tol = dict(rtol=64 * n * _eps(x.dtype), atol=256 * n * _eps(x.dtype))
    np.testing.assert_allclose(np.asarray(gx, np.float64), rx, **tol)
    np.testing.assert_allclose(np.asarray(gv, np.float64), rv, **tol)


@st.composite
def pieces(draw):
    """Random per-piece results and log-sum-exps (some empty: -inf with NaN values)."""
    dtype = draw(st.sampled_from(DTYPES))
    k_pieces = draw(st.integers(1, 6))
    rows = draw(st.integers(1, 3))
    trailing = draw(st.sampled_from([(), (3,)]))
    width = 32 if dtype == np.float32 else 64
    lse = draw(
        hnp.arrays(
            dtype,
            (k_pieces, rows),
            elements=st.one_of(st.floats(-50, 50, width=width), st.just(-np.inf)),
        )
    )
    values = draw(
        hnp.arrays(dtype, (k_pieces, rows) + trailing, elements=st.floats(-5, 5, width=width))
    )
    empty = np.isneginf(lse).reshape(lse.shape + (1,) * len(trailing))
    values = np.where(empty, np.nan, values).astype(dtype)  # never read
    return values, lse


def _np_merge(values, lse):
    """float64 merge over axis 0: ``(sum_k exp(lse_k - lse) o_k, log sum_k exp(lse_k))``."""
    values = np.asarray(values, np.float64)
    lse = np.asarray(lse, np.float64)
    live = np.isfinite(lse)
    m = np.max(np.where(live, lse, -np.inf), axis=0)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(live, np.exp(np.where(live, lse, 0.0) - m), 0.0)
    total = e.sum(axis=0)
    w = e / np.where(total > 0, total, 1.0)
    w = w.reshape(w.shape + (1,) * (values.ndim - lse.ndim))
    o = np.sum(np.where(w > 0, w * np.nan_to_num(values), 0.0), axis=0)
    with np.errstate(divide="ignore"):
        return o, np.where(total > 0, m + np.log(total), -np.inf)


def _close(a, b, dtype, k):
    tol = dict(rtol=16 * k * _eps(dtype), atol=64 * k * _eps(dtype))
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **tol)


@SETTINGS
@given(pieces())
def test_merge_matches_float64_formula(case):
    values, lse = case
    o, l_out = merge(values, lse)
    o_ref, l_ref = _np_merge(values, lse)
    _close(o, o_ref, values.dtype, lse.shape[0])
    _close(l_out, l_ref, values.dtype, lse.shape[0])
    chex.assert_tree_all_finite(o)


@SETTINGS
@given(pieces(), st.data())
def test_associativity_merge_of_merges_equals_merge_of_all(case, data):
    values, lse = case
    k = lse.shape[0]
    groups = data.draw(hnp.arrays(np.int32, (k,), elements=st.integers(0, 2)))
    whole = merge(values, lse)
    partial_o, partial_l = [], []
    for g in range(3):
        idx = np.flatnonzero(groups == g)
        if idx.size:
            o_g, l_g = merge(values[idx], lse[idx])
            partial_o.append(o_g)
            partial_l.append(l_g)
    merged = merge(jnp.stack(partial_o), jnp.stack(partial_l))
    _close(merged[0], whole[0], values.dtype, k)
    _close(merged[1], whole[1], values.dtype, k)
    # A left fold (what a scan over pieces does) gives the same.
    acc = merge(values[:1], lse[:1])
    for j in range(1, k):
        acc = merge(jnp.stack([acc[0], values[j]]), jnp.stack([acc[1], lse[j]]))
    _close(acc[0], whole[0], values.dtype, k)
    _close(acc[1], whole[1], values.dtype, k)


@SETTINGS
@given(pieces(), st.data())
def test_order_of_pieces_does_not_matter(case, data):
    values, lse = case
    perm = data.draw(st.permutations(range(lse.shape[0])))
    perm = np.asarray(perm, np.int32)
    a = merge(values, lse)
    b = merge(values[perm], lse[perm])
    _close(a[0], b[0], values.dtype, lse.shape[0])
    _close(a[1], b[1], values.dtype, lse.shape[0])


# --------------------------------------------------------------------------------------
# Derivatives, forward and reverse mode, against a plain reference.
# --------------------------------------------------------------------------------------


# Derivatives by two routes in REF_DTYPE (relative, absolute).
JAC_TOL = tol(REF_DTYPE, dict(rtol=1e-12, atol=1e-14), dict(rtol=2e-6, atol=2e-7))
# Two evaluations of the same expression (jit or vmap, a dropped empty piece).
SAME_RTOL = tol(REF_DTYPE, 1e-15, 2.5e-7)


def _plain_merge(values, lse):
    """The merge by plain autodiff (no empty pieces): the independent reference."""
    w = jax.nn.softmax(lse, axis=0)
    w = w.reshape(w.shape + (1,) * (values.ndim - lse.ndim))
    return jnp.sum(w * values, axis=0), jax.nn.logsumexp(lse, axis=0)


def _random_pieces(shape_l, trailing, seed=0, dtype=REF_DTYPE):
    rng = np.random.default_rng(seed)
    values = jnp.asarray(rng.standard_normal(shape_l + trailing), dtype)
    lse = jnp.asarray(rng.standard_normal(shape_l) * 3, dtype)
    return values, lse


@pytest.mark.parametrize("trailing", [(), (4,), (2, 3)], ids=str)
def test_jacobians_match_plain_autodiff(trailing):
    values, lse = _random_pieces((5, 3), trailing)
    for jac in (jax.jacfwd, jax.jacrev):
        ours = jax.jit(jac(jsoftmax.merge_partials, argnums=(0, 1)))(values, lse)
        ref = jax.jit(jac(_plain_merge, argnums=(0, 1)))(values, lse)
        chex.assert_trees_all_close(ours, ref, **JAC_TOL)


@pytest.mark.x64  # float32 finite differences carry errors near check_grads' tolerance
def test_check_grads_order_2():
    values, lse = _random_pieces((4, 2), (3,), seed=1)
    check_grads(merge, (values, lse), order=2, modes=["fwd", "rev"])


def test_gradient_formulas_explicitly():
    # d value / d o_k = w_k,  d value / d lse_k = w_k (o_k - value),  d lse / d lse_k = w_k.
    values, lse = _random_pieces((4,), (3,), seed=2)
    value, lse_out = jsoftmax.merge_partials(values, lse)
    w = np.exp(np.asarray(lse) - float(lse_out))
    j_o, j_l = jax.jacrev(lambda o, ls: jsoftmax.merge_partials(o, ls)[0], argnums=(0, 1))(
        values, lse
    )
    rtol, atol = tol(REF_DTYPE, 1e-13, 1e-6), tol(REF_DTYPE, 1e-16, 1e-8)
    np.testing.assert_allclose(j_o, np.einsum("k,ij->ikj", w, np.eye(3)), rtol=rtol, atol=atol)
    rtol, atol = tol(REF_DTYPE, 1e-12, 2e-6), tol(REF_DTYPE, 1e-15, 1e-7)
    np.testing.assert_allclose(
        j_l, (w[:, None] * (np.asarray(values) - np.asarray(value))).T, rtol=rtol, atol=atol
    )
    g_l = jax.grad(lambda ls: jsoftmax.merge_partials(values, ls)[1])(lse)
    np.testing.assert_allclose(g_l, w, rtol=tol(REF_DTYPE, 1e-13, 1e-6))


def test_jit_and_vmap():
    values, lse = _random_pieces((3, 4, 5), (2,), seed=3)
    eager = jsoftmax.merge_partials(values, lse, axis=1)
    chex.assert_trees_all_close(
        jax.jit(jsoftmax.merge_partials, static_argnums=2)(values, lse, 1), eager
    )
    mapped = jax.vmap(lambda o, ls: jsoftmax.merge_partials(o, ls, axis=0), in_axes=(0, 0))(
        values, lse
    )
    chex.assert_trees_all_close(mapped, eager, rtol=SAME_RTOL)


# --------------------------------------------------------------------------------------
# Empty pieces, the axis argument, dtypes, errors.
# --------------------------------------------------------------------------------------


def test_empty_piece_contributes_nothing_whatever_it_holds():
    values, lse = _random_pieces((4, 2), (3,), seed=4)
    values_e = values.at[1].set(jnp.nan)
    lse_e = lse.at[1].set(-jnp.inf)
    keep = jnp.array([0, 2, 3])
    merged = jsoftmax.merge_partials(values_e, lse_e)
    chex.assert_trees_all_close(
        merged, jsoftmax.merge_partials(values[keep], lse[keep]), rtol=SAME_RTOL
    )
    for jac in (jax.jacfwd, jax.jacrev):
        j_o, j_l = jac(lambda o, ls: jsoftmax.merge_partials(o, ls)[0], argnums=(0, 1))(
            values_e, lse_e
        )
        chex.assert_tree_all_finite((j_o, j_l))
        assert np.all(np.asarray(j_o)[..., 1, :, :] == 0) and np.all(
            np.asarray(j_l)[..., 1, :] == 0
        )


@pytest.mark.parametrize("trailing", [(), (3,)], ids=str)
def test_all_pieces_empty_gives_zero_and_neg_inf_with_zero_gradients(trailing):
    values = jnp.full((3, 2) + trailing, jnp.nan, REF_DTYPE)
    lse = jnp.full((3, 2), -jnp.inf, REF_DTYPE).at[:, 1].set(jnp.array([0.5, -1.0, 2.0]))
    value, lse_out = jsoftmax.merge_partials(values.at[:, 1].set(1.0), lse)
    assert np.all(np.asarray(value)[0] == 0) and lse_out[0] == -jnp.inf
    chex.assert_trees_all_close(value[1], jnp.ones(trailing, REF_DTYPE))

    def loss(o, ls):
        value, lse_out = jsoftmax.merge_partials(o, ls)
        return jnp.sum(value**2) + jnp.sum(jnp.where(lse_out > -jnp.inf, lse_out, 0.0))

    g_o, g_l = jax.grad(loss, argnums=(0, 1))(values.at[:, 1].set(1.0), lse)
    chex.assert_tree_all_finite((g_o, g_l))
    assert np.all(np.asarray(g_o)[:, 0] == 0) and np.all(np.asarray(g_l)[:, 0] == 0)
    # The cotangent of lse = -inf itself is ignored, in both modes.
    j = jax.jacfwd(lambda ls: jsoftmax.merge_partials(values.at[:, 1].set(1.0), ls)[1])(lse)
    chex.assert_tree_all_finite(j)
    assert np.all(np.asarray(j)[0] == 0)
    # Second order stays finite.
    h = jax.hessian(lambda ls: jsoftmax.merge_partials(values.at[:, 1].set(1.0), ls)[0].sum())(lse)
    chex.assert_tree_all_finite(h)


def test_inf_and_nan_pieces_propagate():
    values = jnp.ones((3, 4), REF_DTYPE)
    lse = jnp.array(
        [[0.0, 0.0, 0.0, 0.0], [jnp.inf, jnp.nan, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], REF_DTYPE
    )
    values = values.at[0, 3].set(jnp.nan)
    value, lse_out = jsoftmax.merge_partials(values, lse)
    assert lse_out[0] == jnp.inf and np.isnan(value[0])
    assert np.isnan(lse_out[1]) and np.isnan(value[1])
    ref = np.log(np.exp(0.0) + 2 * np.exp(1.0))
    np.testing.assert_allclose(lse_out[2], ref, rtol=tol(REF_DTYPE, 1e-15, 2.5e-7))
    assert np.isnan(value[3])  # NaN in the values of a non-empty piece


def test_axis_counts_within_lse_shape():
    values, lse = _random_pieces((2, 5, 3), (4, 6), seed=5)
    ref = _plain_merge(jnp.moveaxis(values, 1, 0), jnp.moveaxis(lse, 1, 0))
    for axis in (1, -2):
        out = jsoftmax.merge_partials(values, lse, axis=axis)
        assert out[0].shape == (2, 3, 4, 6) and out[1].shape == (2, 3)
        rtol, atol = tol(REF_DTYPE, 1e-13, 1e-6), tol(REF_DTYPE, 1e-15, 1e-7)
        chex.assert_trees_all_close(out[0], ref[0], rtol=rtol, atol=atol)
        chex.assert_trees_all_close(out[1], ref[1], rtol=rtol)


def test_empty_pieces_axis():
    value, lse = jsoftmax.merge_partials(jnp.zeros((0, 3, 2)), jnp.zeros((0, 3)))
    assert value.shape == (3, 2) and np.all(np.asarray(value) == 0)
    assert lse.shape == (3,) and np.all(np.asarray(lse) == -np.inf)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("lse_dtype", ["same", jnp.float32], ids=str)
def test_16_bit_merged_in_float32(dtype, lse_dtype):
    values, lse = _random_pieces((6, 5), (8,), seed=6, dtype=jnp.float32)
    lse_dtype = dtype if lse_dtype == "same" else lse_dtype
    values, lse = values.astype(dtype), (lse + 20.0).astype(lse_dtype)
    value, lse_out = jsoftmax.merge_partials(values, lse)
    assert value.dtype == dtype and lse_out.dtype == jnp.float32
    o_ref, l_ref = _np_merge(np.asarray(values, np.float64), np.asarray(lse, np.float64))
    # The inputs' rounding is not an error of the merge: within one rounding of the output.
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(value, np.float64), o_ref, rtol=eps, atol=eps * 0.05)
    np.testing.assert_allclose(np.asarray(lse_out, np.float64), l_ref, rtol=1e-6)
    g = jax.grad(lambda o: jnp.sum(jsoftmax.merge_partials(o, lse)[0].astype(jnp.float32)))(values)
    assert g.dtype == dtype


def test_errors_name_values_and_lse():
    with pytest.raises(
        ValueError, match=r"values of shape \(3, 4\) must start with the shape of lse \(4, 3\)"
    ):
        jsoftmax.merge_partials(jnp.zeros((3, 4)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="values of shape"):
        jsoftmax.merge_partials(jnp.zeros((3,)), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="lse must have at least one dimension"):
        jsoftmax.merge_partials(jnp.zeros((3,)), jnp.float32(0.0))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        jsoftmax.merge_partials(jnp.zeros((3, 4, 5)), jnp.zeros((3, 4)), axis=2)
    with pytest.raises(TypeError, match="values must be real"):
        jsoftmax.merge_partials(jnp.zeros((3,), jnp.complex64), jnp.zeros((3,)))
    with pytest.raises(TypeError, match="lse must be an array"):
        jsoftmax.merge_partials(jnp.zeros((3,)), None)
    with pytest.raises(ValueError, match="must start with the shape of lse"):
        jax.jit(jsoftmax.merge_partials)(jnp.zeros((3, 4)), jnp.zeros((4,)))


# --------------------------------------------------------------------------------------
# The worked example: attention over key blocks.
# --------------------------------------------------------------------------------------


def _attention(q, k, v, mask=None, rule="vjp"):
    s = q @ k.T
    o = jsoftmax.softmax(s, where=mask, rule=rule) @ v
    return o, jsoftmax.logsumexp(s, -1, where=mask, rule=rule)


def _blockwise_attention(q, k, v, block, mask=None, rule="vjp"):
    outs, lses = [], []
    for start in range(0, k.shape[0], block):
        sl = slice(start, start + block)
        m = None if mask is None else mask[:, sl]
        o_b, l_b = _attention(q, k[sl], v[sl], m, rule)
        outs.append(o_b)
        lses.append(l_b)
    return jsoftmax.merge_partials(jnp.stack(outs), jnp.stack(lses))


def _plain_attention(q, k, v, mask=None):
    s = q @ k.T
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1) @ v, jax.nn.logsumexp(s, axis=-1)


def _qkv(seed=7, nq=5, nk=12, d=4, dv=3):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), REF_DTYPE)
    return f(nq, d), f(nk, d), f(nk, dv)


@pytest.mark.parametrize("masked_block", [None, 1], ids=["no-mask", "block-1-masked"])
def test_blockwise_attention_equals_unsplit(masked_block):
    q, k, v = _qkv()
    mask = None
    if masked_block is not None:
        mask = jnp.asarray(np.random.default_rng(8).random((5, 12)) > 0.3)
        mask = mask.at[:, 0].set(True).at[:, 4 * masked_block : 4 * (masked_block + 1)].set(False)
    split = jax.jit(lambda q, k, v: _blockwise_attention(q, k, v, 4, mask))
    o, lse = split(q, k, v)
    o_ref, lse_ref = _plain_attention(q, k, v, mask)
    rtol, atol = tol(REF_DTYPE, 1e-13, 1e-6), tol(REF_DTYPE, 1e-14, 1e-6)
    chex.assert_trees_all_close((o, lse), (o_ref, lse_ref), rtol=rtol, atol=atol)
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(o.shape), REF_DTYPE)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v)[0] * cot) + jnp.sum(f(q, k, v)[1] ** 2)

    grads = jax.grad(loss(lambda *a: _blockwise_attention(*a, 4, mask)), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda *a: _plain_attention(*a, mask)), argnums=(0, 1, 2))(q, k, v)
    chex.assert_tree_all_finite(grads)
    rtol, atol = tol(REF_DTYPE, 1e-12, 2e-6), tol(REF_DTYPE, 1e-13, 1e-6)
    chex.assert_trees_all_close(grads, ref, rtol=rtol, atol=atol)
    if masked_block is not None:
        assert np.all(np.asarray(grads[1])[4:8] == 0) and np.all(np.asarray(grads[2])[4:8] == 0)


def test_blockwise_attention_forward_mode():
    q, k, v = _qkv(seed=10, nk=9)
    j = jax.jacfwd(lambda q: _blockwise_attention(q, k, v, 3, rule="jvp"))(q)
    j_ref = jax.jacfwd(lambda q: _plain_attention(q, k, v))(q)
    rtol, atol = tol(REF_DTYPE, 1e-12, 2e-6), tol(REF_DTYPE, 1e-13, 1e-6)
    chex.assert_trees_all_close(j, j_ref, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------
# The private statistics: a scan over vocabulary chunks (what a chunked loss does).
# --------------------------------------------------------------------------------------


def _chunked_logsumexp(x, where, chunk):
    """logsumexp over the last axis by a lax.scan over chunks of ``chunk`` classes."""
    rows, n = x.shape
    xs = jnp.moveaxis(x.reshape(rows, n // chunk, chunk), 1, 0)
    ws = jnp.moveaxis(where.reshape(rows, n // chunk, chunk), 1, 0)

    def stats(xc, wc):
        return _kernel.piece_stats(_pass.exp_pass(xc, wc, (1,)), (1,))

    def step(carry, xw):
        return _kernel.merge_pair(carry, stats(*xw)), None

    init = _kernel.empty_like(stats(xs[0], ws[0]))
    st, _ = jax.lax.scan(step, init, (xs, ws))
    return _merge.lse_of(st.m, st.total)[:, 0]


def _chunked_lse_fold(x, where, chunk):
    rows, n = x.shape
    xs = jnp.moveaxis(x.reshape(rows, n // chunk, chunk), 1, 0)
    ws = jnp.moveaxis(where.reshape(rows, n // chunk, chunk), 1, 0)

    def step(carry, xw):
        both = jnp.stack([carry, jsoftmax.logsumexp(xw[0], -1, where=xw[1])])
        return jsoftmax.merge_partials(jnp.zeros_like(both), both)[1], None

    out, _ = jax.lax.scan(step, jnp.full((rows,), -jnp.inf, x.dtype), (xs, ws))
    return out


@pytest.mark.parametrize("fold", [_chunked_logsumexp, _chunked_lse_fold], ids=["stats", "lse"])
def test_scan_over_chunks_equals_logsumexp(fold):
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((4, 24)) * 5, REF_DTYPE)
    where = jnp.asarray(rng.random((4, 24)) > 0.3)
    where = where.at[1, 8:16].set(False)  # an empty chunk in a live row
    where = where.at[2].set(False)  # a fully masked row: every chunk empty
    f = jax.jit(lambda x: fold(x, where, 8))
    out = f(x)
    ref = jax.nn.logsumexp(jnp.where(where, x, -jnp.inf), axis=1)
    assert out[2] == -jnp.inf
    chex.assert_trees_all_close(out, ref, rtol=tol(REF_DTYPE, 1e-14, 5e-7))
    live = where.any(axis=1)
    g = jax.grad(lambda x: jnp.sum(jnp.where(live, f(x), 0.0) * jnp.arange(1.0, 5.0)))(x)
    p = jax.nn.softmax(jnp.where(where, x, -jnp.inf), axis=1)
    g_ref = jnp.where(live[:, None], p, 0.0) * jnp.arange(1.0, 5.0)[:, None]
    chex.assert_tree_all_finite(g)
    rtol, atol = tol(REF_DTYPE, 1e-13, 1e-6), tol(REF_DTYPE, 1e-16, 1e-8)
    chex.assert_trees_all_close(g, g_ref, rtol=rtol, atol=atol)
    assert np.all(np.asarray(g)[~np.asarray(where)] == 0)
