"""jsoftmax.sharded.linear_cross_entropy: the fused output layer + loss, vocabulary split.

Runs on the eight simulated CPU devices of conftest.py, on a vocabulary-only mesh (8,)
and a (data, vocab) mesh (2, 4). References: the dense loss
``jsoftmax.cross_entropy(x @ w + b, ...)`` in float64 (float32 where float64 is off) and
its autodiff gradients, and the one-device ``jsoftmax.linear_cross_entropy``. Collectives
are counted in the compiled HLO.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax
from jsoftmax import sharded

from helpers import REF_DTYPE, collectives, compiled_hlo, cpu_device_count, cpu_mesh, tol

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        cpu_device_count() < 8, reason="needs 8 CPU devices (conftest.py simulates them)"
    ),
]


# Tolerances against the references, in REF_DTYPE (the name is from float64).
F64 = tol(REF_DTYPE, dict(rtol=1e-11, atol=1e-11), dict(rtol=2e-6, atol=2e-6))
ROWS, H, V = 12, 8, 64
MESHES = {"8": ((8,), ("v",), None), "2x4": ((2, 4), ("d", "v"), "d")}

CASES = {
    "plain": {},
    "all": dict(
        label_smoothing=0.2,
        z_loss=1e-2,
        logit_softcap=3.0,
        ignore_index=-100,
        weights=True,
        bias=True,
    ),
    "smoothing+bias": dict(label_smoothing=0.1, bias=True),
    "padded": dict(num_classes=59, label_smoothing=0.1, weights=True, bias=True),
}


def _data(case, seed=0):
    rng = np.random.default_rng(seed)
    n = case.get("num_classes", V)
    x = rng.normal(size=(ROWS, H))
    w = rng.normal(size=(H, V)) / 2
    y = rng.integers(0, n, size=ROWS)
    b = rng.normal(size=V) if case.get("bias") else None
    wt = rng.random(V) + 0.5 if case.get("weights") else None
    if b is not None:
        b[[5, 40]] = -np.inf  # excluded classes
        y[2] = 40  # a label on one: the row does not count
    if case.get("ignore_index") is not None:
        y[[4, 7]] = case["ignore_index"]
    x, w, b, wt = (None if a is None else a.astype(REF_DTYPE) for a in (x, w, b, wt))
    return x, w, y, b, wt


def _dense(x, w, y, b, wt, n, reduction, opts):
    """The dense loss over the first n classes (jsoftmax.cross_entropy)."""
    z = x @ w[:, :n] + (0.0 if b is None else b[None, :n])
    live = None if b is None else jnp.asarray(b[:n] > -np.inf)
    where = None if b is None else live[None, :]
    weights = None if wt is None else wt[:n]
    yy = jnp.asarray(y)
    if where is not None:  # a label on an excluded class counts as ignored
        ig = opts.get("ignore_index", -1)
        yy = jnp.where((yy >= 0) & ~live[jnp.clip(yy, 0, n - 1)], ig, yy)
        opts = dict(opts, ignore_index=ig)
    return jsoftmax.cross_entropy(z, yy, where=where, weights=weights, reduction=reduction, **opts)


def _run(mesh_name, case, reduction, chunk_size=5, hlo=False):
    shape, names, data = MESHES[mesh_name]
    mesh = cpu_mesh(shape, names)
    opts = {k: v for k, v in case.items() if k not in ("weights", "bias", "num_classes")}
    n = case.get("num_classes", V)
    x, w, y, b, wt = _data(case)
    rows = P(data)
    args = [x, w, y] + [a for a in (b, wt) if a is not None]
    specs = [P(data, None), P(None, "v"), rows] + [P("v")] * (len(args) - 3)

    def body(x, w, y, *rest):
        rest = list(rest)
        bias = rest.pop(0) if b is not None else None
        weights = rest.pop(0) if wt is not None else None
        return sharded.linear_cross_entropy(
            x, w, y, "v", bias_shard=bias, weights=weights, reduction=reduction,
            chunk_size=chunk_size, num_classes=case.get("num_classes"),
            data_axis_name=data if reduction != "none" else None, **opts,
        )  # fmt: skip

    f = jax.shard_map(
        body, mesh=mesh, in_specs=tuple(specs), out_specs=rows if reduction == "none" else P()
    )
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)]
    cot = np.linspace(0.5, 2.0, ROWS) if reduction == "none" else 1.0
    argnums = (0, 1) + ((3,) if b is not None else ())
    with jax.set_mesh(mesh):
        loss = jax.jit(f)(*placed)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=argnums))(*placed)
        if hlo:
            hlo = {
                "forward": compiled_hlo(f, *placed),
                "grad": compiled_hlo(
                    jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=argnums), *placed
                ),
            }
    return (x, w, y, b, wt, n, opts, cot), loss, grads, hlo, mesh


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_values_and_gradients_match_dense_and_one_device(mesh_name, case, reduction):
    (x, w, y, b, wt, n, opts, cot), loss, grads, _, _ = _run(mesh_name, CASES[case], reduction)

    def dense(x, w, b):
        return jnp.sum(_dense(x, w, y, b, wt, n, reduction, opts) * cot)

    argnums = (0, 1) + ((2,) if b is not None else ())
    ref = _dense(x, w, y, b, wt, n, reduction, opts)
    ref_grads = jax.grad(dense, argnums=argnums)(jnp.asarray(x), jnp.asarray(w), b)
    np.testing.assert_allclose(np.asarray(loss), ref, **F64)
    assert np.all(np.isfinite(np.asarray(loss)))
    for g, r in zip(grads, ref_grads, strict=True):
        g = np.asarray(g)
        np.testing.assert_allclose(g[..., :n], np.asarray(r)[..., :n], **F64)
        assert np.all(g[..., n:] == 0.0)  # padded columns
    if case == "plain":  # the one-device fused loss, too
        one = jsoftmax.linear_cross_entropy(x, w, y, reduction=reduction, chunk_size=7)
        np.testing.assert_allclose(np.asarray(loss), one, **F64)
        one_g = jax.grad(
            lambda x, w: jnp.sum(jsoftmax.linear_cross_entropy(x, w, y, reduction=reduction) * cot),
            argnums=(0, 1),
        )(x, w)
        for g, r in zip(grads, one_g, strict=True):
            np.testing.assert_allclose(np.asarray(g), r, **F64)


@pytest.mark.parametrize("case, reduction", [("plain", "none"), ("all", "mean")])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_collectives_are_per_row_scalars_and_one_dx_sum(mesh_name, case, reduction):
    """Forward: one all-reduce of the row maxima and one of the other per-row numbers
    (plus, for a mean over a data axis, one of two scalars). Backward: the sum of dx
    over the vocabulary axis (N_local * H values) and, with a data axis, the usual sum of
    dw (and db) over it; nothing of the size of the logits."""
    shape, names, data = MESHES[mesh_name]
    *_, hlo, _ = _run(mesh_name, CASES[case], reduction, hlo=True)
    rows = ROWS // (shape[0] if data else 1)
    v_local = V // shape[-1]
    fwd, grad = collectives(hlo["forward"]), collectives(hlo["grad"])
    assert all(op == "all-reduce" for op, _ in fwd + grad), (fwd, grad)
    big = lambda found: sorted(s for _, sizes in found for s in sizes if s > rows)  # noqa: E731
    scalar_rounds = lambda found: sum(all(s <= rows for s in sz) for _, sz in found)  # noqa: E731
    data_mean = data is not None and reduction == "mean"
    assert big(fwd) == [] and scalar_rounds(fwd) == 2 + data_mean, fwd
    expect = [rows * H]
    if data is not None:  # dw (and db) of the shard's columns, summed over the data axis
        expect += [H * v_local] + ([v_local] if CASES[case].get("bias") else [])
    assert big(grad) == sorted(expect), grad
    assert scalar_rounds(grad) <= 3, grad


def test_bench_rows_for_the_fused_sharded_loss():
    from jsoftmax.tools.bench import _sharded
    from jsoftmax.tools.bench._timing import Ctx

    shape = (1024, 16, 8192)  # 2048 columns per device, chunks of 1024
    rows = _sharded.fused(Ctx(repeats=1, min_sample_s=0.0), devices=4, shape=shape)
    assert [r.baseline for r in rows] == [
        "x @ w_shard + jsoftmax.sharded.cross_entropy",
        "jsoftmax.linear_cross_entropy, 1 device",
    ]
    for r in rows:
        assert r.group == "sharded" and r.unit == "bytes" and r.shape == list(shape)
        assert r.case == "fused loss temporaries per device, vocab over 4 devices"
        assert r.note == ""  # the fused sharded loss and gradients agree with one device
        assert r.ratio == pytest.approx(r.baseline_value / r.candidate_value)
    # The sharded dense loss holds at least its block of logits (N * V / 4 float32) in
    # temporaries; the fused one holds one chunk of it.
    assert rows[0].baseline_value >= 1024 * 8192 // 4 * 4 > rows[0].candidate_value


def _mesh8():
    return cpu_mesh((8,), ("v",))


def _call(mesh, x, w, y, **kw):
    f = jax.shard_map(
        lambda x, w, y: sharded.linear_cross_entropy(x, w, y, "v", **kw),
        mesh=mesh,
        in_specs=(P(), P(None, "v"), P()),
        out_specs=P(),
    )
    with jax.set_mesh(mesh):
        return jax.jit(f)(x, jax.device_put(w, NamedSharding(mesh, P(None, "v"))), y)


def test_out_of_range_labels_give_nan_rows_and_low_precision_is_float32():
    mesh = _mesh8()
    x, w, y, _, _ = _data({}, seed=3)
    y[:2] = [-1, V]
    loss = np.asarray(_call(mesh, x, w, y))
    assert np.all(np.isnan(loss[:2]))
    ref = jsoftmax.cross_entropy(x[2:] @ w, y[2:])
    np.testing.assert_allclose(loss[2:], ref, **F64)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    y_ok = np.abs(y) % V
    lb = _call(mesh, xb, wb, y_ok)
    assert lb.dtype == jnp.float32
    one = jsoftmax.linear_cross_entropy(xb, wb, y_ok)
    np.testing.assert_allclose(np.asarray(lb), np.asarray(one), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_an_empty_batch_gives_what_the_dense_loss_gives(reduction):
    # Regression: with no rows the chunk loop's carry lost its mesh axes and raised.
    mesh = _mesh8()
    _, w, _, _, _ = _data({}, seed=4)
    x, y = np.zeros((2, 0, w.shape[0]), w.dtype), np.zeros((2, 0), np.int32)
    got = _call(mesh, x, w, y, reduction=reduction)
    want = jsoftmax.linear_cross_entropy(x, w, y, reduction=reduction)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    lp = jax.shard_map(
        lambda x, w, y: sharded.linear_token_log_probs(x, w, y, "v", return_entropy=True),
        mesh=mesh,
        in_specs=(P(), P(None, "v"), P()),
        out_specs=P(),
    )
    with jax.set_mesh(mesh):
        out = jax.jit(lp)(x, jax.device_put(w, NamedSharding(mesh, P(None, "v"))), y)
    assert [a.shape for a in out] == [(2, 0), (2, 0)]


def test_argument_errors():
    mesh = _mesh8()
    x, w, y, _, _ = _data({})
    with pytest.raises(TypeError, match="labels must be integer"):
        _call(mesh, x, w, y.astype(float))
    with pytest.raises(ValueError, match="H = x.shape"):
        _call(mesh, x[:, :3], w, y)
    with pytest.raises(ValueError, match="this shard's block"):
        _call(mesh, x, w, y, weights=jnp.ones(V))
    with pytest.raises(ValueError, match="num_classes=65"):
        _call(mesh, x, w, y, num_classes=65)
    with pytest.raises(ValueError, match="data_axis_name"):
        _call(mesh, x, w, y, reduction="mean", data_axis_name="v")
    with pytest.raises(ValueError, match="shard_map"):
        sharded.linear_cross_entropy(x, w, y, "v")


def test_batch_dims_and_vocabulary_over_two_mesh_axes():
    mesh = cpu_mesh((2, 4), ("a", "v"))
    x, w, y, _, _ = _data({}, seed=4)
    x3, y3 = x.reshape(3, 4, H), y.reshape(3, 4)
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    f = jax.shard_map(
        lambda x, w, y: sharded.linear_cross_entropy(x, w, y, ("a", "v"), chunk_size=3, **opts),
        mesh=mesh,
        in_specs=(P(), P(None, ("a", "v")), P()),
        out_specs=P(),
    )
    wd = jax.device_put(w, NamedSharding(mesh, P(None, ("a", "v"))))
    cot = np.linspace(0.5, 2.0, ROWS).reshape(3, 4)
    with jax.set_mesh(mesh):
        loss = jax.jit(f)(x3, wd, y3)
        gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w, y3) * cot), (0, 1)))(x3, wd)
    dense = lambda x, w: jsoftmax.cross_entropy(x @ w, y3, **opts)  # noqa: E731
    np.testing.assert_allclose(np.asarray(loss), dense(x3, w), **F64)
    rx, rw = jax.grad(lambda x, w: jnp.sum(dense(x, w) * cot), (0, 1))(x3, w)
    np.testing.assert_allclose(np.asarray(gx), rx, **F64)
    np.testing.assert_allclose(np.asarray(gw), rw, **F64)
