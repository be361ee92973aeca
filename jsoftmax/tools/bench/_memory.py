"""Group `memory`: bytes saved for the backward pass (the residuals of `jax.vjp`)
and the compiled footprint (arguments + outputs + temporaries) of a training-like step.
Shapes are abstract: nothing of the benchmark's size is allocated."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._timing import F32, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("memory",)
SHAPE = (4096, 32768)


def _memory_row(case, candidate, baseline, cand, base, *, shape, out_bytes=None) -> Row:
    """`cand`/`base` are (arrays, bytes); with `out_bytes` the target is exactly one
    saved array of that size."""
    (nc, bc), (nb, bb) = cand, base
    row = _timing.bytes_row("memory", case, candidate, baseline, bc, bb, shape=shape)
    note = f"arrays saved: jsoftmax {nc}, baseline {nb}"
    if out_bytes is None:
        return dataclasses.replace(row, note=note)
    note += "; target: exactly one output-sized array"
    return dataclasses.replace(row, met=bool(nc == 1 and bc == out_bytes), note=note)


def _step_row(case, candidate, baseline, cand_step, base_step, *, shape, args, note) -> Row:
    cand = _timing.footprint(jax.jit(cand_step).lower(*args).compile())
    base = _timing.footprint(jax.jit(base_step).lower(*args).compile())
    return _timing.bytes_row(
        "memory", case, candidate, baseline, cand, base, shape=shape, note=note
    )


def _nll_step(log_softmax: Callable) -> Callable:
    def loss(x, labels):
        logp = log_softmax(x)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    return jax.value_and_grad(loss)


def _ce_step(cross_entropy: Callable) -> Callable:
    return jax.value_and_grad(lambda x, labels: jnp.mean(cross_entropy(x, labels)))


def memory(ctx: Ctx, shape) -> list[Row]:
    del ctx  # nothing is timed
    x = jax.ShapeDtypeStruct(shape, F32)
    labels = jax.ShapeDtypeStruct(shape[:-1], jnp.int32)
    out_bytes = int(np.prod(shape)) * np.dtype(F32).itemsize
    s = _timing.shape_str(shape)
    # (case, candidate, baseline, jsoftmax's function, the baseline's): one saved
    # output-sized array is the target of each.
    versus_jax_nn = [
        ("softmax(rule='vjp')", "jsoftmax.softmax(rule='vjp')", "jax.nn.softmax",
         jsoftmax.softmax, jax.nn.softmax),
        ("softmax(rule='jvp')", "jsoftmax.softmax(rule='jvp')", "jax.nn.softmax",
         lambda x: jsoftmax.softmax(x, rule="jvp"), jax.nn.softmax),
        ("log_softmax", "jsoftmax.log_softmax(rule='vjp')", "jax.nn.log_softmax",
         jsoftmax.log_softmax, jax.nn.log_softmax),
    ]  # fmt: skip
    rows = [
        _memory_row(
            f"residuals {case} {s}",
            candidate,
            baseline,
            _timing.residuals(ours, x),
            _timing.residuals(theirs, x),
            shape=shape,
            out_bytes=out_bytes,
        )
        for case, candidate, baseline, ours, theirs in versus_jax_nn
    ]
    optax = _timing.optional("optax")
    if optax is not None:
        rows.append(
            _memory_row(
                f"residuals cross-entropy {s}",
                "jsoftmax.cross_entropy",
                "optax.softmax_cross_entropy_with_integer_labels",
                _timing.residuals(jsoftmax.cross_entropy, x, labels),
                _timing.residuals(optax.softmax_cross_entropy_with_integer_labels, x, labels),
                shape=shape,
            )
        )
    rows.append(
        _step_row(
            f"train step (log_softmax NLL) {s}",
            "jsoftmax.log_softmax",
            "jax.nn.log_softmax",
            _nll_step(jsoftmax.log_softmax),
            _nll_step(jax.nn.log_softmax),
            shape=shape,
            args=(x, labels),
            note="compiled arguments + outputs + temporaries of value_and_grad(mean NLL)",
        )
    )
    if optax is not None:
        rows.append(
            _step_row(
                f"train step (cross_entropy) {s}",
                "jsoftmax.cross_entropy",
                "optax.softmax_cross_entropy_with_integer_labels",
                _ce_step(jsoftmax.cross_entropy),
                _ce_step(optax.softmax_cross_entropy_with_integer_labels),
                shape=shape,
                args=(x, labels),
                note="compiled arguments + outputs + temporaries of value_and_grad(mean CE)",
            )
        )
    return rows


def cases(quick: bool) -> list[Case]:
    del quick  # the same in both modes: nothing is timed
    return [Case("memory", "memory", partial(memory, shape=SHAPE))]
