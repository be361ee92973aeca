"""What every benchmark case shares: the timer, the row schema, the agreement check, the
memory measurements and the inputs. Imports no other benchmark module."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import math
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The benchmark groups. Each group module declares its own in ``GROUPS`` (typed with this
# alias, so a name missing here is a type error); ``_plan.GROUPS`` collects them.
Group = Literal[
    "forward",
    "fwd+bwd (a)",
    "fwd+bwd (b)",
    "cross-entropy",
    "ce options",
    "jacobian",
    "jacobian-free",
    "memory",
    "linear-ce",
    "linear-ce scaling",
    "post-training",
    "attention",
    "bandwidth",
    "torch",
    "sharded",
]

F32 = jnp.float32
BF16 = jnp.bfloat16
# Shapes of the forward, fwd+bwd and torch groups; a quick run uses the first.
FORWARD_SHAPES = ((4096, 1024), (1024, 32768), (64, 262144))

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


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, min_sample_s: float = 0.01
) -> dict[str, Timing]:
    """Times argument-free callables, interleaving their repeats.

    Each callable is called twice first (compilation and warm-up), then the number of
    calls per sample is chosen so that one sample lasts about `min_sample_s`. In
    repeat `r` the callables run in an order rotated by `r`, each for its number of
    calls, every call followed by `block_until_ready`.

    Args:
      fns: name -> callable taking no arguments.
      repeats: timed samples per callable.
      min_sample_s: the length of one sample, in seconds.

    Returns:
      name -> `Timing` (seconds per call).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jsoftmax.tools.bench import time_interleaved
      >>> t = time_interleaved({"zeros": lambda: jnp.zeros(3)}, repeats=3, min_sample_s=0.0)
      >>> t["zeros"].repeats, t["zeros"].min <= t["zeros"].median <= t["zeros"].max
      (3, True)
    """
    names = list(fns)
    numbers = {}
    for name in names:
        jax.block_until_ready(fns[name]())  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name]())
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
                        jax.block_until_ready(f())
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
    """One comparison. `ratio` = baseline / jsoftmax (> 1: jsoftmax is better)."""

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


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What every case is given: timed samples per function and the sample length."""

    repeats: int
    min_sample_s: float


def timing_row(
    group: str,
    case: str,
    candidate: str,
    baseline: str,
    cand: Timing,
    base: Timing,
    *,
    shape: Sequence[int],
    dtype,
    target: float | None = None,
    note: str = "",
) -> Row:
    """A row comparing two `Timing`; `met` is judged when a target is given."""
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
        shape=list(shape),
        dtype=np.dtype(dtype).name,
        candidate_iqr=[cand.q1, cand.q3],
        baseline_iqr=[base.q1, base.q3],
        target=target,
        met=None if target is None else bool(ratio >= target),
        note=note,
    )


def temp_bytes(fn, *args) -> int:
    """The compiled temporaries of `fn` (a `jax.jit` function) at `args`."""
    return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def bytes_row(
    group: str,
    case: str,
    candidate: str,
    baseline: str,
    cand: float | None,
    base: float | None,
    *,
    shape: Sequence[int],
    dtype=jnp.float32,
    target: float | None = None,
    note: str = "",
) -> Row:
    """A row comparing two byte counts (None: not reported by the backend); `met` is
    judged when a target is given and both are known."""
    ratio = base / cand if cand and base is not None else None
    return Row(
        group=group,
        case=case,
        candidate=candidate,
        baseline=baseline,
        unit="bytes",
        candidate_value=None if cand is None else float(cand),
        baseline_value=None if base is None else float(base),
        ratio=ratio,
        shape=list(shape),
        dtype=np.dtype(dtype).name,
        target=target,
        met=None if target is None or ratio is None else bool(ratio >= target),
        note=note,
    )


DIFFER = "RESULTS DIFFER"


def agree(a, b, dtype) -> str:
    """An empty note when the two pytrees of results agree, else `"RESULTS DIFFER"`.

    Agreement is judged relative to the largest magnitude of `b`: `3e-2` for 16-bit
    dtypes (the baselines round intermediate results), `1e-5` otherwise. Different
    structures or shapes differ.
    """
    tol = 3e-2 if jnp.finfo(dtype).bits < 32 else 1e-5
    a_leaves = [np.asarray(v, dtype=np.float64) for v in jax.tree_util.tree_leaves(a)]
    b_leaves = [np.asarray(v, dtype=np.float64) for v in jax.tree_util.tree_leaves(b)]
    ok = len(a_leaves) == len(b_leaves) and all(
        u.shape == v.shape
        and float(np.max(np.abs(u - v), initial=0.0))
        <= tol * max(float(np.max(np.abs(v), initial=0.0)), 1e-30)
        for u, v in zip(a_leaves, b_leaves, strict=True)
    )
    return "" if ok else DIFFER


# --------------------------------------------------------------------------------------
# Memory.
# --------------------------------------------------------------------------------------


def residuals(f: Callable, *args) -> tuple[int, int]:
    """(count, bytes) of the arrays saved for the backward pass of `f` at `args`.

    The residuals are the array leaves of the pullback `jax.vjp` returns (the
    arguments it keeps included), found abstractly with `jax.eval_shape`, so
    `args` may be `jax.ShapeDtypeStruct`.
    """
    pullback = jax.eval_shape(lambda *a: jax.vjp(f, *a)[1], *args)
    leaves = jax.tree_util.tree_leaves(pullback)
    nbytes = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in leaves)
    return len(leaves), nbytes


def footprint(compiled) -> int | None:
    """Arguments + outputs + temporaries - aliases of a compiled function, in bytes.

    Per device for a sharded computation; None when the backend does not report it.
    """
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):  # not every backend reports it
        return None
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


# --------------------------------------------------------------------------------------
# Inputs and labels.
# --------------------------------------------------------------------------------------


def logits(shape: Sequence[int], dtype, seed: int = 0) -> jax.Array:
    """Random non-zero logits (standard deviation 3) of `shape` and `dtype`."""
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(seed), tuple(shape), dtype=F32)
    return x.astype(dtype)


def mask(shape: Sequence[int], seed: int = 7) -> jax.Array:
    """About 10% of the entries masked; the first column always kept (no empty row)."""
    m = jax.random.bernoulli(jax.random.PRNGKey(seed), 0.9, tuple(shape))
    return m.at[..., 0].set(True)


def shape_str(shape: Sequence[int]) -> str:
    """`(4096, 1024)`, `(64,)`: the shape as Python prints a tuple."""
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def dtype_name(dtype) -> str:
    return np.dtype(dtype).name


# --------------------------------------------------------------------------------------
# Cases.
# --------------------------------------------------------------------------------------


class Case(NamedTuple):
    """One step of the plan: `run(ctx)` returns the rows of `group`; `label` is
    shown in the progress bar."""

    group: Group
    label: str
    run: Callable[[Ctx], list[Row]]


def installed(name: str) -> bool:
    """Whether the optional module `name` can be imported (without importing it)."""
    return importlib.util.find_spec(name) is not None


def optional(name: str) -> ModuleType | None:
    """The module `name` if it is installed (an optional baseline), else None."""
    return importlib.import_module(name) if installed(name) else None
