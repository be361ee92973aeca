"""Property-based tests: inputs that reach the extremes of each dtype.

Values mix ordinary numbers, subnormals, +-max, -inf and repeated values (ties); shapes
go up to rank 4 with a random softmax axis.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jsoftmax

from helpers import X64, examples

pytestmark = pytest.mark.slow

DTYPES = [np.float32, np.float64] if X64 else [np.float32]
SETTINGS = settings(max_examples=examples(12), deadline=None, derandomize=True)


def _values(dtype):
    fi = np.finfo(dtype)
    width = 32 if dtype == np.float32 else 64
    return st.one_of(
        st.floats(-30, 30, width=width),
        st.floats(allow_nan=False, allow_infinity=False, width=width),
        st.sampled_from(
            [0.0, 1.0, -1.0, float(fi.max), -float(fi.max), float(fi.smallest_subnormal)]
        ),
        st.just(-np.inf),
    )


@st.composite
def logits(draw, dtype=None, allow_neg_inf=True):
    dtype = dtype or draw(st.sampled_from(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4))
    elements = _values(dtype)
    if not allow_neg_inf:
        elements = elements.filter(np.isfinite)
    x = draw(hnp.arrays(dtype, shape, elements=elements))
    axis = draw(st.integers(-x.ndim, x.ndim - 1))
    return x, axis


def _exact_log_softmax(x, axis):
    """float64 log-softmax of ``x`` (exact enough to decide finiteness)."""
    x = x.astype(np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        d = (x - m).astype(np.longdouble)  # x - m may exceed the float64 range
        lse = np.log(np.sum(np.exp(d), axis=axis, keepdims=True))
        return d - lse


@SETTINGS
@given(logits(), st.sampled_from(["default", "high"]))
def test_finite_where_the_exact_answer_is_finite(case, precision):
    x, axis = case
    p = np.asarray(jsoftmax.softmax(x, axis=axis, precision=precision))
    lp = np.asarray(jsoftmax.log_softmax(x, axis=axis, precision=precision))
    assert np.all(np.isfinite(p))
    exact = _exact_log_softmax(x, axis)
    fi = np.finfo(x.dtype)
    representable = np.isfinite(exact) & (np.abs(exact) <= fi.max)
    assert np.all(np.isfinite(lp[representable]))
    # Exactly -inf only where the exact value is -inf or beyond the dtype's range.
    assert np.all(representable[~np.isfinite(lp)] == False)  # noqa: E712


@SETTINGS
@given(logits(), st.sampled_from(["default", "high"]))
def test_rows_sum_to_one_within_n_eps(case, precision):
    x, axis = case
    p = np.asarray(jsoftmax.softmax(x, axis=axis, precision=precision), np.float64)
    n = x.shape[axis]
    total = p.sum(axis=axis)
    has_finite = np.any(np.isfinite(x), axis=axis)
    eps = np.finfo(x.dtype).eps
    assert np.all(np.abs(total[has_finite] - 1) <= n * eps)
    assert np.all(total[~has_finite] == 0)


@SETTINGS
@given(
    st.sampled_from(DTYPES),
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5),
    st.integers(-2000, 2000),
    st.data(),
)
def test_shift_invariance_within_the_error_bound(dtype, shape, shift, data):
    # Integer logits and an integer shift: x + c is exact, so the two results differ
    # only by their rounding errors (a few ULP each).
    x = data.draw(hnp.arrays(dtype, shape, elements=st.integers(-60, 60).map(float)))
    axis = data.draw(st.integers(-x.ndim, x.ndim - 1))
    precision = data.draw(st.sampled_from(["default", "high"]))
    p1 = np.asarray(jsoftmax.softmax(x, axis=axis, precision=precision), np.float64)
    p2 = np.asarray(jsoftmax.softmax(x + dtype(shift), axis=axis, precision=precision))
    fi = np.finfo(dtype)
    assert np.all(np.abs(p1 - p2) <= 8 * fi.eps * np.maximum(p1, fi.tiny))
    l1 = np.asarray(jsoftmax.log_softmax(x, axis=axis, precision=precision), np.float64)
    l2 = np.asarray(jsoftmax.log_softmax(x + dtype(shift), axis=axis, precision=precision))
    assert np.all(np.abs(l1 - l2) <= 8 * fi.eps * np.maximum(np.abs(l1), 1.0))


def _exact_probs(x, axis):
    """float64 probabilities along the last axis, independent of jsoftmax, and the
    per-entry bound on jsoftmax's relative error in the dtype of ``x``: the rounding of
    ``x - max x`` costs up to ``|x - max x| / 2`` ULP (``precision="default"``), the sum
    up to ``n`` ULP."""
    lp = np.moveaxis(_exact_log_softmax(x, axis), axis, -1)
    with np.errstate(invalid="ignore"):
        p = np.exp(lp).astype(np.float64)
    # A row without a finite entry: all probabilities 0 (the documented value).
    p = np.where(np.isnan(p), 0.0, p)
    x_last = np.moveaxis(x.astype(np.float64), axis, -1)
    m = np.max(x_last, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        gap = np.where(np.isfinite(x_last) & np.isfinite(m), np.abs(x_last - m), 0.0)
    n = x_last.shape[-1]
    eps = np.finfo(x.dtype).eps
    # p * gap is at most 1/e: bound it as such where gap overflows float64.
    p_gap = np.where(np.isfinite(gap), p * np.minimum(gap, 1e300), 0.0)
    return p, (n + 4) * eps * p + eps * p_gap


@SETTINGS
@given(logits(allow_neg_inf=True))
def test_jacobian_against_float64_and_its_structure(case):
    x, axis = case
    J = np.asarray(jsoftmax.jacobian(x, axis=axis), np.float64)
    p, err = _exact_probs(x, axis)
    # The independent reference: J = diag(p) - p p^T from float64 probabilities. The
    # bound propagates each probability's error through p_i (delta_ij - p_j).
    J_ref = p[..., :, None] * (np.eye(p.shape[-1]) - p[..., None, :])
    tiny = np.finfo(x.dtype).tiny
    bound = 2 * (err[..., :, None] + err[..., None, :]) + 4 * tiny
    assert np.all(np.abs(J - J_ref) <= bound)
    n = J.shape[-1]
    eps = np.finfo(x.dtype).eps
    np.testing.assert_array_equal(J, np.swapaxes(J, -1, -2))
    # Row i sums to p_i (1 - sum p) plus rounding; sum p = 1 within n eps.
    row_bound = 2 * n * eps * (p + np.abs(J).max(axis=-1)) + 4 * tiny
    assert np.all(np.abs(J.sum(axis=-1)) <= row_bound)
    assert np.all(np.linalg.eigvalsh(J) >= -2 * n * eps * p.max(axis=-1, keepdims=True) - tiny)


@SETTINGS
@given(logits(), st.sampled_from(["default", "high"]), st.data())
def test_vjp_is_jt_g_and_jvp_is_j_t(case, precision, data):
    x, axis = case
    g = data.draw(hnp.arrays(x.dtype, x.shape, elements=st.floats(-4, 4, width=32)))
    # The independent reference: the dense Jacobian of float64 probabilities that do not
    # come from jsoftmax, applied to g.
    p, err = _exact_probs(x, axis)
    J = p[..., :, None] * (np.eye(p.shape[-1]) - p[..., None, :])
    g_last = np.moveaxis(g.astype(np.float64), axis, -1)
    expected = np.moveaxis(np.einsum("...ij,...i->...j", J, g_last), -1, axis)

    def f(rule):
        return lambda z: jsoftmax.softmax(z, axis=axis, rule=rule, precision=precision)

    vjp = np.asarray(jax.vjp(f("vjp"), jnp.asarray(x))[1](jnp.asarray(g))[0], np.float64)
    jvp = np.asarray(jax.jvp(f("jvp"), (jnp.asarray(x),), (jnp.asarray(g),))[1], np.float64)
    eps = np.finfo(x.dtype).eps
    n = x.shape[axis]
    g_max = np.max(np.abs(g), initial=1.0)
    # The products' own rounding, plus each probability's error carried through J g.
    tol = 8 * n * eps * g_max * p + 4 * g_max * (err + p * err.sum(axis=-1, keepdims=True))
    tol = np.moveaxis(tol, -1, axis) + np.finfo(x.dtype).tiny
    assert np.all(np.abs(vjp - expected) <= tol)
    assert np.all(np.abs(jvp - expected) <= tol)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_16_bit_extremes_stay_finite(dtype):
    fi = jnp.finfo(dtype)
    x = jnp.array([fi.max, -fi.max, fi.smallest_normal, 0.0, -jnp.inf, fi.max], dtype)
    for precision in ("default", "high"):
        p = jsoftmax.softmax(x, precision=precision)
        assert bool(jnp.all(jnp.isfinite(p)))
        np.testing.assert_allclose(np.asarray(p, np.float64), [0.5, 0, 0, 0, 0, 0.5])
