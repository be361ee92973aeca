"""Measuring jsoftmax and `jax.nn` against the mpmath reference: `run`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax
from jsoftmax.tools.accuracy._families import FAMILIES, Family, family
from jsoftmax.tools.accuracy._metrics import DTYPES, Dtype, errors, row_scale, summary, to_dtype
from jsoftmax.tools.accuracy._reference import ExactRow, split

ValueOp = Literal["softmax", "softmax[high]", "log_softmax", "log_softmax[high]"]
GradOp = Literal[
    "softmax_vjp",
    "softmax_vjp[high]",
    "log_softmax_vjp",
    "softmax_jvp",
    "softmax_jvp[high]",
    "jacobian",
    "jacfwd",
]
CeOp = Literal["cross_entropy", "cross_entropy_grad"]
Op = Literal[ValueOp, GradOp, CeOp]
VALUE_OPS: tuple[ValueOp, ...] = get_args(ValueOp)
GRAD_OPS: tuple[GradOp, ...] = get_args(GradOp)
CE_OPS: tuple[CeOp, ...] = get_args(CeOp)
OPS: tuple[Op, ...] = get_args(Op)  # the three groups, in this order
QUICK_GRAD_OPS: tuple[GradOp, ...] = ("softmax_vjp", "softmax_vjp[high]", "softmax_jvp", "jacobian")
DIGITS = 50
MPMATH_MISSING = (
    "the accuracy report needs mpmath, an optional extra: pip install 'jsoftmax[accuracy]' "
    "(or pip install mpmath)."
)

# An implementation maps (x, where, v, label) to the quantity, for a batch of rows.
Impl = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _value(f) -> Impl:
    return lambda x, w, v, lab: f(x, w)


def _vjp(f) -> Impl:
    return lambda x, w, v, lab: jax.vjp(lambda z: f(z, w), x)[1](v)[0]


def _jvp(f) -> Impl:
    return lambda x, w, v, lab: jax.jvp(lambda z: f(z, w), (x,), (v,))[1]


def _jacfwd(f) -> Impl:
    return lambda x, w, v, lab: jax.vmap(jax.jacfwd(f))(x, w)


def _ce_nn(x, w, v, lab):
    y = jax.nn.log_softmax(x, where=w)
    return -jnp.take_along_axis(y, lab[:, None], axis=-1)[:, 0]


def _ce_js(x, w, v, lab):
    return jsoftmax.cross_entropy(x, lab, where=w)


def _grad(ce) -> Impl:
    return lambda x, w, v, lab: jax.grad(lambda z: ce(z, w, v, lab).sum())(x)


def _impls(op: str) -> dict[str, Impl]:
    """`{"jsoftmax": f, "jax.nn": g}`, each `f(x, where, v, label)` computing `op`."""
    js, nn = jsoftmax, jax.nn

    def sm(**kw):
        return lambda z, w: js.softmax(z, where=w, **kw)

    def nn_sm(z, w):
        return nn.softmax(z, where=w)

    table = {
        "softmax": (_value(sm()), _value(nn_sm)),
        "softmax[high]": (_value(sm(precision="high")), _value(nn_sm)),
        "log_softmax": (
            _value(lambda z, w: js.log_softmax(z, where=w)),
            _value(lambda z, w: nn.log_softmax(z, where=w)),
        ),
        "log_softmax[high]": (
            _value(lambda z, w: js.log_softmax(z, where=w, precision="high")),
            _value(lambda z, w: nn.log_softmax(z, where=w)),
        ),
        "softmax_vjp": (_vjp(sm()), _vjp(nn_sm)),
        "softmax_vjp[high]": (_vjp(sm(precision="high")), _vjp(nn_sm)),
        "log_softmax_vjp": (
            _vjp(lambda z, w: js.log_softmax(z, where=w)),
            _vjp(lambda z, w: nn.log_softmax(z, where=w)),
        ),
        "softmax_jvp": (_jvp(sm(rule="jvp")), _jvp(nn_sm)),
        "softmax_jvp[high]": (_jvp(sm(rule="jvp", precision="high")), _jvp(nn_sm)),
        "jacobian": (lambda x, w, v, lab: js.jacobian(x, where=w), _jacfwd(nn_sm)),
        "jacfwd": (_jacfwd(sm(rule="jvp")), _jacfwd(nn_sm)),
        "cross_entropy": (_ce_js, _ce_nn),
        "cross_entropy_grad": (_grad(_ce_js), _grad(_ce_nn)),
    }
    js_impl, nn_impl = table[op]
    return {"jsoftmax": js_impl, "jax.nn": nn_impl}


def run(
    *,
    quick: bool = False,
    dtypes: Sequence[Dtype] = DTYPES,
    families: Sequence[Family] = FAMILIES,
    ops: Sequence[Op] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Measures jsoftmax and `jax.nn` against mpmath; returns one dict per row.

    Every operation is computed by both implementations on the same dtype-rounded
    inputs and compared with the exact value (mpmath at `DIGITS` significant
    digits); see `jsoftmax.tools.accuracy` for the metrics.

    Args:
      quick: fewer and shorter rows (2 rows of 33 entries, `many_equal` with 10**4
        instead of 10**6 entries), and fewer derivative operations.
      dtypes: from `DTYPES`; float64 requires `jax_enable_x64`.
      families: input families, from `FAMILIES`.
      ops: operations, from `OPS`; by default all (the quick set with `quick`).
      seed: seed of the inputs (each dtype starts from it).

    Returns:
      One dict per (dtype, family, operation, implementation) with the keys `dtype`,
      `op`, `family`, `impl` (`"jsoftmax"` or `"jax.nn"`), `n` (row
      length), `rows`, `max_ulp`, `median_ulp`, `max_rel`, `median_rel`,
      `nonfinite` and `flushed`.

    Raises:
      ValueError: an unknown name, or float64 without `jax_enable_x64`.
      ImportError: mpmath is not installed (`pip install 'jsoftmax[accuracy]'`).

    Examples:
      One dominant logit per row: `jax.nn.log_softmax` rounds its log-probability to 0.

      >>> from jsoftmax.tools import accuracy
      >>> rows = accuracy.run(quick=True, dtypes=["float32"], families=["dominant"],
      ...                     ops=["log_softmax[high]"])
      >>> [(r["impl"], r["n"], r["max_ulp"] <= 1) for r in rows]
      [('jsoftmax', 33, True), ('jax.nn', 33, False)]
    """
    if ops is None:
        ops = (*VALUE_OPS, *(QUICK_GRAD_OPS if quick else GRAD_OPS), *CE_OPS)
    for name, given, allowed in (
        ("dtypes", dtypes, DTYPES),
        ("families", families, FAMILIES),
        ("ops", ops, OPS),
    ):
        bad = [g for g in given if g not in allowed]
        if bad:
            raise ValueError(f"{name} has unknown entries {bad}; choose from {allowed}.")
    if "float64" in dtypes and not jax.config.read("jax_enable_x64"):
        raise ValueError("dtypes includes float64, which needs jax_enable_x64 to be on.")
    try:
        import mpmath
    except ImportError as e:
        raise ImportError(MPMATH_MISSING) from e

    rows, n, n_big = (2, 33, 10**4) if quick else (8, 257, 10**6)

    # A new function per call, so each run traces the implementations as they are now.
    @partial(jax.jit, static_argnums=(0, 1))
    def compute(op: str, impl: str, x, where, v, label):
        return _impls(op)[impl](x, where, v, label)

    out = []
    with mpmath.workdps(DIGITS):
        for dtype in dtypes:
            rng = np.random.default_rng(seed)
            for name in families:
                out += _measure(compute, dtype, name, ops, rows, n, n_big, rng)
    return out


