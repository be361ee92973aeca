"""Group `post-training`: the fused output-layer post-training losses against the dense
path that builds the logits. [`jsoftmax.linear_token_log_probs`][] (with the entropy)
against `jsoftmax.token_log_probs(x @ w, ...)`, and [`jsoftmax.linear_kl_divergence`][]
(beta 0 and 0.5) against `jsoftmax.kl_divergence(x @ w, tx @ tw, ...)`, which builds
both models' logits: `jax.value_and_grad` of the mean with respect to `x` and `w`, and
the compiled temporary bytes of that step."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._linear_ce import TEMP_NOTE
from jsoftmax.tools.bench._timing import F32, Case, Ctx, Group

GROUPS: tuple[Group, ...] = ("post-training",)
SHAPE = (2048, 256, 32768)  # (N, H, V)
TIME_TARGET = 1.0
MEMORY_TARGET = 10.0


def _inputs(n, h, v):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(keys[0], (n, h), F32)
    w = jax.random.normal(keys[1], (h, v), F32) / np.sqrt(h)
    tx = jax.random.normal(keys[2], (n, h), F32)
    tw = jax.random.normal(keys[3], (h, v), F32) / np.sqrt(h)
    y = jax.random.randint(keys[4], (n,), 0, v)
    return x, w, tx, tw, y


def _log_prob_steps(y):
    def fused(x, w):
        lp, h = jsoftmax.linear_token_log_probs(x, w, y, return_entropy=True)
        return jnp.mean(lp) + 0.01 * jnp.mean(h)

    def dense(x, w):
        lp, h = jsoftmax.token_log_probs(x @ w, y, return_entropy=True)
        return jnp.mean(lp) + 0.01 * jnp.mean(h)

    make = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))  # noqa: E731
    return {"fused": make(fused), "dense": make(dense)}


def _divergence_steps(tx, tw, beta):
    def fused(x, w):
        return jsoftmax.linear_kl_divergence(x, w, tx, tw, beta=beta, reduction="mean")

    def dense(x, w):
        return jnp.mean(jsoftmax.kl_divergence(x @ w, tx @ tw, beta=beta))

    make = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))  # noqa: E731
    return {"fused": make(fused), "dense": make(dense)}


def rows(ctx: Ctx, shape, what: str):
    n, h, v = shape
    x, w, tx, tw, y = _inputs(n, h, v)
    if what == "log-probs":
        steps = _log_prob_steps(y)
        cand, base = "jsoftmax.linear_token_log_probs", "jsoftmax.token_log_probs of x @ w"
        label = "log-probs + entropy"
    else:
        beta = float(what.split("=")[1])
        steps = _divergence_steps(tx, tw, beta)
        cand, base = "jsoftmax.linear_kl_divergence", "jsoftmax.kl_divergence of both x @ w"
        label = f"divergence beta={beta:g}"
    note = _timing.agree(steps["fused"](x, w), steps["dense"](x, w), F32)
    temps = {k: _timing.temp_bytes(f, x, w) for k, f in steps.items()}
    t = _timing.time_interleaved(
        {k: (lambda f=f: f(x, w)) for k, f in steps.items()}, ctx.repeats, ctx.min_sample_s
    )
    headline = tuple(shape) == SHAPE
    desc = f"{label}, (N, H, V) = {tuple(shape)}"

    def row(make, what, values, target, note):
        # `make`: timing_row or bytes_row; the fused loss against the dense one.
        return make(
            "post-training",
            f"{what} {desc}",
            cand,
            base,
            values["fused"],
            values["dense"],
            shape=shape,
            dtype=F32,
            target=target if headline else None,
            note=note,
        )

    return [
        row(_timing.timing_row, "value_and_grad", t, TIME_TARGET, note),
        row(_timing.bytes_row, "temp memory", temps, MEMORY_TARGET, TEMP_NOTE),
    ]


def cases(quick: bool) -> list[Case]:
    shape = (128, 32, 1024) if quick else SHAPE
    whats = ["log-probs", "beta=0.5"] if quick else ["log-probs", "beta=0", "beta=0.5"]
    return [
        Case("post-training", f"post-training {w} {shape}", partial(rows, shape=shape, what=w))
        for w in whats
    ]
