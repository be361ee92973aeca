"""jsoftmax.sharded.cross_entropy with probability labels split like the logits.

Runs on the eight simulated CPU devices of conftest.py, on a class-only mesh (8,) and a
(rows, classes) mesh (2, 4). References: the single-device ``jsoftmax.cross_entropy``
on the unsharded float64 arrays and its autodiff gradients (logits, labels,
temperature), and for the plain loss the dense ``-sum(y * jax.nn.log_softmax(z))``.
Collectives are counted in the compiled HLO.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jsoftmax
from jsoftmax import sharded

from helpers import collectives, compiled_hlo, cpu_device_count, fast_subset, host, mesh_of, put

pytestmark = [
    pytest.mark.x64,  # float64 references built with JAX
    pytest.mark.skipif(
        cpu_device_count() < 8, reason="needs 8 CPU devices (conftest.py simulates them)"
    ),
]

F64 = dict(rtol=1e-12, atol=1e-12)
B, N = 8, 32
MESHES = {"8": ((8,), ("c",), None), "2x4": ((2, 4), ("b", "c"), "b")}

CASES = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "temperature": dict(temperature=True),
    "weights": dict(weights=True),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(logit_softcap=4.0),
    "class-mask": dict(where="classes"),
    "example-mask": dict(where="rows", label_smoothing=0.1),
    "smoothing+weights+mask": dict(label_smoothing=0.3, weights=True, where="classes"),
    "all": dict(
        label_smoothing=0.2,
        temperature=True,
        weights=True,
        z_loss=1e-2,
        logit_softcap=4.0,
        where="classes",
    ),
}


def _labels(rng, shape=(B, N)):
    """Probability rows with exact zeros; row 4 is not normalised (sum 1.7)."""
    y = rng.random(shape) * (rng.random(shape) > 0.25)
    y = y / y.sum(-1, keepdims=True)
    y[4] *= 1.7
    return y


def _class_mask(rng):
    where = rng.random((B, N)) > 0.3
    where[0] = False  # a fully masked row: loss 0, not counted
    where[1, : N // 2] = False  # the first shards see no valid class in this row
    where[2, :] = False
    where[2, N - 1] = True  # a single valid class, on the last shard
    return where


def _data(case, seed=0):
    rng = np.random.default_rng(seed)
    args = {"x": rng.normal(scale=3.0, size=(B, N)), "y": _labels(rng)}
    if case.get("temperature"):
        args["t"] = 0.5 + rng.random(B)
    if case.get("weights"):
        args["w"] = rng.random(N) + 0.5
    if case.get("where") == "classes":
        args["m"] = _class_mask(rng)
    elif case.get("where") == "rows":
        args["m"] = np.arange(B) % 3 != 1
    return args


def _specs(case, rows_axis):
    spec, rows = P(rows_axis, "c"), P(rows_axis)
    m = spec if case.get("where") == "classes" else rows
    return {"x": spec, "y": spec, "t": rows, "w": P("c"), "m": m}


def _kwargs(d, case):
    """The keyword arguments of both losses from the named arrays ``d``."""
    kw = {k: v for k, v in case.items() if k not in ("temperature", "weights", "where")}
    if "t" in d:
        kw["temperature"] = d["t"]
    if "w" in d:
        kw["weights"] = d["w"]
    if "m" in d:
        kw["where"] = d["m"]
    return kw


@pytest.mark.parametrize("reduction", fast_subset(["none", "sum", "mean"], ["none", "mean"]))
@pytest.mark.parametrize("mesh_id", fast_subset(list(MESHES), ["2x4"]))
@pytest.mark.parametrize("case_id", fast_subset(list(CASES), ["plain", "all"]))
def test_matches_single_device(case_id, mesh_id, reduction):
    """Values and gradients (logits, labels, temperature) equal jsoftmax.cross_entropy's."""
    case = CASES[case_id]
    mesh_shape, names, rows_axis = MESHES[mesh_id]
    mesh = mesh_of(mesh_shape, names)
    args = _data(case)
    keys = list(args)
    specs = _specs(case, rows_axis)
    data = rows_axis if reduction != "none" else None

    def body(*a):
        d = dict(zip(keys, a, strict=True))
        return sharded.cross_entropy(
            d["x"], d["y"], "c", reduction=reduction, data_axis_name=data, **_kwargs(d, case)
        )

    out_spec = P(rows_axis) if reduction == "none" else P()
    f = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs[k] for k in keys), out_specs=out_spec)
    placed = [put(args[k], mesh, specs[k]) for k in keys]
    cot = np.linspace(0.5, 2.0, B) if reduction == "none" else 1.0
    diff = tuple(i for i, k in enumerate(keys) if k in ("x", "y", "t"))
    with jax.set_mesh(mesh):
        loss = jax.jit(f)(*placed)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=diff))(*placed)

    def single(*a):
        d = dict(zip(keys, a, strict=True))
        return jsoftmax.cross_entropy(d["x"], d["y"], reduction=reduction, **_kwargs(d, case))

    unsharded = [jnp.asarray(args[k]) for k in keys]
    ref = single(*unsharded)
    ref_grads = jax.grad(lambda *a: jnp.sum(single(*a) * cot), argnums=diff)(*unsharded)
    assert loss.dtype == jnp.float64
    assert np.all(np.isfinite(host(loss)))
    np.testing.assert_allclose(host(loss), ref, **F64)
    for g, r in zip(grads, ref_grads, strict=True):
        assert np.all(np.isfinite(host(g)))
        np.testing.assert_allclose(host(g), r, **F64)
    if case_id == "plain":  # and an outside reference
        x, y = jnp.asarray(args["x"]), jnp.asarray(args["y"])
        dense = lambda x, y: -jnp.sum(y * jax.nn.log_softmax(x), -1)  # noqa: E731
        per_row = dense(x, y)
        expect = {"none": per_row, "sum": jnp.sum(per_row), "mean": jnp.mean(per_row)}
        np.testing.assert_allclose(host(loss), expect[reduction], **F64)
        dense_grads = jax.grad(lambda x, y: jnp.sum(dense(x, y) * cot), argnums=(0, 1))(x, y)
        if reduction == "mean":
            dense_grads = [g / B for g in dense_grads]
        for g, r in zip(grads, dense_grads, strict=True):
            np.testing.assert_allclose(host(g), r, **F64)
    if "m" in args and args["m"].ndim == 2 and reduction == "none":
        # Masked classes get zero gradient; the fully masked row 0 gives 0.
        assert host(loss)[0] == 0.0
        assert np.all(host(grads[0])[~args["m"]] == 0.0)
        assert np.all(host(grads[1])[~args["m"]] == 0.0)


