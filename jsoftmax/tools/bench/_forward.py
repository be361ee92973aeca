"""Group `forward`: [`jsoftmax.softmax`][] vs `jax.nn.softmax`, with and without
`where`, float32 and bfloat16, and [`jsoftmax.log_softmax`][] vs
`jax.nn.log_softmax`."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._timing import BF16, F32, FORWARD_SHAPES, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("forward",)
TARGET = 0.95  # minimum ratio jax.nn / jsoftmax


def forward(ctx: Ctx, shape, dtype, where: bool, name: str = "softmax") -> list[Row]:
    x = _timing.logits(shape, dtype)
    ours, theirs = getattr(jsoftmax, name), getattr(jax.nn, name)
    if where:
        args = (x, _timing.mask(shape))
        cand = jax.jit(lambda x, m: ours(x, where=m))
        base = jax.jit(lambda x, m: theirs(x, where=m))
    else:
        args = (x,)
        cand = jax.jit(ours)
        base = jax.jit(theirs)
    note = _timing.agree(cand(*args), base(*args), dtype)
    t = _timing.time_interleaved(
        {"base": lambda: base(*args), "cand": lambda: cand(*args)}, ctx.repeats, ctx.min_sample_s
    )
    suffix = ", where" if where else ""
    return [
        _timing.timing_row(
            "forward",
            f"{name} {_timing.shape_str(shape)} {np.dtype(dtype).name}{suffix}",
            f"jsoftmax.{name}",
            f"jax.nn.{name}",
            t["cand"],
            t["base"],
            shape=shape,
            dtype=dtype,
            target=TARGET,
            note=note,
        )
    ]


def cases(quick: bool) -> list[Case]:
    shapes = FORWARD_SHAPES[:1] if quick else FORWARD_SHAPES
    plan = [
        Case("forward", f"softmax {s}", partial(forward, shape=s, dtype=F32, where=False))
        for s in shapes
    ]
    plan.append(
        Case(
            "forward",
            "softmax bfloat16",
            partial(forward, shape=(4096, 1024), dtype=BF16, where=False),
        )
    )
    plan += [
        Case("forward", f"softmax {s} where", partial(forward, shape=s, dtype=F32, where=True))
        for s in shapes
    ]
    plan += [
        Case(
            "forward",
            f"log_softmax {s}",
            partial(forward, shape=s, dtype=F32, where=False, name="log_softmax"),
        )
        for s in shapes
    ]
    return plan
