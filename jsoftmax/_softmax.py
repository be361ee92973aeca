r"""`softmax` and `log_softmax` with their custom differentiation rules.

The public functions check and normalise their arguments; the private kernels below
carry the rules. Two rules exist for each function:

* `"vjp"` — a `jax.custom_vjp` whose forward pass saves exactly one
  output-sized array (the probabilities, or the log-probabilities for
  `log_softmax`) for the backward pass. Reverse mode only.
* `"jvp"` — a `jax.custom_jvp` with the same values, so forward mode
  (`jax.jvp`, `jax.jacfwd`, `jax.hessian`) works as well. Its
  tangent is a function of the output alone (recomputed under `jax.checkpoint`),
  so reverse mode through it also keeps exactly one output-sized array, the output.

Both rules delegate the derivative formulas to `jsoftmax._formulas`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _custom, _formulas, _merge
from jsoftmax._checks import Precision, Rule

Axes = tuple[int, ...]


# --------------------------------------------------------------------------------------
# The forward computation shared by every rule.
# --------------------------------------------------------------------------------------


def _scaled_logits(x, where, temperature):
    """`s = x / T` in the accumulation dtype, with masked entries set to `-inf`."""
    s = x.astype(_checks.accumulation_dtype(x.dtype))
    if temperature is not None:
        s = s / temperature.astype(s.dtype)
    if where is not None:
        s = jnp.where(where, s, -jnp.inf)
    return s


def log_normalizer(x, where, temperature, axes: Axes):
    """`(log p, (m, log_total))`: `log p = (s - m) - log_total`, `s = x / T` masked.

    `m` is the row maximum and `log_total = log sum exp(s - m)` (both keepdims), kept
    apart because `m + log_total` would round `log_total` away when `|m|` is
    huge. Both are finite for rows without finite entries (whose `log p` is `-inf`).
    One fused max-exp-sum pass.
    """
    shifted, _, total, _, m = _shifted_exp(x, where, temperature, axes)
    log_total = jnp.log(_nonzero(total))
    return shifted - log_total, (m, log_total)


def _shifted_exp(x, where, temperature, axes: Axes, precise: bool = False, row_max=None):
    """Returns `(s - m, exp(s - m), total, parts, m)` with `s = x / T`, `m = max s`.

    `total` is `sum exp(s - m)`. Computed in float32 for 16-bit inputs. Masked
    entries become `-inf` before the exponential ("double where"), so a large masked
    logit never reaches `exp` and never leaks NaN into a derivative. A row without
    any finite entry yields `exp = 0` and `total = 0`;
    `+inf` and NaN propagate to NaN.

    `precise=True` (`precision="high"`) adds two refinements:

    * for float32 and float64 the rounding error of `d = fl(s - m)` is recovered
      exactly (Knuth's TwoSum, a few additions) and folded back as
      `exp(d + err) = exp(d)(1 + err)`. Without it the rounding of `s - m` alone
      costs up to `|s - m| / 2` ULP (about 30 ULP for a gap of 60 to the maximum);
    * the sum is split as `total = c + r`: `c` sums the entries equal to 1 (the
      maxima, so `c` is their count) and `r` the others, so `r` is not rounded
      against the leading ones. `parts = (c, r)`; it is None otherwise.

    `row_max`, if given, maps the local row maximum to the one to shift by (the
    sharded functions pass an all-reduce over devices); `total` stays local then.
    """
    cdt = _checks.accumulation_dtype(x.dtype)
    s = _scaled_logits(x, where, temperature)
    # The maximum starts from the lowest finite value, so a row without any finite
    # entry is shifted by a finite amount and gives exp = 0 instead of exp(-inf + inf).
    # (A select on the maximum would split XLA's fused max-exp-sum kernel.)
    m = lax.stop_gradient(jnp.max(s, axis=axes, keepdims=True, initial=jnp.finfo(cdt).min))
    if row_max is not None:
        m = row_max(m)
    shifted = s - m
    e = jnp.exp(shifted)
    if not precise:
        return shifted, e, jnp.sum(e, axis=axes, keepdims=True), None, m
    if cdt == x.dtype:  # 16-bit inputs: s - m is exact to far below their ULP
        e = e + e * lax.stop_gradient(_sub_error(s, m, shifted))
    one = e == 1
    zero = jnp.zeros((), cdt)
    # Both sums carry the tangents of their own entries, so d(c + r) = sum de.
    count = jnp.sum(jnp.where(one, e, zero), axis=axes, keepdims=True)
    rest = jnp.sum(jnp.where(one, zero, e), axis=axes, keepdims=True)
    return shifted, e, count + rest, (count, rest), m


def _sub_error(a, b, d):
    """The exact `(a - b) - d` for `d = fl(a - b)` (TwoSum); 0 where `d` is not finite."""
    b_neg = d - a
    err = (a - (d - b_neg)) - (b + b_neg)
    return jnp.where(jnp.isnan(err), jnp.zeros((), err.dtype), err)


def _log_total(parts):
    """`log(c + r)` from `parts = (c, r)` of `_shifted_exp` (`precise=True`).

    Computed as `log1p((c - 1) + r)`: with a single maximum (`c = 1`) this is
    `log1p(r)`, which keeps an `r` below the rounding unit that `log(1 + r)`
    loses (log-softmax of a dominant logit would be 0 instead of about `-r`). A row
    without finite entries (`c = 0`) gives `log1p(0) = 0`.
    """
    count, rest = parts
    return jnp.log1p(jnp.where(count > 0, count - 1, count) + rest)


def _nonzero(total):
    """Clamps `total` to the smallest normal number.

    A row with any finite entry has `total >= 1` (its maximum contributes exp(0)), so
    only rows without finite entries change: they give `p = 0 / tiny = 0` (`log p =
    -inf`) instead of 0/0, with zero derivatives (no tie with `total`). A NaN total
    stays NaN.
    """
    return jnp.maximum(total, jnp.finfo(total.dtype).tiny)


def _values(x, where, temperature, axes: Axes, log: bool, precise: bool = False):
    """Probabilities (or log-probabilities) in the accumulation dtype."""
    shifted, e, total, parts, _ = _shifted_exp(x, where, temperature, axes, precise)
    total = _nonzero(total)
    if log:
        return shifted - (jnp.log(total) if parts is None else _log_total(parts))
    return e / total


def _shift_by_dominant(p, v, axes: Axes):
    """`v - v_k` for the entry with `p_k > 1/2` (there is at most one), else `v`.

    `J` annihilates constants (its rows sum to 0), so the exact product is unchanged.
    But `<p, v - v_k>` is then a sum of small terms, so a dominant component
    `p_k (v_k - <p, v>)` no longer cancels catastrophically: its error drops from
    about `eps / (1 - p_k)` relative to a few ULP of the row's largest component.
    """
    v_k = jnp.sum(jnp.where(p > 0.5, v, jnp.zeros((), v.dtype)), axis=axes, keepdims=True)
    return v - v_k


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
    out = _kernel_vjp(x, where, temperature, axes, log, precise)
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
        if precise:
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
    `log p = -inf`) take no part: their input tangents, maybe `inf`, are dropped. A
    NaN output counts as a live entry, so NaN propagates.
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
        if precise:
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
    if any(x.shape[a] == 0 for a in axes):
        return jnp.zeros(x.shape, x.dtype)
    kernel = _kernel_vjp if rule == "vjp" else _kernel_jvp
    return kernel(x, where, temperature, axes, log, precision == "high")


def softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    where: ArrayLike | None = None,
    rule: Rule = "vjp",
    temperature: ArrayLike = 1.0,
    precision: Precision = "default",
) -> jax.Array:
    r"""Numerically stable softmax with a lean custom derivative.

    $$
    p_i = \frac{\exp(z_i / T)}{\sum_k \exp(z_k / T)}, \qquad
    \frac{\partial p_i}{\partial z_j} = \frac{1}{T}\, p_i(\delta_{ij} - p_j).
    $$

    `i` indexes the output component and `j` the input component; the Jacobian
    $J = \mathrm{diag}(p) - pp^\top$ (for `T = 1`) is symmetric and its rows
    sum to zero. The row maximum is subtracted before `exp` (shift invariance), so
    large logits never overflow.

    Args:
      x: logits, any rank >= 1. Integer input is promoted to the default float dtype.
      axis: the softmax axis (negative counts from the end), or a tuple of axes that
        are normalised together.
      where: optional boolean mask broadcastable to `x`; `False` entries are
        excluded: probability 0 and gradient 0. E.g. a causal `(T, T)` mask against
        `(batch, heads, T, T)` attention scores; the broadcast mask is not saved for
        the backward pass. Numeric masks are refused (an additive 0 / `-inf` mask
        would be inverted): convert a 0/1 mask with `mask.astype(bool)`.
      rule: `"vjp"` (default) differentiates with a `jax.custom_vjp` that
        saves only the probabilities for the backward pass, whose product is
        $\bar z = p \odot (g - \langle g, p\rangle)$. A `custom_vjp` function
        **cannot be forward-differentiated**: `jax.jvp`, `jax.jacfwd`
        and `jax.hessian` raise; use `rule="jvp"` (a
        `jax.custom_jvp` with identical values, whose reverse mode also saves
        only the probabilities) for those.
        Reverse-over-reverse (`jax.grad(jax.grad(...))`) works with both.
      temperature: `T > 0`, a scalar or an array broadcastable to the batch shape
        (`x.shape` without `axis`). Differentiable:
        $\partial L/\partial T = -\frac{1}{T}\langle \bar s, z/T\rangle$ with
        $\bar s = p\odot(g - \langle g, p\rangle)$ (equivalently with
        $\log p$ in place of $z/T$, since $\langle\bar s,1\rangle=0$).
      precision: `"default"` (as fast as `jax.nn.softmax`, with its accuracy:
        float32/float64 errors up to about `|z_i - max z| / 2` ULP, e.g. 10-20 ULP
        for a logit 60 below the maximum) or `"high"`: the rounding error of
        `z - max z` is recovered exactly and folded into `exp`, the small terms
        of the sum are added apart from the maxima, and the derivative rules shift
        the cotangent (tangent) by its value at a dominant entry, so
        `p_k (g_k - <p, g>)` does not cancel when `p_k` is close to 1. Measured
        against 50-digit arithmetic: at most 3 ULP per component for float32 and
        float64, derivatives within 3 ULP of the row's largest component. It costs
        extra passes over the data (2-6x the time of `"default"` on a CPU).
        16-bit inputs are within 1 ULP either way.

    Returns:
      Probabilities with the shape of `x` and its dtype (float16/bfloat16 inputs
      are computed in float32 and rounded once).

    Note:
      * A row whose entries are all masked or `-inf` gives all zeros, with zero
        gradients. A `-inf` logit behaves as a masked entry.
      * `+inf` or NaN anywhere in an unmasked row makes the whole row NaN (as in
        `jax.nn.softmax`); masked entries never contribute, whatever they hold.
      * An empty softmax axis returns an empty array.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.softmax(jnp.array([1.0, 2.0, 3.0])))
      [0.09   0.2447 0.6652]
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.softmax(jnp.array([1.0, 2.0, 1e30]),
      ...                            where=jnp.array([True, True, False])))
      [0.2689 0.7311 0.    ]
    """
    return _dispatch(x, axis, where, rule, temperature, log=False, precision=precision)


def log_softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    where: ArrayLike | None = None,
    rule: Rule = "vjp",
    temperature: ArrayLike = 1.0,
    precision: Precision = "default",
) -> jax.Array:
    r"""Numerically stable log-softmax.

    $$
    y_i = \frac{z_i}{T} - \log\sum_k \exp(z_k / T), \qquad
    \frac{\partial y_i}{\partial z_j} = \frac{1}{T}(\delta_{ij} - p_j).
    $$

    Computed as $(s_i - m) - \log\sum_k \exp(s_k - m)$ with $s = z/T$ and
    $m = \max_k s_k$, so it neither overflows nor underflows to `log(0)`.

    Args:
      x: logits, any rank >= 1.
      axis: the softmax axis or a tuple of axes.
      where: optional boolean mask broadcastable to `x`; masked entries give
        `-inf` and gradient 0.
      rule: `"vjp"` (default; a `jax.custom_vjp` saving only the output,
        backward $\bar z = g - p\sum_i g_i$; reverse mode only) or `"jvp"`
        (a `jax.custom_jvp`, forward mode too). See [`softmax`][jsoftmax.softmax].
      temperature: `T > 0`, scalar or broadcastable to the batch shape;
        $\partial L/\partial T = -\frac{1}{T}\langle \bar s, y\rangle$ with
        $\bar s = g - p\sum_i g_i$.
      precision: `"default"` (the speed and accuracy of `jax.nn.log_softmax`)
        or `"high"`: $\log\sum_k e^{s_k - m}$ is computed as
        $\operatorname{log1p}$ of the sum without one maximal term, so a
        dominant logit gets $\log p \approx -r$ instead of 0 (the default's
        error there reaches about $10^7$ ULP in float32 and $10^{11}$ in
        float64), and `z - max z` is corrected as in [`softmax`][jsoftmax.softmax]. Measured
        against 50-digit arithmetic: at most 1.3 ULP (float32/float64) and 0.5 ULP
        (16-bit). Costs extra passes (2-7x the time of `"default"` on a CPU).

    Returns:
      Log-probabilities with the shape and dtype of `x`.

    Note:
      * Masked and `-inf` entries give `-inf`; the cotangent arriving at such an
        entry is ignored (the output is a constant there). A row with no finite
        entry is `-inf` everywhere with zero gradients.
      * float16/bfloat16 inputs accumulate in float32: 100 000 equal float16 logits
        give `log(1e-5)`, not `-inf`.
      * `+inf` or NaN in an unmasked row gives NaN.

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


