"""Verification harness: every way of computing the softmax derivatives, compared with
an independent float64 reference, on the default backend.

``python -m jsoftmax verify`` is the project's main job; :func:`verify` is the
function behind it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsoftmax import _jacobian
from jsoftmax._operator import SoftmaxJacobian
from jsoftmax._softmax import softmax


# Error budget in units of the dtype's machine epsilon, for the normalised error
# max|A - ref| / max|ref|. float32/float64 results accumulate a few roundings per entry
# (sums over n); 16-bit results are computed in float32 and rounded to the output dtype
# (the probabilities once, the Jacobian entries once more), so 2 eps bounds them.
def _tolerance(dtype) -> float:
    finfo = jnp.finfo(dtype)
    return (2.0 if finfo.bits < 32 else 16.0) * float(finfo.eps)


@dataclasses.dataclass(frozen=True)
class Row:
    """One comparison: a method's result against the float64 reference."""

    quantity: str
    shape: tuple[int, ...]
    axis: int
    dtype: str
    method: str
    max_abs_err: float
    max_rel_err: float
    tolerance: float
    gating: bool  # False for outside references (jax.nn), reported but not judged

    @property
    def ok(self) -> bool:
        return bool(self.max_rel_err <= self.tolerance)


@dataclasses.dataclass
class Report:
    """Rows of a verification run; ``ok`` is True when every gating row passes."""

    backend: str
    device: str
    rows: list[Row]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows if r.gating)

    def table(self) -> str:
        head = (
            f"jsoftmax verify — backend: {self.backend} ({self.device}), jax {jax.__version__}\n"
            "error = max|method - float64 reference| / scale (max p; max p * max|v| for "
            "products; 1 for the log-softmax Jacobian); tolerance = "
            "16 eps (float32/64), 2 eps (16-bit)\n"
        )
        cols = ("quantity", "shape", "axis", "dtype", "method", "max abs", "rel err", "tol", "")
        lines = [
            (
                r.quantity,
                "x".join(map(str, r.shape)),
                str(r.axis),
                r.dtype,
                r.method,
                f"{r.max_abs_err:.2e}",
                f"{r.max_rel_err:.2e}",
                f"{r.tolerance:.1e}",
                ("ok" if r.ok else "FAIL") if r.gating else ("(ref)" if r.ok else "(ref, over)"),
            )
            for r in self.rows
        ]
        widths = [max(len(c), *(len(line[k]) for line in lines)) for k, c in enumerate(cols)]
        fmt = lambda cells: "  ".join(
            c.ljust(w) for c, w in zip(cells, widths, strict=True)
        ).rstrip()
        body = [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
        n_bad = sum(1 for r in self.rows if r.gating and not r.ok)
        verdict = "all methods agree" if self.ok else f"{n_bad} comparison(s) out of tolerance"
        return head + "\n".join(body) + f"\n\nresult: {verdict} ({len(self.rows)} comparisons)"

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------
# float64 references in NumPy: independent of JAX and of jsoftmax.
# --------------------------------------------------------------------------------------


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_jacobian(p: np.ndarray) -> np.ndarray:
    eye = np.eye(p.shape[-1])
    return p[..., :, None] * (eye - p[..., None, :])


def _np_log_jacobian(p: np.ndarray) -> np.ndarray:
    return np.eye(p.shape[-1]) - p[..., None, :]


def _np_hessian(p: np.ndarray) -> np.ndarray:
    eye = np.eye(p.shape[-1])
    a = eye - p[..., None, :]
    return p[..., :, None, None] * (
        a[..., :, :, None] * a[..., :, None, :] - p[..., None, :, None] * a[..., None, :, :]
    )


# --------------------------------------------------------------------------------------
# The methods under test. Each maps logits (softmax axis last) to batch + (n, n).
# --------------------------------------------------------------------------------------


def _per_row(jac_of_vector: Callable) -> Callable:
    """Applies a per-vector Jacobian function over all leading batch dimensions."""

    def f(x):
        g = jac_of_vector
        for _ in range(x.ndim - 1):
            g = jax.vmap(g)
        return g(x)

    return f


def _sm(rule):
    return lambda z: softmax(z, rule=rule)


def _jacobian_methods() -> dict[str, tuple[Callable, bool]]:
    return {
        "jsoftmax.jacobian (explicit)": (lambda x: _jacobian.jacobian(x), True),
        "jacrev(softmax, rule=vjp)": (_per_row(jax.jacrev(_sm("vjp"))), True),
        "jacfwd(softmax, rule=jvp)": (_per_row(jax.jacfwd(_sm("jvp"))), True),
        "jacrev(softmax, rule=jvp)": (_per_row(jax.jacrev(_sm("jvp"))), True),
        "jacfwd(jax.nn.softmax)": (_per_row(jax.jacfwd(jax.nn.softmax)), False),
    }


def _to_float64(a) -> np.ndarray:
    a = jnp.asarray(a)
    if _is_16bit(a):  # NumPy cannot convert bfloat16 directly
        a = a.astype(jnp.float32)
    return np.asarray(a).astype(np.float64)


def _errors(result, reference: np.ndarray, scale: float) -> tuple[float, float]:
    result = _to_float64(result)
    abs_err = float(np.max(np.abs(result - reference))) if reference.size else 0.0
    return abs_err, abs_err / scale


def _is_16bit(a) -> bool:
    return jnp.finfo(a.dtype).bits < 32


def _move_to_last(x, axis):
    return jnp.moveaxis(x, axis, -1)


def verify(
    sizes: Sequence[int] = (2, 3, 16, 128, 1024),
    dtypes: Sequence[str] = ("float32", "float64", "bfloat16"),
    *,
    batched: Sequence[tuple[tuple[int, ...], int]] = (((8, 256), -1), ((64, 4, 3), 0)),
    family: bool = True,
    seed: int = 0,
    scale: float = 3.0,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Checks every jsoftmax derivative method against a float64 NumPy reference.

    For each input (a vector per entry of ``sizes``, plus each ``(shape, axis)`` in
    ``batched``) and each dtype, the softmax Jacobian is built four ways — the explicit
    :func:`jsoftmax.jacobian`, ``jax.jacrev`` of ``softmax(rule="vjp")``, and
    ``jax.jacfwd`` / ``jax.jacrev`` of ``softmax(rule="jvp")`` — and compared with
    ``diag(p) - p p^T`` evaluated in float64 NumPy on the same (dtype-rounded) logits.
    ``jax.jacfwd(jax.nn.softmax)`` is reported beside them as an outside reference
    (not judged). With ``family=True`` the log-softmax Jacobian, the explicit
    Hessian (for n <= 64), the Jacobian-free products ``softmax_jvp`` /
    ``softmax_vjp`` and the :class:`jsoftmax.SoftmaxJacobian` operator (``J @ v``,
    ``v @ J``, ``.dense()``) are checked too.

    Args:
      sizes: softmax lengths of the vector cases.
      dtypes: dtype names; ``"float64"`` is skipped unless ``jax_enable_x64`` is on.
      batched: ``(shape, axis)`` pairs for batched cases (``axis`` may be non-last).
      family: also check the log-softmax Jacobian, Hessian and products.
      seed: PRNG seed for the logits (normal, times ``scale``).
      scale: standard deviation of the logits.
      progress: optional callback receiving a line of text per case.

    Returns:
      A :class:`Report`; ``report.ok`` is False when any jsoftmax method differs from
      the reference by more than ``16 * eps(dtype)`` (``2 * eps`` for 16-bit dtypes).
      Errors are absolute errors divided by the scale of the terms that make up each
      entry: ``max p`` for J and H, ``max p * max|v|`` for products, 1 for the
      log-softmax Jacobian (whose entries are ``delta_ij - p_j``). ``str(report)``
      is a readable table.
    """
    x64 = bool(jax.config.read("jax_enable_x64"))
    cases = [((n,), -1) for n in sizes] + [(tuple(s), a) for s, a in batched]
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    methods = _jacobian_methods()
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        if dtype == jnp.float64 and not x64:
            continue
        tol = _tolerance(dtype)
        for shape, axis in cases:
            if progress is not None:
                progress(f"{dtype_name} {shape} axis={axis}")
            x = jnp.asarray(rng.standard_normal(shape) * scale, dtype)
            x_last = _move_to_last(x, axis)
            x64_ref = _to_float64(x_last)
            p_ref = _np_softmax(x64_ref)
            j_ref = _np_jacobian(p_ref)

            # Every entry of J, H and J v is a sum of products of probabilities (and of
            # v), so rounding errors scale with max p (times max |v|), not with the
            # entry itself: entries like p_i (1 - p_i) at p_i ~ 1 are ill-conditioned
            # in p. Errors are normalised by that scale.
            p_max = float(p_ref.max())

            case = (shape, axis, dtype_name, tol)

            def add(quantity, method, result, reference, gating=True, scale=p_max, case=case):
                shape_, axis_, dtype_, tol_ = case
                abs_err, rel_err = _errors(result, reference, scale)
                rows.append(
                    Row(quantity, shape_, axis_, dtype_, method, abs_err, rel_err, tol_, gating)
                )

            for name, (fn, gating) in methods.items():
                if name.startswith("jsoftmax.jacobian"):
                    result = jax.jit(_jacobian.jacobian, static_argnums=1)(x, axis)
                else:
                    result = jax.jit(fn)(x_last)
                add("J = d softmax", name, result, j_ref, gating)
            if not family:
                continue
            add(
                "d log_softmax",
                "jsoftmax.log_softmax_jacobian",
                jax.jit(_jacobian.log_softmax_jacobian, static_argnums=1)(x, axis),
                _np_log_jacobian(p_ref),
                scale=1.0,
            )
            p = softmax(x, axis)
            v = jnp.asarray(rng.standard_normal(shape), dtype)
            v_ref = _to_float64(_move_to_last(v, axis))
            jv_ref = np.einsum("...ij,...j->...i", j_ref, v_ref)
            v_scale = p_max * float(np.abs(v_ref).max())
            for name, fn in (
                ("softmax_jvp", _jacobian.softmax_jvp),
                ("softmax_vjp", _jacobian.softmax_vjp),
            ):
                result = jax.jit(fn, static_argnums=2)(p, v, axis)
                add(
                    "J v (O(n))",
                    f"jsoftmax.{name}",
                    _move_to_last(result, axis),
                    jv_ref,
                    scale=v_scale,
                )
            operator_products = {
                "SoftmaxJacobian @ v": lambda x, v, a=axis: SoftmaxJacobian.from_logits(x, a) @ v,
                "v @ SoftmaxJacobian": lambda x, v, a=axis: v @ SoftmaxJacobian.from_logits(x, a),
            }
            for name, fn in operator_products.items():
                result = _move_to_last(jax.jit(fn)(x, v), axis)
                add("J v (O(n))", name, result, jv_ref, scale=v_scale)
            add(
                "J = d softmax",
                "SoftmaxJacobian.dense()",
                jax.jit(lambda x, a=axis: SoftmaxJacobian.from_logits(x, a).dense())(x),
                j_ref,
            )
            if shape[axis] <= 64:
                add(
                    "H = d2 softmax",
                    "jsoftmax.hessian (explicit)",
                    jax.jit(_jacobian.hessian, static_argnums=1)(x, axis),
                    _np_hessian(p_ref),
                )
                add(
                    "H = d2 softmax",
                    "hessian(softmax, rule=jvp)",
                    jax.jit(_per_row(jax.hessian(_sm("jvp"))))(x_last),
                    _np_hessian(p_ref),
                )
    device = jax.devices()[0]
    return Report(jax.default_backend(), getattr(device, "device_kind", str(device)), rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jsoftmax verify",
        description=(
            "Build the softmax Jacobian (and log-softmax Jacobian, Hessian and "
            "Jacobian-free products) every way jsoftmax offers, compare each with a "
            "float64 NumPy reference on the default JAX backend, print a table, and exit "
            "non-zero if any jsoftmax method is out of tolerance."
        ),
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[2, 3, 16, 128, 1024],
        help="softmax lengths n of the vector cases (default: 2 3 16 128 1024)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32", "float64", "bfloat16"],
        choices=["float16", "bfloat16", "float32", "float64"],
        help="dtypes to test (default: float32 float64 bfloat16)",
    )
    parser.add_argument("--no-batched", action="store_true", help="skip the batched cases")
    parser.add_argument("--no-family", action="store_true", help="check only the softmax Jacobian")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.sizes):
        parser.error("--sizes must be positive integers")
    if "float64" in args.dtypes:
        jax.config.update("jax_enable_x64", True)
    progress = None if args.quiet else (lambda s: print(f"  checking {s}", file=sys.stderr))
    report = verify(
        args.sizes,
        args.dtypes,
        batched=() if args.no_batched else (((8, 256), -1), ((64, 4, 3), 0)),
        family=not args.no_family,
        seed=args.seed,
        progress=progress,
    )
    print(report.table())
    return 0 if report.ok else 1
