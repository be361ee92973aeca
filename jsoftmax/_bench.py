r"""Benchmarks: ``python -m jsoftmax bench``.

Every row times jsoftmax against a baseline measured in the same run and reports the
ratio ``baseline time / jsoftmax time`` (> 1 means jsoftmax is faster), with the median
and the interquartile range over repeats. Functions are jitted, compiled and warmed up
before timing; every call is followed by ``block_until_ready``; inputs are random
non-zero logits; the repeats of the functions in a row are interleaved (in rotating
order) so that load from other processes affects them alike.

Groups of rows:

* ``forward``: :func:`jsoftmax.softmax` vs :func:`jax.nn.softmax`, with and without
  ``where``, float32 and bfloat16.
* ``fwd+bwd (a)``: value and VJP with the value returned (``jax.vjp``), as when the
  output feeds the next layer; ``fwd+bwd (b)``: ``jax.value_and_grad`` of a scalar loss.
* ``jacobian``: :func:`jsoftmax.jacobian` vs ``jax.jacfwd`` / ``jax.jacrev`` of
  :func:`jax.nn.softmax`, and vs the *write bound*: one elementwise pass that writes an
  array of the same size and dtype (the outer product ``x[:, None] * x[None, :]`` of
  the runtime input, so XLA can neither constant-fold nor skip it).
* ``jacobian-free``: :func:`jsoftmax.softmax_jvp` / :func:`jsoftmax.softmax_vjp` vs the
  dense product ``jacobian(x) @ v``.
* ``memory``: bytes saved for the backward pass (``saved_residuals``) and the compiled
  footprint (arguments + outputs + temporaries) of a training-like step.
* ``bandwidth`` (GPU only): fraction of the memory-bandwidth bound reached by
  forward + backward.
* ``torch`` (only when PyTorch is importable): ``torch.softmax`` as an outside reference.

The same measurements are available from Python: :func:`run` returns a dict with
``meta`` and ``rows``; :func:`format_table` and :func:`plot` render it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROG = "python -m jsoftmax bench"
GROUPS = (
    "forward",
    "fwd+bwd (a)",
    "fwd+bwd (b)",
    "jacobian",
    "jacobian-free",
    "memory",
    "bandwidth",
    "torch",
)

# Targets (minimum ratio baseline / jsoftmax) checked by the rows.
FORWARD_TARGET = 0.95
FWD_BWD_TARGET = 0.95
JACOBIAN_AUTODIFF_TARGET = 1.3
WRITE_BOUND_TARGET = 1 / 1.25
JACOBIAN_FREE_TARGET = 50.0
BANDWIDTH_TARGET = 0.8

_F32 = jnp.float32
_BF16 = jnp.bfloat16


# --------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call over the repeats of one function."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    number: int
    repeats: int

    @classmethod
    def from_samples(cls, samples: Sequence[float], number: int) -> Timing:
        a = np.asarray(samples, dtype=np.float64)
        q1, med, q3 = np.percentile(a, [25, 50, 75])
        return cls(float(med), float(q1), float(q3), float(a.min()), float(a.max()), number, a.size)


def _block(out: Any) -> Any:
    return jax.block_until_ready(out)


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, min_sample_s: float = 0.01
) -> dict[str, Timing]:
    """Times argument-free callables, interleaving their repeats.

    Each callable is called twice first (compilation and warm-up), then the number of
    calls per sample is chosen so that one sample lasts about ``min_sample_s``. In
    repeat ``r`` the callables run in an order rotated by ``r``, each for its number of
    calls, every call followed by ``block_until_ready``.
    """
    names = list(fns)
    numbers = {}
    for name in names:
        _block(fns[name]())  # compile
        t0 = time.perf_counter()
        _block(fns[name]())
        dt = time.perf_counter() - t0
        numbers[name] = max(1, min(10_000, math.ceil(min_sample_s / max(dt, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names)
            order = names[k:] + names[:k]
            total = dict.fromkeys(names, 0.0)
            # Single calls alternate between the functions, so a burst of load from
            # another process lands on all of them rather than on one sample.
            for i in range(max(numbers.values())):
                for name in order:
                    if i < numbers[name]:
                        f = fns[name]
                        t0 = time.perf_counter()
                        _block(f())
                        total[name] += time.perf_counter() - t0
            for name in names:
                samples[name].append(total[name] / numbers[name])
    finally:
        if gc_enabled:
            gc.enable()
    return {name: Timing.from_samples(samples[name], numbers[name]) for name in names}


# --------------------------------------------------------------------------------------
# Rows.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One comparison. ``ratio`` = baseline / jsoftmax (> 1: jsoftmax is better)."""

    group: str
    case: str
    candidate: str
    baseline: str
    unit: str  # "s" (seconds per call), "bytes" or "fraction"
    candidate_value: float | None
    baseline_value: float | None
    ratio: float | None
    shape: list[int] | None = None
    dtype: str | None = None
    candidate_iqr: list[float] | None = None
    baseline_iqr: list[float] | None = None
    target: float | None = None  # minimum ratio
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _timing_row(
    group: str,
    case: str,
    candidate: str,
    baseline: str,
    cand: Timing,
    base: Timing,
    *,
    shape=None,
    dtype=None,
    target: float | None = None,
    note: str = "",
) -> Row:
    ratio = base.median / cand.median
    return Row(
        group=group,
        case=case,
        candidate=candidate,
        baseline=baseline,
        unit="s",
        candidate_value=cand.median,
        baseline_value=base.median,
        ratio=ratio,
        shape=None if shape is None else list(shape),
        dtype=None if dtype is None else np.dtype(dtype).name,
        candidate_iqr=[cand.q1, cand.q3],
        baseline_iqr=[base.q1, base.q3],
        target=target,
        met=None if target is None else bool(ratio >= target),
        note=note,
    )