def test_edge_cases_match_single_device():
    """-inf logits with and without target mass, +inf and NaN logits, a fully masked row."""
    mesh = mesh_of((8,), ("c",))
    spec = P(None, "c")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, N))
    y = _labels(rng, (6, N))
    x[0, 5] = -np.inf
    y[0, 5] = 0.0  # no target mass on the -inf logit: finite
    x[1, 30] = -np.inf
    y[1, 30] = 0.25  # target mass on a -inf logit (an excluded class): dropped, finite
    x[2, 7] = np.inf
    x[3, 12] = np.nan
    x[4, :] = -np.inf
    y[4, :] = 0.0  # no finite logit and no target mass: 0
    where = np.ones((6, N), bool)
    where[5] = False  # fully masked: 0, not counted
    x[5, 3] = np.nan  # masked, so harmless
    body = lambda x, y, m: sharded.cross_entropy(x, y, "c", where=m)  # noqa: E731
    f = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=P())
    mean = lambda x, y, m: jnp.mean(f(x, y, m))  # noqa: E731
    placed = [put(a, mesh, spec) for a in (x, y, where)]
    with jax.set_mesh(mesh):
        loss = host(jax.jit(f)(*placed))
        gx, gy = (host(g) for g in jax.jit(jax.grad(mean, argnums=(0, 1)))(*placed))
        mean_ok = jax.jit(
            jax.shard_map(
                lambda x, y, m: sharded.cross_entropy(x, y, "c", where=m, reduction="mean"),
                mesh=mesh,
                in_specs=(spec, spec, spec),
                out_specs=P(),
            )
        )(*(put(a[[0, 5]], mesh, spec) for a in (x, y, where)))
    single = lambda x, y: jsoftmax.cross_entropy(x, y, where=where)  # noqa: E731
    ref = single(x, y)
    rx, ry = jax.grad(lambda x, y: jnp.mean(single(x, y)), argnums=(0, 1))(x, y)
    assert np.isfinite(loss[0]) and np.isfinite(loss[1]) and np.all(np.isnan(loss[2:4]))
    assert loss[4] == 0.0 and loss[5] == 0.0
    np.testing.assert_allclose(loss, ref, **F64)  # NaN and inf in the same places
    for g, r in [(gx, rx), (gy, ry)]:
        np.testing.assert_allclose(g, r, **F64)
        assert np.all(np.isfinite(g[[0, 1, 4, 5]])) and np.all(g[5] == 0.0)
    # The fully masked row is not in the "mean" denominator: the mean of [row 0, row 5]
    # is row 0's loss.
    np.testing.assert_allclose(host(mean_ok), loss[0], **F64)


