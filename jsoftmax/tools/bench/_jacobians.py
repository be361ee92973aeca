"""Groups `jacobian`: [`jsoftmax.jacobian`][] vs `jax.jacfwd` / `jax.jacrev` of
`jax.nn.softmax` and vs the *write bound* (one elementwise pass writing an array of
the Jacobian's size and dtype); `jacobian-free`: [`jsoftmax.softmax_jvp`][] /
[`jsoftmax.softmax_vjp`][] vs the dense product `jacobian(x) @ v`."""

from __future__ import annotations

from functools import partial

import jax

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._timing import F32, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("jacobian", "jacobian-free")
AUTODIFF_TARGET = 1.3  # minimum ratio autodiff / jsoftmax (batched or n >= 1024)
WRITE_BOUND_TARGET = 1 / 1.25  # within 1.25x of the write bound
JACOBIAN_FREE_TARGET = 50.0  # minimum ratio dense / O(n) product at n = 4096
SHAPES = ((64,), (256,), (1024,), (4096,), (64, 512))
QUICK_SHAPES = ((64,), (1024,), (16, 512))


def _write_bound(x: jax.Array) -> jax.Array:
    # One multiply per output element of the runtime input: the least work that
    # materialises an (..., n, n) array of x's dtype, which XLA can neither
    # constant-fold nor skip.
    return x[..., :, None] * x[..., None, :]


def jacobian(ctx: Ctx, shape) -> list[Row]:
    x = _timing.logits(shape, F32)
    batched = len(shape) > 1

    def autodiff(transform):
        f = transform(jax.nn.softmax)
        return jax.jit(jax.vmap(f) if batched else f)

    fns = {
        "jsoftmax": jax.jit(jsoftmax.jacobian),
        "jacfwd": autodiff(jax.jacfwd),
        "jacrev": autodiff(jax.jacrev),
        "write bound": jax.jit(_write_bound),
    }
    ref = fns["jacfwd"](x)
    note = _timing.agree(fns["jsoftmax"](x), ref, F32) or _timing.agree(fns["jacrev"](x), ref, F32)
    t = _timing.time_interleaved(
        {k: (lambda f=f: f(x)) for k, f in fns.items()}, ctx.repeats, ctx.min_sample_s
    )
    big = batched or shape[-1] >= 1024
    case = f"jacobian {_timing.shape_str(shape)} float32"
    rows = [
        _timing.timing_row(
            "jacobian",
            case,
            "jsoftmax.jacobian",
            f"jax.{name}(jax.nn.softmax)" + (" (vmap)" if batched else ""),
            t["jsoftmax"],
            t[name],
            shape=shape,
            dtype=F32,
            target=AUTODIFF_TARGET if big else None,
            note=note,
        )
        for name in ("jacfwd", "jacrev")
    ]
    rows.append(
        _timing.timing_row(
            "jacobian",
            case,
            "jsoftmax.jacobian",
            "write bound",
            t["jsoftmax"],
            t["write bound"],
            shape=shape,
            dtype=F32,
            target=WRITE_BOUND_TARGET,
            note="ratio >= 0.80 means within 1.25x of the write bound",
        )
    )
    return rows


def jacobian_free(ctx: Ctx, n: int) -> list[Row]:
    x = _timing.logits((n,), F32)
    v = _timing.logits((n,), F32, seed=2)
    fns = {
        "dense J @ v": jax.jit(lambda x, v: jsoftmax.jacobian(x) @ v),
        "dense v @ J": jax.jit(lambda x, v: v @ jsoftmax.jacobian(x)),
        "softmax_jvp": jax.jit(lambda x, v: jsoftmax.softmax_jvp(jsoftmax.softmax(x), v)),
        "softmax_vjp": jax.jit(lambda x, v: jsoftmax.softmax_vjp(jsoftmax.softmax(x), v)),
    }
    note = _timing.agree(fns["softmax_jvp"](x, v), fns["dense J @ v"](x, v), F32)
    note = note or _timing.agree(fns["softmax_vjp"](x, v), fns["dense v @ J"](x, v), F32)
    t = _timing.time_interleaved(
        {k: (lambda f=f: f(x, v)) for k, f in fns.items()}, ctx.repeats, ctx.min_sample_s
    )
    target = JACOBIAN_FREE_TARGET if n >= 4096 else None
    return [
        _timing.timing_row(
            "jacobian-free",
            f"{expr} ({n},) float32",
            f"jsoftmax.{cand}(softmax(x), v)",
            f"jsoftmax.jacobian(x) {'@ v' if expr == 'J @ v' else '(v @)'}",
            t[cand],
            t[base],
            shape=(n,),
            dtype=F32,
            target=target,
            note=note,
        )
        for cand, base, expr in (
            ("softmax_jvp", "dense J @ v", "J @ v"),
            ("softmax_vjp", "dense v @ J", "v @ J"),
        )
    ]


def cases(quick: bool) -> list[Case]:
    plan = [
        Case("jacobian", f"jacobian {s}", partial(jacobian, shape=s))
        for s in (QUICK_SHAPES if quick else SHAPES)
    ]
    plan += [
        Case("jacobian-free", f"jacobian-free n={n}", partial(jacobian_free, n=n))
        for n in (1024, 4096)
    ]
    return plan