def _logits(shape, dtype, seed: int = 0) -> jax.Array:
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(seed), shape, dtype=_F32)
    return x.astype(dtype)


def _mask(shape, seed: int = 7) -> jax.Array:
    # About 10% of the entries masked; the first column always kept, so no row is empty.
    m = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.9, shape)
    return m.at[..., 0].set(True)


def _agree(a, b, dtype) -> str:
    """An empty note when the two results agree, else a warning for the table."""
    # Relative to the largest magnitude: 16-bit baselines round intermediate results.
    tol = 3e-2 if jnp.finfo(dtype).bits < 32 else 1e-5
    a_leaves = [np.asarray(v, dtype=np.float64) for v in jax.tree_util.tree_leaves(a)]
    b_leaves = [np.asarray(v, dtype=np.float64) for v in jax.tree_util.tree_leaves(b)]
    ok = len(a_leaves) == len(b_leaves) and all(
        u.shape == v.shape
        and float(np.max(np.abs(u - v), initial=0.0))
        <= tol * max(float(np.max(np.abs(v), initial=0.0)), 1e-30)
        for u, v in zip(a_leaves, b_leaves, strict=True)
    )
    return "" if ok else "RESULTS DIFFER"


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# --------------------------------------------------------------------------------------
# Cases. Each returns a list of rows; `ctx` carries repeats and sample length.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ctx:
    repeats: int
    min_sample_s: float


def _forward(ctx: _Ctx, shape, dtype, where: bool) -> list[Row]:
    import jsoftmax

    x = _logits(shape, dtype)
    if where:
        args = (x, _mask(shape))
        cand = jax.jit(lambda x, m: jsoftmax.softmax(x, where=m))
        base = jax.jit(lambda x, m: jax.nn.softmax(x, where=m))
    else:
        args = (x,)
        cand = jax.jit(jsoftmax.softmax)
        base = jax.jit(jax.nn.softmax)
    note = _agree(cand(*args), base(*args), dtype)
    t = time_interleaved(
        {"base": lambda: base(*args), "cand": lambda: cand(*args)}, ctx.repeats, ctx.min_sample_s
    )
    suffix = ", where" if where else ""
    return [
        _timing_row(
            "forward",
            f"softmax {_shape_str(shape)} {np.dtype(dtype).name}{suffix}",
            "jsoftmax.softmax",
            "jax.nn.softmax",
            t["cand"],
            t["base"],
            shape=shape,
            dtype=dtype,
            target=FORWARD_TARGET,
            note=note,
        )
    ]


