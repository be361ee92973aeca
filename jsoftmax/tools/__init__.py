"""Tools built on jsoftmax: verification, benchmark and accuracy report.

Three subpackages, each a command of `python -m jsoftmax` (or `jsoftmax`) and a
Python API. They import the core (`jsoftmax.softmax` and friends), never the reverse.

* `jsoftmax.tools.verify` — [`jsoftmax.tools.verify.verify`][] checks every
  derivative method against a float64 reference (`jsoftmax verify`; also
  [`jsoftmax.verify`][]).
* `jsoftmax.tools.bench` — [`jsoftmax.tools.bench.run`][] times jsoftmax
  against jax.nn and autodiff baselines (`jsoftmax bench`).
* `jsoftmax.tools.accuracy` — `jsoftmax.tools.accuracy.run` measures the
  error against mpmath in ULPs (`jsoftmax accuracy`; needs `jsoftmax[accuracy]`).

The subpackages load on first use, so `import jsoftmax` stays light:

```python
import jsoftmax.tools.bench
result = jsoftmax.tools.bench.run(quick=True)
```
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loaded on first use (see __getattr__); named here for type checkers
    from jsoftmax.tools import accuracy, bench, verify

__all__ = ["accuracy", "bench", "verify"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
