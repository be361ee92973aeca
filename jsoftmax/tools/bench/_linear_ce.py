"""Groups `linear-ce` and `linear-ce scaling`: [`jsoftmax.linear_cross_entropy`][]
(the output layer and the loss fused, logits never built) against the dense path a user
writes today, `optax.softmax_cross_entropy_with_integer_labels(x @ w, labels)`, and a
token-chunked `jax.lax.scan` with `jax.checkpoint` (what MaxText-style code
does). `jax.value_and_grad` of the mean with respect to `x` and `w`; memory is
the compiled temporary bytes (`memory_analysis().temp_size_in_bytes`: inputs, `dw`
and `dx` excluded, since every variant has them)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._timing import F32, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("linear-ce", "linear-ce scaling")
SHAPE = (2048, 256, 32768)  # (N, H, V)
TIME_TARGET = 1.1  # minimum ratio dense / fused
MEMORY_TARGET = 10.0
# V from 8k to 256k at fixed N * H (= 2048 * 256); timed up to TIMED_MAX_V.
SCALING = tuple((2048, 256, v) for v in (8192, 32768, 131072, 262144))
TIMED_MAX_V = 131072
TOKEN_CHUNK = 256
CANDIDATE = "jsoftmax.linear_cross_entropy"
DENSE = "optax CE of x @ w (dense)"


def _inputs(n, h, v, dtype=F32):
    x = jax.random.normal(jax.random.PRNGKey(0), (n, h), dtype=F32).astype(dtype)
    w = (jax.random.normal(jax.random.PRNGKey(1), (h, v), dtype=F32) / np.sqrt(h)).astype(dtype)
    labels = jax.random.randint(jax.random.PRNGKey(2), (n,), 0, v)
    return x, w, labels


def _steps(optax, labels, n):
    def fused(x, w):
        return jsoftmax.linear_cross_entropy(x, w, labels, reduction="mean")

    def dense(x, w):
        return optax.softmax_cross_entropy_with_integer_labels(x @ w, labels).mean()

    def token_scan(x, w):
        xs = x.reshape(-1, TOKEN_CHUNK, x.shape[-1])
        ys = labels.reshape(-1, TOKEN_CHUNK)

        @jax.checkpoint
        def chunk_loss(xc, yc):
            z = jnp.dot(xc, w, preferred_element_type=jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(z, yc).sum()

        total, _ = jax.lax.scan(lambda c, a: (c + chunk_loss(*a), None), 0.0, (xs, ys))
        return total / n

    make = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))  # noqa: E731
    return {"fused": make(fused), "dense": make(dense), "token-scan": make(token_scan)}


TEMP_NOTE = "compiled temporaries of value_and_grad w.r.t. x and w"


def headline(ctx: Ctx, shape, dtype=F32) -> list[Row]:
    optax = _timing.optional("optax")
    if optax is None:
        return []
    n, h, v = shape
    x, w, labels = _inputs(n, h, v, dtype)
    steps = _steps(optax, labels, n)
    note = _timing.agree(steps["fused"](x, w), steps["dense"](x, w), dtype)
    temps = {k: _timing.temp_bytes(f, x, w) for k, f in steps.items()}
    t = _timing.time_interleaved(
        {k: (lambda f=f: f(x, w)) for k, f in steps.items()}, ctx.repeats, ctx.min_sample_s
    )
    desc = f"(N, H, V) = {tuple(shape)}"
    # The targets are set for the headline size only (the quick run is a smoke test).
    target_t, target_m = (TIME_TARGET, MEMORY_TARGET) if tuple(shape) == SHAPE else (None, None)
    scan = f"token-chunked scan + checkpoint ({TOKEN_CHUNK} rows)"

    def row(make, what, values, baseline, key, target=None, note=""):
        # `make`: timing_row or bytes_row; the fused loss against `values[key]`.
        return make(
            "linear-ce",
            f"{what} {desc}",
            CANDIDATE,
            baseline,
            values["fused"],
            values[key],
            shape=shape,
            dtype=dtype,
            target=target,
            note=note,
        )

    return [
        row(_timing.timing_row, "value_and_grad", t, DENSE, "dense", target_t, note),
        row(_timing.timing_row, "value_and_grad", t, scan, "token-scan"),
        row(_timing.bytes_row, "temp memory", temps, DENSE, "dense", target_m, TEMP_NOTE),
        row(_timing.bytes_row, "temp memory", temps, scan, "token-scan", note=TEMP_NOTE),
    ]


def scaling(ctx: Ctx, shape) -> list[Row]:
    optax = _timing.optional("optax")
    if optax is None:
        return []
    n, h, v = shape
    desc = f"V = {v}, (N, H) = ({n}, {h})"
    x = jax.ShapeDtypeStruct((n, h), F32)
    w = jax.ShapeDtypeStruct((h, v), F32)
    labels = jnp.zeros((n,), jnp.int32)
    steps = _steps(optax, labels, n)
    rows = [
        _timing.bytes_row(
            "linear-ce scaling",
            f"temp memory {desc}",
            CANDIDATE,
            DENSE,
            _timing.temp_bytes(steps["fused"], x, w),
            _timing.temp_bytes(steps["dense"], x, w),
            shape=shape,
            dtype=F32,
            note=TEMP_NOTE,
        )
    ]
    if v <= TIMED_MAX_V:
        xa, wa, labels = _inputs(n, h, v)
        steps = _steps(optax, labels, n)
        t = _timing.time_interleaved(
            {k: (lambda f=f: f(xa, wa)) for k in ("fused", "dense") for f in [steps[k]]},
            max(ctx.repeats // 3, 2),
            ctx.min_sample_s,
        )
        rows.append(
            _timing.timing_row(
                "linear-ce scaling",
                f"value_and_grad {desc}",
                CANDIDATE,
                DENSE,
                t["fused"],
                t["dense"],
                shape=shape,
                dtype=F32,
            )
        )
    return rows


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("linear-ce", "linear-ce (256, 64, 4096)", partial(headline, shape=(256, 64, 4096)))
        ]
    return [Case("linear-ce", f"linear-ce {SHAPE}", partial(headline, shape=SHAPE))] + [
        Case("linear-ce scaling", f"linear-ce scaling V={s[2]}", partial(scaling, shape=s))
        for s in SCALING
    ]
