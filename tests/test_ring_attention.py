"""jsoftmax.sharded.attention (ring attention) on simulated CPU devices: values, lse and
gradients against the unsharded jsoftmax.attention and a dense reference written here
(float64 where enabled, `jax.grad` of it for the gradients); the collectives of the
compiled program (the keys and values move only by collective-permute); per-device
memory; argument errors."""

from __future__ import annotations

import functools
import math
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax
from jsoftmax import sharded

from helpers import EXHAUSTIVE, REF_DTYPE, X64, cpu_mesh, f64

# float64: within 1e-9 of the reference, relative to the largest entry of the reference.
RTOL = 1e-9 if X64 else 3e-5

# Global shapes: 64 positions over up to 8 devices (8 each, in chunks of 4).
B, T, N, K, H, HV = 2, 64, 4, 2, 8, 6
CHUNK = 4


def assert_rel(a, b, name=""):
    a, b = f64(a), f64(b)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    err = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    assert err <= RTOL * scale, f"{name}: max error {err:.3e} > {RTOL:.1e} * {scale:.3e}"


# --------------------------------------------------------------------------------------
# The dense reference: the (B, N, T, T) scores from the definitions.
# --------------------------------------------------------------------------------------


def dense(q, k, v, *, is_causal=False, local_window_size=None, q_segment_ids=None,
          kv_segment_ids=None, logit_softcap=None, sinks=None):  # fmt: skip
    """`(out, lse)` of softmax attention over all T positions (every row sees at least
    its own key, so no row is empty)."""
    t, n, h = q.shape[1], q.shape[2], q.shape[3]
    group = n // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    z = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(h)
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    qp, kp = jnp.arange(t)[None, :, None], jnp.arange(t)[None, None, :]
    visible = jnp.ones((1, t, t), bool)
    if is_causal:
        visible = visible & (kp <= qp)
    if local_window_size is not None:
        left, right = local_window_size
        visible = visible & (kp >= qp - left) & (kp <= qp + right)
    if q_segment_ids is not None:
        visible = visible & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    z = jnp.where(visible[:, None], z, -jnp.inf)
    if sinks is not None:
        sink = jnp.broadcast_to(sinks[None, :, None, None], z.shape[:3] + (1,))
        z = jnp.concatenate([z, sink], axis=-1)
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    lse = m + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True))
    p = jnp.exp(z - lse)[..., :t]
    out = jnp.einsum("bnts,bsnh->btnh", p, v)
    return out, jnp.transpose(lse[..., 0], (0, 2, 1))


# --------------------------------------------------------------------------------------
# Inputs, options and meshes.
# --------------------------------------------------------------------------------------


def inputs(kh=K, dtype=REF_DTYPE, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H))
    k = rng.standard_normal((B, T, kh, H))
    v = rng.standard_normal((B, T, kh, HV))
    sinks = rng.standard_normal(N)
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v, sinks))


def segments():
    """Packed sequences whose boundaries fall inside and between the devices' blocks."""
    ends = [[5, 19, 40, 64], [30, 33, 64, 64]]
    ids = np.stack([np.searchsorted(np.array(e), np.arange(T), side="right") for e in ends])
    return jnp.asarray(ids, jnp.int32)


OPTIONS = {
    "plain": {},
    "causal": dict(is_causal=True),
    "window": dict(local_window_size=(11, 3)),
    "segments": dict(segments=True),
    "softcap": dict(logit_softcap=2.0),
    "sinks": dict(sinks=True),
    "gqa": dict(kh=1),
    # With chunks of 3 that do not divide a device's block (the kernel pads).
    "all": dict(is_causal=True, local_window_size=(20, 0), segments=True, logit_softcap=2.0,
                sinks=True, kh=1, chunk_size=3),
}  # fmt: skip

# (mesh shape, mesh axis names, batch axis, sequence axis name(s)).
MESHES = {
    "sp8": ((8,), ("sp",), None, "sp"),
    "dp2xsp4": ((2, 4), ("dp", "sp"), "dp", "sp"),
    "tuple2x4": ((2, 4), ("x", "y"), None, ("x", "y")),
    # The sequence split over the mesh axes in the other order (ppermute numbers the
    # devices in the mesh's order; a regression: the ring passed blocks out of order).
    "tuple2x4_reversed": ((2, 4), ("x", "y"), None, ("y", "x")),
}


