"""A typed `jax.custom_vjp` for the kernels of the package.

`jax.custom_vjp.__new__` has no annotations, so a type checker cannot infer the
return type of a decorated function and sees its calls as returning an unsolved type
variable. `custom_vjp` constructs the same object with the decorated function's
return type carried through, so the kernels' callers are checked against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import jax

_R = TypeVar("_R")


def custom_vjp(fun: Callable[..., _R], nondiff_argnums: Sequence[int] = ()) -> jax.custom_vjp[_R]:
    """`jax.custom_vjp(fun, nondiff_argnums)`, typed with `fun`'s return type."""
    # jax.custom_vjp.__new__ is unannotated (it may also build an experimental
    # variant with the same interface), so its result type is unknown to pyright.
    return jax.custom_vjp(fun, nondiff_argnums=nondiff_argnums)  # pyright: ignore[reportReturnType]
