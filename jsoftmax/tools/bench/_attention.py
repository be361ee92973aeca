"""Group `attention`: `jsoftmax.attention` against `jax.nn.dot_product_attention`
(`implementation="xla"`, the portable path), tokamax's `xla_chunked` when tokamax is
installed, and `implementation="cudnn"` on a GPU.

A training step is `jax.value_and_grad` in `q`, `k` and `v` of `sum(out * w)` for a
fixed random `w`; a forward row times the output alone. Memory is the compiled temporary
bytes of the training step (`memory_analysis().temp_size_in_bytes`: inputs and the
gradients excluded, since every variant has them). Shapes are `(B, T, N, H)` with
`B = 1`, `N = 4`, `H = 64` (one layer of a small model), float32 unless a row says
otherwise (cuDNN needs 16-bit inputs: its rows are bfloat16 on both sides).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._timing import BF16, F32, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("attention",)
HEADS, HEAD_DIM = 4, 64
# (T, causal, training-step time target, temporary-memory target); the targets hold for
# these shapes in full mode (the quick shapes are a smoke test).
FULL = ((1024, False, 1.0, None), (4096, True, 1.5, 20.0))
QUICK = ((256, True, None, None),)
CANDIDATE = "jsoftmax.attention"
TEMP_NOTE = "compiled temporaries of value_and_grad in q, k, v"


def _inputs(t: int, dtype=F32):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    return tuple(
        jax.random.normal(k, (1, t, HEADS, HEAD_DIM), dtype=F32).astype(dtype) for k in keys
    )


def _impls(causal: bool) -> dict[str, Callable]:
    """name -> attention(q, k, v) of each variant available on this machine."""
    impls = {
        CANDIDATE: lambda q, k, v: jsoftmax.attention(q, k, v, is_causal=causal),
        "jax.nn (xla)": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"
        ),
    }
    tokamax = _tokamax()
    if tokamax is not None:
        impls["tokamax (xla_chunked)"] = lambda q, k, v: tokamax.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla_chunked"
        )
    return impls


def _tokamax():
    """tokamax if installed. On first use it parses `sys.argv` as absl flags (its
    configuration) unless they are parsed already; the command line of the bench is not
    theirs, so they are marked parsed first (tokamax's defaults)."""
    tokamax = _timing.optional("tokamax")
    if tokamax is not None:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return tokamax


def _train_step(attention: Callable, w) -> Callable:
    loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(F32) * w)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))


def _rows(ctx: Ctx, t: int, causal: bool, time_target, memory_target, impls, dtype) -> list[Row]:
    q, k, v, w = _inputs(t, dtype)
    shape = (1, t, HEADS, HEAD_DIM)
    desc = f"T = {t}{', causal' if causal else ''}"
    # A few repeats suffice for the seconds-long steps of the longest sequences.
    repeats = ctx.repeats if t <= 1024 else max(ctx.repeats // 3, 3)
    steps = {name: _train_step(f, w.astype(F32)) for name, f in impls.items()}
    forwards = {name: jax.jit(f) for name, f in impls.items()}
    results = {name: step(q, k, v) for name, step in steps.items()}
    outs = {name: f(q, k, v) for name, f in forwards.items()}
    t_step = _timing.time_interleaved(
        {n: (lambda s=s: s(q, k, v)) for n, s in steps.items()}, repeats, ctx.min_sample_s
    )
    t_fwd = _timing.time_interleaved(
        {n: (lambda f=f: f(q, k, v)) for n, f in forwards.items()}, repeats, ctx.min_sample_s
    )
    temps = {name: _timing.temp_bytes(step, q, k, v) for name, step in steps.items()}

    def row(make, what, values, baseline, target, note):
        # `make`: timing_row or bytes_row; the candidate against `baseline`.
        return make(
            "attention",
            f"{what} {desc}",
            CANDIDATE,
            baseline,
            values[CANDIDATE],
            values[baseline],
            shape=shape,
            dtype=dtype,
            target=target,
            note=note,
        )

    rows = []
    for name in impls:
        if name == CANDIDATE:
            continue
        # Only the comparison with jax.nn (xla) has targets.
        tt, mt = (time_target, memory_target) if name == "jax.nn (xla)" else (None, None)
        step_note = _timing.agree(results[CANDIDATE], results[name], dtype)
        fwd_note = _timing.agree(outs[CANDIDATE], outs[name], dtype)
        rows += [
            row(_timing.timing_row, "train step", t_step, name, tt, step_note),
            row(_timing.timing_row, "forward", t_fwd, name, None, fwd_note),
            row(_timing.bytes_row, "temp memory", temps, name, mt, TEMP_NOTE),
        ]
    return rows


def attention_rows(ctx: Ctx, t: int, causal: bool, time_target, memory_target) -> list[Row]:
    return _rows(ctx, t, causal, time_target, memory_target, _impls(causal), F32)


def cudnn_rows(ctx: Ctx, t: int, causal: bool) -> list[Row]:
    """jsoftmax against cuDNN's fused attention, bfloat16 (GPU only; no target)."""
    impls = {
        CANDIDATE: lambda q, k, v: jsoftmax.attention(q, k, v, is_causal=causal),
        "jax.nn (cudnn)": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        ),
    }
    return _rows(ctx, t, causal, None, None, impls, BF16)


def has_gpu() -> bool:
    return jax.default_backend() == "gpu"


def cases(quick: bool) -> list[Case]:
    shapes = QUICK if quick else FULL
    out = [
        Case(
            "attention",
            f"attention T={t}{' causal' if causal else ''}",
            partial(attention_rows, t=t, causal=causal, time_target=tt, memory_target=mt),
        )
        for t, causal, tt, mt in shapes
    ]
    if has_gpu():
        out += [
            Case("attention", f"attention cudnn T={t}", partial(cudnn_rows, t=t, causal=causal))
            for t, causal, _, _ in shapes
        ]
    return out