def _setup(option: str, mesh_name: str):
    opts = dict(OPTIONS[option])
    q, k, v, sinks = inputs(kh=opts.pop("kh", K))
    seg = segments() if opts.pop("segments", False) else None
    sinks = sinks if opts.pop("sinks", False) else None
    shape, names, batch, seq = MESHES[mesh_name]
    mesh = cpu_mesh(shape, names, (AxisType.Explicit,) * len(names))
    return (q, k, v, seg, sinks), opts, mesh, batch, seq


def _ring_fn(mesh, batch, seq, opts, *, with_seg: bool, with_sinks: bool, **extra):
    """`f(q, k, v, seg, sinks) -> (out, lse)` of sharded.attention inside shard_map."""
    split = P(batch, seq)

    def body(q, k, v, seg, sinks):
        kw = dict(q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks, return_lse=True)
        return sharded.attention(q, k, v, seq, **kw, **{"chunk_size": CHUNK, **opts}, **extra)

    in_specs = (split, split, split, split if with_seg else None, P() if with_sinks else None)
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(split, split))


def _place(mesh, batch, seq, args):
    q, k, v, seg, sinks = args
    split = NamedSharding(mesh, P(batch, seq))
    put = lambda a, s: None if a is None else jax.device_put(a, s)  # noqa: E731
    return (put(q, split), put(k, split), put(v, split), put(seg, split),
            put(sinks, NamedSharding(mesh, P())))  # fmt: skip


def _value_and_grads(f, args):
    """`((out, lse), grads in q, k, v (and sinks))` of a loss through both outputs."""
    rng = np.random.default_rng(7)
    c_out = jnp.asarray(rng.standard_normal((B, T, N, HV)), REF_DTYPE)
    c_lse = jnp.asarray(rng.standard_normal((B, T, N)), REF_DTYPE)
    q, k, v, seg, sinks = args

    def loss(q, k, v, sinks):
        out, lse = f(q, k, v, seg, sinks)
        return jnp.sum(out * c_out) + jnp.sum(lse * c_lse), (out, lse)

    argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
    (_, values), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, sinks)
    return values, grads


def _unsharded(opts):
    def f(q, k, v, seg, sinks):
        return jsoftmax.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks,
                                  return_lse=True, **{"chunk_size": CHUNK, **opts})  # fmt: skip

    return f


def _dense(opts):
    def f(q, k, v, seg, sinks):
        kw = {name: value for name, value in opts.items() if name != "chunk_size"}
        return dense(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks, **kw)

    return f


def _compare(got, want, what):
    (out, lse), grads = got
    (out_r, lse_r), grads_r = want
    assert_rel(out, out_r, f"{what}: out")
    assert_rel(lse, lse_r, f"{what}: lse")
    assert len(grads) == len(grads_r)
    for name, g, g_r in zip("qkvs", grads, grads_r, strict=False):
        assert_rel(g, g_r, f"{what}: d{name}")


# --------------------------------------------------------------------------------------
# Values and gradients.
# --------------------------------------------------------------------------------------

# Every option on the 8-device ring and all the options together on each mesh (every
# option on every mesh with JSOFTMAX_TEST_EXHAUSTIVE=1); the fast suite runs all the
# options together on each mesh, and causality alone on one.
_CASES = [
    pytest.param(o, m, marks=() if o == "all" or (o, m) == ("causal", "sp8") else pytest.mark.slow)
    for m in MESHES
    for o in OPTIONS
    if EXHAUSTIVE or m == "sp8" or o == "all"
]


@functools.cache
def _references(option: str):
    """`(dense, unsharded)`: the values and gradients of the dense reference and of
    jsoftmax.attention on the whole sequence."""
    args, opts, *_ = _setup(option, "sp8")
    return _value_and_grads(_dense(opts), args), _value_and_grads(_unsharded(opts), args)


