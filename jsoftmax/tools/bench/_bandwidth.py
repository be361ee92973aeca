"""Group `bandwidth` (accelerators only): the fraction of the memory-bandwidth bound
reached by forward + backward (form (a), value and VJP) of a large softmax."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

import jsoftmax
from jsoftmax.tools.bench._fwd_bwd import value_and_vjp
from jsoftmax.tools.bench._timing import (
    BF16,
    F32,
    Case,
    Ctx,
    Group,
    Row,
    logits,
    shape_str,
    time_interleaved,
)

GROUPS: tuple[Group, ...] = ("bandwidth",)
TARGET = 0.8  # minimum fraction of the bound
SHAPE = (4096, 32768)


def bandwidth(ctx: Ctx, shape, dtype) -> list[Row]:
    """Bytes that must move: read x and g, write y and dx (4 arrays of x's size).
    Bandwidth: a device-to-device pass `-x` (read + write one array)."""
    x = logits(shape, dtype)
    g = logits(shape, dtype, seed=1)
    copy = jax.jit(lambda x: -x)
    cand = value_and_vjp(jsoftmax.softmax)
    base = value_and_vjp(jax.nn.softmax)
    t = time_interleaved(
        {"copy": lambda: copy(x), "cand": lambda: cand(x, g), "base": lambda: base(x, g)},
        ctx.repeats,
        ctx.min_sample_s,
    )
    nbytes = x.size * x.dtype.itemsize
    rate = 2 * nbytes / t["copy"].median
    bound_s = 4 * nbytes / rate
    frac_c = bound_s / t["cand"].median
    frac_b = bound_s / t["base"].median
    return [
        Row(
            group="bandwidth",
            case=f"value + vjp {shape_str(shape)} {np.dtype(dtype).name}",
            candidate="jsoftmax.softmax(rule='vjp')",
            baseline="jax.nn.softmax",
            unit="fraction",
            candidate_value=frac_c,
            baseline_value=frac_b,
            ratio=frac_c,
            shape=list(shape),
            dtype=np.dtype(dtype).name,
            target=TARGET,
            met=bool(frac_c >= TARGET),
            note=f"ratio = fraction of bound; copy bandwidth {rate / 1e9:.0f} GB/s",
        )
    ]


def cases(quick: bool) -> list[Case]:
    del quick  # one shape in both modes
    if jax.default_backend() == "cpu":
        return []
    return [
        Case(
            "bandwidth",
            f"bandwidth {np.dtype(dtype).name}",
            partial(bandwidth, shape=SHAPE, dtype=dtype),
        )
        for dtype in (F32, BF16)
    ]