def _value_and_vjp(sm: Callable) -> Callable:
    def f(x, g):
        y, pullback = jax.vjp(sm, x)
        return y, pullback(g)[0]

    return jax.jit(f)


def _value_and_grad(sm: Callable) -> Callable:
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(sm(x) * w)))


def _fwd_bwd(ctx: _Ctx, form: str, shape, dtype, rule: str) -> list[Row]:
    import jsoftmax

    x = _logits(shape, dtype)
    g = _logits(shape, dtype, seed=1)
    make = _value_and_vjp if form == "a" else _value_and_grad
    cand = make(lambda x: jsoftmax.softmax(x, rule=rule))
    base = make(jax.nn.softmax)
    note = _agree(cand(x, g), base(x, g), dtype)
    t = time_interleaved(
        {"base": lambda: base(x, g), "cand": lambda: cand(x, g)}, ctx.repeats, ctx.min_sample_s
    )
    what = "value + vjp" if form == "a" else "value_and_grad"
    return [
        _timing_row(
            f"fwd+bwd ({form})",
            f"{what} {_shape_str(shape)} {np.dtype(dtype).name}, rule={rule}",
            f"jsoftmax.softmax(rule={rule!r})",
            "jax.nn.softmax",
            t["cand"],
            t["base"],
            shape=shape,
            dtype=dtype,
            target=FWD_BWD_TARGET if rule == "vjp" else None,
            note=note,
        )
    ]


def _write_bound(x: jax.Array) -> jax.Array:
    # One multiply per output element of the runtime input: the least work that
    # materialises an (..., n, n) array of x's dtype.
    return x[..., :, None] * x[..., None, :]


def _jacobian(ctx: _Ctx, shape) -> list[Row]:
    import jsoftmax

    x = _logits(shape, _F32)
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
    note = _agree(fns["jsoftmax"](x), ref, _F32) or _agree(fns["jacrev"](x), ref, _F32)
    t = time_interleaved(
        {k: (lambda f=f: f(x)) for k, f in fns.items()}, ctx.repeats, ctx.min_sample_s
    )
    n = shape[-1]
    big = batched or n >= 1024
    case = f"jacobian {_shape_str(shape)} float32"
    rows = []
    for name in ("jacfwd", "jacrev"):
        rows.append(
            _timing_row(
                "jacobian",
                case,
                "jsoftmax.jacobian",
                f"jax.{name}(jax.nn.softmax)" + (" (vmap)" if batched else ""),
                t["jsoftmax"],
                t[name],
                shape=shape,
                dtype=_F32,
                target=JACOBIAN_AUTODIFF_TARGET if big else None,
                note=note,
            )
        )
    rows.append(
        _timing_row(
            "jacobian",
            case,
            "jsoftmax.jacobian",
            "write bound",
            t["jsoftmax"],
            t["write bound"],
            shape=shape,
            dtype=_F32,
            target=WRITE_BOUND_TARGET,
            note="ratio >= 0.80 means within 1.25x of the write bound",
        )
    )
    return rows


def _jacobian_free(ctx: _Ctx, n: int) -> list[Row]:
    import jsoftmax

    x = _logits((n,), _F32)
    v = _logits((n,), _F32, seed=2)
    fns = {
        "dense J @ v": jax.jit(lambda x, v: jsoftmax.jacobian(x) @ v),
        "dense v @ J": jax.jit(lambda x, v: v @ jsoftmax.jacobian(x)),
        "softmax_jvp": jax.jit(lambda x, v: jsoftmax.softmax_jvp(jsoftmax.softmax(x), v)),
        "softmax_vjp": jax.jit(lambda x, v: jsoftmax.softmax_vjp(jsoftmax.softmax(x), v)),
    }
    note = _agree(fns["softmax_jvp"](x, v), fns["dense J @ v"](x, v), _F32)
    note = note or _agree(fns["softmax_vjp"](x, v), fns["dense v @ J"](x, v), _F32)
    t = time_interleaved(
        {k: (lambda f=f: f(x, v)) for k, f in fns.items()}, ctx.repeats, ctx.min_sample_s
    )
    target = JACOBIAN_FREE_TARGET if n >= 4096 else None
    rows = []
    for cand, base, expr in (
        ("softmax_jvp", "dense J @ v", "J @ v"),
        ("softmax_vjp", "dense v @ J", "v @ J"),
    ):
        rows.append(
            _timing_row(
                "jacobian-free",
                f"{expr} ({n},) float32",
                f"jsoftmax.{cand}(softmax(x), v)",
                f"jsoftmax.jacobian(x) {'@ v' if expr == 'J @ v' else '(v @)'}",
                t[cand],
                t[base],
                shape=(n,),
                dtype=_F32,
                target=target,
                note=note,
            )
        )
    return rows


