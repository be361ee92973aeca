"""Sharding: jsoftmax under jit with NamedSharding, and jsoftmax.sharded inside shard_map.

Runs on the eight simulated CPU devices set up by conftest.py. References are plain
computations on the unsharded arrays (NumPy, or ``jax.grad`` of a plain ``jax.numpy``
implementation) in float64, or float32 where float64 is off; collectives are counted in
the compiled HLO.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax
from jsoftmax import sharded

from helpers import (
    REF_DTYPE,
    X64,
    collectives,
    compiled_hlo,
    cpu_device_count,
    fast_subset,
    host,
    mesh_of,
    put,
    saved_residuals,
    tol,
)

pytestmark = pytest.mark.skipif(
    cpu_device_count() < 8, reason="needs 8 CPU devices (conftest.py simulates them)"
)

ROOT = Path(__file__).resolve().parents[1]
# Tolerances against the references, in REF_DTYPE (the name is from float64).
F64 = tol(REF_DTYPE, dict(rtol=1e-12, atol=1e-12), dict(rtol=2e-6, atol=2e-6))
B, N = 8, 32  # rows, classes: divisible by every mesh axis below


# --------------------------------------------------------------------------------------
# Helpers and references.
# --------------------------------------------------------------------------------------


def _logits(seed=0, shape=(B, N), scale=3.0):
    return np.random.default_rng(seed).normal(scale=scale, size=shape).astype(REF_DTYPE)


def _live_rows(x, where):
    """Reference inputs for rows with no unmasked entry: documented constant outputs."""
    x = jnp.asarray(x)
    if where is None:
        return x, None, None
    live = jnp.any(where, -1, keepdims=True)
    return jnp.where(live, x, 0.0), jnp.where(live, where, True), live


def _ref_softmax(x, where=None):
    x, where, live = _live_rows(x, where)
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, -1, keepdims=True)))
    if where is not None:
        e = jnp.where(where, e, 0.0)
    p = e / jnp.sum(e, -1, keepdims=True)
    return p if live is None else jnp.where(live, p, 0.0)


def _ref_log_softmax(x, where=None):
    x, where, live = _live_rows(x, where)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(x, -1, keepdims=True))
    out = x - m - jnp.log(jnp.sum(jnp.exp(x - m), -1, keepdims=True))
    return out if live is None else jnp.where(live, out, -jnp.inf)


def _ref_ce(x, y, where=None):
    logp = _ref_log_softmax(x, where)
    return -jnp.take_along_axis(logp, jnp.asarray(y)[:, None], -1)[:, 0]


def _ref_masked_grad(ref, x, w, where):
    """Gradient of sum(ref(x) * w) with masked outputs treated as constants."""

    def loss(x):
        out = ref(x, where)
        if where is not None:
            out = jnp.where(where, out, 0.0)
        return jnp.sum(out * w)

    return jax.grad(loss)(jnp.asarray(x))


# --------------------------------------------------------------------------------------
# 1. jsoftmax's own functions under jit with NamedSharding inputs.
# --------------------------------------------------------------------------------------

# Explicit axes (jax.make_mesh's default) for every placement; Auto (GSPMD propagation)
# for batch x class sharding.
JIT_CASES = [
    (P("b", None), AxisType.Explicit),
    (P(None, "c"), AxisType.Explicit),
    (P("b", "c"), AxisType.Explicit),
    (P("b", "c"), AxisType.Auto),
]


@pytest.mark.parametrize("spec, kind", fast_subset(JIT_CASES, JIT_CASES[2:], unpack=True), ids=str)
@pytest.mark.parametrize(
    "fn, ref",
    [(jsoftmax.softmax, _ref_softmax), (jsoftmax.log_softmax, _ref_log_softmax)],
    ids=["softmax", "log_softmax"],
)
def test_jit_named_sharding_matches_unsharded(fn, ref, spec, kind):
    mesh = mesh_of((2, 4), ("b", "c"), kind)
    xh, wh = _logits(0), _logits(1)
    x, w = put(xh, mesh, spec), put(wh, mesh, spec)
    with jax.set_mesh(mesh):
        out = jax.jit(fn)(x)
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x) * w)))(x, w)
        hlo_fwd = compiled_hlo(fn, x)
        hlo_grad = compiled_hlo(jax.grad(lambda x, w: jnp.sum(fn(x) * w)), x, w)
    np.testing.assert_allclose(host(out), ref(xh), **F64)
    np.testing.assert_allclose(host(grad), _ref_masked_grad(ref, xh, wh, None), **F64)
    # The output (and the gradient) stay sharded like the input: no silent gather.
    assert out.sharding.is_equivalent_to(x.sharding, x.ndim)
    assert grad.sharding.is_equivalent_to(x.sharding, x.ndim)
    fwd = collectives(hlo_fwd)
    assert all(op == "all-reduce" for op, _ in fwd), fwd
    assert all(op == "all-reduce" for op, _ in collectives(hlo_grad))
    local_rows = B // 2 if spec[0] == "b" else B
    if spec[1] == "c":
        # Two rounds: the max, then the sum of exponentials (with any other per-row sum
        # the implementation needs, in the same all-reduce); one scalar per row each.
        assert len(fwd) == 2, fwd
        assert all(size == local_rows for _, sizes in fwd for size in sizes), fwd
    else:
        assert fwd == []  # batch sharding alone needs no communication


@pytest.mark.parametrize(
    "spec, kind",
    [
        (P("b", None), AxisType.Explicit),
        (P(None, "c"), AxisType.Auto),
        (P("b", "c"), AxisType.Auto),
    ],
    ids=str,
)
def test_jit_named_sharding_jacobian(spec, kind):
    mesh = mesh_of((2, 4), ("b", "c"), kind)
    xh = _logits(2, shape=(B, 8))
    x = put(xh, mesh, spec)
    with jax.set_mesh(mesh):
        out = jax.jit(jsoftmax.jacobian)(x)
        hlo = compiled_hlo(jsoftmax.jacobian, x)
    ref = jax.vmap(jax.jacrev(_ref_softmax))(jnp.asarray(xh))
    np.testing.assert_allclose(host(out), ref, **F64)
    # The batch and row axes keep the input's sharding; the output is never gathered.
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec, None)), 3)
    assert "all-gather" not in [op for op, _ in collectives(hlo)]


@pytest.mark.parametrize("spec", [P(None, "c"), P("b", "c")], ids=str)
@pytest.mark.parametrize("fn", [jsoftmax.jacobian, jsoftmax.log_softmax_jacobian])
def test_jit_explicit_class_sharding_jacobian(fn, spec):
    # With Explicit axes the column operand p_j is gathered (each row i of J needs every
    # p_j): an all-gather of the probabilities, n per row, never of the n x n output.
    mesh = mesh_of((2, 4), ("b", "c"), AxisType.Explicit)
    xh = _logits(2, shape=(B, 8))
    x = put(xh, mesh, spec)
    with jax.set_mesh(mesh):
        out = jax.jit(fn)(x)
        hlo = compiled_hlo(fn, x)
    np.testing.assert_allclose(host(out), fn(jnp.asarray(xh)), **F64)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec, None)), 3)
    gathers = [sizes for op, sizes in collectives(hlo) if op == "all-gather"]
    assert all(max(sizes) <= B * 8 for sizes in gathers), gathers


def _core_ce():
    ce = getattr(jsoftmax, "cross_entropy", None)
    if ce is None:
        pytest.skip("jsoftmax.cross_entropy is not available")
    return ce


@pytest.mark.parametrize("spec, kind", JIT_CASES, ids=str)
def test_jit_named_sharding_cross_entropy(spec, kind):
    ce = _core_ce()
    mesh = mesh_of((2, 4), ("b", "c"), kind)
    xh = _logits(3)
    yh = np.random.default_rng(4).integers(0, N, size=B)
    x, y = put(xh, mesh, spec), put(yh, mesh, P(spec[0]))
    with jax.set_mesh(mesh):
        loss = jax.jit(ce)(x, y)
        grad = jax.jit(jax.grad(lambda x, y: jnp.sum(ce(x, y))))(x, y)
        hlo = compiled_hlo(ce, x, y)
    np.testing.assert_allclose(host(loss), _ref_ce(xh, yh), **F64)
    ref_grad = jax.grad(lambda x: jnp.sum(_ref_ce(x, yh)))(jnp.asarray(xh))
    np.testing.assert_allclose(host(grad), ref_grad, **F64)
    assert loss.sharding.is_equivalent_to(NamedSharding(mesh, P(spec[0])), 1)
    assert grad.sharding.is_equivalent_to(x.sharding, 2)
    assert "all-gather" not in [op for op, _ in collectives(hlo)]


# --------------------------------------------------------------------------------------
# 2./3. jsoftmax.sharded inside shard_map: meshes (8,), (2, 4), (4, 2).
# --------------------------------------------------------------------------------------

# (mesh shape, mesh axis names, logits spec, axis_name passed to jsoftmax.sharded)
MESHES = [
    ((8,), ("c",), P(None, "c"), "c"),
    ((2, 4), ("b", "c"), P("b", "c"), "c"),
    ((4, 2), ("b", "c"), P("b", "c"), "c"),
    ((2, 4), ("b", "c"), P(None, ("b", "c")), ("b", "c")),  # classes over both axes
]
MESH_IDS = ["8", "2x4", "4x2", "2x4-classes-over-both"]
# The fast suite's meshes: batch and classes sharded, classes over one and over two axes.
FAST_MESHES = fast_subset(MESHES, [MESHES[1], MESHES[3]], unpack=True)


def _rows_spec(spec):
    return P(spec[0])


def _local_rows(mesh_shape, names, spec):
    return B // mesh_shape[names.index(spec[0])] if spec[0] is not None else B


def _mask(seed=5):
    where = np.random.default_rng(seed).random((B, N)) > 0.3
    where[0] = False  # a fully masked row
    where[1, : N // 2] = False  # a row whose first shards are fully masked
    where[2, :] = False
    where[2, N - 1] = True  # a single live class, on the last shard
    return where


def _sm(fn, mesh, spec, axis_name, with_where, **kw):
    if with_where:
        body = lambda x, m: fn(x, axis_name, where=m, **kw)
        return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
    body = lambda x: fn(x, axis_name, **kw)
    return jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)


@pytest.mark.parametrize("with_where", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("mesh_shape, names, spec, axis_name", FAST_MESHES, ids=MESH_IDS)
@pytest.mark.parametrize(
    "fn, ref",
    [(sharded.softmax, _ref_softmax), (sharded.log_softmax, _ref_log_softmax)],
    ids=["softmax", "log_softmax"],
)
def test_sharded_softmax_values_and_grads(fn, ref, mesh_shape, names, spec, axis_name, with_where):
    mesh = mesh_of(mesh_shape, names)
    xh, wh = _logits(6), _logits(7)
    where = _mask() if with_where else None
    f = _sm(fn, mesh, spec, axis_name, with_where)
    args = (put(xh, mesh, spec),) + ((put(where, mesh, spec),) if with_where else ())
    w = put(wh, mesh, spec)
    with jax.set_mesh(mesh):
        out = jax.jit(f)(*args)
        # Masked log-softmax outputs are -inf constants; leave them out of the loss.
        if fn is sharded.log_softmax and with_where:
            loss = lambda x, *m: jnp.sum(jnp.where(m[0], f(x, *m), 0.0) * w)
        else:
            loss = lambda x, *m: jnp.sum(f(x, *m) * w)
        grad = jax.jit(jax.grad(loss))(*args)
    np.testing.assert_allclose(host(out), ref(xh, where), **F64)
    np.testing.assert_allclose(host(grad), _ref_masked_grad(ref, xh, wh, where), **F64)
    assert out.sharding.is_equivalent_to(args[0].sharding, 2)
    assert np.all(np.isfinite(host(grad)))
    if with_where:
        assert np.all(host(out)[0] == (0.0 if fn is sharded.softmax else -np.inf))
        assert np.all(host(grad)[~where] == 0.0)


def _ce_sm(mesh, spec, axis_name, with_where=False, **kw):
    rows = _rows_spec(spec)
    if with_where:
        body = lambda x, y, m: sharded.cross_entropy(x, y, axis_name, where=m, **kw)
        return jax.shard_map(body, mesh=mesh, in_specs=(spec, rows, spec), out_specs=rows)
    body = lambda x, y: sharded.cross_entropy(x, y, axis_name, **kw)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, rows), out_specs=rows)


@pytest.mark.parametrize("with_where", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("mesh_shape, names, spec, axis_name", FAST_MESHES, ids=MESH_IDS)
def test_sharded_cross_entropy_values_and_grads(mesh_shape, names, spec, axis_name, with_where):
    mesh = mesh_of(mesh_shape, names)
    xh = _logits(8)
    where = _mask() if with_where else None
    yh = np.random.default_rng(9).integers(0, N, size=B)
    ignored = np.zeros(B, bool)
    if with_where:
        # Labels on live classes, except row 0 (fully masked) and row 3, whose label is
        # on a masked class: no target mass, loss 0 and zero gradient.
        for r in range(1, B):
            yh[r] = np.flatnonzero(where[r])[r % np.count_nonzero(where[r])]
        yh[3] = np.flatnonzero(~where[3])[0]
        ignored[[0, 3]] = True
    f = _ce_sm(mesh, spec, axis_name, with_where)
    args = (put(xh, mesh, spec), put(yh, mesh, _rows_spec(spec)))
    args += (put(where, mesh, spec),) if with_where else ()
    cot = np.linspace(0.5, 2.0, B)  # a per-example cotangent that is not all ones
    with jax.set_mesh(mesh):
        loss = jax.jit(f)(*args)
        grad = jax.jit(jax.grad(lambda x, *a: jnp.sum(f(x, *a) * cot)))(*args)
    assert loss.sharding.is_equivalent_to(NamedSharding(mesh, _rows_spec(spec)), 1)
    assert grad.sharding.is_equivalent_to(args[0].sharding, 2)
    loss, grad = host(loss), host(grad)
    live = ~ignored
    ref = np.asarray(_ref_ce(xh, yh, where))
    ref_grad = np.asarray(jax.grad(lambda x: jnp.sum(_ref_ce(x, yh, where) * cot))(xh))
    np.testing.assert_allclose(loss[live], ref[live], **F64)
    np.testing.assert_allclose(grad[live], ref_grad[live], **F64)
    assert np.all(loss[ignored] == 0.0) and np.all(grad[ignored] == 0.0)
    if with_where:
        assert np.all(grad[~where] == 0.0)
    # ... and the unsharded jsoftmax.cross_entropy, ignored labels included.
    ce = getattr(jsoftmax, "cross_entropy", None)
    if ce is not None:
        np.testing.assert_allclose(loss, ce(xh, yh, where=where), **F64)
        core_grad = jax.grad(lambda x: jnp.sum(ce(x, yh, where=where) * cot))(xh)
        np.testing.assert_allclose(grad, core_grad, **F64)


@pytest.mark.parametrize("mesh_shape, names, spec, axis_name", FAST_MESHES, ids=MESH_IDS)
def test_collectives_per_row_match_the_design(mesh_shape, names, spec, axis_name):
    """Forward/backward all-reduces, each carrying one scalar per local row."""
    mesh = mesh_of(mesh_shape, names)
    rows = _local_rows(mesh_shape, names, spec)
    x = put(_logits(10), mesh, spec)
    g = put(_logits(11), mesh, spec)
    y = put(np.arange(B) % N, mesh, _rows_spec(spec))
    q = put(np.asarray(jax.nn.softmax(_logits(12))), mesh, spec)
    ones = put(np.ones(B), mesh, _rows_spec(spec))

    def vjp_only(fn):
        # the backward pass plus the part of the forward pass that it needs
        return lambda *a: jax.vjp(fn, *a[:-1])[1](a[-1])[0]

    expect = {}
    with jax.set_mesh(mesh):
        for name, fn in [("softmax", sharded.softmax), ("log_softmax", sharded.log_softmax)]:
            f = _sm(fn, mesh, spec, axis_name, False)
            expect[name + " forward"] = (compiled_hlo(f, x), [[rows], [rows]])  # max, sum exp
            # + <g, p> (softmax) or sum g (log_softmax): one more scalar per row
            expect[name + " vjp"] = (compiled_hlo(vjp_only(f), x, g), [[rows]] * 3)
        ce = _ce_sm(mesh, spec, axis_name)
        # max; then sum of exponentials and target logit in one all-reduce
        expect["cross_entropy forward"] = (compiled_hlo(ce, x, y), [[rows], [rows, rows]])
        # the backward pass p - onehot adds no all-reduce: the max, then the sum with the
        # target logit (it says whether the label is on an excluded class, -inf or masked,
        # whose row does not count)
        ce_vjp = lambda x, y, g: jax.vjp(lambda x: ce(x, y), x)[1](g)[0]
        expect["cross_entropy vjp"] = (compiled_hlo(ce_vjp, x, y, ones), [[rows], [rows, rows]])
        # Probability labels (split like the logits): max; then the sum of exponentials,
        # sum q and sum q (s - M) in one all-reduce. The backward pass needs sum q.
        ce_p = jax.shard_map(
            lambda x, q: sharded.cross_entropy(x, q, axis_name),
            mesh=mesh,
            in_specs=(spec, spec),
            out_specs=_rows_spec(spec),
        )
        expect["cross_entropy probability labels forward"] = (
            compiled_hlo(ce_p, x, q),
            [[rows], [rows, rows, rows]],
        )
        ce_p_vjp = lambda x, q, g: jax.vjp(ce_p, x, q)[1](g)
        expect["cross_entropy probability labels vjp"] = (
            compiled_hlo(ce_p_vjp, x, q, ones),
            [[rows], [rows, rows]],
        )
    for what, (hlo, sizes) in expect.items():
        found = collectives(hlo)
        assert all(op == "all-reduce" for op, _ in found), (what, found)
        assert sorted(s for _, s in found) == sorted(sizes), (what, found)


def test_one_output_sized_residual():
    mesh = mesh_of((2, 4), ("b", "c"))
    spec = P("b", "c")
    x = put(_logits(12), mesh, spec)
    y = put(np.arange(B) % N, mesh, P("b"))
    with jax.set_mesh(mesh):
        for fn in (sharded.softmax, sharded.log_softmax):
            res = saved_residuals(_sm(fn, mesh, spec, "c", False), x)
            assert [r[0].size for r in res] == [B * N]
        res = saved_residuals(_ce_sm(mesh, spec, "c"), x, y)
        ce_p = jax.shard_map(
            lambda x, q: sharded.cross_entropy(x, q, "c"),
            mesh=mesh,
            in_specs=(spec, spec),
            out_specs=P("b"),
        )
        res_p = saved_residuals(ce_p, x, put(np.asarray(jax.nn.softmax(_logits(13))), mesh, spec))
    # the logits block (the backward pass recomputes p), the labels, the merged per-row
    # max and log-sum of exponentials, which rows count (a label on an excluded class),
    # and each shard's own row maximum (B per shard of the 4 along "c": the backward
    # pass writes exp(x - m_local) as the forward pass does, so XLA computes it once)
    assert sorted(r[0].size for r in res) == sorted([B * N, B, B, B, B, 4 * B])
    # probability labels: the logits and labels blocks (inputs), max, sum exp, sum q,
    # and each shard's own row maximum
    assert sorted(r[0].size for r in res_p) == sorted([B * N, B * N, B, B, B, 4 * B])


# --------------------------------------------------------------------------------------
# Class count not divisible by the shard count: pad with masked entries.
# --------------------------------------------------------------------------------------


def test_indivisible_class_count_is_rejected_by_shard_map():
    mesh = mesh_of((8,), ("c",))
    f = _sm(sharded.softmax, mesh, P(None, "c"), "c", False)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="evenly divisible"):
        f(jnp.zeros((2, 30), REF_DTYPE))


@pytest.mark.parametrize("mesh_shape, names, spec, axis_name", MESHES[:3], ids=MESH_IDS[:3])
def test_padding_with_num_classes_matches_unpadded(mesh_shape, names, spec, axis_name):
    n_real = 27  # padded to 32: the last shard(s) hold padding only partly or entirely
    mesh = mesh_of(mesh_shape, names)
    xh = _logits(13, shape=(B, n_real))
    wh = _logits(14, shape=(B, n_real))
    yh = np.array([0, 26, 5, 13, 20, 26, 1, 8])
    pad = lambda a: np.pad(a, ((0, 0), (0, N - n_real)), constant_values=1e30)
    x, w = put(pad(xh), mesh, spec), put(pad(wh), mesh, spec)
    y = put(yh, mesh, _rows_spec(spec))
    sm = _sm(sharded.softmax, mesh, spec, axis_name, False, num_classes=n_real)
    lsm = _sm(sharded.log_softmax, mesh, spec, axis_name, False, num_classes=n_real)
    ce = _ce_sm(mesh, spec, axis_name, num_classes=n_real)
    real = np.arange(N) < n_real
    with jax.set_mesh(mesh):
        p = jax.jit(sm)(x)
        lp = jax.jit(lsm)(x)
        loss = jax.jit(ce)(x, y)
        gp = jax.jit(jax.grad(lambda x: jnp.sum(sm(x) * w)))(x)
        gl = jax.jit(jax.grad(lambda x: jnp.sum(jnp.where(real, lsm(x), 0.0) * w)))(x)
        gce = jax.jit(jax.grad(lambda x: jnp.sum(ce(x, y))))(x)
        bad = jax.jit(ce)(x, put(np.full(B, n_real), mesh, _rows_spec(spec)))
    np.testing.assert_allclose(host(p)[:, :n_real], _ref_softmax(xh), **F64)
    np.testing.assert_allclose(host(lp)[:, :n_real], _ref_log_softmax(xh), **F64)
    np.testing.assert_allclose(host(loss), _ref_ce(xh, yh), **F64)
    assert np.all(host(p)[:, n_real:] == 0.0) and np.all(host(lp)[:, n_real:] == -np.inf)
    for g, ref in [(gp, _ref_softmax), (gl, _ref_log_softmax)]:
        np.testing.assert_allclose(host(g)[:, :n_real], _ref_masked_grad(ref, xh, wh, None), **F64)
        assert np.all(host(g)[:, n_real:] == 0.0)
    ref_gce = jax.grad(lambda x: jnp.sum(_ref_ce(x, yh)))(jnp.asarray(xh))
    np.testing.assert_allclose(host(gce)[:, :n_real], ref_gce, **F64)
    assert np.all(host(gce)[:, n_real:] == 0.0)
    assert np.all(np.isnan(host(bad)))  # a label in the padding is out of range


# --------------------------------------------------------------------------------------
# Edge cases.
# --------------------------------------------------------------------------------------


def _mesh8():
    return mesh_of((8,), ("c",)), P(None, "c")


def test_inf_and_nan_make_the_whole_row_nan_on_every_shard():
    mesh, spec = _mesh8()
    xh = _logits(15, shape=(4, N))
    xh[0, 3] = np.inf
    xh[1, 30] = np.nan
    xh[2, :] = -np.inf  # no finite entry: zeros / -inf
    xh[3, 5] = -np.inf  # a single -inf entry behaves as masked
    y = put(np.array([0, 1, 2, 5]), mesh, P())
    with jax.set_mesh(mesh):
        x = put(xh, mesh, spec)
        p = host(jax.jit(_sm(sharded.softmax, mesh, spec, "c", False))(x))
        lp = host(jax.jit(_sm(sharded.log_softmax, mesh, spec, "c", False))(x))
        loss = host(jax.jit(_ce_sm(mesh, spec, "c"))(x, y))
    assert np.all(np.isnan(p[:2])) and np.all(np.isnan(lp[:2])) and np.all(np.isnan(loss[:2]))
    # A label on a -inf logit (an excluded class): the row does not count.
    assert np.all(p[2] == 0.0) and np.all(lp[2] == -np.inf) and loss[2] == 0.0
    assert p[3, 5] == 0.0 and lp[3, 5] == -np.inf and loss[3] == 0.0
    np.testing.assert_allclose(p[3], _ref_softmax(xh[3]), **F64)


def test_huge_logits_do_not_overflow():
    mesh, spec = _mesh8()
    # Far beyond exp's range, within the dtype's.
    xh = _logits(16, shape=(2, N)) + (1e300 if X64 else 1e37)
    xh[1] = _logits(17, shape=(N,)) * 1e3
    y = np.array([4, 31])
    with jax.set_mesh(mesh):
        x = put(xh, mesh, spec)
        p = host(jax.jit(_sm(sharded.softmax, mesh, spec, "c", False))(x))
        loss = host(jax.jit(_ce_sm(mesh, spec, "c"))(x, put(y, mesh, P())))
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(loss))
    np.testing.assert_allclose(p, _ref_softmax(xh), **F64)
    np.testing.assert_allclose(loss, _ref_ce(xh, y), **F64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
def test_low_precision_is_computed_in_float32(dtype):
    mesh = mesh_of((2, 4), ("b", "c"))
    spec = P("b", "c")
    xh = np.asarray(jnp.asarray(_logits(18), dtype))
    y = np.arange(B) * 3 % N
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-3)
    ref_in = jnp.asarray(xh, jnp.float32)
    with jax.set_mesh(mesh):
        x = put(xh, mesh, spec)
        p = jax.jit(_sm(sharded.softmax, mesh, spec, "c", False))(x)
        yd = put(y, mesh, P("b"))
        loss = jax.jit(_ce_sm(mesh, spec, "c"))(x, yd)
        g = jax.jit(jax.grad(lambda x: jnp.sum(_ce_sm(mesh, spec, "c")(x, yd)).astype(float)))(x)
    # As jsoftmax.cross_entropy: a float32 loss (a 16-bit one would be quantised),
    # gradients in the logits' dtype.
    assert p.dtype == dtype and loss.dtype == jnp.float32 and g.dtype == dtype
    np.testing.assert_allclose(np.asarray(p, np.float32), _ref_softmax(ref_in), **tol)
    np.testing.assert_allclose(np.asarray(loss, np.float32), _ref_ce(ref_in, y), **tol)
    ref_g = jax.grad(lambda x: jnp.sum(_ref_ce(x, y)))(ref_in)
    np.testing.assert_allclose(np.asarray(g, np.float32), ref_g, **tol)


def test_out_of_range_labels_give_nan_not_a_wrong_loss():
    mesh, spec = _mesh8()
    xh = _logits(19, shape=(4, N))
    y = np.array([-1, N, 0, N - 1])
    ce = _ce_sm(mesh, spec, "c")
    with jax.set_mesh(mesh):
        x = put(xh, mesh, spec)
        yd = put(y, mesh, P())
        loss = host(jax.jit(ce)(x, yd))
        g = host(jax.jit(jax.grad(lambda x: jnp.sum(ce(x, yd))))(x))
    assert np.all(np.isnan(loss[:2])) and np.all(np.isnan(g[:2]))
    np.testing.assert_allclose(loss[2:], _ref_ce(xh[2:], y[2:]), **F64)
    assert np.all(np.isfinite(g[2:]))


@pytest.mark.skipif(not jax.config.jax_enable_x64, reason="int64 labels need x64")
def test_int64_labels_beyond_int32_are_out_of_range_not_wrapped():
    # Regression: the labels were cast to int32, so 2**32 + 3 read class 3's loss and
    # 2**32 - 100 matched ignore_index=-100.
    mesh, spec = _mesh8()
    xh = _logits(21, shape=(3, N))
    y = np.array([2**32 + 3, 2**32 - 100, 1], np.int64)
    ce = _ce_sm(mesh, spec, "c", ignore_index=-100)
    with jax.set_mesh(mesh):
        loss = host(jax.jit(ce)(put(xh, mesh, spec), put(y, mesh, P())))
    assert np.all(np.isnan(loss[:2]))
    np.testing.assert_allclose(loss[2:], _ref_ce(xh[2:], y[2:]), **F64)


def test_nan_cotangent_of_a_row_that_does_not_count_stays_out():
    # As in jsoftmax.cross_entropy (and autodiff of a select): an ignored row passes no
    # cotangent to the logits, even a NaN one.
    mesh, spec = _mesh8()
    xh = _logits(20, shape=(4, N))
    y = np.array([0, -100, 5, N - 1])
    ct = np.array([1.0, np.nan, 0.5, 2.0])
    ce = _ce_sm(mesh, spec, "c", ignore_index=-100)
    with jax.set_mesh(mesh):
        x, yd, cd = put(xh, mesh, spec), put(y, mesh, P()), put(ct, mesh, P())
        g = host(jax.jit(lambda x, c: jax.vjp(lambda x: ce(x, yd), x)[1](c)[0])(x, cd))
    y_ok, ct_ok = np.where(y < 0, 0, y), np.where(np.isnan(ct), 0.0, ct)
    ref = jax.vjp(lambda x: _ref_ce(x, y_ok), jnp.asarray(xh))[1](jnp.asarray(ct_ok))[0]
    assert np.all(g[1] == 0)
    np.testing.assert_allclose(g, ref, **F64)


# --------------------------------------------------------------------------------------
# Argument errors.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, "", (), ("c", 1), None, ("c", "c")], ids=repr)
def test_bad_axis_name(bad):
    err = ValueError if bad == ("c", "c") else TypeError
    with pytest.raises(err, match="axis_name"):
        sharded.softmax(jnp.zeros((2, 4)), bad)


def test_unbound_axis_name_says_use_shard_map():
    with pytest.raises(ValueError, match="shard_map"):
        sharded.log_softmax(jnp.zeros((2, 4)), "vocab")
    with pytest.raises(ValueError, match="shard_map"):
        sharded.cross_entropy(jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32), "vocab")


def test_bad_labels_num_classes_and_where():
    mesh, spec = _mesh8()
    x = put(np.zeros((2, N)), mesh, spec)

    def run(body, *args):
        f = jax.shard_map(body, mesh=mesh, in_specs=(spec,) + (P(),) * len(args), out_specs=P())
        with jax.set_mesh(mesh):
            return f(x, *args)

    yf = put(np.zeros(2), mesh, P())
    with pytest.raises(ValueError, match="float labels .* shape of logits_shard.*integer dtype"):
        run(lambda x, y: sharded.cross_entropy(x, y, "c"), yf)
    y3 = put(np.zeros(3, np.int32), mesh, P())
    with pytest.raises(ValueError, match="labels of shape .* do not match logits_shard"):
        run(lambda x, y: sharded.cross_entropy(x, y, "c"), y3)
    y = put(np.zeros(2, np.int32), mesh, P())
    with pytest.raises(ValueError, match="num_classes=40"):
        run(lambda x, y: sharded.cross_entropy(x, y, "c", num_classes=40), y)
    with pytest.raises(TypeError, match="num_classes"):
        run(lambda x, y: sharded.cross_entropy(x, y, "c", num_classes=True), y)
    with pytest.raises(TypeError, match="where must be a boolean"):
        run(lambda x, y: sharded.cross_entropy(x, y, "c", where=jnp.ones(4)), y)
    with pytest.raises(ValueError, match="single softmax axis"):
        run(lambda x, y: sharded.softmax(x, "c", (0, 1), num_classes=3)[0, 0], y)


# --------------------------------------------------------------------------------------
# The example script: a vocab-sharded language-model head trained on 8 devices.
# --------------------------------------------------------------------------------------


def test_example_sharded_vocab_head_runs_and_matches():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sharded_vocab_head.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sharded and unsharded losses match" in proc.stdout


# --------------------------------------------------------------------------------------
# cross_entropy's options: equal to the single-device jsoftmax.cross_entropy.
# --------------------------------------------------------------------------------------

OPTION_CASES = {
    "smoothing": dict(label_smoothing=0.1),
    "temperature": dict(temperature="rows"),
    "ignore_index": dict(ignore_index=-100),
    "weights": dict(weights=True),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(logit_softcap=4.0),
    # -inf logits (excluded classes) without a mask: the backward pass has no select
    # on the valid classes there.
    "softcap+temperature+inf": dict(logit_softcap=4.0, temperature="rows", neg_inf=True),
    "all+mask": dict(
        label_smoothing=0.2,
        temperature="rows",
        ignore_index=-100,
        weights=True,
        z_loss=1e-2,
        logit_softcap=4.0,
        where=True,
    ),
    "smoothing+weights+mask": dict(label_smoothing=0.3, weights=True, where=True),
    "example-mask": dict(where="rows", label_smoothing=0.1),
}
OPTION_MESHES = [((8,), ("c",), None), ((2, 4), ("b", "c"), "b")]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize(
    "mesh_shape, names, rows_axis",
    fast_subset(OPTION_MESHES, OPTION_MESHES[1:], unpack=True),
    ids=["8", "2x4"],
)
@pytest.mark.parametrize(
    "case", fast_subset(list(OPTION_CASES), ["all+mask", "example-mask"]), ids=list(OPTION_CASES)
)
def test_sharded_cross_entropy_options(case, mesh_shape, names, rows_axis, reduction):
    """Values and gradients (logits, temperature) equal jsoftmax.cross_entropy's."""
    opts = dict(OPTION_CASES[case])
    mesh = mesh_of(mesh_shape, names)
    rng = np.random.default_rng(30)
    xh = _logits(31)
    yh = rng.integers(0, N, size=B)
    spec, rows = P(rows_axis, "c"), P(rows_axis)
    args = {"x": xh, "t": 0.5 + rng.random(B)}
    kw = {}
    if opts.pop("temperature", None):
        kw["temperature"] = None  # filled with the traced argument below
    if opts.pop("neg_inf", None):
        # On every shard of 8, off the labels; row 0 has only one finite class left.
        xh[:, [1, 9, 17, 26]] = -np.inf
        xh[0, np.arange(N) != yh[0]] = -np.inf
    if opts.get("ignore_index") is not None:
        yh[[1, 5]] = opts["ignore_index"]
    if opts.pop("weights", None):
        args["w"] = rng.random(N) + 0.5
    where = opts.pop("where", None)
    if where is True:
        args["m"] = _mask(32)
        args["m"][:, 0] = True  # row labels below land on live classes or class 0
        yh[3] = np.flatnonzero(~args["m"][3])[0]  # a label on a masked class
    elif where == "rows":
        args["m"] = np.arange(B) % 3 != 1
    args["y"] = yh
    specs = {"x": spec, "t": rows, "w": P("c"), "m": spec if where is True else rows, "y": rows}
    names_ = list(args)

    def body(*a):
        d = dict(zip(names_, a, strict=True))
        extra = dict(weights=d.get("w"), where=d.get("m"))
        if "temperature" in kw:
            extra["temperature"] = d["t"]
        data = rows_axis if reduction != "none" else None
        return sharded.cross_entropy(
            d["x"], d["y"], "c", reduction=reduction, data_axis_name=data, **extra, **opts
        )

    out_spec = rows if reduction == "none" else P()
    f = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs[k] for k in names_), out_specs=out_spec)
    placed = [put(args[k], mesh, specs[k]) for k in names_]
    cot = np.linspace(0.5, 2.0, B) if reduction == "none" else 1.0
    diff = [i for i, k in enumerate(names_) if k == "x" or (k == "t" and "temperature" in kw)]
    with jax.set_mesh(mesh):
        loss = jax.jit(f)(*placed)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=diff))(*placed)

    def single(*a):
        d = dict(zip(names_, a, strict=True))
        extra = dict(weights=d.get("w"), where=d.get("m"))
        if "temperature" in kw:
            extra["temperature"] = d["t"]
        return jsoftmax.cross_entropy(d["x"], d["y"], reduction=reduction, **extra, **opts)

    unsharded = [jnp.asarray(args[k]) for k in names_]
    ref = single(*unsharded)
    ref_grads = jax.grad(lambda *a: jnp.sum(single(*a) * cot), argnums=diff)(*unsharded)
    assert np.all(np.isfinite(host(loss)))
    np.testing.assert_allclose(host(loss), ref, **F64)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(host(g), r, **F64)
    if opts.get("ignore_index") is not None and reduction == "none":
        assert np.all(host(loss)[[1, 5]] == 0.0) and np.all(host(grads[0])[[1, 5]] == 0.0)