def test_padding_with_num_classes_matches_unpadded():
    n_real = 27  # padded to 32 with logits 1e30 (masked) and labels 0
    mesh = mesh_of((2, 4), ("b", "c"))
    spec = P("b", "c")
    rng = np.random.default_rng(2)
    x, y, w = rng.normal(size=(B, n_real)), _labels(rng, (B, n_real)), rng.random(n_real) + 0.5
    pad = lambda a, v: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, N - n_real)], constant_values=v)  # noqa: E731
    opts = dict(label_smoothing=0.2, z_loss=1e-2, reduction="mean")
    body = lambda x, y, w: sharded.cross_entropy(  # noqa: E731
        x, y, "c", num_classes=n_real, weights=w, data_axis_name="b", **opts
    )
    f = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, P("c")), out_specs=P())
    placed = (put(pad(x, 1e30), mesh, spec), put(pad(y, 0.0), mesh, spec))
    placed += (put(pad(w, 7.0), mesh, P("c")),)
    with jax.set_mesh(mesh):
        loss = jax.jit(f)(*placed)
        gx, gy = jax.jit(jax.grad(f, argnums=(0, 1)))(*placed)
    single = lambda x, y: jsoftmax.cross_entropy(x, y, weights=w, **opts)  # noqa: E731
    rx, ry = jax.grad(single, argnums=(0, 1))(x, y)
    np.testing.assert_allclose(host(loss), single(x, y), **F64)
    np.testing.assert_allclose(host(gx)[:, :n_real], rx, **F64)
    np.testing.assert_allclose(host(gy)[:, :n_real], ry, **F64)
    assert np.all(host(gx)[:, n_real:] == 0.0) and np.all(host(gy)[:, n_real:] == 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_16bit_loss_is_float32(dtype, reduction):
    """A float32 loss (as jsoftmax.cross_entropy), gradients in the inputs' dtypes."""
    mesh = mesh_of((2, 4), ("b", "c"))
    spec = P("b", "c")
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(scale=3.0, size=(B, N)), dtype)
    y = jnp.asarray(_labels(rng), dtype)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    data = "b" if reduction == "mean" else None
    body = lambda x, y: sharded.cross_entropy(x, y, "c", data_axis_name=data, **opts)  # noqa: E731
    out_spec = P("b") if reduction == "none" else P()
    f = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=out_spec)
    placed = (put(x, mesh, spec), put(y, mesh, spec))
    with jax.set_mesh(mesh):
        loss = jax.jit(f)(*placed)
        gx, gy = jax.jit(jax.grad(lambda x, y: jnp.sum(f(x, y)), argnums=(0, 1)))(*placed)
    single = lambda x, y: jnp.sum(jsoftmax.cross_entropy(x, y, **opts))  # noqa: E731
    rx, ry = jax.grad(single, argnums=(0, 1))(x, y)
    assert loss.dtype == jnp.float32 and gx.dtype == dtype and gy.dtype == dtype
    # Both compute in float32 from the same 16-bit inputs: equal to float32 rounding.
    ref = jsoftmax.cross_entropy(x, y, **opts)
    assert ref.dtype == jnp.float32
    np.testing.assert_allclose(host(loss), ref, rtol=1e-5, atol=1e-5)
    ulp = dict(rtol=2.0 ** -(jnp.finfo(dtype).nmant - 1), atol=1e-3)
    for g, r in [(gx, rx), (gy, ry)]:
        np.testing.assert_allclose(host(g).astype(np.float32), np.asarray(r, np.float32), **ulp)
    # ... and a float64 reference of the same loss, to 16-bit input precision.
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ref64 = jsoftmax.cross_entropy(x64, y64, **opts)
    np.testing.assert_allclose(host(loss), ref64, rtol=1e-5, atol=1e-5)


