r"""Error report against an arbitrary-precision reference: ``python -m jsoftmax accuracy``.

For each dtype, operation and input family, the same quantity is computed by jsoftmax,
by :mod:`jax.nn` (with :func:`jax.vjp`, :func:`jax.jvp` and :func:`jax.jacfwd` for the
derivatives) and by :mod:`mpmath` at 50 significant digits, and the error is expressed
in units in the last place (ULP) of the output dtype.

Metrics:

* **values** (``softmax``, ``log_softmax``, ``cross_entropy``): per component,
  :math:`|y - y^\star| / \mathrm{ulp}(y^\star)`, where :math:`\mathrm{ulp}(a)` is the
  spacing of the output dtype at :math:`a` (the smallest subnormal below the normal
  range). Exact zeros and ``-inf`` (masked entries) must be reproduced exactly; a
  reference beyond the dtype's range must round to the same infinity.
* **derivatives** (``softmax_vjp``, ``log_softmax_vjp``, ``softmax_jvp``, ``jacobian``,
  ``jacfwd``, ``cross_entropy_grad``): per component, the error divided by the ULP of
  the largest exact component of the same row (a row of a dense Jacobian is
  :math:`\partial p_i/\partial z`). A derivative component far below the row's largest
  one carries no relative-accuracy promise.
* the relative error :math:`|y - y^\star| / |y^\star|` alongside (same row scale for
  derivatives).

A component that is NaN or infinite where the exact answer is finite counts as an
infinite error and is also counted in ``nonfinite``.

The reference handles the cases that defeat a naive high-precision evaluation: the
log-sum-exp is :math:`\log c + \operatorname{log1p}(r / c)` with ``c`` the number of
maximal entries and ``r`` the sum over the others, and :math:`1 - p_k` for a maximal
entry is formed from the other terms, so a dominant logit whose probability is
:math:`1 - 10^{-100}` is still resolved.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("float16", "bfloat16", "float32", "float64")
FAMILIES = (
    "normal",
    "wide",
    "near_ties",
    "dominant",
    "many_equal",
    "near_max",
    "neg_inf",
    "masked",
)
VALUE_OPS = ("softmax", "softmax[high]", "log_softmax", "log_softmax[high]")
GRAD_OPS = (
    "softmax_vjp",
    "softmax_vjp[high]",
    "log_softmax_vjp",
    "softmax_jvp",
    "softmax_jvp[high]",
    "jacobian",
    "jacfwd",
)
CE_OPS = ("cross_entropy", "cross_entropy_grad")
QUICK_GRAD_OPS = ("softmax_vjp", "softmax_vjp[high]", "softmax_jvp", "jacobian")
DIGITS = 50

# Precision bits (stored mantissa) and minimum normal exponent of each dtype.
_FORMAT = {
    "float16": (10, -14),
    "bfloat16": (7, -126),
    "float32": (23, -126),
    "float64": (52, -1022),
}


def _np_dtype(name: str):
    return jnp.dtype(name)


def _ulp(a: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of ``dtype`` at the float64 values ``a`` (smallest subnormal at 0)."""
    nmant, emin = _FORMAT[dtype]
    a = np.abs(np.asarray(a, np.float64))
    finite = np.isfinite(a) & (a > 0)
    _, e = np.frexp(np.where(finite, a, 1.0))
    e = np.where(finite, e - 1, emin)
    return np.ldexp(1.0, np.maximum(e, emin) - nmant)


# --------------------------------------------------------------------------------------
# Input families. Each returns float64 arrays whose values are exactly representable in
# ``dtype`` (they are rounded to it first): the rounded values are the problem solved.
# --------------------------------------------------------------------------------------


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float64).astype(_np_dtype(dtype)).astype(np.float64)