@pytest.mark.parametrize("option, mesh_name", _CASES)
def test_matches_unsharded_and_dense_reference(option, mesh_name):
    args, opts, mesh, batch, seq = _setup(option, mesh_name)
    with_seg, with_sinks = args[3] is not None, args[4] is not None
    ring = _ring_fn(mesh, batch, seq, opts, with_seg=with_seg, with_sinks=with_sinks)
    with jax.set_mesh(mesh):
        got = _value_and_grads(ring, _place(mesh, batch, seq, args))
    ref, unsharded = _references(option)
    _compare(got, ref, f"{option} on {mesh_name} vs dense")
    _compare(got, unsharded, f"{option} on {mesh_name} vs unsharded")
    _compare(unsharded, ref, f"{option} unsharded vs dense")


def test_output_only_loss_and_unbatched_input():
    # return_lse=False and (T, N, H) inputs: the lse's cotangent is zero.
    q, k, v, _ = inputs()
    q, k, v = q[1], k[1], v[1]
    mesh = cpu_mesh((8,), ("sp",), (AxisType.Explicit,))
    ring = jax.shard_map(
        lambda q, k, v: sharded.attention(q, k, v, "sp", is_causal=True, chunk_size=CHUNK),
        mesh=mesh, in_specs=P("sp"), out_specs=P("sp"),
    )  # fmt: skip
    c = jnp.asarray(np.random.default_rng(3).standard_normal((T, N, HV)), REF_DTYPE)

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * c), (0, 1, 2)))

    split = NamedSharding(mesh, P("sp"))
    with jax.set_mesh(mesh):
        got = loss(ring)(*jax.device_put((q, k, v), split))
    want = loss(lambda q, k, v: dense(q[None], k[None], v[None], is_causal=True)[0][0])(q, k, v)
    assert_rel(got[0], want[0], "loss")
    for name, g, g_r in zip("qkv", got[1], want[1], strict=True):
        assert_rel(g, g_r, f"d{name}")


@pytest.mark.slow
def test_bfloat16_inputs_compute_in_float32():
    # The blocks travel in bfloat16 and are computed in float32 (lse float32, the
    # gradients in the inputs' dtype), matching jsoftmax.attention to bfloat16 rounding.
    args, opts, mesh, batch, seq = _setup("all", "sp8")
    q, k, v, seg, sinks = args
    args = (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), seg,
            sinks.astype(jnp.float32))  # fmt: skip
    ring = _ring_fn(mesh, batch, seq, opts, with_seg=True, with_sinks=True)

    def run(f, args):
        def loss(q, k, v, s):
            out, lse = f(q, k, v, args[3], s)
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(lse), (out, lse)

        return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(*args[:3], args[4])

    with jax.set_mesh(mesh):
        (_, (out, lse)), grads = run(ring, _place(mesh, batch, seq, args))
    (_, (out_r, lse_r)), grads_r = run(_unsharded(opts), args)
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3 + [jnp.float32]
    for a, b in zip((out, lse, *grads), (out_r, lse_r, *grads_r), strict=True):
        a, b = f64(a), f64(b)
        assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b))


# --------------------------------------------------------------------------------------
# The compiled program: K and V move by collective-permute only, one per ring step.
# --------------------------------------------------------------------------------------


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """The computations of an HLO module (name -> instruction lines) and the entry's."""
    comps: dict[str, list[str]] = {}
    entry, name = "", None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(2)
            comps[name] = []
            entry = name if head.group(1) else entry
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps, entry


def collective_counts(hlo: str) -> Counter:
    """How many times each collective runs, by kind, operand type and the ring's name
    scope (e.g. `("collective-permute", "f32[1,8,2,8]", "ring_kv")`): instructions in
    while loops count once per iteration (XLA's known trip count)."""
    comps, entry = _computations(hlo)
    kinds = "collective-permute|all-gather|all-to-all|all-reduce|reduce-scatter"

    def count(name: str) -> Counter:
        total = Counter()
        for line in comps[name]:
            op = re.search(rf"= (\w+\[[\d,]*\])\S* ({kinds})(?:-start)?\(", line)
            if op:
                scope = re.search(r"ring_d?kv", line)
                total[(op.group(2), op.group(1), scope.group(0) if scope else "")] += 1
            loop = re.search(r" while\(.*body=%([\w.\-]+)", line)
            if loop:
                inner = count(loop.group(1))
                if inner:
                    trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
                    assert trips, f"a loop with collectives and no known trip count: {line}"
                    for key, n in inner.items():
                        total[key] += n * int(trips.group(1))
        return total

    return count(entry)


