"""Input families of the accuracy report. Each returns float64 arrays whose values are
exactly representable in the dtype (they are rounded to it first): the rounded values
are the problem solved."""

from __future__ import annotations

from typing import Literal, get_args

import jax.numpy as jnp
import numpy as np

from jsoftmax.tools.accuracy._metrics import Dtype, to_dtype, ulp

Family = Literal[
    "normal",
    "wide",
    "near_ties",
    "dominant",
    "many_equal",
    "near_max",
    "neg_inf",
    "masked",
]
FAMILIES: tuple[Family, ...] = get_args(Family)


def family(name: Family, dtype: Dtype, rows: int, n: int, rng: np.random.Generator):
    """Returns `(x, where)` of shape `(rows, n)`; `where` is None when unmasked."""
    fmax = float(jnp.finfo(jnp.dtype(dtype)).max)
    where = None
    if name == "normal":
        x = rng.standard_normal((rows, n))
    elif name == "wide":
        x = 1e3 * rng.standard_normal((rows, n))
    elif name == "near_ties":
        c = to_dtype(3.0 * rng.standard_normal((rows, 1)), dtype)
        x = c + ulp(c, dtype) * rng.integers(-3, 4, size=(rows, n))
    elif name == "dominant":
        x = rng.standard_normal((rows, n))
        gaps = np.array([5.0, 12.0, 20.0, 30.0, 40.0, 50.0, 70.0, 100.0])
        idx = rng.integers(0, n, size=rows)
        for r in range(rows):
            x[r, idx[r]] = x[r].max() + gaps[r % len(gaps)]
    elif name == "many_equal":
        v = to_dtype(rng.standard_normal((rows, 1)), dtype)
        x = np.repeat(v, n, axis=1)
        for r in range(1, rows):
            k = max(1, n // 100)
            pos = rng.choice(n, size=k, replace=False)
            if r % 2:  # a few smaller values among many equal maxima
                x[r, pos] = v[r, 0] - rng.integers(1, 4, size=k)
            else:  # one larger value above many equal ones
                x[r, pos[0]] = v[r, 0] + 1.0
    elif name == "near_max":
        spacing = ulp(np.array([fmax]), dtype)[0]
        x = fmax - spacing * rng.integers(0, 8, size=(rows, n))
        x[::2, 0] = -fmax
    elif name == "neg_inf":
        x = rng.standard_normal((rows, n))
        x[rng.random((rows, n)) < 0.25] = -np.inf
        x[:, 0] = rng.standard_normal(rows)  # at least one finite entry per row
    elif name == "masked":
        x = rng.standard_normal((rows, n))
        where = rng.random((rows, n)) >= 0.3
        where[:, 0] = True
        where[-1, :] = False  # one fully masked row
        x[~where] = fmax  # masked entries hold huge values that must never leak
    else:
        raise ValueError(f"unknown family {name!r}; choose from {FAMILIES}.")
    return to_dtype(x, dtype), where
