r"""Benchmarks: `python -m jsoftmax bench` and [`run`][jsoftmax.tools.bench.run].

Every row times jsoftmax against a baseline measured in the same run and reports the
ratio `baseline time / jsoftmax time` (> 1 means jsoftmax is faster), with the median
and the interquartile range over repeats. Functions are jitted, compiled and warmed up
before timing; every call is followed by `block_until_ready`; inputs are random
non-zero logits; the repeats of the functions in a row are interleaved (in rotating
order) so that load from other processes affects them alike. Each row also checks that
the two sides computed the same result (`note = "RESULTS DIFFER"` otherwise).

Groups of rows (`GROUPS`):

* `forward`: [`jsoftmax.softmax`][] vs `jax.nn.softmax`, with and without
  `where`, float32 and bfloat16.
* `fwd+bwd (a)`: value and VJP with the value returned (`jax.vjp`), as when the
  output feeds the next layer; `fwd+bwd (b)`: `jax.value_and_grad` of a scalar loss.
* `cross-entropy`: `jax.value_and_grad` of the mean [`jsoftmax.cross_entropy`][]
  with integer labels vs optax; `ce options`: each training option (ignore_index,
  weights, label smoothing, z-loss, soft-capping, temperature, `reduction="sum"`)
  against the plain call (target: at most 1.15x its time).
* `jacobian`: [`jsoftmax.jacobian`][] vs `jax.jacfwd` / `jax.jacrev` of
  `jax.nn.softmax`, and vs the *write bound*: one elementwise pass that writes an
  array of the same size and dtype (the outer product `x[:, None] * x[None, :]` of
  the runtime input, so XLA can neither constant-fold nor skip it).
* `jacobian-free`: [`jsoftmax.softmax_jvp`][] / [`jsoftmax.softmax_vjp`][] vs the
  dense product `jacobian(x) @ v`.
* `memory`: bytes saved for the backward pass (the residuals of `jax.vjp`) and the
  compiled footprint (arguments + outputs + temporaries) of a training-like step; the
  cross-entropy rows need optax.
* `linear-ce`: [`jsoftmax.linear_cross_entropy`][] vs the dense
  `optax.softmax_cross_entropy_with_integer_labels(x @ w, labels)` and a
  token-chunked `lax.scan` with `jax.checkpoint`: time and compiled temporary memory
  of `value_and_grad`; `linear-ce scaling`: the same against the vocabulary size.
* `bandwidth` (accelerators; on a CPU only a quick run, at a small shape): fraction of
  the memory-bandwidth bound reached by forward + backward of softmax and cross-entropy.
* `torch` (only when PyTorch is importable): `torch.softmax` as an outside reference.
* `sharded` (with `devices`): [`jsoftmax.sharded.cross_entropy`][] over 1, 2, 4, 8
  devices vs [`jsoftmax.cross_entropy`][] on one.

Public entry points: [`run`][jsoftmax.tools.bench.run] returns
`{"meta": ..., "rows": [...]}` (the schema of `--json`);
[`format_table`][jsoftmax.tools.bench.format_table] and `plot` render it; `main` is the
command line. `time_interleaved` and `Row` are the timer and the row
schema every case uses. Each group is a small module of this package with `GROUPS`
and `cases(quick)`, registered in `_plan`.
"""

from jsoftmax.tools.bench._cli import main as main
from jsoftmax.tools.bench._plan import GROUPS as GROUPS
from jsoftmax.tools.bench._report import format_table as format_table
from jsoftmax.tools.bench._report import plot as plot
from jsoftmax.tools.bench._run import run as run
from jsoftmax.tools.bench._sharded import prepare_devices as prepare_devices
from jsoftmax.tools.bench._timing import Row as Row
from jsoftmax.tools.bench._timing import Timing as Timing
from jsoftmax.tools.bench._timing import time_interleaved as time_interleaved

__all__ = [
    "GROUPS",
    "Row",
    "Timing",
    "format_table",
    "main",
    "plot",
    "prepare_devices",
    "run",
    "time_interleaved",
]
