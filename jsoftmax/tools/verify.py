"""Verification harness: every way of computing the softmax derivatives, compared with
an independent float64 reference, on the default backend.

`python -m jsoftmax verify` is the project's main job: it prints a short summary (the
worst error of each method per dtype, then the verdict) and exits non-zero when a
jsoftmax method is out of tolerance; `--full` prints every comparison and
`--json PATH` writes them. [`verify`][jsoftmax.tools.verify.verify] is the function behind it (also
[`jsoftmax.verify`][]).

Each method is a check function of `_CHECKS`: it receives one input (`_Input`) and
adds rows; a new method is a new check.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax
from jsoftmax.tools import _verify_attention, _verify_post

PROG = "python -m jsoftmax verify"
SIZES = (2, 3, 16, 128, 1024)
Dtype = Literal["float16", "bfloat16", "float32", "float64"]
DTYPES: tuple[Dtype, ...] = ("float32", "float64", "bfloat16")
BATCHED = (((8, 256), -1), ((64, 4, 3), 0))


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

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shape": list(self.shape), "ok": self.ok}


def _mark(row: Row) -> str:
    if row.gating:
        return "ok" if row.ok else "FAIL"
    return "(ref)" if row.ok else "(ref, over)"


def _columns(cols: Sequence[str], lines: list[Sequence[str]]) -> list[str]:
    widths = [max(len(c), *(len(line[k]) for line in lines)) for k, c in enumerate(cols)]

    def fmt(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]


_FULL_COLS = ("quantity", "shape", "axis", "dtype", "method", "max abs", "rel err", "tol", "")


def _full_line(r: Row) -> tuple[str, ...]:
    return (
        r.quantity,
        "x".join(map(str, r.shape)),
        str(r.axis),
        r.dtype,
        r.method,
        f"{r.max_abs_err:.2e}",
        f"{r.max_rel_err:.2e}",
        f"{r.tolerance:.1e}",
        _mark(r),
    )


@dataclasses.dataclass
class Report:
    """Rows of a verification run; `ok` is True when every gating row passes.

    `summary()` is the short form (worst error per method and dtype, the verdict),
    `table()` (also `str(report)`) lists every comparison, `as_dict()` is the
    JSON form.
    """

    backend: str
    device: str
    rows: list[Row]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows if r.gating)

    def _head(self) -> str:
        return (
            f"jsoftmax verify — backend: {self.backend} ({self.device}), jax {jax.__version__}\n"
            "error = max|method - float64 reference| / scale (max p; max p * max|v| for "
            "products; 1 for the log-softmax Jacobian); tolerance = "
            "16 eps (float32/64), 2 eps (16-bit)\n"
        )

    def _verdict(self) -> str:
        n_bad = sum(1 for r in self.rows if r.gating and not r.ok)
        verdict = "all methods agree" if self.ok else f"{n_bad} comparison(s) out of tolerance"
        return f"result: {verdict} ({len(self.rows)} comparisons)"

    def table(self) -> str:
        """Every comparison, one line each, then the verdict."""
        body = _columns(_FULL_COLS, [_full_line(r) for r in self.rows])
        return self._head() + "\n".join(body) + "\n\n" + self._verdict()

    def summary(self) -> str:
        """The worst error of each method per dtype (in units of the dtype's eps), the
        comparisons out of tolerance in full, and the verdict."""
        dtypes = list(dict.fromkeys(r.dtype for r in self.rows))
        worst: dict[tuple[str, str], dict[str, Row]] = {}
        for r in self.rows:
            cell = worst.setdefault((r.quantity, r.method), {})
            if r.dtype not in cell or r.max_rel_err > cell[r.dtype].max_rel_err:
                cell[r.dtype] = r
        lines = []
        for (quantity, method), cell in worst.items():
            line = [quantity, method]
            for dtype in dtypes:
                r = cell.get(dtype)
                if r is None:
                    line.append("-")
                    continue
                eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
                line.append(f"{r.max_rel_err:.1e} ({r.max_rel_err / eps:.1f} eps) {_mark(r)}")
            lines.append(line)
        n_inputs = len({(r.shape, r.axis, r.dtype) for r in self.rows})
        out = self._head() + (
            f"worst error per method and dtype, over {n_inputs} inputs "
            "(the full table: --full or --json PATH)\n\n"
        )
        out += "\n".join(_columns(["quantity", "method", *dtypes], lines))
        bad = [r for r in self.rows if r.gating and not r.ok]
        if bad:
            out += "\n\nout of tolerance:\n" + "\n".join(
                _columns(_FULL_COLS, [_full_line(r) for r in bad])
            )
        return out + "\n\n" + self._verdict()

    def as_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form: backend, device, jax, ok and every row."""
        return {
            "backend": self.backend,
            "device": self.device,
            "jax": jax.__version__,
            "ok": self.ok,
            "rows": [r.as_dict() for r in self.rows],
        }

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


def _to_float64(a) -> np.ndarray:
    a = jnp.asarray(a)
    if jnp.finfo(a.dtype).bits < 32:  # NumPy cannot convert bfloat16 directly
        a = a.astype(jnp.float32)
    return np.asarray(a).astype(np.float64)


# --------------------------------------------------------------------------------------
# One input and the checks run on it.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Input:
    """Logits `x` (softmax along `axis`), an optional direction `v`, their float64
    references with the softmax axis last, and the rows collected so far."""

    x: jax.Array
    axis: int
    dtype: str
    v: jax.Array | None
    rows: list[Row]

    def __post_init__(self):
        self.shape = tuple(self.x.shape)
        self.tolerance = _tolerance(self.x.dtype)
        self.x_last = jnp.moveaxis(self.x, self.axis, -1)
        self.p_ref = _np_softmax(_to_float64(self.x_last))
        self.j_ref = _np_jacobian(self.p_ref)
        # Every entry of J, H and J v is a sum of products of probabilities (and of v),
        # so rounding errors scale with max p (times max |v|), not with the entry
        # itself: entries like p_i (1 - p_i) at p_i ~ 1 are ill-conditioned in p.
        # Errors are normalised by that scale.
        self.p_max = float(self.p_ref.max())

    def add(self, quantity, method, result, reference, *, gating=True, scale=None) -> None:
        """Adds the row of `result` (softmax axis last) against `reference`."""
        scale = self.p_max if scale is None else scale
        result = _to_float64(result)
        abs_err = float(np.max(np.abs(result - reference))) if reference.size else 0.0
        self.rows.append(
            Row(
                quantity,
                self.shape,
                self.axis,
                self.dtype,
                method,
                abs_err,
                abs_err / scale,
                self.tolerance,
                gating,
            )
        )


def _per_row(jac_of_vector: Callable) -> Callable:
    """Applies a per-vector Jacobian function over all leading batch dimensions."""

    def f(x):
        g = jac_of_vector
        for _ in range(x.ndim - 1):
            g = jax.vmap(g)
        return g(x)

    return f


def _sm(rule):
    return lambda z: jsoftmax.softmax(z, rule=rule)


def _check_jacobians(c: _Input) -> None:
    """J four ways, plus `jax.jacfwd(jax.nn.softmax)` as an outside reference."""
    axis = c.axis
    explicit = jax.jit(lambda x: jsoftmax.jacobian(x, axis))
    c.add("J = d softmax", "jsoftmax.jacobian (explicit)", explicit(c.x), c.j_ref)
    for name, fn, gating in (
        ("jacrev(softmax, rule=vjp)", jax.jacrev(_sm("vjp")), True),
        ("jacfwd(softmax, rule=jvp)", jax.jacfwd(_sm("jvp")), True),
        ("jacrev(softmax, rule=jvp)", jax.jacrev(_sm("jvp")), True),
        ("jacfwd(jax.nn.softmax)", jax.jacfwd(jax.nn.softmax), False),
    ):
        c.add("J = d softmax", name, jax.jit(_per_row(fn))(c.x_last), c.j_ref, gating=gating)


def _check_log_softmax_jacobian(c: _Input) -> None:
    result = jax.jit(lambda x: jsoftmax.log_softmax_jacobian(x, c.axis))(c.x)
    c.add(
        "d log_softmax",
        "jsoftmax.log_softmax_jacobian",
        result,
        _np_log_jacobian(c.p_ref),
        scale=1.0,
    )


def _products(c: _Input) -> tuple[np.ndarray, float]:
    if c.v is None:
        raise ValueError("the product checks need a direction v (family=True).")
    v_ref = _to_float64(jnp.moveaxis(c.v, c.axis, -1))
    jv_ref = np.einsum("...ij,...j->...i", c.j_ref, v_ref)
    return jv_ref, c.p_max * float(np.abs(v_ref).max())


def _check_products(c: _Input) -> None:
    """The O(n) products `softmax_jvp` / `softmax_vjp` (J is symmetric)."""
    jv_ref, scale = _products(c)
    p = jsoftmax.softmax(c.x, c.axis)
    for name in ("softmax_jvp", "softmax_vjp"):
        fn = getattr(jsoftmax, name)
        result = jax.jit(lambda p, v, fn=fn: fn(p, v, c.axis))(p, c.v)
        c.add(
            "J v (O(n))", f"jsoftmax.{name}", jnp.moveaxis(result, c.axis, -1), jv_ref, scale=scale
        )


def _check_operator(c: _Input) -> None:
    """[`jsoftmax.SoftmaxJacobian`][]: `J @ v`, `v @ J` and `.dense()`."""
    jv_ref, scale = _products(c)

    def op(x):
        return jsoftmax.SoftmaxJacobian.from_logits(x, c.axis)

    for name, fn in (
        ("SoftmaxJacobian @ v", lambda x, v: op(x) @ v),
        ("v @ SoftmaxJacobian", lambda x, v: v @ op(x)),
    ):
        result = jnp.moveaxis(jax.jit(fn)(c.x, c.v), c.axis, -1)
        c.add("J v (O(n))", name, result, jv_ref, scale=scale)
    c.add(
        "J = d softmax", "SoftmaxJacobian.dense()", jax.jit(lambda x: op(x).dense())(c.x), c.j_ref
    )


def _check_hessian(c: _Input) -> None:
    """The explicit Hessian and `jax.hessian` of the jvp rule, for n <= 64."""
    if c.shape[c.axis] > 64:
        return
    h_ref = _np_hessian(c.p_ref)
    explicit = jax.jit(lambda x: jsoftmax.hessian(x, c.axis))(c.x)
    c.add("H = d2 softmax", "jsoftmax.hessian (explicit)", explicit, h_ref)
    autodiff = jax.jit(_per_row(jax.hessian(_sm("jvp"))))(c.x_last)
    c.add("H = d2 softmax", "hessian(softmax, rule=jvp)", autodiff, h_ref)


def _check_linear_cross_entropy(c: _Input) -> None:
    """[`jsoftmax.linear_cross_entropy`][] (vocabulary in chunks that do not divide it)
    and the dense path `cross_entropy(h @ w)`: the loss and its gradients with respect
    to `h` and `w`, against float64 NumPy. The classes are the input's softmax axis;
    hidden states `h` (16 features) and `w` are drawn per input."""
    n = c.shape[c.axis]
    rows = int(np.prod(c.shape)) // n
    if n < 2 or rows > 4096:
        return
    k1, k2, k3 = jax.random.split(jax.random.key(n + rows), 3)
    dt = c.x.dtype
    h = jax.random.normal(k1, (rows, 16), jnp.float32).astype(dt)
    w = (jax.random.normal(k2, (16, n), jnp.float32) / 2).astype(dt)
    labels = jax.random.randint(k3, (rows,), 0, n)
    h64, w64, lab = _to_float64(h), _to_float64(w), np.asarray(labels)
    z = h64 @ w64
    p = _np_softmax(z)
    zmax = z.max(-1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(-1, keepdims=True)))[:, 0]
    loss_ref = np.mean(lse - z[np.arange(rows), lab])
    d = p.copy()
    d[np.arange(rows), lab] -= 1
    d /= rows
    refs = (np.asarray(loss_ref), d @ w64.T, h64.T @ d)
    chunk = max(1, n // 3 + 1)

    def fused(h, w):
        return jsoftmax.linear_cross_entropy(h, w, labels, reduction="mean", chunk_size=chunk)

    def dense(h, w):
        return jsoftmax.cross_entropy(h @ w, labels, reduction="mean")

    for name, fn, gating in (
        ("jsoftmax.linear_cross_entropy (chunked)", fused, True),
        ("jsoftmax.cross_entropy(h @ w) (dense)", dense, not _is_16bit(dt)),
    ):
        value, (gh, gw) = jax.jit(jax.value_and_grad(fn, (0, 1)))(h, w)
        for quantity, result, ref in zip(
            ("linear CE, d/dh, d/dw",) * 3,
            (value, gh, gw),
            refs,
            strict=True,
        ):
            scale = max(float(np.abs(ref).max()), 1.0 / rows)
            c.add(quantity, name, result, ref, gating=gating, scale=scale)


# --------------------------------------------------------------------------------------
# Attention and the post-training losses: once per dtype (jsoftmax.tools._verify_attention,
# jsoftmax.tools._verify_post).
# --------------------------------------------------------------------------------------


def _check_once(module, dtype_name: str, rows: list[Row], rng: np.random.Generator) -> None:
    """The rows of a once-per-dtype check (`module.errors`)."""
    tol = _tolerance(jnp.dtype(dtype_name))
    for quantity, method, shape, abs_err, rel_err in module.errors(dtype_name, rng):
        rows.append(Row(quantity, shape, -1, dtype_name, method, abs_err, rel_err, tol, True))


def _is_16bit(dtype) -> bool:
    return jnp.finfo(dtype).bits < 32


# The checks run on every input; with ``family=False`` only the first.
_CHECKS: tuple[Callable[[_Input], None], ...] = (
    _check_jacobians,
    _check_log_softmax_jacobian,
    _check_products,
    _check_operator,
    _check_hessian,
    _check_linear_cross_entropy,
)


def verify(
    sizes: Sequence[int] = SIZES,
    dtypes: Sequence[Dtype] = DTYPES,
    *,
    batched: Sequence[tuple[tuple[int, ...], int]] = BATCHED,
    family: bool = True,
    seed: int = 0,
    scale: float = 3.0,
    progress: Callable[[str], None] | None = None,
) -> Report:
    r"""Checks every jsoftmax derivative method against a float64 NumPy reference.

    For each input (a vector per entry of `sizes`, plus each `(shape, axis)` in
    `batched`) and each dtype, the softmax Jacobian

    $$
    J = \operatorname{diag}(p) - p p^\top, \qquad p = \operatorname{softmax}(x)
    $$

    is built four ways — the explicit [`jsoftmax.jacobian`][], `jax.jacrev` of
    `softmax(rule="vjp")`, and `jax.jacfwd` / `jax.jacrev` of
    `softmax(rule="jvp")` — and compared with `diag(p) - p p^T` evaluated in float64
    NumPy on the same (dtype-rounded) logits. `jax.jacfwd(jax.nn.softmax)` is reported
    beside them as an outside reference (not judged). With `family=True` the
    log-softmax Jacobian, the explicit Hessian (for n <= 64), the Jacobian-free
    products `softmax_jvp` / `softmax_vjp` and the [`jsoftmax.SoftmaxJacobian`][]
    operator (`J @ v`, `v @ J`, `.dense()`) are checked too, and, once per dtype,
    [`jsoftmax.attention`][]: its Jacobians in `q`, `k`, `v` (`jax.jacrev`
    through its backward pass) against `jax.jacrev` of a dense float64 attention, and
    the merge of its results over two halves of the keys against the whole, and the
    post-training losses ([`jsoftmax.token_log_probs`][], [`jsoftmax.kl_divergence`][]
    and their fused versions): values and gradients against `jax.grad` of dense float64
    definitions.

    Args:
      sizes: softmax lengths of the vector cases.
      dtypes: dtype names; `"float64"` is skipped unless `jax_enable_x64` is on.
      batched: `(shape, axis)` pairs for batched cases (`axis` may be non-last).
      family: also check the log-softmax Jacobian, Hessian, products, linear
        cross-entropy and attention.
      seed: PRNG seed for the logits (normal, times `scale`).
      scale: standard deviation of the logits.
      progress: optional callback receiving a line of text per case.

    Returns:
      A `Report`; `report.ok` is False when any jsoftmax method differs from
      the reference by more than `16 * eps(dtype)` (`2 * eps` for 16-bit dtypes).
      Errors are absolute errors divided by the scale of the terms that make up each
      entry: `max p` for J and H, `max p * max|v|` for products, 1 for the
      log-softmax Jacobian (whose entries are `delta_ij - p_j`). `report.summary()`
      is the short form, `str(report)` the full table, `report.as_dict()` the JSON
      form.

    Note:
      The reference is computed from the logits after rounding to each dtype, so only
      the methods' own rounding is measured. Results of 16-bit dtypes are compared after
      conversion to float64.

    Examples:
      >>> import jsoftmax
      >>> report = jsoftmax.verify(sizes=(3, 8), dtypes=("float32",), batched=())
      >>> report.ok, len(report.rows)
      (True, 50)
      >>> max(r.max_rel_err for r in report.rows if r.gating) <= 16 * 2.0**-23
      True
    """
    x64 = bool(jax.config.read("jax_enable_x64"))
    inputs = [((n,), -1) for n in sizes] + [(tuple(s), a) for s, a in batched]
    checks = _CHECKS if family else _CHECKS[:1]
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        if dtype == jnp.float64 and not x64:
            continue
        for shape, axis in inputs:
            if progress is not None:
                progress(f"{dtype_name} {shape} axis={axis}")
            x = jnp.asarray(rng.standard_normal(shape) * scale, dtype)
            v = jnp.asarray(rng.standard_normal(shape), dtype) if family else None
            case = _Input(x, axis, dtype_name, v, rows)
            for check in checks:
                check(case)
        if family:
            if progress is not None:
                progress(f"{dtype_name} attention {_verify_attention.SHAPE}")
            _check_once(_verify_attention, dtype_name, rows, rng)
            if progress is not None:
                progress(f"{dtype_name} post-training {_verify_post.SHAPE}")
            _check_once(_verify_post, dtype_name, rows, rng)
    device = jax.devices()[0]
    return Report(jax.default_backend(), getattr(device, "device_kind", str(device)), rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command with `argv`; returns 0 when every jsoftmax method agrees, 1
    when one is out of tolerance (2 for bad arguments)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Build the softmax Jacobian (and log-softmax Jacobian, Hessian and "
            "Jacobian-free products) every way jsoftmax offers, compare each with a "
            "float64 NumPy reference on the default JAX backend, print the worst error "
            "of each method per dtype, and exit non-zero if any jsoftmax method is out "
            "of tolerance."
        ),
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(SIZES),
        help="softmax lengths n of the vector cases (default: 2 3 16 128 1024)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=list(DTYPES),
        choices=get_args(Dtype),
        help="dtypes to test (default: float32 float64 bfloat16)",
    )
    parser.add_argument("--no-batched", action="store_true", help="skip the batched cases")
    parser.add_argument("--no-family", action="store_true", help="check only the softmax Jacobian")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--full", action="store_true", help="print every comparison, not only the summary"
    )
    parser.add_argument("--json", metavar="PATH", help="write every comparison as JSON to PATH")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.sizes):
        parser.error("--sizes must be positive integers")
    progress = None if args.quiet else (lambda s: print(f"  checking {s}", file=sys.stderr))
    # float64 for this run only: the caller's JAX configuration is left as it was.
    with jax.enable_x64(True) if "float64" in args.dtypes else contextlib.nullcontext():
        report = verify(
            args.sizes,
            args.dtypes,
            batched=() if args.no_batched else BATCHED,
            family=not args.no_family,
            seed=args.seed,
            progress=progress,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report.as_dict(), fh, indent=1)
        print(f"wrote {args.json}")
    print(report.table() if args.full else report.summary())  # the verdict comes last
    return 0 if report.ok else 1