def _lse_parts(x, where, axes: Axes):
    """`(e, total, lse)`: the fused max-exp-sum pass and the row log-sum-exp.

    `lse = m + log(total)` (keepdims, accumulation dtype) by `jsoftmax._merge.lse_of`:
    `-inf` for a row without finite entries, `+inf` for a row with `+inf` (and no
    NaN), NaN for NaN.
    """
    _, e, total, _, m = _shifted_exp(x, where, None, axes)
    return e, total, _merge.lse_of(m, total)


@partial(_custom.custom_vjp, nondiff_argnums=(2,))
def _lse_kernel_vjp(x, where, axes: Axes) -> jax.Array:
    return _lse_parts(x, where, axes)[2].astype(x.dtype)


def _lse_kernel_vjp_fwd(x, where, axes):
    e, total, lse = _lse_parts(x, where, axes)
    # The one residual: the probabilities, in the input's dtype (the gradient itself).
    return lse.astype(x.dtype), (e / _nonzero(total)).astype(x.dtype)


def _lse_kernel_vjp_bwd(axes, p, g):
    cdt = _checks.accumulation_dtype(p.dtype)
    return _formulas.lse_vjp(p.astype(cdt), g.astype(cdt)).astype(p.dtype), None


_lse_kernel_vjp.defvjp(_lse_kernel_vjp_fwd, _lse_kernel_vjp_bwd)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _lse_kernel_jvp(x, where, axes: Axes) -> jax.Array:
    return _lse_parts(x, where, axes)[2].astype(x.dtype)