# ----- memory ---------------------------------------------------------------------------


def _residuals(f: Callable, *args) -> tuple[int, int]:
    """(count, bytes) of the arrays saved for the backward pass of ``f``."""
    from jax._src.ad_checkpoint import saved_residuals

    res = saved_residuals(f, *args)
    nbytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a, _ in res)
    return len(res), nbytes


def _memory_row(case, candidate, baseline, cand, base, *, shape, dtype, out_bytes=None) -> Row:
    (nc, bc), (nb, bb) = cand, base
    met = None
    note = f"arrays saved: jsoftmax {nc}, baseline {nb}"
    if out_bytes is not None:
        met = bool(nc == 1 and bc == out_bytes)
        note += "; target: exactly one output-sized array"
    return Row(
        group="memory",
        case=case,
        candidate=candidate,
        baseline=baseline,
        unit="bytes",
        candidate_value=float(bc),
        baseline_value=float(bb),
        ratio=bb / bc if bc else None,
        shape=list(shape),
        dtype=np.dtype(dtype).name,
        met=met,
        note=note,
    )


def _footprint(f: Callable, *args) -> int:
    """Arguments + outputs + temporaries - aliases of the compiled ``f``, in bytes."""
    m = jax.jit(f).lower(*args).compile().memory_analysis()
    if m is None:
        return -1
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def _nll_step(log_softmax: Callable) -> Callable:
    def loss(x, labels):
        logp = log_softmax(x)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    return jax.value_and_grad(loss)


def _ce_step(cross_entropy: Callable) -> Callable:
    return jax.value_and_grad(lambda x, labels: jnp.mean(cross_entropy(x, labels)))


def _memory(ctx: _Ctx, shape) -> list[Row]:
    import jsoftmax

    del ctx
    x = jax.ShapeDtypeStruct(shape, _F32)
    labels = jax.ShapeDtypeStruct(shape[:-1], jnp.int32)
    out_bytes = int(np.prod(shape)) * 4
    s = _shape_str(shape)
    rows = [
        _memory_row(
            f"residuals softmax(rule='vjp') {s}",
            "jsoftmax.softmax(rule='vjp')",
            "jax.nn.softmax",
            _residuals(jsoftmax.softmax, x),
            _residuals(jax.nn.softmax, x),
            shape=shape,
            dtype=_F32,
            out_bytes=out_bytes,
        ),
        _memory_row(
            f"residuals softmax(rule='jvp') {s}",
            "jsoftmax.softmax(rule='jvp')",
            "jax.nn.softmax",
            _residuals(lambda x: jsoftmax.softmax(x, rule="jvp"), x),
            _residuals(jax.nn.softmax, x),
            shape=shape,
            dtype=_F32,
        ),
        _memory_row(
            f"residuals log_softmax {s}",
            "jsoftmax.log_softmax(rule='vjp')",
            "jax.nn.log_softmax",
            _residuals(jsoftmax.log_softmax, x),
            _residuals(jax.nn.log_softmax, x),
            shape=shape,
            dtype=_F32,
            out_bytes=out_bytes,
        ),
    ]
    optax = _optional("optax")
    ce = getattr(jsoftmax, "cross_entropy", None)
    if ce is not None and optax is not None:
        rows.append(
            _memory_row(
                f"residuals cross-entropy {s}",
                "jsoftmax.cross_entropy",
                "optax.softmax_cross_entropy_with_integer_labels",
                _residuals(ce, x, labels),
                _residuals(optax.softmax_cross_entropy_with_integer_labels, x, labels),
                shape=shape,
                dtype=_F32,
            )
        )
    # Compiled footprint of a training-like step: value_and_grad of a mean NLL.
    rows.append(
        _memory_row(
            f"train step (log_softmax NLL) {s}",
            "jsoftmax.log_softmax",
            "jax.nn.log_softmax",
            (0, _footprint(_nll_step(jsoftmax.log_softmax), x, labels)),
            (0, _footprint(_nll_step(jax.nn.log_softmax), x, labels)),
            shape=shape,
            dtype=_F32,
        )
    )
    rows[-1].note = "compiled arguments + outputs + temporaries of value_and_grad(mean NLL)"
    if ce is not None and optax is not None:
        rows.append(
            _memory_row(
                f"train step (cross_entropy) {s}",
                "jsoftmax.cross_entropy",
                "optax.softmax_cross_entropy_with_integer_labels",
                (0, _footprint(_ce_step(ce), x, labels)),
                (
                    0,
                    _footprint(
                        _ce_step(optax.softmax_cross_entropy_with_integer_labels), x, labels
                    ),
                ),
                shape=shape,
                dtype=_F32,
            )
        )
        rows[-1].note = "compiled arguments + outputs + temporaries of value_and_grad(mean CE)"
    return rows


