r"""`softmax`, `log_softmax` and `logsumexp` with their custom differentiation rules.

The public functions check and normalise their arguments; the private kernels below
carry the rules. Two rules exist for each function:

* `"vjp"`: a `jax.custom_vjp` whose forward pass saves exactly one output-sized array
  (the probabilities, or the log-probabilities for `log_softmax`) for the backward
  pass. Its forward rule computes the values directly, so forward-over-reverse
  (`jax.hessian`, `jax.jacfwd(jax.grad(...))`) differentiates through it.
* `"jvp"`: a `jax.custom_jvp` with the same values, so forward mode (`jax.jvp`,
  `jax.jacfwd`) works as well. Its tangent is a function of the output alone
  (recomputed under `jax.checkpoint`), so reverse mode through it also keeps exactly
  one output-sized array, the output.

Both rules delegate the derivative formulas to [`jsoftmax._formulas`][jsoftmax._formulas]
and the forward pass to the max-exp-sum pass of [`jsoftmax._kernel`][jsoftmax._kernel].
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _custom, _formulas, _merge, _pass
from jsoftmax._checks import Precision, Rule

Axes = tuple[int, ...]


# --------------------------------------------------------------------------------------
# The forward computation shared by every rule.
# --------------------------------------------------------------------------------------


def _shifted_exp(x, where, temperature, axes: Axes, precise: bool = False):
    """`(d, exp(d), total, parts)` with `d = (x - m) / T`, `m` the row maximum, in the
    accumulation dtype (the pass of `jsoftmax._pass.exp_pass`).

    `precise=True` (`precision="high"`) adds two refinements:

    * for float32 and float64 the rounding error of `x - m` is recovered exactly
      (Knuth's TwoSum, a few additions) and folded back as
      `exp(d + err) = exp(d)(1 + err)`. Without it the rounding of `x - m` alone costs
      up to `|x - m| / 2` ULP (about 30 ULP for a gap of 60 to the maximum);
    * the sum is split as `total = c + r`: `c` sums the entries equal to 1 (the maxima,
      so `c` is their count) and `r` the others, so `r` is not rounded against the
      leading ones. `parts = (c, r)`; it is None otherwise.
    """
    cdt = _checks.accumulation_dtype(x.dtype)
    fp = _pass.exp_pass(x, where, axes, temperature)
    if not precise:
        return fp.d, fp.e, fp.total, None
    e = fp.e
    if cdt == x.dtype:  # 16-bit inputs: x - m is exact to far below their ULP
        err = lax.stop_gradient(_sub_error(fp.u, fp.m, fp.u - fp.m))
        if temperature is not None:
            err = err / temperature.astype(cdt)
        e = e + e * err
    one = e == 1
    zero = jnp.zeros((), cdt)
    # Both sums carry the tangents of their own entries, so d(c + r) = sum de.
    count = jnp.sum(jnp.where(one, e, zero), axis=axes, keepdims=True)
    rest = jnp.sum(jnp.where(one, zero, e), axis=axes, keepdims=True)
    return fp.d, e, count + rest, (count, rest)


def _sub_error(a, b, d):
    """The exact `(a - b) - d` for `d = fl(a - b)` (TwoSum); 0 where `d` is not finite."""
    b_neg = d - a
    err = (a - (d - b_neg)) - (b + b_neg)
    return jnp.where(jnp.isnan(err), jnp.zeros((), err.dtype), err)


def _log_total(parts):
    """`log(c + r)` from `parts = (c, r)` of `_shifted_exp` (`precise=True`), computed
    as `log1p((c - 1) + r)`: with a single maximum (`c = 1`) this is `log1p(r)`, which
    keeps an `r` below the rounding unit that `log(1 + r)` loses. A row without finite
    entries (`c = 0`) gives `log1p(0) = 0`."""
    count, rest = parts
    return jnp.log1p(jnp.where(count > 0, count - 1, count) + rest)


def _nonzero(total):
    """Clamps `total` to the smallest normal number: a row with any finite entry has
    `total >= 1`, so only rows without finite entries change: they give `p = 0`
    (`log p = -inf`) instead of 0/0, with zero derivatives. NaN stays NaN."""
    return jnp.maximum(total, jnp.finfo(total.dtype).tiny)


def _values(x, where, temperature, axes: Axes, log: bool, precise: bool = False):
    """Probabilities (or log-probabilities) in the accumulation dtype."""
    d, e, total, parts = _shifted_exp(x, where, temperature, axes, precise)
    total = _nonzero(total)
    if log:
        return d - (jnp.log(total) if parts is None else _log_total(parts))
    return e / total


def _shift_by_dominant(p, v, axes: Axes):
    """`v - v_k` for the entry with `p_k > 1/2` (there is at most one), else `v`.

    $J$ annihilates constants (its rows sum to 0), so the exact product is unchanged.
    But $\\langle p, v - v_k\\rangle$ is then a sum of small terms, so a dominant
    component $p_k (v_k - \\langle p, v\\rangle)$ no longer cancels catastrophically:
    its error drops from about $\\epsilon / (1 - p_k)$ relative to a few ULP of the
    row's largest component. It also keeps the derivatives of 16-bit outputs right
    where $p_k$ rounds to 1 (e.g. $p = 1 - 8\\cdot 10^{-5}$ in float16): the product is
    then formed from the small probabilities, which the 16-bit output holds exactly to
    its rounding.
    """
    # round(p) (halves to even) is 1 where p > 1/2 and 0 elsewhere for p in [0, 1]. As
    # arithmetic rather than a compare and select it fuses with the products that use
    # it (on XLA:CPU a select splits the 16-bit VJP into three passes).
    dominant = jnp.round(p).astype(v.dtype)
    v_k = jnp.sum(dominant * v, axis=axes, keepdims=True)
    return v - v_k


def _stable_products(precise: bool, dtype) -> bool:
    """Whether the derivative rules shift by the dominant entry: with `precision="high"`
    and for 16-bit outputs, whose probabilities near 1 are rounded."""
    return precise or _checks.accumulation_dtype(dtype) != dtype


def _safe_log(p):
    # log p where p > 0 and 0 elsewhere, with a derivative that stays finite at p = 0.
    positive = p > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, p, jnp.ones((), p.dtype))), 0)


# --------------------------------------------------------------------------------------
# rule="vjp": custom_vjp, one output-sized residual.
# --------------------------------------------------------------------------------------


@partial(_custom.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernel_vjp(x, where, temperature, axes: Axes, log: bool, precise: bool = False) -> jax.Array:
    return _values(x, where, temperature, axes, log, precise).astype(x.dtype)


def _kernel_vjp_fwd(x, where, temperature, axes, log, precise=False):
    # The values directly (not through _kernel_vjp), so that forward mode can
    # differentiate this rule: jax.hessian of a custom_vjp function is jacfwd of jacrev.
    out = _values(x, where, temperature, axes, log, precise).astype(x.dtype)
    return out, (out, temperature)


def _kernel_vjp_bwd(axes, log, precise, residuals, g):
    out, temperature = residuals
    cdt = _checks.accumulation_dtype(out.dtype)
    out_c, g = out.astype(cdt), g.astype(cdt)
    if log:
        valid = out_c > -jnp.inf
        g = jnp.where(valid, g, jnp.zeros((), cdt))  # masked outputs are constants
        g_s = _formulas.log_vjp(jnp.exp(out_c), g, axes)
        log_p = jnp.where(valid, out_c, jnp.zeros((), cdt))
    else:
        if _stable_products(precise, out.dtype):
            g = _shift_by_dominant(out_c, g, axes)
        g_s = _formulas.jac_product(out_c, g, axes)
        log_p = None
    if temperature is None:
        return g_s.astype(out.dtype), None, None
    # s = x / T, so dL/dx = g_s / T and dL/dT = -<g_s, s> / T. Since <g_s, 1> = 0 the
    # shift-invariant log p can stand in for s (exact, and finite where p > 0).
    t = temperature.astype(cdt)
    if log_p is None:
        log_p = _safe_log(out_c)
    g_t = -jnp.sum(g_s * log_p, axis=axes, keepdims=True) / t
    return (g_s / t).astype(out.dtype), None, g_t.astype(temperature.dtype)


_kernel_vjp.defvjp(_kernel_vjp_fwd, _kernel_vjp_bwd)


# --------------------------------------------------------------------------------------
# rule="jvp": custom_jvp, so forward mode works.
# --------------------------------------------------------------------------------------


@partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _kernel_jvp(x, where, temperature, axes: Axes, log: bool, precise: bool = False) -> jax.Array:
    return _values(x, where, temperature, axes, log, precise).astype(x.dtype)


@_kernel_jvp.defjvp
def _kernel_jvp_rule(axes, log, precise, primals, tangents):
    x, where, temperature = primals
    x_dot, _, t_dot = tangents
    out = _kernel_jvp(x, where, temperature, axes, log, precise)
    # The tangent is a function of the output alone (and of the temperature, an input):
    # p, log p and which entries are constants are recomputed from it inside
    # jax.checkpoint, so reverse mode keeps the output as its one output-sized residual.
    tangent = partial(_output_tangent, axes=axes, log=log, precise=precise)
    return out, jax.checkpoint(tangent)(out, temperature, x_dot, t_dot)


def _output_tangent(out, temperature, x_dot, t_dot, axes: Axes, log: bool, precise: bool):
    """The tangent of softmax (`log`: log-softmax) from its output `out`.

    Entries whose output is a constant (masked or `-inf` logits: `p = 0`, or
    `log p = -inf`) take no part: their input tangents, maybe `inf`, are dropped. A NaN
    output counts as a live entry, so NaN propagates.
    """
    cdt = _checks.accumulation_dtype(out.dtype)
    out_c = out.astype(cdt)
    zero = jnp.zeros((), cdt)
    if log:
        valid = out_c != -jnp.inf
        p = jnp.exp(out_c)
    else:
        valid = out_c != 0
        p = out_c
    s_dot = jnp.where(valid, x_dot.astype(cdt), zero)
    if temperature is not None:
        # d(x / T) = (dx - (x / T) dT) / T. log p differs from x / T by a per-row
        # constant, which both Jacobians annihilate; it is 0 where p = 0.
        log_p = jnp.where(valid, out_c, zero) if log else _safe_log(p)
        s_dot = (s_dot - log_p * t_dot.astype(cdt)) / temperature.astype(cdt)
    if log:
        out_dot = jnp.where(valid, _formulas.log_jvp(p, s_dot, axes), zero)
    else:
        if _stable_products(precise, out.dtype):
            s_dot = _shift_by_dominant(p, s_dot, axes)
        out_dot = _formulas.jac_product(p, s_dot, axes)
    return out_dot.astype(out.dtype)


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def _dispatch(
    x, axis, where, rule: Rule, temperature, log: bool, precision: Precision
) -> jax.Array:
    x = _checks.as_float_array(x)
    axes = _checks.canonical_axes(axis, x.ndim)
    _checks.check_rule(rule)
    _checks.check_precision(precision)
    where = _checks.check_where(where, x.shape)
    temperature = _checks.prepare_temperature(temperature, x.shape, axes)
    if x.size == 0:
        return jnp.zeros(x.shape, x.dtype)
    kernel = _kernel_vjp if rule == "vjp" else _kernel_jvp
    return kernel(x, where, temperature, axes, log, precision == "high")


def softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    rule: Rule = "vjp",
    temperature: ArrayLike = 1.0,
    precision: Precision = "default",
) -> jax.Array:
    r"""Numerically stable softmax with a lean custom derivative.

    $$
    p_i = \frac{\exp(z_i / T)}{\sum_k \exp(z_k / T)}, \qquad
    \frac{\partial p_i}{\partial z_j} = \frac{1}{T}\, p_i(\delta_{ij} - p_j).
    $$

    $i$ indexes the output component and $j$ the input component; the Jacobian
    $J = \mathrm{diag}(p) - pp^\top$ (for $T = 1$) is symmetric and its rows sum to
    zero. The row maximum is subtracted before `exp` (shift invariance), so large
    logits never overflow. The call `softmax(x, axis, where)` is a drop-in for
    `jax.nn.softmax`.

    Args:
      x: logits, any rank >= 1. Integer input is promoted to the default float dtype.
      axis: the softmax axis (negative counts from the end), a tuple of axes that are
        normalised together, or None (every axis), as in `jax.nn.softmax`.
      where: optional boolean mask broadcastable to `x`; `False` entries are excluded:
        probability 0 and gradient 0. E.g. a causal `(T, T)` mask against
        `(batch, heads, T, T)` attention scores; the broadcast mask is not saved for
        the backward pass. Numeric masks are refused (an additive 0 / `-inf` mask would
        be inverted): convert a 0/1 mask with `mask.astype(bool)`.
      rule: `"vjp"` (default) differentiates with a `jax.custom_vjp` that saves only
        the probabilities for the backward pass, whose product is
        $\bar z = p \odot (g - \langle g, p\rangle)$. Reverse mode, and forward mode
        over it (`jax.hessian`), work; `jax.jvp` and `jax.jacfwd` of the function
        itself raise: use `rule="jvp"` (a `jax.custom_jvp` with identical values,
        whose reverse mode also saves only the probabilities) for those.
      temperature: $T > 0$, a scalar or an array broadcastable to the batch shape
        (`x.shape` without `axis`). Differentiable:
        $\partial L/\partial T = -\frac{1}{T}\langle \bar s, z/T\rangle$ with
        $\bar s = p\odot(g - \langle g, p\rangle)$. The row maximum is subtracted
        before dividing, $(z - \max z)/T$, so eager and jitted calls agree for huge
        logits. Masked and $-\infty$ entries stay exactly 0 for $T$ up to about
        $3\cdot 10^{36}$ in float32 (their exponential is that of the lowest finite
        value over $T$).
      precision: `"default"` (as fast as `jax.nn.softmax`, with its accuracy:
        float32/float64 errors up to about $|z_i - \max z| / 2$ ULP, e.g. 10-20 ULP
        for a logit 60 below the maximum) or `"high"`: the rounding error of
        $z - \max z$ is recovered exactly and folded into `exp`, the small terms of the
        sum are added apart from the maxima, and the derivative rules shift the
        cotangent (tangent) by its value at a dominant entry, so
        $p_k (g_k - \langle p, g\rangle)$ does not cancel when $p_k$ is close to 1.
        Measured against 50-digit arithmetic: at most 3 ULP per component for float32
        and float64, derivatives within 3 ULP of the row's largest component. It costs
        extra passes over the data (2-6x the time of `"default"` on a CPU). 16-bit
        inputs are within 1 ULP either way.

    Returns:
      Probabilities with the shape of `x` and its dtype.

    Note:
      * A row whose entries are all masked or $-\infty$ gives all zeros, with zero
        gradients. A $-\infty$ logit behaves as a masked entry.
      * $+\infty$ or NaN anywhere in an unmasked row makes the whole row NaN (as in
        `jax.nn.softmax`); masked entries never contribute, whatever they hold.
      * An empty softmax axis returns an empty array.
      * float16/bfloat16 inputs are computed in float32 and rounded once. Their
        derivatives are formed from the 16-bit probabilities with the dominant entry
        shifted out (as with `precision="high"`), so a probability that rounds to 1
        still gives the right derivative: first and second derivatives agree with the
        float32 ones to the 16-bit rounding.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.softmax(jnp.array([1.0, 2.0, 3.0])))
      [0.09   0.2447 0.6652]
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.softmax(jnp.array([1.0, 2.0, 1e30]), -1,
      ...                            jnp.array([True, True, False])))
      [0.2689 0.7311 0.    ]
    """
    return _dispatch(x, axis, where, rule, temperature, log=False, precision=precision)


def log_softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    rule: Rule = "vjp",
    temperature: ArrayLike = 1.0,
    precision: Precision = "default",
) -> jax.Array:
    r"""Numerically stable log-softmax.

    $$
    y_i = \frac{z_i}{T} - \log\sum_k \exp(z_k / T), \qquad
    \frac{\partial y_i}{\partial z_j} = \frac{1}{T}(\delta_{ij} - p_j).
    $$

    Computed as $(z_i - m)/T - \log\sum_k \exp((z_k - m)/T)$ with $m = \max_k z_k$, so
    it neither overflows nor underflows to `log(0)`. The call
    `log_softmax(x, axis, where)` is a drop-in for `jax.nn.log_softmax`.

    Args:
      x: logits, any rank >= 1.
      axis: the softmax axis, a tuple of axes, or None (every axis).
      where: optional boolean mask broadcastable to `x`; masked entries give `-inf`
        and gradient 0.
      rule: `"vjp"` (default; a `jax.custom_vjp` saving only the output, backward
        $\bar z = g - p\sum_i g_i$; reverse mode and `jax.hessian`) or `"jvp"` (a
        `jax.custom_jvp`, forward mode too). See [`softmax`][jsoftmax.softmax].
      temperature: $T > 0$, scalar or broadcastable to the batch shape;
        $\partial L/\partial T = -\frac{1}{T}\langle \bar s, y\rangle$ with
        $\bar s = g - p\sum_i g_i$.
      precision: `"default"` (the speed and accuracy of `jax.nn.log_softmax`) or
        `"high"`: $\log\sum_k e^{s_k - m}$ is computed as $\operatorname{log1p}$ of the
        sum without one maximal term, so a dominant logit gets $\log p \approx -r$
        instead of 0 (the default's error there reaches about $10^7$ ULP in float32
        and $10^{11}$ in float64), and $z - \max z$ is corrected as in
        [`softmax`][jsoftmax.softmax]. Measured against 50-digit arithmetic: at most
        1.3 ULP (float32/float64) and 0.5 ULP (16-bit). Costs extra passes (2-7x the
        time of `"default"` on a CPU).

    Returns:
      Log-probabilities with the shape and dtype of `x`.

    Note:
      * Masked and $-\infty$ entries give $-\infty$; the cotangent arriving at such an
        entry is ignored (the output is a constant there). A row with no finite entry
        is $-\infty$ everywhere with zero gradients.
      * float16/bfloat16 inputs accumulate in float32: 100 000 equal float16 logits
        give `log(1e-5)`, not $-\infty$.
      * $+\infty$ or NaN in an unmasked row gives NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.log_softmax(jnp.array([1.0, 2.0, 3.0])))
      [-2.4076 -1.4076 -0.4076]
    """
    return _dispatch(x, axis, where, rule, temperature, log=True, precision=precision)


# --------------------------------------------------------------------------------------
# logsumexp: the row statistic that softmax normalises by; its gradient is softmax.
# --------------------------------------------------------------------------------------


def _lse_parts(x, b, where, axes: Axes):
    """`(lse, sign, r)`: the (signed) log-sum-exp $\\log|\\sum_k b_k e^{x_k}|$ and its
    sign (keepdims, accumulation dtype), and `r = exp(x - lse) * sign`, the gradient of
    `lse` with respect to `b` (times `b` it is the gradient with respect to `x`).

    Entries with `b = 0` are left out, as masked ones. A row with nothing left gives
    `lse = -inf`, sign 0 and `r = 0`; `+inf` gives `+inf`; NaN gives NaN.
    """
    valid = where
    if b is not None:
        nonzero = b != 0
        valid = nonzero if valid is None else valid & nonzero
    fp = _pass.exp_pass(x, valid, axes)
    if b is None:
        total = fp.total
        sign = jnp.where(total > 0, jnp.ones((), total.dtype), jnp.zeros((), total.dtype))
        lse = _merge.lse_of(fp.m, total)
        return lse, sign, fp.e / _nonzero(total)
    signed = jnp.sum(jnp.where(valid, b * fp.e, jnp.zeros((), fp.e.dtype)), axes, keepdims=True)
    sign = jnp.sign(signed)
    size = jnp.abs(signed)
    lse = _merge.lse_of(fp.m, size)
    r = fp.e / jnp.where(size == 0, jnp.ones((), size.dtype), signed)
    return lse, sign, r


def _lse_out(x, b, where, axes):
    cdt = _checks.accumulation_dtype(x.dtype if b is None else jnp.promote_types(x.dtype, b.dtype))
    bc = None if b is None else b.astype(cdt)
    return _lse_parts(x.astype(cdt), bc, where, axes)


@partial(_custom.custom_vjp, nondiff_argnums=(3,))
def _lse_kernel_vjp(x, b, where, axes: Axes):
    lse, sign, _ = _lse_out(x, b, where, axes)
    return lse.astype(x.dtype), sign.astype(x.dtype)


def _lse_kernel_vjp_fwd(x, b, where, axes):
    lse, sign, r = _lse_out(x, b, where, axes)
    # The one residual: r (for b = None the probabilities, the gradient itself), in the
    # input's dtype; b is an argument.
    return (lse.astype(x.dtype), sign.astype(x.dtype)), (r.astype(x.dtype), b)


def _lse_kernel_vjp_bwd(axes, residuals, g):
    r, b = residuals
    g_lse = g[0]
    cdt = _checks.accumulation_dtype(r.dtype)
    grad_b = _formulas.lse_vjp(r.astype(cdt), g_lse.astype(cdt))
    if b is None:
        return grad_b.astype(r.dtype), None, None
    return (b.astype(cdt) * grad_b).astype(r.dtype), grad_b.astype(b.dtype), None


_lse_kernel_vjp.defvjp(_lse_kernel_vjp_fwd, _lse_kernel_vjp_bwd)


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _lse_kernel_jvp(x, b, where, axes: Axes):
    lse, sign, _ = _lse_out(x, b, where, axes)
    return lse.astype(x.dtype), sign.astype(x.dtype)


@_lse_kernel_jvp.defjvp
def _lse_kernel_jvp_rule(axes, primals, tangents):
    x, b, where = primals
    x_dot, b_dot, _ = tangents
    lse, sign, r = _lse_out(x, b, where, axes)
    cdt = r.dtype
    # Entries left out (masked, -inf, b = 0) take no part: their tangents (maybe inf)
    # are dropped. A NaN or +inf entry keeps its row's tangents, so the row's derivative
    # is NaN in both rules.
    valid = x != -jnp.inf
    if where is not None:
        valid = valid & where
    if b is not None:
        valid = valid & (b != 0)
    zero = jnp.zeros((), cdt)
    p = r if b is None else r * b.astype(cdt)
    lse_dot = _formulas.lse_jvp(p, jnp.where(valid, x_dot.astype(cdt), zero), axes)
    if b is not None:
        lse_dot = lse_dot + _formulas.lse_jvp(r, jnp.where(valid, b_dot.astype(cdt), zero), axes)
    out = (lse.astype(x.dtype), sign.astype(x.dtype))
    return out, (lse_dot.astype(x.dtype), jnp.zeros_like(out[1]))


def logsumexp(
    a: ArrayLike,
    axis: int | tuple[int, ...] | None = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
    *,
    rule: Rule = "vjp",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Numerically stable log-sum-exp, whose gradient is [`softmax`][jsoftmax.softmax].

    $$
    \ell = \log\sum_k b_k e^{a_k} = m + \log\sum_k b_k e^{a_k - m}, \qquad
    m = \max_k a_k, \qquad \frac{\partial \ell}{\partial a_j} = p_j
    \ \ (b = 1).
    $$

    The signature and defaults are `jax.nn.logsumexp`'s (also
    `jax.scipy.special.logsumexp`), so a call is a drop-in: the default `axis=None`
    reduces every axis. The row maximum is subtracted before `exp` (one fused
    max-exp-sum pass), so nothing overflows. It is the normaliser of
    [`softmax`][jsoftmax.softmax] ($\log p = a - \ell$) and the statistic that
    [`merge_partials`][jsoftmax.merge_partials] merges.

    Args:
      a: logits, any rank >= 1. Integer input is promoted to the default float dtype.
      axis: the axis to reduce (negative counts from the end), a tuple of axes reduced
        together, or None (default): every axis.
      b: optional scaling factors broadcastable to `a`, differentiable;
        $\ell = \log\sum_k b_k e^{a_k}$. Entries with $b_k = 0$ are left out (their
        gradients are 0). With negative factors the sum may be negative: its log is
        NaN unless `return_sign`.
      keepdims: keep the reduced axes with size 1.
      return_sign: return `(log|sum|, sign)` instead, as `jax.nn.logsumexp`.
      where: optional boolean mask broadcastable to `a`; `False` entries are left out
        of the sum (gradient 0), whatever they hold.
      rule: `"vjp"` (default): a `jax.custom_vjp` whose forward pass saves one array of
        `a`'s size (the probabilities $p$, or $e^{a - \ell}$ with `b`) in the dtype of
        `a`; the backward pass is $\bar a = \bar\ell\, p$. `"jvp"`: a `jax.custom_jvp`
        with identical values, $\dot\ell = \langle p, \dot a\rangle$, so `jax.jvp`,
        `jax.jacfwd` and `jax.hessian` work too.

    Returns:
      The log-sum-exp over `axis`: the shape of `a` without the reduced axes (with
      size-1 axes if `keepdims`), in the dtype of `a` (float16/bfloat16 inputs are
      computed in float32 and rounded once); with `return_sign`, `(result, sign)`.

    Note:
      * Masked and $-\infty$ entries are ignored. A row with nothing left (every entry
        masked or $-\infty$) gives $-\infty$ with a zero, never NaN, gradient; an
        empty axis gives $-\infty$.
      * $+\infty$ in an unmasked entry gives $+\infty$ (its gradient is NaN, as the
        softmax of that row); NaN gives NaN.
      * 100 000 equal float16 logits give `log(1e5) = 11.51`: the sum is accumulated
        in float32. A 16-bit result carries the dtype's rounding (a bfloat16 value
        near 10 is off by up to 0.03); pass float32 logits when the result is to be
        merged with [`merge_partials`][jsoftmax.merge_partials].

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> z = jnp.array([[1.0, 2.0, 3.0], [100.0, 100.0, -jnp.inf]], jnp.float32)
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.logsumexp(z, axis=-1))
      ...     print(jax.grad(lambda z: jsoftmax.logsumexp(z, axis=-1).sum())(z))
      [  3.4076 100.6931]
      [[0.09   0.2447 0.6652]
       [0.5    0.5    0.    ]]
      >>> print(jsoftmax.logsumexp(z, axis=-1, where=jnp.zeros((2, 3), bool)))
      [-inf -inf]
      >>> lse, sign = jsoftmax.logsumexp(jnp.array([1.0, 1.0]), b=jnp.array([2.0, -1.0]),
      ...                                return_sign=True)
      >>> print(f"{float(lse):.4f} {float(sign):+.0f}")  # log(2e - e) = 1
      1.0000 +1
    """
    x = _checks.as_float_array(a, "a")
    axes = _checks.canonical_axes(axis, x.ndim)
    _checks.check_rule(rule)
    if not isinstance(keepdims, (bool, type(None))) or not isinstance(return_sign, bool):
        raise TypeError(
            f"keepdims and return_sign must be bools, got {keepdims!r} and {return_sign!r}."
        )
    where = _checks.check_where(where, x.shape)
    if b is not None:
        b = _checks.as_array(b, "b")
        if not (jnp.issubdtype(b.dtype, jnp.floating) or jnp.issubdtype(b.dtype, jnp.integer)):
            raise TypeError(f"b must be a real array, got dtype {b.dtype}.")
        if not _checks.broadcasts_to(b.shape, x.shape):
            raise ValueError(f"b of shape {b.shape} does not broadcast to a's shape {x.shape}.")
        dtype = jnp.promote_types(x.dtype, b.dtype)
        x = x.astype(dtype)
        b = jnp.broadcast_to(b.astype(dtype), x.shape)
    if any(x.shape[k] == 0 for k in axes):
        shape = tuple(1 if k in axes else s for k, s in enumerate(x.shape))
        lse, sign = jnp.full(shape, -jnp.inf, x.dtype), jnp.zeros(shape, x.dtype)
    else:
        kernel = _lse_kernel_vjp if rule == "vjp" else _lse_kernel_jvp
        lse, sign = kernel(x, b, where, axes)
    if not keepdims:
        lse, sign = jnp.squeeze(lse, axes), jnp.squeeze(sign, axes)
    if return_sign:
        return lse, sign
    if b is not None:
        lse = jnp.where(sign < 0, jnp.full((), jnp.nan, lse.dtype), lse)
    return lse