@_lse_kernel_jvp.defjvp
def _lse_kernel_jvp_rule(axes, primals, tangents):
    x, where = primals
    x_dot, _ = tangents
    e, total, lse = _lse_parts(x, where, axes)
    p = e / _nonzero(total)
    # Masked and -inf entries take no part: their tangents (maybe inf) are dropped. A
    # NaN or +inf entry keeps its row's tangents, so the row's derivative is NaN in
    # both modes, as with rule="vjp".
    valid = x != -jnp.inf if where is None else (x != -jnp.inf) & where
    t = jnp.where(valid, x_dot.astype(p.dtype), jnp.zeros((), p.dtype))
    return lse.astype(x.dtype), _formulas.lse_jvp(p, t, axes).astype(x.dtype)


def logsumexp(
    x: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    where: ArrayLike | None = None,
    keepdims: bool = False,
    rule: Rule = "vjp",
) -> jax.Array:
    r"""Numerically stable log-sum-exp, whose gradient is [`softmax`][jsoftmax.softmax].

    $$
    \ell = \log\sum_k e^{z_k} = m + \log\sum_k e^{z_k - m}, \qquad
    m = \max_k z_k, \qquad \frac{\partial \ell}{\partial z_j} = p_j .
    $$

    The row maximum is subtracted before `exp` (one fused max-exp-sum pass), so
    nothing overflows. It is the normaliser of [`softmax`][jsoftmax.softmax]
    (`log p = z - ℓ`) and the statistic that [`merge_partials`][jsoftmax.merge_partials]
    merges: a softmax computed in pieces is put together from each piece's `logsumexp`.

    Args:
      x: logits, any rank >= 1. Integer input is promoted to the default float dtype.
      axis: the axis to reduce (negative counts from the end), or a tuple of axes
        reduced together.
      where: optional boolean mask broadcastable to `x`; `False` entries are left
        out of the sum (gradient 0), whatever they hold.
      keepdims: keep the reduced axes with size 1.
      rule: `"vjp"` (default): a `jax.custom_vjp` whose forward pass saves one
        array, the probabilities `p` in the dtype of `x`; the backward pass is
        $\bar z = \bar\ell\, p$. Reverse mode only (reverse-over-reverse works).
        `"jvp"`: a `jax.custom_jvp` with identical values,
        $\dot\ell = \langle p, \dot z\rangle$, so `jax.jvp`,
        `jax.jacfwd` and `jax.hessian` work too.

    Returns:
      The log-sum-exp over `axis`: the shape of `x` without the reduced axes (with
      size-1 axes if `keepdims`), in the dtype of `x` (float16/bfloat16 inputs are
      computed in float32 and rounded once).

    Note:
      * Masked and `-inf` entries are ignored. A row with nothing left (every entry
        masked or `-inf`) gives `-inf` with a zero, never NaN, gradient; an empty
        axis gives `-inf`.
      * `+inf` in an unmasked entry gives `+inf` (its gradient is NaN, as the
        softmax of that row); NaN gives NaN.
      * 100 000 equal float16 logits give `log(1e5) = 11.51`: the sum is
        accumulated in float32. A 16-bit result carries the dtype's rounding (a
        bfloat16 value near 10 is off by up to 0.03); pass float32 logits when the
        result is to be merged with [`merge_partials`][jsoftmax.merge_partials].

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> z = jnp.array([[1.0, 2.0, 3.0], [100.0, 100.0, -jnp.inf]], jnp.float32)
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.logsumexp(z))
      ...     print(jax.grad(lambda z: jsoftmax.logsumexp(z).sum())(z))
      [  3.4076 100.6931]
      [[0.09   0.2447 0.6652]
       [0.5    0.5    0.    ]]
      >>> print(jsoftmax.logsumexp(z, where=jnp.zeros((2, 3), bool)))
      [-inf -inf]
    """
    x = _checks.as_float_array(x)
    axes = _checks.canonical_axes(axis, x.ndim)
    _checks.check_rule(rule)
    where = _checks.check_where(where, x.shape)
    if any(x.shape[a] == 0 for a in axes):
        shape = tuple(1 if k in axes else s for k, s in enumerate(x.shape))
        out = jnp.full(shape, -jnp.inf, x.dtype)
    else:
        kernel = _lse_kernel_vjp if rule == "vjp" else _lse_kernel_jvp
        out = kernel(x, where, axes)
    return out if keepdims else jnp.squeeze(out, axes)