def test_collectives_with_every_option():
    """Two forward all-reduces (max; everything else), one scalar per row each, and the
    temperature's one in the backward pass: the options add operands, not rounds."""
    mesh = mesh_of((2, 4), ("b", "c"))
    case = CASES["all"]
    args = _data(case)
    keys = list(args)
    specs = _specs(case, "b")
    body = lambda *a: sharded.cross_entropy(  # noqa: E731
        a[0], a[1], "c", **_kwargs(dict(zip(keys, a, strict=True)), case)
    )
    f = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs[k] for k in keys), out_specs=P("b"))
    placed = [put(args[k], mesh, specs[k]) for k in keys]
    grad = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2))
    with jax.set_mesh(mesh):
        fwd = collectives(compiled_hlo(f, *placed))
        bwd = collectives(compiled_hlo(grad, *placed))
    rows = B // 2
    assert [op for op, _ in fwd] == ["all-reduce"] * 2, fwd
    assert all(size == rows for _, sizes in fwd + bwd for size in sizes), (fwd, bwd)
    assert sorted(len(s) for _, s in fwd)[0] == 1  # the row max alone
    # forward (recomputed with the gradient) + the temperature's <dl/ds, s>
    assert [op for op, _ in bwd] == ["all-reduce"] * 3, bwd


def test_bad_labels():
    mesh = mesh_of((8,), ("c",))
    spec = P(None, "c")
    x = put(np.zeros((2, N)), mesh, spec)

    def run(y, y_spec, **kw):
        body = lambda x, y: sharded.cross_entropy(x, y, "c", **kw)  # noqa: E731
        f = jax.shard_map(body, mesh=mesh, in_specs=(spec, y_spec), out_specs=P())
        with jax.set_mesh(mesh):
            return f(x, put(y, mesh, y_spec))

    # float labels with the batch shape: a shape error that names labels and hints at ints
    with pytest.raises(ValueError, match=r"float labels .*logits_shard.*\(2, 4\).*integer dtype"):
        run(np.zeros(2), P())
    # float labels replicated (the full class axis on every shard): wrong local shape
    with pytest.raises(ValueError, match=r"float labels .*\(2, 4\).*split .*\(2, 32\)"):
        run(np.zeros((2, N)), P())
    # integer labels of the logits' shape: points to float labels
    with pytest.raises(ValueError, match=r"integer labels .*\(2,\).*float labels"):
        run(np.zeros((2, N), np.int32), spec)
    with pytest.raises(TypeError, match="labels must be integer class indices or real"):
        run(np.zeros((2, N), bool), spec)
    with pytest.raises(ValueError, match="ignore_index applies to integer"):
        run(np.zeros((2, N)), spec, ignore_index=-100)
