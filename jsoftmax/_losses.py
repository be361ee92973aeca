r"""Softmax cross-entropy with the fused $p - y$ derivative, and its Hessian.

Every option (class mask, per-example mask, `ignore_index`, class weights, label
smoothing, temperature, z-loss, logit soft-capping, reductions) is defined once here
and in `jsoftmax._formulas`, and reused by every loss of the package.

The reverse-mode rule keeps no new logits-sized array: the backward pass recomputes
$p$ from the logits and two per-row numbers (the row maximum and the sum of
exponentials). For float32 and float64 it recomputes `exp(s - m)` with exactly the
expression of the forward pass, so that when the forward and backward passes are
compiled together (`jax.jit(jax.value_and_grad(...))`) XLA computes the exponential
once and writes the gradient into the same buffer (optax's footprint, one
exponential per entry); alone, the backward pass recomputes it. The Hessian is
returned as a [`jsoftmax.SoftmaxJacobian`][].
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _custom, _formulas
from jsoftmax._checks import Reduction, Rule
from jsoftmax._operator import SoftmaxJacobian
from jsoftmax._softmax import _nonzero, _scaled_logits, _shifted_exp, softmax


class _Options(NamedTuple):
    """The static options of a loss (hashable: a `nondiff_argnum`)."""

    axis: int
    alpha: float = 0.0  # label smoothing
    z_loss: float = 0.0
    softcap: float | None = None


# --------------------------------------------------------------------------------------
# Pieces shared by both rules.
# --------------------------------------------------------------------------------------


def _is_integer(labels) -> bool:
    return bool(jnp.issubdtype(labels.dtype, jnp.integer))


def _compute_dtype(logits, labels) -> np.dtype:
    cdt = _checks.accumulation_dtype(logits.dtype)
    if not _is_integer(labels):
        cdt = jnp.promote_types(cdt, _checks.accumulation_dtype(labels.dtype))
    return np.dtype(cdt)


def _label_index(labels, n: int, axis: int):
    """`(clipped index, in_range)` of integer labels, both with a size-1 class axis."""
    idx = jnp.expand_dims(labels.astype(jnp.result_type(int)), axis)
    in_range = (idx >= 0) & (idx < n)
    return jnp.clip(idx, 0, n - 1), in_range


def _pick(a, idx, axis: int):
    """`a` at the label index along `axis` (keepdims): a gather, or a one-hot sum
    when the class axis is explicitly sharded (a plain reduction, one scalar per row)."""
    if _formulas._sharded_along(a, (axis,)):
        onehot = lax.broadcasted_iota(idx.dtype, a.shape, axis) == idx
        if a.dtype == jnp.bool_:
            return jnp.any(onehot & a, axis, keepdims=True)
        return jnp.sum(jnp.where(onehot, a, jnp.zeros((), a.dtype)), axis, keepdims=True)
    return jnp.take_along_axis(a, idx, axis=axis)


def _capped(z, opts: _Options):
    return z if opts.softcap is None else _formulas.softcap(z, opts.softcap)


def _scale(u, temperature):
    return u if temperature is None else u / temperature.astype(u.dtype)


def _class_weights(weights, where, axis: int, ndim: int, cdt):
    """The per-class weight vector `w * valid` shaped to broadcast against the logits
    (`None` when it is all ones)."""
    w = None
    if weights is not None:
        shape = [1] * ndim
        shape[axis] = weights.shape[0]
        w = weights.astype(cdt).reshape(shape)
    if where is not None:
        w = jnp.where(where, jnp.ones((), cdt) if w is None else w, jnp.zeros((), cdt))
    return w


def _valid_count(where, n: int, axis: int, cdt):
    """`m`: the number of unmasked classes per row (keepdims; at least 1)."""
    if where is None:
        return jnp.asarray(n, cdt)
    return jnp.maximum(jnp.sum(where, axis=axis, keepdims=True), 1).astype(cdt)


def _smoothing(where, w, n: int, axis: int, alpha: float, cdt):
    """`(k, W)`: the per-row smoothing mass `alpha / m` of each of the `m` valid
    classes and the total class weight `W = sum_valid w` (`m` without weights)."""
    count = _valid_count(where, n, axis, cdt)
    total_w = count if w is None else jnp.sum(w, axis=axis, keepdims=True)
    return _formulas.smoothing_mass(alpha, count), total_w


def _finite_or_zero(a):
    return jnp.where(a > -jnp.inf, a, jnp.zeros((), a.dtype))


class _Pass(NamedTuple):
    """The forward quantities of one row-wise pass, all keepdims along the class axis."""

    z: jax.Array  # logits in the compute dtype
    u: jax.Array  # soft-capped logits
    shifted: jax.Array  # s - m, with s = u / T and masked entries -inf
    total: jax.Array  # sum exp(s - m) (0 for a row without a finite entry)
    m: jax.Array  # the row maximum of s (no gradient)


def _forward_pass(logits, where, temperature, opts: _Options, cdt) -> tuple[_Pass, jax.Array]:
    """The forward quantities and `exp(s - m)`."""
    z = logits.astype(cdt)
    u = _capped(z, opts)
    row_max = None
    if opts.softcap is not None:
        # softcap is increasing and T > 0, so the row maximum of softcap(z) / T is
        # softcap(max z) / T: found from the logits, without a tanh per entry.
        masked = z if where is None else jnp.where(where, z, -jnp.inf)
        lowest = jnp.finfo(cdt).min
        z_max = jnp.max(masked, axis=opts.axis, keepdims=True, initial=lowest)
        m = lax.stop_gradient(_scale(_formulas.softcap(z_max, opts.softcap), temperature))
        row_max = lambda _: m  # noqa: E731
    shifted, e, total, _, m = _shifted_exp(u, where, temperature, (opts.axis,), row_max=row_max)
    return _Pass(z, u, shifted, total, m), e


def integer_loss(log_total, m, s_label, in_range, row_w, smooth, opts: _Options):
    """The per-row loss for integer labels from per-row statistics (any shape):
    `b (log_total - (s_y - m)) + k (W (log_total - (s_y - m)) - S) + c lse^2` with
    `b = (1 - alpha) w_y` and `smooth = (k, W, S)`, `S = sum_valid w_i (s_i - s_y)`
    (None without smoothing); NaN where the label is out of range.

    `m` and `log_total` are kept apart, so the loss stays exact when `|m|` is near
    the dtype's maximum. Shared by every loss with integer labels (chunked and sharded
    ones compute the same statistics in pieces).
    """
    alpha = opts.alpha
    nll = log_total - (s_label - m)  # -log p_y
    loss = nll
    if row_w is not None or alpha:
        loss = ((1 - alpha) if row_w is None else (1 - alpha) * row_w) * loss
    if alpha:
        k, total_w, centred = smooth
        loss = loss + k * (total_w * nll - centred)
    if opts.z_loss:
        loss = loss + _formulas.z_loss_term(m + log_total, opts.z_loss)
    return jnp.where(in_range, loss, jnp.full((), jnp.nan, loss.dtype))


def smoothing_sum(s, s_label, valid, w, axis: int):
    """`S = sum_valid w_i (s_i - s_y)` over `axis` (keepdims).

    Centred on the target logit `s_y` rather than on the row maximum, so that this
    sum reads the logits on its own and XLA does not keep `s - m` in memory. `valid`
    and `w` may be None (all valid, unit weights); zero weights contribute 0 even at
    `-inf` logits.
    """
    d = s - s_label
    if valid is not None:
        d = jnp.where(valid, d, jnp.zeros((), d.dtype))
    if w is not None:
        d = jnp.where(w != 0, w * d, jnp.zeros((), d.dtype))
    return jnp.sum(d, axis=axis, keepdims=True)


def integer_cotangent(p, onehot, in_range, row_w, smooth, lse, opts: _Options):
    """`d loss / d s = (sum q + 2 c lse) p - q` for integer labels, with
    `q = b e_y + k w` (`smooth = (k, W, w)`: the per-row smoothing mass, total class
    weight and the class-weight vector, or None); NaN where the label is out of range.
    Works on any block of classes (`onehot` marks the label inside the block)."""
    cdt = p.dtype
    b = jnp.asarray(1 - opts.alpha, cdt) if row_w is None else (1 - opts.alpha) * row_w
    mass = b
    q = jnp.where(onehot, b, jnp.zeros((), cdt))
    if opts.alpha:
        k, total_w, w = smooth
        mass = mass + k * total_w
        q = q + (k if w is None else k * w)
    g_s = _formulas.ce_cotangent(p, q, mass, lse, opts.z_loss)
    return jnp.where(in_range, g_s, jnp.full((), jnp.nan, cdt))


def _row_loss(fp: _Pass, labels, where, temperature, weights, row_w, opts: _Options):
    """The per-row loss `sum_i q_i (lse - s_i) + c lse^2` (keepdims), before the row
    mask. Integer labels read the target logit with a gather (no pass over the classes
    unless label smoothing is on); probability labels use the dense targets."""
    axis, alpha = opts.axis, opts.alpha
    cdt = fp.z.dtype
    log_total = jnp.log(_nonzero(fp.total))
    w = _class_weights(weights, where, axis, fp.z.ndim, cdt)
    if _is_integer(labels):
        idx, in_range = _label_index(labels, fp.z.shape[axis], axis)
        s_label = _scale(_capped(_pick(fp.z, idx, axis), opts), temperature)
        smooth = None
        if alpha:
            k, total_w = _smoothing(where, w, fp.z.shape[axis], axis, alpha, cdt)
            s = _scale(_capped(fp.z, opts), temperature)
            smooth = (k, total_w, smoothing_sum(s, s_label, where, w, axis))
        return integer_loss(log_total, fp.m, s_label, in_range, row_w, smooth, opts)
    k = _prob_smoothing_mass(where, fp.z.shape[axis], axis, alpha, cdt)
    q = prob_targets(labels, w, k, alpha, cdt)
    mass, cross = target_sums(q, fp.shifted, axis)
    return prob_loss(log_total, fp.m, mass, cross, opts)


def _prob_smoothing_mass(where, n: int, axis: int, alpha: float, cdt):
    """`k = alpha / m` per row (None without label smoothing)."""
    if not alpha:
        return None
    return _formulas.smoothing_mass(alpha, _valid_count(where, n, axis, cdt))


def prob_targets(labels, w, k, alpha: float, cdt):
    """`q = w * ((1 - alpha) y + k)` for probability labels `y`, with `w` the
    class weights times the class mask (None: all ones) and `k` the per-row smoothing
    mass (None without smoothing; 0 gives the unsmoothed part `(1 - alpha) w y`)."""
    y = labels.astype(cdt)
    if alpha:
        y = (1 - alpha) * y
    if k is not None:
        y = y + k
    return y if w is None else w * y


def target_sums(q, d, axis: int):
    """`(sum_i q_i, sum_i q_i d_i)` over `axis` (keepdims) with `d = s - m`; terms
    with `q_i = 0` are left out, so a `-inf` logit without target mass adds 0
    ("double where"), while `q_i > 0` there gives `-inf`."""
    cross = jnp.where(q != 0, q * d, jnp.zeros((), d.dtype))
    return jnp.sum(q, axis=axis, keepdims=True), jnp.sum(cross, axis=axis, keepdims=True)


def prob_loss(log_total, m, mass, cross, opts: _Options):
    """The per-row loss for probability labels from per-row statistics (any shape):
    `sum_i q_i (lse - s_i) + c lse^2 = mass * log_total - cross + c lse^2` with
    `mass = sum q`, `cross = sum q (s - m)` and `lse = m + log_total`.

    With `q >= 0` both `mass * log_total` and `-cross` are `>= 0`: no
    cancellation. Shared by every loss with probability labels (the sharded one sums
    `mass` and `cross` over devices).
    """
    loss = mass * log_total - cross
    if opts.z_loss:
        loss = loss + _formulas.z_loss_term(m + log_total, opts.z_loss)
    return loss


def _cotangent_s(fp: _Pass, p, labels, where, weights, row_w, opts: _Options):
    """`d loss / d s = (sum q + 2 c lse) p - q` (dense, keepdims), before the row mask."""
    axis, alpha = opts.axis, opts.alpha
    cdt = fp.z.dtype
    w = _class_weights(weights, where, axis, fp.z.ndim, cdt)
    lse = fp.m + jnp.log(_nonzero(fp.total)) if opts.z_loss else None
    if _is_integer(labels):
        idx, in_range = _label_index(labels, fp.z.shape[axis], axis)
        onehot = lax.broadcasted_iota(idx.dtype, fp.z.shape, axis) == idx
        smooth = None
        if alpha:
            k, total_w = _smoothing(where, w, fp.z.shape[axis], axis, alpha, cdt)
            smooth = (k, total_w, w)
        return integer_cotangent(p, onehot, in_range, row_w, smooth, lse, opts)
    k = _prob_smoothing_mass(where, fp.z.shape[axis], axis, alpha, cdt)
    q = prob_targets(labels, w, k, alpha, cdt)
    mass = jnp.sum(q, axis=axis, keepdims=True)
    return _formulas.ce_cotangent(p, q, mass, lse, opts.z_loss)


def _label_cotangent(fp: _Pass, weights, where, opts: _Options):
    """`d loss / d y_i = (1 - alpha) w_i (lse - s_i) = -(1 - alpha) w_i log p_i`
    (0 where `p_i = 0`) for probability labels, before the row mask."""
    cdt = fp.z.dtype
    log_p = fp.shifted - jnp.log(_nonzero(fp.total))
    d = -(1 - opts.alpha) * _finite_or_zero(log_p)
    w = _class_weights(weights, where, opts.axis, fp.z.ndim, cdt)
    return d if w is None else w * d


def _mask_rows(a, row_ok):
    """`a` where the row counts, 0 elsewhere (a select: NaN in an ignored row stays out)."""
    if row_ok is None:
        return a
    return jnp.where(row_ok, a, jnp.zeros((), a.dtype))


def _out_dtype(logits, labels):
    """float32 for 16-bit logits (a bfloat16 loss would be quantised), else the logits'
    dtype, promoted with float labels."""
    return _compute_dtype(logits, labels)


def _chain_to_logits(fp: _Pass, g_s, temperature, opts: _Options):
    """`(dL/dz, dL/dT)` from `g_s = dL/ds`, with `s = softcap(z) / T`."""
    g_u = g_s if temperature is None else g_s / temperature.astype(g_s.dtype)
    g_t = None
    if temperature is not None:
        # dL/dT = -<g_s, s> / T. With a z-loss g_s does not sum to 0, so s itself
        # (not the shift-invariant log p) is used; 0 at masked and -inf entries.
        s = _finite_or_zero(fp.shifted + fp.m)
        g_t = -jnp.sum(g_s * s, axis=opts.axis, keepdims=True) / temperature.astype(g_s.dtype)
    if opts.softcap is not None:
        g_u = g_u * _formulas.softcap_derivative(fp.u, opts.softcap)
    return g_u, g_t


# --------------------------------------------------------------------------------------
# rule="vjp": custom_vjp; the only logits-sized residual is the logits themselves.
# --------------------------------------------------------------------------------------


@partial(_custom.custom_vjp, nondiff_argnums=(7,))
def _ce_vjp(
    logits, labels, where, temperature, weights, row_ok, row_w, opts: _Options
) -> jax.Array:
    return _ce_vjp_fwd(logits, labels, where, temperature, weights, row_ok, row_w, opts)[0]


def _ce_vjp_fwd(logits, labels, where, temperature, weights, row_ok, row_w, opts):
    cdt = _compute_dtype(logits, labels)
    fp, _ = _forward_pass(logits, where, temperature, opts, cdt)
    loss = _row_loss(fp, labels, where, temperature, weights, row_w, opts)
    out = _mask_rows(jnp.squeeze(loss, opts.axis), row_ok).astype(_out_dtype(logits, labels))
    residuals = (logits, labels, where, temperature, weights, row_ok, row_w, fp.m, fp.total)
    return out, residuals


def _ce_vjp_bwd(opts, residuals, g):
    logits, labels, where, temperature, weights, row_ok, row_w, m, total = residuals
    cdt = _compute_dtype(logits, labels)
    z = logits.astype(cdt)
    u = _capped(z, opts)
    shifted = _scaled_logits(u, where, temperature) - m
    if cdt == logits.dtype:
        # exp(s - m) exactly as in the forward pass: compiled together with it, XLA
        # computes it once (and this pass writes the gradient over it).
        p = jnp.exp(shifted) * (1 / _nonzero(total))
    else:
        # 16-bit logits: a differently written exponential, so XLA does not keep a
        # float32 copy of the logits' size between the passes.
        p = jnp.exp(shifted - jnp.log(_nonzero(total)))
    if opts.softcap is not None:
        # The soft-cap derivative needs tanh(z / cap) again. Written behind an
        # optimization barrier, XLA recomputes it in the pass that writes the gradient
        # instead of keeping the forward's logits-sized tanh in memory (which costs
        # more than the second tanh on a CPU).
        u = _capped(lax.optimization_barrier(z), opts)
    fp = _Pass(z, u, shifted, total, m)
    g = jnp.expand_dims(g.astype(cdt), opts.axis)
    ok = None if row_ok is None else jnp.expand_dims(row_ok, opts.axis)
    # Selects, not products: an ignored row's gradients are 0 even if its logits are NaN.
    g_s = _mask_rows(_cotangent_s(fp, p, labels, where, weights, row_w, opts) * g, ok)
    g_z, g_t = _chain_to_logits(fp, g_s, temperature, opts)
    g_z = _mask_rows(g_z, ok)
    g_labels = None
    if not _is_integer(labels):
        g_lab = _mask_rows(_label_cotangent(fp, weights, where, opts) * g, ok)
        g_labels = g_lab.astype(labels.dtype)
    g_t = None if g_t is None else g_t.astype(temperature.dtype)
    return g_z.astype(logits.dtype), g_labels, None, g_t, None, None, None


_ce_vjp.defvjp(_ce_vjp_fwd, _ce_vjp_bwd)


# --------------------------------------------------------------------------------------
# rule="jvp": custom_jvp, so forward mode (jax.jvp, jax.hessian) works.
# --------------------------------------------------------------------------------------


@partial(jax.custom_jvp, nondiff_argnums=(7,))
def _ce_jvp(
    logits, labels, where, temperature, weights, row_ok, row_w, opts: _Options
) -> jax.Array:
    return _ce_vjp_fwd(logits, labels, where, temperature, weights, row_ok, row_w, opts)[0]


@partial(_ce_jvp.defjvp)
def _ce_jvp_rule(opts, primals, tangents):
    logits, labels, where, temperature, weights, row_ok, row_w = primals
    logits_dot, labels_dot, _, t_dot, _, _, _ = tangents
    cdt = _compute_dtype(logits, labels)
    fp, e = _forward_pass(logits, where, temperature, opts, cdt)
    loss = _row_loss(fp, labels, where, temperature, weights, row_w, opts)
    p = e / _nonzero(fp.total)
    # Rows that do not count are selected away before the products, so that reverse
    # mode (the transpose of this rule) multiplies their NaN (out-of-range) entries by
    # nothing.
    ok = None if row_ok is None else jnp.expand_dims(row_ok, opts.axis)
    g_s = _mask_rows(_cotangent_s(fp, p, labels, where, weights, row_w, opts), ok)
    # The tangent of s = softcap(z) / T (0 at masked entries). At a -inf logit g_s is
    # 0, or -q_i if it has target mass: the same finite gradient as the vjp rule.
    u_dot = logits_dot.astype(cdt)
    if where is not None:
        u_dot = jnp.where(where, u_dot, jnp.zeros((), cdt))
    if opts.softcap is not None:
        u_dot = u_dot * _formulas.softcap_derivative(fp.u, opts.softcap)
    s_dot = u_dot
    if temperature is not None:
        s = _finite_or_zero(fp.shifted + fp.m)
        s_dot = (u_dot - s * t_dot.astype(cdt)) / temperature.astype(cdt)
    loss_dot = jnp.sum(g_s * s_dot, axis=opts.axis, keepdims=True)
    if not _is_integer(labels):
        d_y = _mask_rows(_label_cotangent(fp, weights, where, opts), ok)
        loss_dot = loss_dot + jnp.sum(d_y * labels_dot.astype(cdt), opts.axis, keepdims=True)
    out_dtype = _out_dtype(logits, labels)
    sq = lambda a: _mask_rows(jnp.squeeze(a, opts.axis), row_ok).astype(out_dtype)  # noqa: E731
    return sq(loss), sq(loss_dot)


# --------------------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------------------


def _check_labels(labels, logits: jax.Array, axis: int, ignore_index) -> jax.Array:
    labels = _checks.as_array(labels, "labels")
    batch = tuple(s for k, s in enumerate(logits.shape) if k != axis)
    n = logits.shape[axis]
    if labels.dtype == jnp.bool_ or jnp.issubdtype(labels.dtype, jnp.complexfloating):
        raise TypeError(
            "labels must be integer class indices or real probabilities, got dtype "
            f"{labels.dtype}. Convert one-hot booleans with labels.astype(logits.dtype)."
        )
    if _is_integer(labels):
        if labels.shape == logits.shape:
            raise ValueError(
                f"integer labels of shape {labels.shape} have a class axis: integer labels "
                f"are class indices with the batch shape {batch} (the logits' shape without "
                "axis). For one-hot or probability targets pass float labels, e.g. "
                "labels.astype(logits.dtype)."
            )
        if labels.shape != batch:
            raise ValueError(
                f"integer labels of shape {labels.shape} do not match the logits: class "
                f"indices must have the batch shape {batch} (logits {logits.shape} without "
                f"axis {axis})."
            )
        check_label_range(labels, n, ignore_index)
        return labels
    if ignore_index is not None:
        raise ValueError(
            "ignore_index applies to integer class labels; got float (probability) labels. "
            "Mask examples of probability labels with a batch-shaped where instead."
        )
    if labels.shape != logits.shape:
        hint = " For class indices use an integer dtype." if labels.shape == batch else ""
        raise ValueError(
            f"float labels (a probability vector per row) must have the logits' shape "
            f"{logits.shape}, got {labels.shape}.{hint}"
        )
    return labels


def check_label_range(labels, n: int, ignore_index) -> None:
    """Raises `IndexError` for concrete integer labels outside `[0, n)` other than
    `ignore_index` (traced labels cannot be checked: those rows become NaN)."""
    if not (_checks.is_concrete(labels) and labels.size):
        return
    values = np.asarray(labels)  # numpy: jnp would be staged inside a trace
    if ignore_index is not None:
        values = values[values != ignore_index]
    if values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= n:
            raise IndexError(
                f"labels has entries out of range for {n} classes: got values in "
                f"[{lo}, {hi}], valid class indices are 0 to {n - 1}"
                + ("." if ignore_index is None else f" (or ignore_index={ignore_index}).")
            )


def _static_number(value, name: str, what: str) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got {value!r}.")
    if not isinstance(value, (int, float, np.integer, np.floating)):
        arr = jnp.asarray(value)
        if not _checks.is_concrete(arr) or arr.ndim != 0:
            raise TypeError(
                f"{name} must be a Python number (or concrete scalar), {what}; it is a "
                "static argument and cannot be traced."
            )
        value = arr.item()
    return float(value)


def _check_label_smoothing(alpha) -> float:
    alpha = _static_number(alpha, "label_smoothing", "a number in [0, 1]")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {alpha!r}.")
    return alpha


def _check_z_loss(z_loss) -> float:
    c = _static_number(z_loss, "z_loss", "a number >= 0")
    if not (c >= 0.0 and np.isfinite(c)):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}.")
    return c


def _check_softcap(cap) -> float | None:
    if cap is None:
        return None
    c = _static_number(cap, "logit_softcap", "None or a number > 0")
    if not (c > 0.0 and np.isfinite(c)):
        raise ValueError(f"logit_softcap must be None or a finite number > 0, got {cap!r}.")
    return c


def _check_ignore_index(ignore_index) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(
        ignore_index, (int, np.integer)
    ):
        raise TypeError(f"ignore_index must be None or a Python int, got {ignore_index!r}.")
    return int(ignore_index)


def _check_weights(weights, n: int):
    if weights is None:
        return None
    w = _checks.as_array(weights, "weights")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        if jnp.issubdtype(w.dtype, jnp.integer):
            w = w.astype(jnp.result_type(float))
        else:
            raise TypeError(f"weights must be a real array, got dtype {w.dtype}.")
    if w.shape != (n,):
        raise ValueError(
            f"weights must have one entry per class, shape ({n},), got shape {w.shape}."
        )
    return lax.stop_gradient(w)


def _split_where(where, shape: tuple[int, ...], axes: tuple[int, ...]):
    """`(class mask or None, example mask or None)`.

    A mask with exactly the batch shape (`shape` without `axes`) and a lower rank
    than the logits is a per-example mask, as in optax; any other mask must broadcast
    to the logits and masks classes.
    """
    if where is None:
        return None, None
    where = _checks.as_bool_mask(where)
    batch = tuple(s for k, s in enumerate(shape) if k not in axes)
    if where.ndim == len(batch) and where.ndim < len(shape) and where.shape == batch:
        return None, where
    try:
        return _checks.check_where(where, shape), None
    except ValueError:
        raise ValueError(
            f"where of shape {where.shape} is neither a class mask broadcastable to the "
            f"logits' shape {tuple(shape)} nor a per-example mask of the batch shape {batch}."
        ) from None


def _flatten_classes(logits, labels, where, axes: tuple[int, ...]):
    """Moves the class axes to the end and flattens them into one (optax's convention
    for a tuple `axis`: integer labels index the row-major flattened classes)."""
    nb = logits.ndim - len(axes)
    batch_axes = tuple(k for k in range(logits.ndim) if k not in axes)
    order = batch_axes + axes
    shape = logits.shape
    batch = tuple(shape[k] for k in batch_axes)

    def merge(a):
        return jnp.transpose(jnp.broadcast_to(a, shape), order).reshape(batch + (-1,))

    logits = merge(logits)
    if where is not None:
        where = merge(where)
    if not _is_integer(labels):
        labels = merge(labels)
    return logits, labels, where, nb


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    temperature: ArrayLike = 1.0,
    rule: Rule = "vjp",
    ignore_index: int | None = None,
    weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Softmax cross-entropy with the fused $p - y$ derivative and the options of
    training code (ignored labels, class weights, label smoothing, z-loss, soft-capping,
    reductions).

    With $s = \mathrm{softcap}(z) / T$ over `axis` (masked classes excluded),
    $p = \mathrm{softmax}(s)$, $\mathrm{lse} = \log\sum_i e^{s_i}$, class
    weights $w$ (1 by default) and the effective target $\tilde y =
    (1-\alpha)\,y + \alpha/m$ over the $m$ valid classes ($y$ one-hot for
    integer labels), each row's loss is

    $$
    \ell = \sum_i q_i\,(\mathrm{lse} - s_i) + c\,\mathrm{lse}^2
    = -\sum_i q_i \log p_i + c\,\mathrm{lse}^2,
    $$

    $$
    \frac{\partial \ell}{\partial s} = \Bigl(\sum_i q_i + 2c\,\mathrm{lse}\Bigr)\,p
    - q, \qquad \frac{\partial \ell}{\partial z} = \frac{1}{T}
    \frac{\partial \ell}{\partial s}\,\bigl(1 - \mathrm{softcap}(z)^2/\kappa^2\bigr),
    $$

    with $q = w_y(1-\alpha)e_y + \frac{\alpha}{m}w$ for integer labels (PyTorch's
    `weight` with `label_smoothing`) and $q = w\odot\tilde y$ for probability
    labels; without options this is $p - y$. Also
    $\partial\ell/\partial T = -\langle\partial\ell/\partial s, s\rangle/T$ and
    $\partial\ell/\partial y_i = -(1-\alpha)\,w_i\log p_i$.

    Args:
      logits: any rank >= 1; integer input is promoted to the default float dtype.
      labels: either integer class indices with the batch shape (`logits.shape`
        without `axis`), or a real probability vector per row with the shape of
        `logits` (not required to be normalised; differentiable).
      axis: the class axis, or a tuple of axes whose entries together are the classes
        (integer labels then index them flattened in row-major order, as in optax).
      where: optional boolean mask. Broadcastable to `logits`: masked classes get
        probability 0 and **no target mass**. With exactly the batch shape (rank
        lower than the logits'): a per-example mask; masked examples behave like
        `ignore_index`.
      label_smoothing: $\alpha \in [0, 1]$, a static Python number. The
        smoothing mass $\alpha/m$ goes to the $m$ unmasked classes.
      temperature: `T > 0`, a scalar or an array broadcastable to the batch shape;
        differentiable.
      rule: `"vjp"` (default): a `jax.custom_vjp` that keeps no new
        logits-sized array for the backward pass (it recomputes $p$ from the
        logits and two numbers per row); reverse mode only
        (`jax.grad(jax.grad(...))` works). `"jvp"`: a `jax.custom_jvp`
        with the same values and formula, so `jax.jvp`, `jax.jacfwd`
        and `jax.hessian` work too.
      ignore_index: an int (integer labels only): rows whose label equals it have
        loss 0 and gradient 0 and are left out of the `"mean"` denominator.
      weights: per-class weights, shape `(n,)` (`n` classes; PyTorch's
        `weight`). Not differentiated.
      z_loss: $c \ge 0$, adds $c\,\mathrm{lse}^2$ per row (PaLM).
      logit_softcap: `None` or $\kappa > 0$: logits become
        $\kappa\tanh(z/\kappa)$ before everything else (Gemma 2).
      reduction: `"none"` (per row), `"sum"` or `"mean"`: PyTorch's weighted
        mean $\sum_r \ell_r / \sum_r w_{y_r}$ over the rows that count (for
        probability labels every counted row has weight 1). A batch whose total
        weight is 0 gives 0 with zero gradients.

    Returns:
      The loss per example (shape `logits.shape` without `axis`) or its sum or
      mean (a scalar). float32 for 16-bit logits (computed in float32, without a
      float32 copy of the logits), else the logits' dtype promoted with float labels.
      Gradients have the logits' dtype.

    Note:
      * Rows that do not count — label equal to `ignore_index`, example masked by a
        batch-shaped `where`, integer label on a masked class, or no unmasked class
        at all — give loss 0 and zero gradients (even if their logits are NaN) and
        are not in the `"mean"` denominator.
      * `-inf` logits (and masked classes) with zero target mass contribute 0:
        loss and gradients stay finite (optax gives NaN there). A `-inf` logit that
        receives target mass (its label, float mass, or label smoothing, which reaches
        every unmasked class) makes the loss `+inf`; its gradient stays finite.
        Mask such classes with `where` to exclude them from smoothing.
      * `logit_softcap` keeps `-inf` logits at `-inf` (excluded classes) and
        maps `+inf` to $\kappa$.
      * Out-of-range integer labels other than `ignore_index` raise `IndexError`
        when `labels` is concrete; under `jax.jit` that row's loss and
        gradient are NaN.
      * `+inf`/NaN logits in a counted row give NaN, as in
        [`jsoftmax.log_softmax`][].

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.cross_entropy(logits, jnp.array([0, 2])))
      ...     print(jax.grad(lambda z: jsoftmax.cross_entropy(z, jnp.array([0, 2])).sum())(logits))
      [0.4076 1.0986]
      [[-0.3348  0.2447  0.09  ]
       [ 0.3333  0.3333 -0.6667]]
      >>> labels = jnp.array([0, -100])  # the second row is padding
      >>> mean = jsoftmax.cross_entropy(logits, labels, ignore_index=-100, reduction="mean")
      >>> print(f"{float(mean):.4f}")
      0.4076
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.cross_entropy(logits, jnp.array([0, 2]), z_loss=1e-2,
      ...                                  logit_softcap=1.5, weights=jnp.array([1.0, 2, 3])))
      [0.6912 3.3079]
    """
    logits = _checks.as_float_array(logits, "logits")
    axes = _checks.canonical_axes(axis, logits.ndim)
    _checks.check_rule(rule)
    reduction = _checks.check_reduction(reduction)
    ignore_index = _check_ignore_index(ignore_index)
    alpha = _check_label_smoothing(label_smoothing)
    opts_z = _check_z_loss(z_loss)
    cap = _check_softcap(logit_softcap)
    where, example_mask = _split_where(where, logits.shape, axes)
    labels = _checks.as_array(labels, "labels")
    ax = axes[0]
    if len(axes) > 1:
        if not _is_integer(labels) and labels.shape != logits.shape:
            _check_labels(labels, logits, ax, ignore_index)  # raises with the shapes
        logits, labels, where, ax = _flatten_classes(logits, labels, where, axes)
    labels = _check_labels(labels, logits, ax, ignore_index)
    n = logits.shape[ax]
    weights = _check_weights(weights, n)
    t = _checks.prepare_temperature(temperature, logits.shape, (ax,))  # None for T = 1
    out_dtype = _out_dtype(logits, labels)
    if n == 0:
        batch = tuple(s for k, s in enumerate(logits.shape) if k != ax)
        per_row = jnp.zeros(batch, out_dtype)
        return per_row if reduction == "none" else jnp.zeros((), out_dtype)
    row_ok, row_w = _row_weights(labels, where, example_mask, weights, ignore_index, ax, n)
    opts = _Options(ax, alpha, opts_z, cap)
    kernel = _ce_vjp if rule == "vjp" else _ce_jvp
    row_w_k = None if row_w is None else jnp.expand_dims(row_w, ax)
    per_row = kernel(logits, labels, where, t, weights, row_ok, row_w_k, opts)
    return reduce_rows(per_row, row_ok, row_w, reduction)