def _stack_split(rows_of_mpf) -> tuple[np.ndarray, np.ndarray]:
    pairs = [split(r) for r in rows_of_mpf]
    return np.stack([hi for hi, _ in pairs]), np.stack([lo for _, lo in pairs])


def _measure(compute, dtype, name, ops, rows, n, n_big, rng) -> list[dict]:
    results = []
    value_ops = [op for op in ops if op in VALUE_OPS]
    other_ops = [op for op in ops if op not in VALUE_OPS]
    shapes = []
    if value_ops:
        shapes.append((value_ops, n_big if name == "many_equal" else n))
    if other_ops:
        shapes.append((other_ops, n))
    jdt = jnp.dtype(dtype)
    for op_list, length in shapes:
        x, where = family(name, dtype, rows, length, rng)
        valid = np.ones(x.shape, bool) if where is None else where
        ref = [ExactRow(x[r], valid[r]) for r in range(rows)]
        fin = valid & np.isfinite(x)
        v = to_dtype(rng.standard_normal(x.shape), dtype)
        label = np.array([int(rng.choice(np.flatnonzero(f))) if f.any() else 0 for f in fin])
        if name == "dominant":
            label[::2] = [ref[r].k for r in range(0, rows, 2)]
        keep = np.array([rr.any for rr in ref])  # rows with a defined cross-entropy
        xj = jnp.asarray(x, jdt)
        wj = jnp.asarray(valid)
        vj = jnp.asarray(v, jdt)
        lj = jnp.asarray(label, jnp.int32)
        for op in op_list:
            scale = None
            v_arg = vj
            if op in VALUE_OPS:
                pairs = [rr.values(op.startswith("log")) for rr in ref]
                hi, lo = np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])
            elif op.startswith(("softmax_vjp", "softmax_jvp")):
                hi, lo = _stack_split(rr.jac_product(v[i]) for i, rr in enumerate(ref))
                scale = row_scale(hi)
            elif op == "log_softmax_vjp":
                v_op = np.where(fin, v, 0.0)
                v_arg = jnp.asarray(v_op, jdt)
                hi, lo = _stack_split(rr.log_vjp(v_op[i]) for i, rr in enumerate(ref))
                scale = row_scale(hi)
            elif op in ("jacobian", "jacfwd"):
                hi, lo = map(np.stack, zip(*(rr.jacobian() for rr in ref), strict=True))
                scale = row_scale(hi)
            elif op == "cross_entropy":
                hi, lo = split(
                    [rr.cross_entropy(label[i])[0] for i, rr in enumerate(ref) if rr.any]
                )
            else:  # cross_entropy_grad
                hi, lo = _stack_split(
                    rr.cross_entropy(label[i])[1] for i, rr in enumerate(ref) if rr.any
                )
                scale = row_scale(hi)
            for impl in ("jsoftmax", "jax.nn"):
                got = np.asarray(compute(op, impl, xj, wj, v_arg, lj)).astype(np.float64)
                if op in CE_OPS:
                    got = got[keep]
                results.append(
                    {
                        "dtype": dtype,
                        "op": op,
                        "family": name,
                        "impl": impl,
                        "n": int(length),
                        "rows": int(x.shape[0]),
                        **summary(*errors(got, hi, lo, dtype, scale)),
                    }
                )
    return results