def test_padded_classes_get_no_smoothing_mass_or_weight():
    n_real = 27
    mesh, spec = _mesh8()
    xh = _logits(33, shape=(B, n_real))
    yh = np.array([0, 26, 5, 13, 20, 26, 1, 8])
    wh = np.random.default_rng(34).random(n_real) + 0.5
    pad = lambda a, v: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, N - n_real)], constant_values=v)
    opts = dict(label_smoothing=0.2, z_loss=1e-2, reduction="mean")
    body = lambda x, y, w: sharded.cross_entropy(x, y, "c", num_classes=n_real, weights=w, **opts)
    f = jax.shard_map(body, mesh=mesh, in_specs=(spec, P(), P("c")), out_specs=P())
    args = (put(pad(xh, 1e30), mesh, spec), put(yh, mesh, P()), put(pad(wh, 7.0), mesh, P("c")))
    with jax.set_mesh(mesh):
        loss = jax.jit(f)(*args)
        grad = jax.jit(jax.grad(f))(*args)
    single = lambda x: jsoftmax.cross_entropy(x, yh, weights=wh, **opts)
    np.testing.assert_allclose(host(loss), single(xh), **F64)
    np.testing.assert_allclose(host(grad)[:, :n_real], jax.grad(single)(xh), **F64)
    assert np.all(host(grad)[:, n_real:] == 0.0)