def _family(name: str, dtype: str, rows: int, n: int, rng: np.random.Generator):
    """Returns ``(x, where)`` of shape ``(rows, n)``; ``where`` is None when unmasked."""
    fmax = float(jnp.finfo(_np_dtype(dtype)).max)
    where = None
    if name == "normal":
        x = rng.standard_normal((rows, n))
    elif name == "wide":
        x = 1e3 * rng.standard_normal((rows, n))
    elif name == "near_ties":
        c = _round(3.0 * rng.standard_normal((rows, 1)), dtype)
        spacing = _ulp(c, dtype)
        x = c + spacing * rng.integers(-3, 4, size=(rows, n))
    elif name == "dominant":
        x = rng.standard_normal((rows, n))
        gaps = np.array([5.0, 12.0, 20.0, 30.0, 40.0, 50.0, 70.0, 100.0])
        idx = rng.integers(0, n, size=rows)
        for r in range(rows):
            x[r, idx[r]] = x[r].max() + gaps[r % len(gaps)]
    elif name == "many_equal":
        v = _round(rng.standard_normal((rows, 1)), dtype)
        x = np.repeat(v, n, axis=1)
        for r in range(1, rows):
            k = max(1, n // 100)
            pos = rng.choice(n, size=k, replace=False)
            if r % 2:  # a few smaller values among many equal maxima
                x[r, pos] = v[r, 0] - rng.integers(1, 4, size=k)
            else:  # one larger value above many equal ones
                x[r, pos[0]] = v[r, 0] + 1.0
    elif name == "near_max":
        spacing = _ulp(np.array([fmax]), dtype)[0]
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
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(f"unknown family {name!r}")
    return _round(x, dtype), where


# --------------------------------------------------------------------------------------
# The mpmath reference.
# --------------------------------------------------------------------------------------


def _split(values, dtype: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mpf values to a float64 (hi, lo) pair."""
    hi = np.array([float(v) for v in values], np.float64)
    with np.errstate(invalid="ignore"):
        lo = np.array(
            [float(v - h) if math.isfinite(h) else 0.0 for v, h in zip(values, hi, strict=True)],
            np.float64,
        )
    return hi, lo


class _Row:
    """Exact softmax quantities of one row, from its distinct values and multiplicities."""

    def __init__(self, x: np.ndarray, valid: np.ndarray):
        import mpmath

        self.mp = mpmath.mp
        self.n = x.size
        self.fin = valid & np.isfinite(x)
        self.any = bool(self.fin.any())
        mpf = mpmath.mpf
        if not self.any:
            return
        uniq, inv, cnt = np.unique(x[self.fin], return_inverse=True, return_counts=True)
        self.inv = np.full(self.n, -1, np.int64)
        self.inv[self.fin] = inv
        m = mpf(float(uniq[-1]))
        d = [mpf(float(u)) - m for u in uniq]
        e = [mpmath.exp(v) for v in d]
        c_max = int(cnt[-1])
        rest = mpmath.fsum(int(c) * v for c, v in zip(cnt[:-1], e[:-1], strict=True))
        total = c_max + rest
        log_total = mpmath.log(c_max) + mpmath.log1p(rest / c_max)
        self.p_u = [v / total for v in e]
        self.logp_u = [v - log_total for v in d]
        # 1 - p for each distinct value, without cancellation for the maximum.
        self.q_u = [(total - v) / total for v in e[:-1]] + [((c_max - 1) + rest) / total]
        self.k = int(np.flatnonzero(self.fin & (x == uniq[-1]))[0])  # one maximal entry

    def values(self, log: bool) -> tuple[np.ndarray, np.ndarray]:
        """Exact softmax (or log_softmax) of every entry as a (hi, lo) float64 pair."""
        fill = -np.inf if log else 0.0
        hi = np.full(self.n, fill)
        lo = np.zeros(self.n)
        if self.any:
            u_hi, u_lo = _split(self.logp_u if log else self.p_u)
            hi[self.fin] = u_hi[self.inv[self.fin]]
            lo[self.fin] = u_lo[self.inv[self.fin]]
        return hi, lo

    def _p(self, i: int):
        return self.p_u[self.inv[i]]

    def jac_product(self, g: np.ndarray):
        r"""Exact :math:`p_i (g_i - \langle p, g\rangle)`, shifted by ``g`` at a maximum."""
        out = [self.mp.mpf(0)] * self.n
        if not self.any:
            return out
        idx = np.flatnonzero(self.fin)
        gk = self.mp.mpf(float(g[self.k]))
        w = self.mp.fsum(self._p(j) * (float(g[j]) - gk) for j in idx)
        for i in idx:
            out[i] = self._p(i) * ((float(g[i]) - gk) - w)
        return out

    def log_vjp(self, g: np.ndarray):
        """Exact ``g - p * sum(g)`` (``g`` is zero at non-finite outputs)."""
        out = [self.mp.mpf(0)] * self.n
        if not self.any:
            return out
        idx = np.flatnonzero(self.fin)
        total = self.mp.fsum(self.mp.mpf(float(g[j])) for j in idx)
        for i in idx:
            out[i] = float(g[i]) - self._p(i) * total
        return out

    def jacobian(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact ``diag(p) - p p^T`` as a (hi, lo) pair of ``(n, n)`` arrays."""
        if not self.any:
            z = np.zeros((self.n, self.n))
            return z, z.copy()
        p = [self._p(i) if self.fin[i] else self.mp.mpf(0) for i in range(self.n)]
        p_hi, p_lo = _split(p)
        pl = p_hi.astype(np.longdouble) + p_lo.astype(np.longdouble)
        full = -pl[:, None] * pl[None, :]
        hi = full.astype(np.float64)
        lo = (full - hi.astype(np.longdouble)).astype(np.float64)
        idx = np.flatnonzero(self.fin)
        d_hi, d_lo = _split([self._p(i) * self.q_u[self.inv[i]] for i in idx])
        hi[idx, idx] = d_hi
        lo[idx, idx] = d_lo
        return hi, lo

    def cross_entropy(self, label: int):
        """Exact ``-log p_label`` and gradient ``p - onehot(label)`` (mpf)."""
        loss = -self.logp_u[self.inv[label]]
        grad = [self._p(i) if self.fin[i] else self.mp.mpf(0) for i in range(self.n)]
        grad[label] = -self.q_u[self.inv[label]]
        return loss, grad


# --------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------


def _errors(got: np.ndarray, hi: np.ndarray, lo: np.ndarray, dtype: str, scale=None):
    """Per-component (ulp error, relative error, nonfinite flag, flushed flag).

    A component whose exact value lies below the dtype's smallest normal number and
    which came out as zero is "flushed" (XLA on CPU flushes subnormal results to zero):
    it is counted separately and given error 0, since no XLA CPU computation can
    return the subnormal.
    """
    got = np.asarray(got, np.float64)
    tiny = float(jnp.finfo(_np_dtype(dtype)).tiny)
    flushed = (got == 0) & (np.abs(hi) < tiny) & (hi != 0)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = hi.astype(_np_dtype(dtype)).astype(np.float64)
        exact_inf = np.isinf(rounded)  # the correctly rounded answer is infinite
        diff = np.abs((got - hi) - lo)
        diff = np.where(got == hi, 0.0, diff)
        diff = np.where(exact_inf, np.where(got == rounded, 0.0, np.inf), diff)
        diff = np.where(np.isnan(diff), np.inf, diff)
        diff = np.where(flushed, 0.0, diff)
        ref = np.abs(hi) if scale is None else scale
        ulp = _ulp(ref, dtype)
        ulps = diff / ulp
        # Relative to the exact value, but never to less than the smallest normal.
        rel = np.where(diff == 0, 0.0, diff / np.maximum(ref, tiny))
    nonfinite = ~np.isfinite(got) & np.isfinite(rounded)
    return ulps, rel, nonfinite, flushed


def _row_scale(hi: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.max(np.abs(hi), axis=-1, keepdims=True), hi.shape)


def _mp_to_pair(values) -> tuple[np.ndarray, np.ndarray]:
    return _split(values)


# --------------------------------------------------------------------------------------
# The implementations compared.
# --------------------------------------------------------------------------------------


def _impls(op: str) -> dict[str, Callable]:
    """``{impl: f(x, where, v, label)}`` computing ``op`` for a batch of rows."""
    import jsoftmax

    js, nn = jsoftmax, jax.nn

    def vjp(f):
        return lambda x, w, v, lab: jax.vjp(lambda z: f(z, w), x)[1](v)[0]

    def jvp(f):
        return lambda x, w, v, lab: jax.jvp(lambda z: f(z, w), (x,), (v,))[1]

    def jac(f):
        return lambda x, w, v, lab: jax.vmap(jax.jacfwd(f))(x, w)

    def ce_nn(x, w, v, lab):
        y = nn.log_softmax(x, where=w)
        return -jnp.take_along_axis(y, lab[:, None], axis=-1)[:, 0]

    if op == "softmax":
        return {
            "jsoftmax": lambda x, w, v, lab: js.softmax(x, where=w),
            "jax.nn": lambda x, w, v, lab: nn.softmax(x, where=w),
        }
    if op == "softmax[high]":
        return {
            "jsoftmax": lambda x, w, v, lab: js.softmax(x, where=w, precision="high"),
            "jax.nn": lambda x, w, v, lab: nn.softmax(x, where=w),
        }
    if op == "log_softmax[high]":
        return {
            "jsoftmax": lambda x, w, v, lab: js.log_softmax(x, where=w, precision="high"),
            "jax.nn": lambda x, w, v, lab: nn.log_softmax(x, where=w),
        }
    if op == "softmax_vjp[high]":
        return {
            "jsoftmax": vjp(lambda z, w: js.softmax(z, where=w, precision="high")),
            "jax.nn": vjp(lambda z, w: nn.softmax(z, where=w)),
        }
    if op == "softmax_jvp[high]":
        return {
            "jsoftmax": jvp(lambda z, w: js.softmax(z, where=w, rule="jvp", precision="high")),
            "jax.nn": jvp(lambda z, w: nn.softmax(z, where=w)),
        }
    if op == "log_softmax":
        return {
            "jsoftmax": lambda x, w, v, lab: js.log_softmax(x, where=w),
            "jax.nn": lambda x, w, v, lab: nn.log_softmax(x, where=w),
        }
    if op == "softmax_vjp":
        return {
            "jsoftmax": vjp(lambda z, w: js.softmax(z, where=w)),
            "jax.nn": vjp(lambda z, w: nn.softmax(z, where=w)),
        }
    if op == "log_softmax_vjp":
        return {
            "jsoftmax": vjp(lambda z, w: js.log_softmax(z, where=w)),
            "jax.nn": vjp(lambda z, w: nn.log_softmax(z, where=w)),
        }
    if op == "softmax_jvp":
        return {
            "jsoftmax": jvp(lambda z, w: js.softmax(z, where=w, rule="jvp")),
            "jax.nn": jvp(lambda z, w: nn.softmax(z, where=w)),
        }
    if op == "jacobian":
        return {
            "jsoftmax": lambda x, w, v, lab: js.jacobian(x, where=w),
            "jax.nn": jac(lambda z, w: nn.softmax(z, where=w)),
        }
    if op == "jacfwd":
        return {
            "jsoftmax": jac(lambda z, w: js.softmax(z, where=w, rule="jvp")),
            "jax.nn": jac(lambda z, w: nn.softmax(z, where=w)),
        }
    if op == "cross_entropy":
        return {
            "jsoftmax": lambda x, w, v, lab: js.cross_entropy(x, lab, where=w),
            "jax.nn": ce_nn,
        }
    if op == "cross_entropy_grad":
        return {
            "jsoftmax": lambda x, w, v, lab: jax.grad(
                lambda z: js.cross_entropy(z, lab, where=w).sum()
            )(x),
            "jax.nn": lambda x, w, v, lab: jax.grad(lambda z: ce_nn(z, w, v, lab).sum())(x),
        }
    raise ValueError(f"unknown operation {op!r}")  # pragma: no cover


@partial(jax.jit, static_argnums=(0, 1))
def _run(op: str, impl: str, x, where, v, label):
    return _impls(op)[impl](x, where, v, label)


def _has_cross_entropy() -> bool:
    import jsoftmax

    return hasattr(jsoftmax, "cross_entropy")


# --------------------------------------------------------------------------------------
# The report.
# --------------------------------------------------------------------------------------


def _summary(ulps, rel, nonfinite, flushed) -> dict:
    ulps, rel = np.ravel(ulps), np.ravel(rel)
    return {
        "max_ulp": float(np.max(ulps)) if ulps.size else 0.0,
        "median_ulp": float(np.median(ulps)) if ulps.size else 0.0,
        "max_rel": float(np.max(rel)) if rel.size else 0.0,
        "median_rel": float(np.median(rel)) if rel.size else 0.0,
        "nonfinite": int(np.sum(nonfinite)),
        "flushed": int(np.sum(flushed)),
    }


def accuracy_report(
    *,
    quick: bool = False,
    dtypes: Sequence[str] = DTYPES,
    families: Sequence[str] = FAMILIES,
    ops: Sequence[str] | None = None,
    seed: int = 0,
) -> list[dict]:
    """Measures jsoftmax and :mod:`jax.nn` against mpmath; returns one dict per row.

    Each row has the keys ``dtype``, ``op``, ``family``, ``impl`` (``"jsoftmax"`` or
    ``"jax.nn"``), ``n`` (row length), ``rows``, ``max_ulp``, ``median_ulp``,
    ``max_rel``, ``median_rel`` and ``nonfinite`` (see the module docstring for the
    metrics). ``quick`` uses fewer and shorter rows (``many_equal`` with 10**4 instead of
    10**6 entries). float64 requires ``jax_enable_x64``.
    """
    if ops is None:
        ops = VALUE_OPS + (QUICK_GRAD_OPS if quick else GRAD_OPS)
        ops += CE_OPS if _has_cross_entropy() else ()
    for name, given, allowed in (
        ("dtypes", dtypes, DTYPES),
        ("families", families, FAMILIES),
        ("ops", ops, VALUE_OPS + GRAD_OPS + CE_OPS),
    ):
        bad = [g for g in given if g not in allowed]
        if bad:
            raise ValueError(f"{name} has unknown entries {bad}; choose from {allowed}.")
    if "float64" in dtypes and not jax.config.jax_enable_x64:
        raise ValueError("dtypes includes float64, which needs jax_enable_x64 to be on.")
    import mpmath

    rows, n, n_big = (2, 33, 10**4) if quick else (8, 257, 10**6)
    out = []
    with mpmath.workdps(DIGITS):
        for dtype in dtypes:
            rng = np.random.default_rng(seed)
            for family in families:
                out += _measure(dtype, family, ops, rows, n, n_big, rng)
    return out


def _measure(dtype, family, ops, rows, n, n_big, rng) -> list[dict]:
    results = []
    value_ops = [op for op in ops if op in VALUE_OPS]
    other_ops = [op for op in ops if op not in VALUE_OPS]
    shapes = []
    if value_ops:
        shapes.append((value_ops, n_big if family == "many_equal" else n))
    if other_ops:
        shapes.append((other_ops, n))
    jdt = _np_dtype(dtype)
    for op_list, length in shapes:
        x, where = _family(family, dtype, rows, length, rng)
        valid = np.ones(x.shape, bool) if where is None else where
        ref = [_Row(x[r], valid[r]) for r in range(rows)]
        fin = valid & np.isfinite(x)
        v = _round(rng.standard_normal(x.shape), dtype)
        label = np.array([int(rng.choice(np.flatnonzero(f))) if f.any() else 0 for f in fin])
        if family == "dominant":
            label[::2] = [ref[r].k for r in range(0, rows, 2)]
        xj = jnp.asarray(x, jdt)
        wj = jnp.asarray(valid)
        vj = jnp.asarray(v, jdt)
        lj = jnp.asarray(label, jnp.int32)
        for op in op_list:
            if op in VALUE_OPS:
                pairs = [rr.values(op.startswith("log")) for rr in ref]
                hi, lo = np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])
                scale = None
            elif op.startswith(("softmax_vjp", "softmax_jvp")):
                hi, lo = map(
                    np.stack,
                    zip(*(_split(rr.jac_product(v[i])) for i, rr in enumerate(ref)), strict=True),
                )
                scale = _row_scale(hi)
            elif op == "log_softmax_vjp":
                v_op = np.where(fin, v, 0.0)
                hi, lo = map(
                    np.stack,
                    zip(*(_split(rr.log_vjp(v_op[i])) for i, rr in enumerate(ref)), strict=True),
                )
                scale = _row_scale(hi)
            elif op in ("jacobian", "jacfwd"):
                hi, lo = map(np.stack, zip(*(rr.jacobian() for rr in ref), strict=True))
                scale = _row_scale(hi)
            elif op == "cross_entropy":
                keep = np.array([rr.any for rr in ref])
                hi, lo = _split(
                    [rr.cross_entropy(label[i])[0] for i, rr in enumerate(ref) if rr.any]
                )
                scale = None
            else:  # cross_entropy_grad
                keep = np.array([rr.any for rr in ref])
                hi, lo = map(
                    np.stack,
                    zip(
                        *(
                            _split(rr.cross_entropy(label[i])[1])
                            for i, rr in enumerate(ref)
                            if rr.any
                        ),
                        strict=True,
                    ),
                )
                scale = _row_scale(hi)
            v_arg = jnp.asarray(np.where(fin, v, 0.0), jdt) if op == "log_softmax_vjp" else vj
            for impl in ("jsoftmax", "jax.nn"):
                got = np.asarray(_run(op, impl, xj, wj, v_arg, lj)).astype(np.float64)
                if op.startswith("cross_entropy"):
                    got = got[keep]
                errs = _errors(got, hi, lo, dtype, scale)
                results.append(
                    {
                        "dtype": dtype,
                        "op": op,
                        "family": family,
                        "impl": impl,
                        "n": int(length),
                        "rows": int(x.shape[0]),
                        **_summary(*errs),
                    }
                )
    return results


