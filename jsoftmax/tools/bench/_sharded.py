"""Group `sharded` (with `devices`): the vocabulary-sharded loss.

For each device count `d` in 1, 2, 4, 8 (up to `devices`), the class axis of a
`(batch, vocab)` float32 logits array is split over a mesh axis of `d` devices and
the mean loss and its gradient are computed with [`jsoftmax.sharded.cross_entropy`][]
inside `jax.shard_map`. The rows compare it with [`jsoftmax.cross_entropy`][]
on one device: time per call, the bytes of logits each device holds, and the
per-device footprint XLA reports for the compiled step (arguments + temporaries +
outputs). `ratio` = unsharded / sharded, about `d` for the logits.

On a machine without accelerators the devices are simulated CPU devices sharing the
host's cores, so time is not expected to improve with `d`; memory per device is.

The fused rows (`fused loss temporaries`) do the same for the output layer and the
loss, `(N, H, V)` with `w` of shape `(H, V)` split by vocabulary:
[`jsoftmax.sharded.linear_cross_entropy`][] against the sharded dense loss
(`x @ w_shard` then [`jsoftmax.sharded.cross_entropy`][]) and against the
one-device [`jsoftmax.linear_cross_entropy`][]: the compiled temporary bytes per
device of the mean loss's value and gradient with respect to `x` and `w`
(`memory_analysis().temp_size_in_bytes`; inputs and outputs excluded).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._timing import F32, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("sharded",)
DEVICE_COUNTS = (1, 2, 4, 8)
SHAPE = (512, 32768)
QUICK_SHAPE = (256, 8192)
FUSED_SHAPE = (2048, 256, 32768)  # (N, H, V)
QUICK_FUSED_SHAPE = (256, 64, 8192)


def prepare_devices(devices: int) -> None:
    """Makes `devices` devices available, simulating CPU devices when needed.

    Must run before the first JAX computation of the process (JAX fixes the number
    of CPU devices when its backends start).

    Raises:
      ValueError: `devices` is not a positive int.
      RuntimeError: fewer devices are available, with advice.
    """
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"devices must be a positive int, got {devices!r}.")
    try:
        # jax.config declares no attributes for its flags (this one has a context
        # manager, so jax.config.read refuses it): the documented attribute read.
        if jax.config.jax_num_cpu_devices < devices:  # pyright: ignore[reportAttributeAccessIssue]
            jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:
        pass  # backends already started: use what is there
    if jax.device_count() < devices:
        raise RuntimeError(
            f"--devices {devices} needs {devices} devices but JAX has {jax.device_count()}. "
            "On CPU, set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{devices} before starting Python, or request the devices before any "
            "other JAX computation runs."
        )


def _mean_loss(x, y):
    return jnp.mean(jsoftmax.cross_entropy(x, y))


def _sharded_mean_loss(x, y):
    return jnp.mean(jsoftmax.sharded.cross_entropy(x, y, "vocab"))


def sharded(ctx: Ctx, devices: int, shape) -> list[Row]:
    """The rows of one device count `devices`."""
    batch, vocab = shape
    x_host = 3.0 * np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    y_host = np.random.default_rng(1).integers(0, vocab, size=batch)

    dev0 = jax.devices()[0]
    x1 = jax.device_put(x_host, dev0)
    y1 = jax.device_put(y_host, dev0)
    unsharded = jax.jit(jax.value_and_grad(_mean_loss))

    mesh = jax.make_mesh((devices,), ("vocab",), devices=jax.devices()[:devices])
    spec = P(None, "vocab")
    loss = jax.shard_map(_sharded_mean_loss, mesh=mesh, in_specs=(spec, P()), out_specs=P())
    step = jax.jit(jax.value_and_grad(loss))
    xd = jax.device_put(x_host, NamedSharding(mesh, spec))
    yd = jax.device_put(y_host, NamedSharding(mesh, P()))

    note = _timing.agree(step(xd, yd), unsharded(x1, y1), F32)
    t = _timing.time_interleaved(
        {"sharded": lambda: step(xd, yd), "unsharded": lambda: unsharded(x1, y1)},
        ctx.repeats,
        ctx.min_sample_s,
    )
    on = f"{devices} device{'s' if devices > 1 else ''}"
    cand = "jsoftmax.sharded.cross_entropy in shard_map"
    base = "jsoftmax.cross_entropy, 1 device"
    rows = [
        _timing.timing_row(
            "sharded",
            f"cross_entropy value+grad, vocab over {on}",
            cand,
            base,
            t["sharded"],
            t["unsharded"],
            shape=shape,
            dtype=F32,
            note=note,
        ),
        _timing.bytes_row(
            "sharded",
            f"logits bytes per device, {on}",
            cand,
            base,
            xd.addressable_shards[0].data.nbytes,
            x1.nbytes,
            shape=shape,
        ),
    ]
    step_bytes = _timing.footprint(step.lower(xd, yd).compile())
    unsharded_bytes = _timing.footprint(unsharded.lower(x1, y1).compile())
    if step_bytes is not None and unsharded_bytes is not None:
        rows.append(
            _timing.bytes_row(
                "sharded",
                f"compiled step footprint per device, {on}",
                cand,
                base,
                step_bytes,
                unsharded_bytes,
                shape=shape,
            )
        )
    return rows


def fused(ctx: Ctx, devices: int, shape) -> list[Row]:
    """The fused rows of one device count `devices`."""
    del ctx  # structural figures only: nothing is timed
    n, h, v = shape
    rng = np.random.default_rng(0)
    x_host = rng.standard_normal((n, h), dtype=np.float32)
    w_host = rng.standard_normal((h, v), dtype=np.float32) / np.float32(np.sqrt(h))
    y_host = rng.integers(0, v, size=n)

    def one_device(x, w, y):
        return jsoftmax.linear_cross_entropy(x, w, y, reduction="mean")

    def fused_shard(x, w, y):
        return jsoftmax.sharded.linear_cross_entropy(x, w, y, "vocab", reduction="mean")

    def dense_shard(x, w, y):
        z = jnp.dot(x, w, preferred_element_type=jnp.float32)
        return jsoftmax.sharded.cross_entropy(z, y, "vocab", reduction="mean")

    mesh = jax.make_mesh((devices,), ("vocab",), devices=jax.devices()[:devices])
    specs = (P(), P(None, "vocab"), P())
    grad = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))  # noqa: E731
    wrap = lambda f: jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P())  # noqa: E731
    steps = {"fused": grad(wrap(fused_shard)), "dense": grad(wrap(dense_shard))}
    placed = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(
        (x_host, w_host, y_host), specs, strict=True)]  # fmt: skip
    dev0 = jax.devices()[0]
    single = [jax.device_put(a, dev0) for a in (x_host, w_host, y_host)]
    one = grad(one_device)
    note = _timing.agree(steps["fused"](*placed), one(*single), F32)
    cand_bytes = _timing.temp_bytes(steps["fused"], *placed)
    on = f"{devices} device{'s' if devices > 1 else ''}"
    cand = "jsoftmax.sharded.linear_cross_entropy in shard_map"
    rows = []
    for base, base_bytes in [
        (
            "x @ w_shard + jsoftmax.sharded.cross_entropy",
            _timing.temp_bytes(steps["dense"], *placed),
        ),
        ("jsoftmax.linear_cross_entropy, 1 device", _timing.temp_bytes(one, *single)),
    ]:
        row = _timing.bytes_row(
            "sharded",
            f"fused loss temporaries per device, vocab over {on}",
            cand,
            base,
            cand_bytes,
            base_bytes,
            shape=shape,
        )
        rows.append(dataclasses.replace(row, note=note))
    return rows


def cases(quick: bool, devices: int) -> list[Case]:
    """Per device count in `DEVICE_COUNTS` up to `devices`: the sharded loss, then
    the fused one."""
    shape = QUICK_SHAPE if quick else SHAPE
    fused_shape = QUICK_FUSED_SHAPE if quick else FUSED_SHAPE
    out = []
    for d in DEVICE_COUNTS:
        if d <= devices:
            out.append(Case("sharded", f"sharded d={d}", partial(sharded, devices=d, shape=shape)))
            fused_d = partial(fused, devices=d, shape=fused_shape)
            out.append(Case("sharded", f"sharded fused d={d}", fused_d))
    return out
