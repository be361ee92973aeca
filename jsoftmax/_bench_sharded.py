"""Benchmark rows for the vocab-sharded loss: ``python -m jsoftmax bench --devices N``.

For each device count ``d`` in 1, 2, 4, 8 (up to ``N``), the class axis of a
``(batch, vocab)`` float32 logits array is split over a mesh axis of ``d`` devices and
the loss and its gradient are computed with :func:`jsoftmax.sharded.cross_entropy`
inside :func:`jax.shard_map`. The rows compare it with :func:`jsoftmax.cross_entropy`
on one device: time per call, the bytes of logits each device holds, and the
per-device footprint XLA reports for the compiled step (arguments + temporaries +
outputs).

On a machine without accelerators the devices are simulated CPU devices sharing the
host's cores, so time is not expected to improve with ``d``; memory per device is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax
from jsoftmax import sharded

GROUP = "sharded"
DEVICE_COUNTS = (1, 2, 4, 8)


def prepare_devices(devices: int) -> None:
    """Makes ``devices`` devices available, simulating CPU devices when needed.

    Must run before the first JAX computation of the process (JAX fixes the number
    of CPU devices when its backends start). Raises ``RuntimeError`` with advice when
    fewer devices are available.
    """
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ValueError(f"devices must be a positive int, got {devices!r}.")
    try:
        if jax.config.jax_num_cpu_devices < devices:
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


def _footprint(compiled) -> int | None:
    """Per-device bytes of arguments, temporaries and outputs of a compiled step."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if m is None:
        return None
    total = (
        m.argument_size_in_bytes
        + m.temp_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
    return int(total)


def _row(case, candidate, baseline, unit, cand, base, *, shape, cand_iqr=None, base_iqr=None):
    ratio = None if cand in (None, 0) or base is None else base / cand
    return {
        "group": GROUP,
        "case": case,
        "candidate": candidate,
        "baseline": baseline,
        "unit": unit,
        "candidate_value": cand,
        "baseline_value": base,
        "ratio": ratio,
        "shape": list(shape),
        "dtype": "float32",
        "candidate_iqr": cand_iqr,
        "baseline_iqr": base_iqr,
        "target": None,
        "met": None,
        "note": "",
    }


def run_sharded_bench(devices: int, quick: bool = False) -> list[dict]:
    """Sharded vs unsharded cross-entropy (value and gradient) on 1, 2, 4, ... devices.

    Args:
      devices: the largest device count to use (device counts 1, 2, 4, 8 up to it).
      quick: a smaller problem and fewer repeats.

    Returns:
      A list of dicts with the fields of ``jsoftmax._bench.Row``: for each device
      count ``d``, a time row (``unit="s"``, median seconds per call; ``ratio`` =
      unsharded / sharded) and two memory rows (``unit="bytes"``: logits bytes held
      per device, and the compiled step's per-device footprint; ``ratio`` =
      unsharded / sharded, about ``d`` for the logits).
    """
    from jsoftmax._bench import time_interleaved  # the bench's shared timer

    prepare_devices(devices)
    batch, vocab = (256, 8192) if quick else (512, 32768)
    repeats = 5 if quick else 15
    shape = (batch, vocab)
    x_host = 3.0 * np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    y_host = np.random.default_rng(1).integers(0, vocab, size=batch)

    dev0 = jax.devices()[0]
    x1 = jax.device_put(x_host, dev0)
    y1 = jax.device_put(y_host, dev0)
    unsharded = jax.jit(jax.value_and_grad(lambda x, y: jnp.mean(jsoftmax.cross_entropy(x, y))))
    unsharded_footprint = _footprint(unsharded.lower(x1, y1).compile())
    rows: list[dict] = []
    for d in (c for c in DEVICE_COUNTS if c <= devices):
        mesh = jax.make_mesh((d,), ("vocab",), devices=jax.devices()[:d])
        spec = P(None, "vocab")
        loss = jax.shard_map(
            lambda x, y: jnp.mean(sharded.cross_entropy(x, y, "vocab")),
            mesh=mesh,
            in_specs=(spec, P()),
            out_specs=P(),
        )
        step = jax.jit(jax.value_and_grad(loss))
        xd = jax.device_put(x_host, NamedSharding(mesh, spec))
        yd = jax.device_put(y_host, NamedSharding(mesh, P()))
        footprint = _footprint(step.lower(xd, yd).compile())
        t = time_interleaved(
            {
                "sharded": lambda f=step, a=xd, b=yd: f(a, b),
                "unsharded": lambda: unsharded(x1, y1),
            },
            repeats=repeats,
        )
        v_s = float(step(xd, yd)[0])
        v_u = float(unsharded(x1, y1)[0])
        name = f"cross_entropy value+grad, vocab over {d} device{'s' if d > 1 else ''}"
        cand = "jsoftmax.sharded.cross_entropy in shard_map"
        base = "jsoftmax.cross_entropy, 1 device"
        row = _row(
            name,
            cand,
            base,
            "s",
            t["sharded"].median,
            t["unsharded"].median,
            shape=shape,
            cand_iqr=[t["sharded"].q1, t["sharded"].q3],
            base_iqr=[t["unsharded"].q1, t["unsharded"].q3],
        )
        if abs(v_s - v_u) > 1e-5 * max(1.0, abs(v_u)):
            row["note"] = "RESULTS DIFFER"
        rows.append(row)
        per_device = xd.addressable_shards[0].data.nbytes
        rows.append(
            _row(
                f"logits bytes per device, {d} device{'s' if d > 1 else ''}",
                cand,
                base,
                "bytes",
                float(per_device),
                float(x1.nbytes),
                shape=shape,
            )
        )
        if footprint is not None and unsharded_footprint is not None:
            rows.append(
                _row(
                    f"compiled step footprint per device, {d} device{'s' if d > 1 else ''}",
                    cand,
                    base,
                    "bytes",
                    float(footprint),
                    float(unsharded_footprint),
                    shape=shape,
                )
            )
    return rows
