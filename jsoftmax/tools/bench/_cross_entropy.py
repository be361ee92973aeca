"""Group `cross-entropy`: `jax.value_and_grad` of the mean cross-entropy with
integer labels, probability labels and label smoothing, [`jsoftmax.cross_entropy`][] vs
optax; group `ce options`: each
training option against the plain call of the same run (the options must fuse into the
plain passes)."""

from __future__ import annotations

from functools import partial
from typing import Literal

import jax
import numpy as np

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._timing import BF16, F32, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("cross-entropy", "ce options")
SHAPES = ((4096, 1024, F32), (1024, 32768, F32), (512, 131072, F32), (4096, 1024, BF16))
TARGET = 1.0  # minimum ratio optax / jsoftmax
OPTION_TARGET = 1 / 1.15  # an option may cost at most 15% over the plain call
OPTIONS_SHAPE = (1024, 32768)


def _labels(shape, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), shape[:-1], 0, shape[-1])


def versus_optax(ctx: Ctx, shape, dtype) -> list[Row]:
    optax = _timing.optional("optax")
    if optax is None:
        return []
    x, labels = _timing.logits(shape, dtype), _labels(shape)
    cand = jax.jit(jax.value_and_grad(lambda x, y: jsoftmax.cross_entropy(x, y).mean()))
    base = jax.jit(
        jax.value_and_grad(
            lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
        )
    )
    note = _timing.agree(cand(x, labels), base(x, labels), dtype)
    t = _timing.time_interleaved(
        {"base": lambda: base(x, labels), "cand": lambda: cand(x, labels)},
        ctx.repeats,
        ctx.min_sample_s,
    )
    return [
        _timing.timing_row(
            "cross-entropy",
            f"value_and_grad(mean) {_timing.shape_str(shape)} {np.dtype(dtype).name}",
            "jsoftmax.cross_entropy",
            "optax.softmax_cross_entropy_with_integer_labels",
            t["cand"],
            t["base"],
            shape=shape,
            dtype=dtype,
            target=TARGET if (*shape, dtype) in SHAPES else None,
            note=note,
        )
    ]


def versus_optax_targets(ctx: Ctx, shape) -> list[Row]:
    """Probability labels, and integer labels with label smoothing against optax on
    `optax.smooth_labels` of one-hot labels (how optax smooths); the compiled
    temporaries of both sides go into the note."""
    optax = _timing.optional("optax")
    if optax is None:
        return []
    x, labels = _timing.logits(shape, F32), _labels(shape)
    n = shape[-1]
    probs = jax.nn.softmax(_timing.logits(shape, F32) * 0.1)
    mean = lambda f: jax.jit(jax.value_and_grad(lambda x, y: f(x, y).mean()))  # noqa: E731
    pairs = {
        "probability labels": (
            mean(jsoftmax.cross_entropy),
            mean(optax.softmax_cross_entropy),
            probs,
            "optax.softmax_cross_entropy",
        ),
        "label_smoothing=0.1": (
            mean(lambda x, y: jsoftmax.cross_entropy(x, y, label_smoothing=0.1)),
            mean(
                lambda x, y: optax.softmax_cross_entropy(
                    x, optax.smooth_labels(jax.nn.one_hot(y, n, dtype=x.dtype), 0.1)
                )
            ),
            labels,
            "optax.softmax_cross_entropy of smooth_labels(one_hot)",
        ),
    }
    rows = []
    for name, (cand, base, y, base_name) in pairs.items():
        agree = _timing.agree(cand(x, y), base(x, y), F32)
        mib = [_timing.temp_bytes(f, x, y) / 2**20 for f in (cand, base)]
        t = _timing.time_interleaved(
            {"base": lambda b=base, y=y: b(x, y), "cand": lambda c=cand, y=y: c(x, y)},
            ctx.repeats,
            ctx.min_sample_s,
        )
        note = f"temporaries {mib[0]:.1f} vs {mib[1]:.1f} MiB" + (f"; {agree}" if agree else "")
        rows.append(
            _timing.timing_row(
                "cross-entropy",
                f"value_and_grad(mean) {_timing.shape_str(shape)} float32, {name}",
                "jsoftmax.cross_entropy",
                base_name,
                t["cand"],
                t["base"],
                shape=shape,
                dtype=F32,
                target=TARGET if tuple(shape) == OPTIONS_SHAPE else None,
                note=note,
            )
        )
    return rows


def _option_kwargs(shape) -> dict[str, dict]:
    n = shape[-1]
    weights = jax.random.uniform(jax.random.PRNGKey(2), (n,)) + 0.5
    return {
        "ignore_index=-100": {"ignore_index": -100},
        "weights": {"weights": weights},
        "label_smoothing=0.1": {"label_smoothing": 0.1},
        "z_loss=1e-4": {"z_loss": 1e-4},
        "logit_softcap=30": {"logit_softcap": 30.0},
        "temperature=0.7": {"temperature": 0.7},
        "reduction='sum'": {},
    }


def options(ctx: Ctx, shape) -> list[Row]:
    x = _timing.logits(shape, F32)
    labels = _labels(shape)
    ignored = labels.at[::7].set(-100)  # one row in seven is padding
    fns, kwargs = {}, _option_kwargs(shape)

    def step(y, reduction: Literal["sum", "mean"] = "mean", **kw):
        f = jax.jit(
            jax.value_and_grad(lambda x: jsoftmax.cross_entropy(x, y, reduction=reduction, **kw))
        )
        return lambda: f(x)

    fns["plain"] = step(labels)
    for name, kw in kwargs.items():
        if name.startswith("ignore"):
            fns[name] = step(ignored, **kw)
        elif name.startswith("reduction"):
            fns[name] = step(labels, reduction="sum")
        else:
            fns[name] = step(labels, **kw)
    t = _timing.time_interleaved(fns, ctx.repeats, ctx.min_sample_s)
    return [
        _timing.timing_row(
            "ce options",
            f"value_and_grad(mean) {_timing.shape_str(shape)} float32, {name}",
            f"jsoftmax.cross_entropy({name})",
            "jsoftmax.cross_entropy (no option)",
            t[name],
            t["plain"],
            shape=shape,
            dtype=F32,
            target=OPTION_TARGET if tuple(shape) == OPTIONS_SHAPE else None,
        )
        for name in kwargs
    ]


def cases(quick: bool) -> list[Case]:
    shapes = SHAPES[:1] if quick else SHAPES
    out = [
        Case(
            "cross-entropy",
            f"cross-entropy {shape} {np.dtype(dtype).name}",
            partial(versus_optax, shape=shape, dtype=dtype),
        )
        for *shape, dtype in shapes
    ]
    opt_shape = (256, 1024) if quick else OPTIONS_SHAPE
    out.append(
        Case(
            "cross-entropy",
            f"cross-entropy targets {opt_shape}",
            partial(versus_optax_targets, shape=opt_shape),
        )
    )
    out.append(Case("ce options", f"ce options {opt_shape}", partial(options, shape=opt_shape)))
    return out