def _hlo(f, *specs, grad: bool):
    fn = jax.value_and_grad(lambda *a: jnp.sum(f(*a)), (0, 1, 2)) if grad else f
    return jax.jit(fn).lower(*specs).compile().as_text()


def test_keys_and_values_move_only_by_collective_permute():
    # The blocks' sends are named "ring_kv", the gradient accumulators' "ring_dkv"; the
    # segment ids travel with the blocks.
    p, t_local, h, hv = 8, 8, 8, 6
    mesh = cpu_mesh((p,), ("sp",), (AxisType.Explicit,))
    split = NamedSharding(mesh, P(None, "sp"))

    def spec(*shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=split)

    body = lambda q, k, v, seg: sharded.attention(  # noqa: E731
        q, k, v, "sp", is_causal=True, q_segment_ids=seg, kv_segment_ids=seg, chunk_size=CHUNK
    )
    f = jax.shard_map(body, mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    specs = (spec(1, p * t_local, 4, h), spec(1, p * t_local, 2, h), spec(1, p * t_local, 2, hv),
             spec(1, p * t_local, dtype=jnp.int32))  # fmt: skip
    k_t, v_t, seg_t = f"f32[1,{t_local},2,{h}]", f"f32[1,{t_local},2,{hv}]", f"s32[1,{t_local}]"
    with jax.set_mesh(mesh):
        forward = collective_counts(_hlo(f, *specs, grad=False))
        train = collective_counts(_hlo(f, *specs, grad=True))
    send = "collective-permute"
    # Forward: each of k, v and the segment ids once per ring step after the first.
    assert forward == Counter({(send, ty, "ring_kv"): p - 1 for ty in (k_t, v_t, seg_t)})
    # Forward and backward: the blocks go around again (XLA may reuse the forward's first
    # send, which carries the same values), and dk, dv once per step: a full circle.
    for ty in (k_t, v_t, seg_t):
        assert 2 * (p - 1) - 1 <= train[(send, ty, "ring_kv")] <= 2 * (p - 1), (ty, train)
    assert train[(send, k_t, "ring_dkv")] == train[(send, v_t, "ring_dkv")] == p, train
    # Nothing else moves: no gather, and the only other collective is the all-reduce of
    # the scalar loss.
    others = {key: n for key, n in train.items() if key[2] not in ("ring_kv", "ring_dkv")}
    assert others == {("all-reduce", "f32[]", ""): 1}, train


def test_hlo_counter_counts_loop_iterations():
    # The counter itself: a ppermute inside a fori_loop of 5 iterations counts 5 times.
    mesh = cpu_mesh((2,), ("sp",), (AxisType.Explicit,))

    def body(x):
        shift = lambda _, a: jax.lax.ppermute(a, "sp", [(0, 1), (1, 0)])  # noqa: E731
        return jax.lax.fori_loop(0, 5, shift, jnp.sin(x))

    f = jax.shard_map(body, mesh=mesh, in_specs=P("sp"), out_specs=P("sp"))
    spec = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh, P("sp")))
    with jax.set_mesh(mesh):
        counts = collective_counts(jax.jit(f).lower(spec).compile().as_text())
    assert counts == Counter({("collective-permute", "f32[2]", ""): 5})


def _work(comps, name: str) -> set[str]:
    """The loops and products that computation `name` runs, with those it calls."""
    found = set()
    for line in comps[name]:
        found |= set(re.findall(r" (while|dot|convolution)\(", line))
        for called in re.findall(r"(?:calls|body|to_apply)=%([\w.\-]+)", line):
            found |= _work(comps, called)
    return found