# ----- GPU bandwidth ----------------------------------------------------------------------


def _bandwidth(ctx: _Ctx, shape, dtype) -> list[Row]:
    """Fraction of the bandwidth bound reached by forward + backward (form (a)).

    Bytes that must move: read x and g, write y and dx (4 arrays of x's size). Bandwidth:
    a device-to-device pass ``-x`` (read + write one array).
    """
    import jsoftmax

    x = _logits(shape, dtype)
    g = _logits(shape, dtype, seed=1)
    copy = jax.jit(lambda x: -x)
    cand = _value_and_vjp(jsoftmax.softmax)
    base = _value_and_vjp(jax.nn.softmax)
    t = time_interleaved(
        {"copy": lambda: copy(x), "cand": lambda: cand(x, g), "base": lambda: base(x, g)},
        ctx.repeats,
        ctx.min_sample_s,
    )
    nbytes = x.size * x.dtype.itemsize
    bandwidth = 2 * nbytes / t["copy"].median
    bound_s = 4 * nbytes / bandwidth
    frac_c = bound_s / t["cand"].median
    frac_b = bound_s / t["base"].median
    return [
        Row(
            group="bandwidth",
            case=f"value + vjp {_shape_str(shape)} {np.dtype(dtype).name}",
            candidate="jsoftmax.softmax(rule='vjp')",
            baseline="jax.nn.softmax",
            unit="fraction",
            candidate_value=frac_c,
            baseline_value=frac_b,
            ratio=frac_c,
            shape=list(shape),
            dtype=np.dtype(dtype).name,
            target=BANDWIDTH_TARGET,
            met=bool(frac_c >= BANDWIDTH_TARGET),
            note=f"ratio = fraction of bound; copy bandwidth {bandwidth / 1e9:.0f} GB/s",
        )
    ]


# ----- PyTorch (optional) ---------------------------------------------------------------


def _torch(ctx: _Ctx, shape, backward: bool) -> list[Row]:
    import torch

    import jsoftmax

    x = _logits(shape, _F32)
    g = _logits(shape, _F32, seed=1)
    xt = torch.from_numpy(np.array(x))
    gt = torch.from_numpy(np.array(g))
    if backward:
        cand = _value_and_vjp(jsoftmax.softmax)

        def base():
            xr = xt.detach().requires_grad_(True)
            y = torch.softmax(xr, dim=-1)
            y.backward(gt)
            return y, xr.grad

        run_c = lambda: cand(x, g)  # noqa: E731
    else:
        cand = jax.jit(jsoftmax.softmax)

        def base():
            with torch.no_grad():
                return torch.softmax(xt, dim=-1)

        run_c = lambda: cand(x)  # noqa: E731
    t = time_interleaved({"base": base, "cand": run_c}, ctx.repeats, ctx.min_sample_s)
    what = "value + vjp" if backward else "softmax"
    return [
        _timing_row(
            "torch",
            f"{what} {_shape_str(shape)} float32",
            "jsoftmax.softmax",
            f"torch.softmax (torch {torch.__version__}, CPU)",
            t["cand"],
            t["base"],
            shape=shape,
            dtype=_F32,
        )
    ]