# --------------------------------------------------------------------------------------
# Formatting and the command line.
# --------------------------------------------------------------------------------------


def _fmt(u: float) -> str:
    if not math.isfinite(u):
        return "inf"
    if u == 0:
        return "0"
    if u < 10:
        return f"{u:.2f}"
    if u < 1e4:
        return f"{u:.0f}"
    return f"{u:.1e}"


def _pairs(results: list[dict]) -> dict:
    table: dict = {}
    for r in results:
        table.setdefault((r["dtype"], r["op"], r["family"]), {})[r["impl"]] = r
    return table


def _verdict(a: dict, b: dict) -> str:
    ka = (a["nonfinite"], a["max_ulp"], a["median_ulp"])
    kb = (b["nonfinite"], b["max_ulp"], b["median_ulp"])
    # Differences below a quarter ULP are noise.
    if ka[0] == kb[0] and abs(ka[1] - kb[1]) <= 0.25 + 0.05 * min(ka[1], kb[1]):
        return "same"
    return "better" if ka < kb else "worse"


def format_table(results: list[dict], summary: bool = False) -> str:
    """Markdown table, jsoftmax beside jax.nn; ``summary`` keeps the worst family only."""
    table = _pairs(results)
    if summary:
        worst: dict = {}
        for (dtype, op, family), d in table.items():
            key = (dtype, op)
            js = d["jsoftmax"]
            if key not in worst or (js["nonfinite"], js["max_ulp"]) > (
                worst[key][1]["jsoftmax"]["nonfinite"],
                worst[key][1]["jsoftmax"]["max_ulp"],
            ):
                worst[key] = (family, d)
            nn = d["jax.nn"]
            old = worst.setdefault(("nn",) + key, (family, d))
            if (nn["nonfinite"], nn["max_ulp"]) > (
                old[1]["jax.nn"]["nonfinite"],
                old[1]["jax.nn"]["max_ulp"],
            ):
                worst[("nn",) + key] = (family, d)
        lines = [
            "| dtype | operation | jsoftmax max ULP (worst family) "
            "| jax.nn max ULP (worst family) |",
            "|---|---|---|---|",
        ]
        for key, (family, d) in worst.items():
            if key[0] == "nn":
                continue
            nfam, nd = worst[("nn",) + key]
            js, nn = d["jsoftmax"], nd["jax.nn"]
            js_s = _fmt(js["max_ulp"]) + (
                f", {js['nonfinite']} non-finite" if js["nonfinite"] else ""
            )
            nn_s = _fmt(nn["max_ulp"]) + (
                f", {nn['nonfinite']} non-finite" if nn["nonfinite"] else ""
            )
            lines.append(f"| {key[0]} | {key[1]} | {js_s} ({family}) | {nn_s} ({nfam}) |")
        return "\n".join(lines)
    lines = [
        "| dtype | operation | family | n | jsoftmax max / median ULP | "
        "jax.nn max / median ULP | jsoftmax max rel | jax.nn max rel | jsoftmax vs jax.nn |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (dtype, op, family), d in table.items():
        js, nn = d["jsoftmax"], d["jax.nn"]

        def cell(r):
            s = f"{_fmt(r['max_ulp'])} / {_fmt(r['median_ulp'])}"
            return s + (f" ({r['nonfinite']} non-finite)" if r["nonfinite"] else "")

        lines.append(
            f"| {dtype} | {op} | {family} | {js['n']} | {cell(js)} | {cell(nn)} | "
            f"{js['max_rel']:.1e} | {nn['max_rel']:.1e} | {_verdict(js, nn)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jsoftmax accuracy",
        description=(
            "Error of jsoftmax and jax.nn against mpmath (50 digits), in ULPs of the "
            "output dtype; derivatives relative to the largest exact component of the row."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rows (CI)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="dtypes to measure"
    )
    parser.add_argument(
        "--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="input families"
    )
    parser.add_argument("--summary", action="store_true", help="print the worst family only")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    results = accuracy_report(
        quick=args.quick, dtypes=args.dtypes, families=args.families, seed=args.seed
    )
    elapsed = time.perf_counter() - start
    print(format_table(results, summary=args.summary))
    print(
        f"\n{len(results)} rows in {elapsed:.1f} s; jax {jax.__version__}, "
        f"backend {jax.default_backend()}, mpmath at {DIGITS} digits."
    )
    if args.json:
        payload = {
            "jax_version": jax.__version__,
            "backend": jax.default_backend(),
            "digits": DIGITS,
            "quick": bool(args.quick),
            "seed": args.seed,
            # JSON has no infinity: an infinite error is written as null.
            "results": [
                {
                    k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in r.items()
                }
                for r in results
            ],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=False, default=_json_default)
    return 0


def _json_default(o):  # pragma: no cover - only for exotic numpy scalars
    return float(o)