def test_invisible_blocks_cost_nothing():
    # Causal: a device skips the blocks of later devices. Every step of the forward and
    # the backward ring is a conditional whose skipping branch runs no loop and no
    # product (it passes the running sums through), the other one the kernel's loops.
    mesh = cpu_mesh((8,), ("sp",), (AxisType.Explicit,))
    f = jax.shard_map(
        lambda q, k, v: sharded.attention(q, k, v, "sp", is_causal=True),
        mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"),
    )  # fmt: skip
    split = NamedSharding(mesh, P(None, "sp"))
    spec = jax.ShapeDtypeStruct((1, 64, 2, 8), jnp.float32, sharding=split)
    with jax.set_mesh(mesh):
        hlo = _hlo(f, spec, spec, spec, grad=True)
    comps, _ = _computations(hlo)
    conds = re.findall(r"conditional\(.*branch_computations=\{%([\w.\-]+), %([\w.\-]+)\}", hlo)
    assert len(conds) >= 2, "no conditional around the ring's steps"
    for branches in conds:
        work = [_work(comps, name) for name in branches]
        idle, busy = [w for w in work if not w], [w for w in work if "while" in w]
        assert len(idle) == 1 and len(busy) == 1, (branches, work)


# --------------------------------------------------------------------------------------
# Memory: per-device temporaries of a training step are those of one device's block.
# --------------------------------------------------------------------------------------


def _step_temporaries(f, t, sharding=None, n=4, h=8):
    spec = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32, sharding=sharding)
    step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), (0, 1, 2)))
    return step.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_training_step_memory_per_device_is_that_of_its_block():
    one = _step_temporaries(lambda q, k, v: jsoftmax.attention(q, k, v, is_causal=True), 1024)
    mesh = cpu_mesh((8,), ("sp",), (AxisType.Explicit,))
    ring = jax.shard_map(
        lambda q, k, v: sharded.attention(q, k, v, "sp", is_causal=True),
        mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"),
    )  # fmt: skip
    with jax.set_mesh(mesh):
        per_device = _step_temporaries(ring, 8 * 1024, NamedSharding(mesh, P(None, "sp")))
    assert per_device <= 1.5 * one, (per_device, one)


# --------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------


def _bad_cases():
    q, k, v, sinks = inputs()
    ok = dict(query=q, key=k, value=v, axis_name="sp")
    ints = jnp.zeros((B, T), jnp.int32)
    return [
        (dict(ok, key=k[:, :-8], value=v[:, :-8]), ValueError, "key"),
        (dict(ok, value=v[:, :-8]), ValueError, "value"),
        (dict(ok, q_segment_ids=jnp.zeros((B, T)), kv_segment_ids=ints), TypeError,
         "q_segment_ids"),
        (dict(ok, q_segment_ids=ints, kv_segment_ids=ints[:, :-1]), ValueError,
         "kv_segment_ids"),
        (dict(ok, q_segment_ids=ints), ValueError, "kv_segment_ids"),
        (dict(ok, sinks=sinks[:2]), ValueError, "sinks"),
        (dict(ok, axis_name=3), TypeError, "axis_name"),
        (dict(ok, axis_name=("sp", "sp")), ValueError, "axis_name"),
        (dict(ok, axis_name=""), TypeError, "axis_name"),
        (dict(ok, local_window_size=-1), ValueError, "local_window_size"),
        (dict(ok, chunk_size=0), ValueError, "chunk_size"),
        (dict(ok, is_causal="yes"), TypeError, "is_causal"),
        # Well-formed, but outside shard_map: no mesh axis "sp" is bound.
        (ok, ValueError, "axis_name"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_naming_the_argument(case):
    kwargs, error, name = _bad_cases()[case]
    with pytest.raises(error, match=name):
        sharded.attention(**kwargs)


def test_unbound_axis_name_inside_shard_map():
    mesh = cpu_mesh((8,), ("sp",), (AxisType.Explicit,))
    f = jax.shard_map(
        lambda q: sharded.attention(q, q, q, "seq"), mesh=mesh,
        in_specs=P(None, "sp"), out_specs=P(None, "sp"),
    )  # fmt: skip
    spec = jax.ShapeDtypeStruct(
        (1, 64, 2, 8), jnp.float32, sharding=NamedSharding(mesh, P(None, "sp"))
    )
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="axis_name='seq'"):
        jax.eval_shape(f, spec)
