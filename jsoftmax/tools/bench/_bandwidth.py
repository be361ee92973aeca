"""Group `bandwidth`: the fraction of the memory-bandwidth bound reached by forward +
backward of a large softmax (form (a), value and VJP) and of the mean cross-entropy
(`jax.value_and_grad`), jsoftmax's beside its baseline's.

The bound is the time to move the bytes that the computation must read and write at
least once, at the bandwidth of a device-to-device pass `-x` timed in the same run. It
is a figure of an accelerator: on a CPU only a quick run has the group (a small shape,
no target), so that the quick run, the smoke test of `.ci/device`, runs its code."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._fwd_bwd import value_and_vjp
from jsoftmax.tools.bench._timing import BF16, F32, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("bandwidth",)
TARGET = 0.8  # minimum fraction of the bound, softmax forward + backward
SHAPE = (4096, 32768)
CPU_SHAPE = (256, 4096)  # the quick run on a CPU: the code path, not a figure


def _fraction_row(
    case: str,
    candidate: str,
    baseline: str,
    t: dict,
    arrays: int,
    x: jax.Array,
    target: float | None,
    note: str,
) -> Row:
    """A row whose ratio is jsoftmax's fraction of the bound: `arrays` arrays of `x`'s
    size moved at the bandwidth of the `copy` pass (which moves two)."""
    nbytes = x.size * x.dtype.itemsize
    rate = 2 * nbytes / t["copy"].median
    bound_s = arrays * nbytes / rate
    frac_c = bound_s / t["cand"].median
    frac_b = bound_s / t["base"].median if "base" in t else None
    return Row(
        group="bandwidth",
        case=case,
        candidate=candidate,
        baseline=baseline,
        unit="fraction",
        candidate_value=frac_c,
        baseline_value=frac_b,
        ratio=frac_c,
        shape=list(x.shape),
        dtype=np.dtype(x.dtype).name,
        target=target,
        met=None if target is None else bool(frac_c >= target),
        note=f"ratio = fraction of the bound ({arrays} arrays); copy bandwidth "
        f"{rate / 1e9:.0f} GB/s" + (f"; {note}" if note else ""),
    )


def softmax(ctx: Ctx, shape, dtype, target: float | None) -> list[Row]:
    """Bytes that must move: read x and g, write y and dx (4 arrays of x's size)."""
    x = _timing.logits(shape, dtype)
    g = _timing.logits(shape, dtype, seed=1)
    copy = jax.jit(lambda x: -x)
    cand = value_and_vjp(jsoftmax.softmax)
    base = value_and_vjp(jax.nn.softmax)
    note = _timing.agree(cand(x, g), base(x, g), dtype)
    t = _timing.time_interleaved(
        {"copy": lambda: copy(x), "cand": lambda: cand(x, g), "base": lambda: base(x, g)},
        ctx.repeats,
        ctx.min_sample_s,
    )
    case = f"softmax value + vjp {_timing.shape_str(shape)} {np.dtype(dtype).name}"
    return [
        _fraction_row(case, "jsoftmax.softmax(rule='vjp')", "jax.nn.softmax", t, 4, x, target, note)
    ]


def cross_entropy(ctx: Ctx, shape, dtype) -> list[Row]:
    """Bytes that must move: read the logits, write their gradient (2 arrays; the labels
    are one integer per row). A kernel that finds the row maximum in a pass of its own
    reads the logits twice, so it stays below 2/3 of this bound."""
    x = _timing.logits(shape, dtype)
    labels = jax.random.randint(jax.random.PRNGKey(1), shape[:-1], 0, shape[-1])
    copy = jax.jit(lambda x: -x)
    cand = jax.jit(jax.value_and_grad(lambda x, y: jsoftmax.cross_entropy(x, y).mean()))
    fns = {"copy": lambda: copy(x), "cand": lambda: cand(x, labels)}
    baseline, note = "none (optax is not installed)", ""
    optax = _timing.optional("optax")
    if optax is not None:
        loss = optax.softmax_cross_entropy_with_integer_labels
        base = jax.jit(jax.value_and_grad(lambda x, y: loss(x, y).mean()))
        fns["base"] = lambda: base(x, labels)
        baseline = "optax.softmax_cross_entropy_with_integer_labels"
        note = _timing.agree(cand(x, labels), base(x, labels), dtype)
    t = _timing.time_interleaved(fns, ctx.repeats, ctx.min_sample_s)
    case = f"cross_entropy value_and_grad(mean) {_timing.shape_str(shape)} {np.dtype(dtype).name}"
    return [_fraction_row(case, "jsoftmax.cross_entropy", baseline, t, 2, x, None, note)]


def cases(quick: bool) -> list[Case]:
    cpu = jax.default_backend() == "cpu"
    if cpu and not quick:
        return []
    shape, target = (CPU_SHAPE, None) if cpu else (SHAPE, TARGET)
    dtypes = (F32,) if quick else (F32, BF16)
    out = []
    for dtype in dtypes:
        name = np.dtype(dtype).name
        out.append(
            Case(
                "bandwidth",
                f"bandwidth softmax {name}",
                partial(softmax, shape=shape, dtype=dtype, target=target),
            )
        )
        out.append(
            Case(
                "bandwidth",
                f"bandwidth cross-entropy {name}",
                partial(cross_entropy, shape=shape, dtype=dtype),
            )
        )
    return out