def _row_weights(
    labels, where, example_mask, weights, ignore_index, axis: int, n: int, label_ok=None
):
    """`(row_ok, row_w)`: which rows count (None: all) and, for integer labels with
    class weights, each row's weight `w[label]` (None: 1). `label_ok`, if given,
    says per row whether the label's class is valid (instead of reading `where`)."""
    row_ok = example_mask
    row_w = None

    def both(a, b):
        return b if a is None else a & b

    if _is_integer(labels):
        if ignore_index is not None:
            row_ok = both(row_ok, labels != ignore_index)
        if label_ok is not None:
            row_ok = both(row_ok, label_ok)
        if where is not None or weights is not None:
            idx, _ = _label_index(labels, n, axis)
            if where is not None:
                row_ok = both(row_ok, jnp.squeeze(_pick(where, idx, axis), axis))
            if weights is not None:
                row_w = weights[jnp.squeeze(idx, axis)]
    elif where is not None:
        row_ok = both(row_ok, jnp.any(where, axis=axis))
    return row_ok, row_w


def reduce_rows(per_row, row_ok, row_w, reduction: Reduction):
    """`"none"`, `"sum"` or the weighted `"mean"` of per-row losses: the sum over
    the sum of the counted rows' weights (0, with zero gradients, if that is 0)."""
    if reduction == "none":
        return per_row
    total = jnp.sum(per_row)
    if reduction == "sum":
        return total
    if row_w is None:
        weight = jnp.ones(per_row.shape, per_row.dtype)
    else:
        weight = row_w.astype(per_row.dtype)
    if row_ok is not None:
        weight = jnp.where(row_ok, weight, jnp.zeros((), per_row.dtype))
    denom = lax.stop_gradient(jnp.sum(weight))
    positive = denom > 0
    return jnp.where(positive, total / jnp.where(positive, denom, 1), jnp.zeros((), total.dtype))


