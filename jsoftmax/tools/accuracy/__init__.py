r"""Error report against an arbitrary-precision reference: `python -m jsoftmax accuracy`
and `run`. Needs mpmath (`pip install 'jsoftmax[accuracy]'`).

For each dtype, operation and input family, the same quantity is computed by jsoftmax,
by `jax.nn` (with `jax.vjp`, `jax.jvp` and `jax.jacfwd` for the
derivatives) and by `mpmath` at 50 significant digits, and the error is expressed
in units in the last place (ULP) of the output dtype.

Metrics:

* **values** (`softmax`, `log_softmax`, `cross_entropy`): per component,
  $|y - y^\star| / \mathrm{ulp}(y^\star)$, where $\mathrm{ulp}(a)$ is the
  spacing of the output dtype at $a$ (the smallest subnormal below the normal
  range). Exact zeros and `-inf` (masked entries) must be reproduced exactly; a
  reference beyond the dtype's range must round to the same infinity.
* **derivatives** (`softmax_vjp`, `log_softmax_vjp`, `softmax_jvp`, `jacobian`,
  `jacfwd`, `cross_entropy_grad`): per component, the error divided by the ULP of
  the largest exact component of the same row (a row of a dense Jacobian is
  $\partial p_i/\partial z$). A derivative component far below the row's largest
  one carries no relative-accuracy promise.
* the relative error $|y - y^\star| / |y^\star|$ alongside (same row scale for
  derivatives).

A component that is NaN or infinite where the exact answer is finite counts as an
infinite error and is also counted in `nonfinite`. `[high]` operations use
`precision="high"`.

Public entry points: `run` returns the rows, `format_table` renders them,
`main` is the command line, `ulp` and `errors` are the metric.
"""

from jsoftmax.tools.accuracy._families import FAMILIES as FAMILIES
from jsoftmax.tools.accuracy._measure import CE_OPS as CE_OPS
from jsoftmax.tools.accuracy._measure import DIGITS as DIGITS
from jsoftmax.tools.accuracy._measure import GRAD_OPS as GRAD_OPS
from jsoftmax.tools.accuracy._measure import OPS as OPS
from jsoftmax.tools.accuracy._measure import VALUE_OPS as VALUE_OPS
from jsoftmax.tools.accuracy._measure import run as run
from jsoftmax.tools.accuracy._metrics import DTYPES as DTYPES
from jsoftmax.tools.accuracy._metrics import errors as errors
from jsoftmax.tools.accuracy._metrics import ulp as ulp
from jsoftmax.tools.accuracy._report import format_table as format_table
from jsoftmax.tools.accuracy._report import main as main

__all__ = [
    "CE_OPS",
    "DIGITS",
    "DTYPES",
    "FAMILIES",
    "GRAD_OPS",
    "OPS",
    "VALUE_OPS",
    "errors",
    "format_table",
    "main",
    "run",
    "ulp",
]