# --------------------------------------------------------------------------------------
# The plan: which cases run in quick and full mode.
# --------------------------------------------------------------------------------------

FORWARD_SHAPES = ((4096, 1024), (1024, 32768), (64, 262144))
JACOBIAN_SHAPES = ((64,), (256,), (1024,), (4096,), (64, 512))


def _optional(name: str):
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def _plan(quick: bool) -> list[tuple[str, str, Callable[[_Ctx], list[Row]]]]:
    """(group, label, case) triples, in the order they run."""
    from functools import partial

    fwd_shapes = FORWARD_SHAPES[:1] if quick else FORWARD_SHAPES
    plan: list[tuple[str, str, Callable[[_Ctx], list[Row]]]] = []
    for shape in fwd_shapes:
        plan.append(
            ("forward", f"softmax {shape}", partial(_forward, shape=shape, dtype=_F32, where=False))
        )
    plan.append(
        (
            "forward",
            "softmax bfloat16",
            partial(_forward, shape=(4096, 1024), dtype=_BF16, where=False),
        )
    )
    for shape in fwd_shapes:
        plan.append(
            (
                "forward",
                f"softmax {shape} where",
                partial(_forward, shape=shape, dtype=_F32, where=True),
            )
        )
    rules = ("vjp",) if quick else ("vjp", "jvp")
    for form in ("a", "b"):
        for rule in rules:
            cases = [(s, _F32) for s in fwd_shapes] + [((4096, 1024), _BF16)]
            for shape, dtype in cases:
                label = f"fwd+bwd ({form}) {shape} {np.dtype(dtype).name} {rule}"
                plan.append(
                    (
                        f"fwd+bwd ({form})",
                        label,
                        partial(_fwd_bwd, form=form, shape=shape, dtype=dtype, rule=rule),
                    )
                )
    jac_shapes = ((64,), (1024,), (16, 512)) if quick else JACOBIAN_SHAPES
    for shape in jac_shapes:
        plan.append(("jacobian", f"jacobian {shape}", partial(_jacobian, shape=shape)))
    for n in (1024, 4096):
        plan.append(("jacobian-free", f"jacobian-free n={n}", partial(_jacobian_free, n=n)))
    plan.append(("memory", "memory", partial(_memory, shape=(4096, 32768))))
    if jax.default_backend() != "cpu":
        for dtype in (_F32, _BF16):
            plan.append(
                (
                    "bandwidth",
                    f"bandwidth {np.dtype(dtype).name}",
                    partial(_bandwidth, shape=(4096, 32768), dtype=dtype),
                )
            )
    if _optional("torch") is not None:
        for shape in fwd_shapes:
            for backward in (False, True):
                plan.append(
                    ("torch", f"torch {shape}", partial(_torch, shape=shape, backward=backward))
                )
    return plan


# --------------------------------------------------------------------------------------
# Progress, metadata, running.
# --------------------------------------------------------------------------------------


