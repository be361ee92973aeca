"""Groups `fwd+bwd (a)`: value and VJP with the value returned (`jax.vjp`), as when
the output feeds the next layer; `fwd+bwd (b)`: `jax.value_and_grad` of a scalar
loss. [`jsoftmax.softmax`][] with either rule vs `jax.nn.softmax`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._timing import BF16, F32, FORWARD_SHAPES, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("fwd+bwd (a)", "fwd+bwd (b)")
TARGET = 0.95  # minimum ratio jax.nn / jsoftmax, for the default rule


def value_and_vjp(sm: Callable) -> Callable:
    """`jit` of `(x, g) -> (sm(x), vjp of sm at x applied to g)`."""

    def f(x, g):
        y, pullback = jax.vjp(sm, x)
        return y, pullback(g)[0]

    return jax.jit(f)


def _value_and_grad(sm: Callable) -> Callable:
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(sm(x) * w)))


def fwd_bwd(ctx: Ctx, form: str, shape, dtype, rule: Literal["vjp", "jvp"]) -> list[Row]:
    x = _timing.logits(shape, dtype)
    g = _timing.logits(shape, dtype, seed=1)
    make = value_and_vjp if form == "a" else _value_and_grad
    cand = make(lambda x: jsoftmax.softmax(x, rule=rule))
    base = make(jax.nn.softmax)
    note = _timing.agree(cand(x, g), base(x, g), dtype)
    t = _timing.time_interleaved(
        {"base": lambda: base(x, g), "cand": lambda: cand(x, g)}, ctx.repeats, ctx.min_sample_s
    )
    what = "value + vjp" if form == "a" else "value_and_grad"
    return [
        _timing.timing_row(
            f"fwd+bwd ({form})",
            f"{what} {_timing.shape_str(shape)} {np.dtype(dtype).name}, rule={rule}",
            f"jsoftmax.softmax(rule={rule!r})",
            "jax.nn.softmax",
            t["cand"],
            t["base"],
            shape=shape,
            dtype=dtype,
            target=TARGET if rule == "vjp" else None,
            note=note,
        )
    ]


def cases(quick: bool) -> list[Case]:
    shapes = FORWARD_SHAPES[:1] if quick else FORWARD_SHAPES
    rules = ("vjp",) if quick else ("vjp", "jvp")
    inputs = [(s, F32) for s in shapes] + [((4096, 1024), BF16)]
    return [
        Case(
            group,
            f"{group} {shape} {np.dtype(dtype).name} {rule}",
            partial(fwd_bwd, form=form, shape=shape, dtype=dtype, rule=rule),
        )
        for group, form in zip(GROUPS, ("a", "b"), strict=True)
        for rule in rules
        for shape, dtype in inputs
    ]
