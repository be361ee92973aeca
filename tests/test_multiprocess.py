"""Two processes, one mesh: jsoftmax.sharded with the vocabulary split across processes.

The test starts two Python processes (this file run as a script) that join one JAX
runtime through ``jax.distributed.initialize`` (coordinator on 127.0.0.1, CPU
collectives over gloo, two CPU devices each). They build a (data, vocab) mesh whose
vocabulary axis crosses the process boundary, place the inputs with
``jax.make_array_from_process_local_data`` and compute ``sharded.linear_cross_entropy``
and ``sharded.cross_entropy`` (values and gradients), plus the one-device functions on
the global arrays (their argument checks must not read another process's data).
Process 0 writes the gathered results as JSON; the test compares them with this
process's one-device ``jsoftmax.linear_cross_entropy`` and ``jsoftmax.cross_entropy``.
They also run ``sharded.attention`` (ring attention) with the sequence split over the
vocabulary axis, a ring that crosses the process boundary, against ``jsoftmax.attention``
on one device (values and gradients).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ROWS, H, V = 8, 4, 16
OPTS = dict(label_smoothing=0.1, z_loss=1e-2, logit_softcap=3.0, ignore_index=-100)
TIMEOUT_S = 60  # per process, a loaded two-core machine included


ATT_OPTS = dict(is_causal=True, logit_softcap=3.0, chunk_size=2)


def _attention_data():
    """q (B, T, N, H), k, v (B, T, K, H), sinks (N,) and an output cotangent."""
    rng = np.random.default_rng(1)
    shapes = [(2, 8, 2, 4), (2, 8, 1, 4), (2, 8, 1, 4), (2,), (2, 8, 2, 4)]
    return [rng.normal(size=s) for s in shapes]


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, H))
    w = rng.normal(size=(H, V))
    b = rng.normal(size=V)
    y = rng.integers(0, V, size=ROWS)
    y[3] = OPTS["ignore_index"]
    return x, w, b, y


# --------------------------------------------------------------------------------------
# The worker: one of the two processes.
# --------------------------------------------------------------------------------------


def _worker(pid: int, port: int, out: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=pid,
        initialization_timeout=TIMEOUT_S,
    )
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jsoftmax
    from jsoftmax import sharded

    # Devices 0, 1 live on process 0 and 2, 3 on process 1: each row of the device grid
    # is one data shard, and its two vocabulary shards sit on different processes.
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    mesh = Mesh(devices.reshape(2, 2).T, ("data", "vocab"))
    x, w, b, y = _data()

    def put(a, spec):
        """The global array from this process's blocks (in order along each axis)."""
        sharding = NamedSharding(mesh, spec)
        idx = list(sharding.addressable_devices_indices_map(a.shape).values())
        keep = [
            np.unique(np.concatenate([np.arange(a.shape[d])[i[d]] for i in idx]))
            for d in range(a.ndim)
        ]
        return jax.make_array_from_process_local_data(sharding, a[np.ix_(*keep)], a.shape)

    xs, ws, bs, ys = (
        put(x, P("data")),
        put(w, P(None, "vocab")),
        put(b, P("vocab")),
        put(y, P("data")),
    )
    zs = put(x @ w + b[None, :], P("data", "vocab"))
    assert not ys.is_fully_addressable

    lce = jax.shard_map(
        lambda x, w, b, y: sharded.linear_cross_entropy(
            x, w, y, "vocab", bias_shard=b, reduction="mean", data_axis_name="data",
            chunk_size=3, **OPTS,
        ),
        mesh=mesh, in_specs=(P("data"), P(None, "vocab"), P("vocab"), P("data")), out_specs=P(),
    )  # fmt: skip
    ce = jax.shard_map(
        lambda z, y: sharded.cross_entropy(z, y, "vocab", **OPTS),
        mesh=mesh, in_specs=(P("data", "vocab"), P("data")), out_specs=P("data"),
    )  # fmt: skip
    cot = jnp.linspace(0.5, 2.0, ROWS)
    cot = put(np.asarray(cot), P("data"))
    # Ring attention: batch over "data", sequence over "vocab" (a ring across processes).
    seq = P("data", "vocab")
    aq, ak, av, asinks, acot = _attention_data()
    ring = jax.shard_map(
        lambda q, k, v, s: sharded.attention(q, k, v, "vocab", sinks=s, **ATT_OPTS),
        mesh=mesh, in_specs=(seq, seq, seq, P()), out_specs=seq,
    )  # fmt: skip
    att_args = (put(aq, seq), put(ak, seq), put(av, seq), put(asinks, P()))
    acot = put(acot, seq)
    with jax.set_mesh(mesh):
        lce_val, lce_grads = jax.jit(jax.value_and_grad(lce, argnums=(0, 1, 2)))(xs, ws, bs, ys)
        ce_val = jax.jit(ce)(zs, ys)
        ce_grad = jax.jit(jax.grad(lambda z, y, c: jnp.sum(ce(z, y) * c)))(zs, ys, cot)
        att_loss = lambda q, k, v, s, c: jnp.sum(ring(q, k, v, s) * c)  # noqa: E731
        att_val, att_grads = jax.jit(jax.value_and_grad(att_loss, argnums=(0, 1, 2, 3)))(
            *att_args, acot
        )
        # The one-device functions, called eagerly on global arrays whose rows are split
        # over all four devices: their argument checks must not read the labels held by
        # the other process.
        rows = P(("data", "vocab"))
        y4, x4, z4 = put(y, rows), put(x, rows), put(x @ w + b[None, :], rows)
        assert len(y4.addressable_shards) == 2 and y4.addressable_data(0).shape == (ROWS // 4,)
        one_lce = jsoftmax.linear_cross_entropy(
            x4, put(w, P()), y4, bias=put(b, P()), reduction="mean", **OPTS
        )
        one_ce = jsoftmax.cross_entropy(z4, y4, **OPTS)

    def host(a):
        return np.asarray(multihost_utils.process_allgather(a, tiled=True)).tolist()

    result = {
        "lce": host(lce_val),
        "lce_dx": host(lce_grads[0]),
        "lce_dw": host(lce_grads[1]),
        "lce_db": host(lce_grads[2]),
        "ce": host(ce_val),
        "ce_dz": host(ce_grad),
        "one_lce": host(one_lce),
        "one_ce": host(one_ce),
        "att": host(att_val),
        **{f"att_d{name}": host(g) for name, g in zip("qkvs", att_grads, strict=True)},
    }
    if pid == 0:
        Path(out).write_text(json.dumps(result))
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    sys.exit(0)


# --------------------------------------------------------------------------------------
# The test.
# --------------------------------------------------------------------------------------

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jsoftmax  # noqa: E402


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax

        return hasattr(_jax, "make_gloo_tcp_collectives")
    except ImportError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not _gloo_available(), reason="jaxlib has no gloo CPU collectives")