class _Progress:
    """A plain-text progress bar on a stream (stderr by default)."""

    def __init__(self, total: int, stream=None, width: int = 24, enabled: bool = True):
        self.total, self.done, self.width, self.enabled = total, 0, width, enabled
        self.stream = sys.stderr if stream is None else stream
        self._last = 0

    def show(self, label: str) -> None:
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}"
        pad = " " * max(0, self._last - len(line))
        self._last = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()

    def step(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            self.show("done")
            self.stream.write("\n")
            self.stream.flush()


def _meta(quick: bool, repeats: int) -> dict[str, Any]:
    import jsoftmax

    dev = jax.devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    return {
        "backend": jax.default_backend(),
        "device": f"{dev.platform}: {dev.device_kind}",
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": getattr(importlib.import_module("jaxlib"), "__version__", "?"),
        "jsoftmax": jsoftmax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "dtype": "float32 unless a row names another",
        "mode": "quick" if quick else "full",
        "repeats": repeats,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "peak_bytes_in_use": (stats or {}).get("peak_bytes_in_use", "n/a"),
    }


def run(
    quick: bool = True,
    repeats: int | None = None,
    groups: Sequence[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Runs the benchmark and returns ``{"meta": {...}, "rows": [...]}``.

    Args:
      quick: a reduced set of shapes and repeats (under a minute on 2 CPU cores).
      repeats: timed samples per function (default 5 quick, 15 full).
      groups: restrict to these groups (see ``GROUPS``); all by default.
      progress: print a progress bar on stderr.

    Returns:
      A JSON-serialisable dict. Each row has ``group, case, candidate, baseline, unit,
      candidate_value, baseline_value, ratio`` (baseline / jsoftmax: > 1 means jsoftmax
      is faster or smaller), ``candidate_iqr``, ``baseline_iqr``, ``target`` (minimum
      ratio, or None), ``met``, ``shape``, ``dtype`` and ``note``.
    """
    if repeats is None:
        repeats = 5 if quick else 15
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if groups is not None:
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"groups: unknown {unknown}; choose from {list(GROUPS)}.")
    ctx = _Ctx(repeats=repeats, min_sample_s=0.003 if quick else 0.02)
    plan = [p for p in _plan(quick) if groups is None or p[0] in groups]
    bar = _Progress(len(plan), enabled=progress)
    rows: list[Row] = []
    start = time.perf_counter()
    for _, label, case in plan:
        bar.show(label)
        rows.extend(case(ctx))
        bar.step()
    bar.close()
    meta = _meta(quick, repeats)
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    return {"meta": meta, "rows": [r.as_dict() for r in rows]}


# --------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_bytes(b: float) -> str:
    if b < 0:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{int(b)} B"


def _fmt_value(row: Mapping[str, Any], which: str) -> str:
    v = row[f"{which}_value"]
    if v is None:
        return "n/a"
    if not isinstance(v, (int, float)):
        return str(v)
    if row["unit"] == "s":
        iqr = row.get(f"{which}_iqr")
        if not iqr:
            return _fmt_time(v)
        return f"{_fmt_time(v)} ({_fmt_time(iqr[0])}-{_fmt_time(iqr[1])})"
    if row["unit"] == "bytes":
        return _fmt_bytes(v)
    return f"{v:.2f}"


def _fmt_target(row: Mapping[str, Any]) -> str:
    if row["met"] is None:
        return ""
    t = row["target"]
    goal = f">= {t:.2f}" if t is not None else "1 array"
    return f"{goal} {'met' if row['met'] else 'MISSED'}"


def format_table(result: Mapping[str, Any]) -> str:
    """The result of :func:`run` as a plain-text table with a header and a summary."""
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"jsoftmax {meta['jsoftmax']} benchmark ({meta['mode']}, {meta['repeats']} repeats, "
        f"{meta['date']})",
        f"backend: {meta['backend']}   device: {meta['device']} x{meta['device_count']}   "
        f"jax {meta['jax']}   cpu cores: {meta['cpu_count']}   dtype: {meta['dtype']}",
        "ratio = baseline / jsoftmax (> 1: jsoftmax faster or smaller); times are medians "
        "per call with the interquartile range.",
        "",
    ]
    header = ("group", "case", "baseline", "jsoftmax: value", "baseline: value", "ratio", "target")
    table = [header]
    for r in rows:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        table.append(
            (
                r["group"],
                r["case"],
                r["baseline"],
                _fmt_value(r, "candidate"),
                _fmt_value(r, "baseline"),
                ratio,
                _fmt_target(r),
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = sorted({r["note"] for r in rows if r["note"] and "DIFFER" in r["note"]})
    if notes:
        lines += ["", "WARNING: " + "; ".join(notes)]
    checked = [r for r in rows if r["met"] is not None]
    missed = [r for r in checked if not r["met"]]
    lines += [
        "",
        f"targets met: {len(checked) - len(missed)}/{len(checked)}",
    ]
    for r in missed:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"  missed: {r['group']}: {r['case']} vs {r['baseline']} ({ratio})")
    lines.append(f"peak bytes in use (device): {meta['peak_bytes_in_use']}")
    lines.append(f"elapsed: {meta.get('elapsed_s', '?')} s")
    return "\n".join(lines)


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "--plot needs matplotlib, which is an optional extra: "
            "pip install 'jsoftmax[bench]' (or pip install matplotlib)."
        ) from e
    return plt


def plot(result: Mapping[str, Any], path: str) -> None:
    """Writes a PNG bar chart of the ratios (log scale) with the targets marked."""
    plt = _require_matplotlib()
    rows = [r for r in result["rows"] if r["ratio"] is not None and r["unit"] != "fraction"]
    labels = [f"{r['case']} vs {r['baseline']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    colors = [
        "tab:gray" if r["met"] is None else ("tab:green" if r["met"] else "tab:red") for r in rows
    ]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    y = np.arange(len(rows))
    ax.barh(y, ratios, color=colors)
    for i, r in enumerate(rows):
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="black", lw=1.5)
    ax.axvline(1.0, color="black", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    meta = result["meta"]
    ax.set_xlabel("baseline / jsoftmax (> 1: jsoftmax better); black tick: target")
    ax.set_title(f"jsoftmax bench: {meta['device']}, jax {meta['jax']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Time jsoftmax against jax.nn and autodiff baselines on the default backend. "
        "Ratios are baseline / jsoftmax, so > 1 means jsoftmax is faster.",
    )
    p.add_argument("--quick", action="store_true", help="reduced run (< 1 minute on 2 CPU cores)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the ratios (needs matplotlib)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per function")
    p.add_argument(
        "--only",
        metavar="GROUPS",
        help=f"comma-separated groups to run, from: {', '.join(GROUPS)}",
    )
    p.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="also run the sharded benchmark over N devices",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _sharded(devices: int, quick: bool) -> Any:
    try:
        module = importlib.import_module("jsoftmax._bench_sharded")
    except ImportError:
        return None
    return module.run_sharded_bench(devices, quick)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.repeats is not None and args.repeats < 1:
        print(f"{PROG}: --repeats must be >= 1, got {args.repeats}.", file=sys.stderr)
        return 2
    if args.devices is not None and args.devices < 1:
        print(f"{PROG}: --devices must be >= 1, got {args.devices}.", file=sys.stderr)
        return 2
    groups = None
    if args.only:
        groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            print(
                f"{PROG}: --only: unknown group(s) {unknown}; choose from {list(GROUPS)}.",
                file=sys.stderr,
            )
            return 2
    if args.plot:
        try:
            _require_matplotlib()
        except ImportError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
    if args.devices is not None and importlib.util.find_spec("jsoftmax._bench_sharded") is None:
        print(
            f"{PROG}: --devices needs the sharded benchmark (jsoftmax._bench_sharded), "
            "which this installation does not have.",
            file=sys.stderr,
        )
        return 2

    if args.devices is not None:
        # The device count is fixed when JAX starts its backends: ask before any timing.
        module = importlib.import_module("jsoftmax._bench_sharded")
        prepare = getattr(module, "prepare_devices", None)
        try:
            if prepare is not None:
                prepare(args.devices)
        except (RuntimeError, ValueError) as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
    result = run(
        quick=args.quick, repeats=args.repeats, groups=groups, progress=not args.no_progress
    )
    if args.devices is not None:
        sharded = _sharded(args.devices, args.quick)
        if isinstance(sharded, Mapping) and "rows" in sharded:
            sharded = sharded["rows"]
        if isinstance(sharded, list) and all(isinstance(r, Mapping) for r in sharded):
            blank = {f.name: None for f in dataclasses.fields(Row)}
            blank.update(group="sharded", case="", candidate="", baseline="", unit="", note="")
            result["rows"].extend({**blank, **dict(r)} for r in sharded)
        else:
            result["sharded"] = sharded
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