def cross_entropy_hessian(
    logits: ArrayLike,
    axis: int = -1,
    *,
    where: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
) -> SoftmaxJacobian:
    r"""Hessian of [`cross_entropy`][jsoftmax.cross_entropy] with respect to the logits.

    Returned as an operator, a [`SoftmaxJacobian`][jsoftmax.SoftmaxJacobian].

    For targets summing to 1 (one-hot, smoothed or probability labels) the Hessian of
    one row's loss does not depend on the labels:

    $$
    \frac{\partial^2 L}{\partial z\,\partial z^\top}
    = \frac{1}{T^2}\bigl(\mathrm{diag}(p) - pp^\top\bigr),
    \qquad p = \mathrm{softmax}(z/T).
    $$

    The loss is separable over rows, so the Hessian of `scale * sum(losses)` is
    block diagonal with these blocks times `scale`: pass `scale=1/B` for the mean
    over `B` rows. The result is a [`jsoftmax.SoftmaxJacobian`][]: `H @ v` costs
    $O(n)$ per row and `H.pinv_solve(g)` gives the Newton step on the logits
    (the gradient $p - y$ lies in the range of `H`).

    Args:
      logits: any rank >= 1.
      axis: the class axis.
      where: optional boolean class mask, as in [`cross_entropy`][jsoftmax.cross_entropy].
      temperature: `T > 0`, scalar or broadcastable to the batch shape.
      scale: a factor (scalar or broadcastable to the batch shape), e.g. `1/B`.

    Returns:
      A [`jsoftmax.SoftmaxJacobian`][] with `scale` $= \mathrm{scale}/T^2$.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> z, y = jnp.array([[1.0, 0.0, -1.0]]), jnp.array([2])
      >>> mean_ce = lambda z: jsoftmax.cross_entropy(z, y).mean()
      >>> H = jsoftmax.cross_entropy_hessian(z, scale=1 / z.shape[0])
      >>> step = H.pinv_solve(jax.grad(mean_ce)(z))   # Newton step on the logits
      >>> with jnp.printoptions(precision=4):
      ...     print(H.dense()[0])
      ...     print(step)
      [[ 0.2227 -0.1628 -0.0599]
       [-0.1628  0.1848 -0.022 ]
       [-0.0599 -0.022   0.0819]]
      [[ 3.7024  3.7024 -7.4049]]
    """
    logits = _checks.as_float_array(logits, "logits")
    ax = _checks.canonical_axis(axis, logits.ndim)
    t = _checks.prepare_temperature(temperature, logits.shape, (ax,))
    p = softmax(logits, ax, where=where, rule="jvp", temperature=temperature)
    if t is None and isinstance(scale, (int, float)) and scale == 1:
        return SoftmaxJacobian(p, ax)
    hess = SoftmaxJacobian(p, ax, scale=scale)  # checks scale, shapes it like t
    if t is not None and hess.scale is not None:  # (hess.scale is set: scale was given)
        hess.scale = hess.scale / (t * t).astype(hess.scale.dtype)
    return hess