def test_two_processes_match_one_device(tmp_path):
    out = tmp_path / "result.json"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(pid), str(port), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for pid in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    got = {k: np.asarray(v) for k, v in json.loads(out.read_text()).items()}

    x, w, b, y = _data()
    F64 = dict(rtol=1e-12, atol=1e-12)

    def lce(x, w, b):
        return jsoftmax.linear_cross_entropy(x, w, y, bias=b, reduction="mean", **OPTS)

    ref, ref_grads = jax.value_and_grad(lce, argnums=(0, 1, 2))(x, w, b)
    np.testing.assert_allclose(got["lce"], ref, **F64)
    np.testing.assert_allclose(got["one_lce"], ref, **F64)
    for name, r in zip(("lce_dx", "lce_dw", "lce_db"), ref_grads, strict=True):
        np.testing.assert_allclose(got[name], r, **F64)
    z = x @ w + b[None, :]
    cot = jnp.linspace(0.5, 2.0, ROWS)
    ref_ce = jsoftmax.cross_entropy(z, y, **OPTS)
    ref_dz = jax.grad(lambda z: jnp.sum(jsoftmax.cross_entropy(z, y, **OPTS) * cot))(z)
    np.testing.assert_allclose(got["ce"], ref_ce, **F64)
    np.testing.assert_allclose(got["one_ce"], ref_ce, **F64)
    np.testing.assert_allclose(got["ce_dz"], ref_dz, **F64)
    assert got["ce"][3] == 0.0  # the ignored row
    q, k, v, sinks, c = _attention_data()

    def att_loss(q, k, v, s):
        return jnp.sum(jsoftmax.attention(q, k, v, sinks=s, **ATT_OPTS) * c)

    ref, ref_grads = jax.value_and_grad(att_loss, argnums=(0, 1, 2, 3))(q, k, v, sinks)
    np.testing.assert_allclose(got["att"], ref, **F64)
    for name, r in zip("qkvs", ref_grads, strict=True):
        np.testing.assert_allclose(got[f"att_d{name}"], r, **F64)
