r"""Softmax cross-entropy with the fused $p - y$ derivative, and its Hessian.

`cross_entropy` runs the passes of `jsoftmax._ce` (built on the per-row kernel of
`jsoftmax._kernel`) on the whole row at once: one max-exp-sum pass gives the row's
statistics, the loss is a function of them, and the cotangent
$(\sum q + 2cb\,\mathrm{lse})\,p - q$ is formed in the backward pass. Every option is
defined by the kernel, so the chunked and sharded losses share it.

The reverse-mode rule keeps no new logits-sized array: the backward pass recomputes
$p$ from the logits and per-row numbers. For float32 and float64 it recomputes
`exp((u - m) / T)` with exactly the expression of the forward pass, so that when the
two passes are compiled together (`jax.jit(jax.value_and_grad(...))`) XLA computes
the exponential once and writes the gradient into the same buffer (optax's
footprint). The Hessian is returned as a [`SoftmaxJacobian`][jsoftmax.SoftmaxJacobian].
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _ce, _checks, _custom, _formulas, _kernel, _merge
from jsoftmax._checks import Reduction, Rule
from jsoftmax._kernel import Flags
from jsoftmax._operator import SoftmaxJacobian
from jsoftmax._softmax import softmax

# --------------------------------------------------------------------------------------
# The forward pass and the cotangent, shared by both rules.
# --------------------------------------------------------------------------------------


def _label_at(labels, shape, axis: int):
    """The backward pass's `(index, in_range)` of integer labels (None for probability
    labels)."""
    return _kernel.label_index(labels, shape[axis], axis) if _kernel.is_integer(labels) else None


def _picker(idx, shape, axis: int):
    """`a` at the label index along `axis` (keepdims): a gather, or a one-hot sum when
    the class axis is explicitly sharded (a plain reduction, one scalar per row)."""

    def pick(a):
        if _formulas.sharded_along(a, (axis,)):
            onehot = lax.broadcasted_iota(idx.dtype, shape, axis) == idx
            a = jnp.broadcast_to(a, shape)
            return jnp.sum(jnp.where(onehot, a, jnp.zeros((), a.dtype)), axis, keepdims=True)
        return jnp.take_along_axis(jnp.broadcast_to(a, shape), idx, axis=axis)

    return pick


def _forward(logits, labels, where, temperature, weights, row_ok, coefs, flags: Flags):
    """`((loss, weight), residual row numbers)`: the per-row loss (0 where the row does
    not count) and its weight in the mean."""
    label_at = None
    if _kernel.is_integer(labels):
        idx, in_range = _kernel.label_index(labels, logits.shape[flags.axis], flags.axis)
        label_at = (_picker(idx, logits.shape, flags.axis), in_range)
    args = (logits, labels, where, temperature, weights, row_ok, coefs, flags)
    out, saved, fp = _ce.forward(*args, label_at=label_at)
    return out, (saved, fp.total)


# --------------------------------------------------------------------------------------
# rule="vjp": custom_vjp; the only logits-sized residual is the logits themselves.
# --------------------------------------------------------------------------------------


@partial(_custom.custom_vjp, nondiff_argnums=(7,))
def _ce_vjp(logits, labels, where, temperature, weights, row_ok, coefs, flags: Flags):
    return _forward(logits, labels, where, temperature, weights, row_ok, coefs, flags)[0]


def _ce_vjp_fwd(logits, labels, where, temperature, weights, row_ok, coefs, flags):
    out, (saved, total) = _forward(
        logits, labels, where, temperature, weights, row_ok, coefs, flags
    )
    # log t is recomputed from t: one per-row residual fewer.
    return out, (saved._replace(row=saved.row._replace(log_total=None)), total)


def _ce_vjp_bwd(flags, residuals, g):
    saved, total = residuals
    row = saved.row._replace(log_total=_merge.log_total(total))
    label_at = _label_at(saved.labels, saved.logits.shape, flags.axis)
    g_z, g_labels, g_t = _ce.backward(saved._replace(row=row), flags, row.m, g[0], label_at)
    g_t = None if g_t is None else g_t.astype(saved.temperature.dtype)
    return g_z, g_labels, None, g_t, None, None, None


_ce_vjp.defvjp(_ce_vjp_fwd, _ce_vjp_bwd)


# --------------------------------------------------------------------------------------
# rule="jvp": custom_jvp, so forward mode (jax.jvp, jax.hessian) works.
# --------------------------------------------------------------------------------------


@partial(jax.custom_jvp, nondiff_argnums=(7,))
def _ce_jvp(logits, labels, where, temperature, weights, row_ok, coefs, flags: Flags):
    return _forward(logits, labels, where, temperature, weights, row_ok, coefs, flags)[0]


@partial(_ce_jvp.defjvp)
def _ce_jvp_rule(flags, primals, tangents):
    logits, labels, where, temperature, weights, row_ok, coefs = primals
    logits_dot, labels_dot, _, t_dot, _, _, _ = tangents
    axis = flags.axis
    out, (saved, _) = _forward(logits, labels, where, temperature, weights, row_ok, coefs, flags)
    ok, row = saved.ok, saved.row
    cdt = row.m.dtype
    p = _ce.probs(logits, where, temperature, flags, row, row.m)
    g_s, valid, u, w = _ce.cotangent(saved, flags, p, _label_at(labels, logits.shape, axis))
    # The tangent of s = softcap(z) / T, 0 off the valid classes (their tangents, maybe
    # inf, are dropped).
    if valid is None:
        valid = u > -jnp.inf
    zero = jnp.zeros((), cdt)
    u_dot = jnp.where(valid, logits_dot.astype(cdt), zero)
    if flags.softcap is not None:
        u_dot = u_dot * _formulas.softcap_derivative(u, flags.softcap)
    s_dot = u_dot
    if temperature is not None:
        s = jnp.where(valid, u, zero) / temperature.astype(cdt)
        s_dot = (u_dot - s * t_dot.astype(cdt)) / temperature.astype(cdt)
    loss_dot = jnp.sum(g_s * s_dot, axis=axis, keepdims=True)
    if not _kernel.is_integer(labels):
        alpha = _kernel.coefs_as(coefs, cdt).alpha if flags.smoothing else None
        d_y = _kernel.mask_rows(_kernel.label_cotangent(u, row, valid, w, alpha, temperature), ok)
        loss_dot = loss_dot + jnp.sum(d_y * labels_dot.astype(cdt), axis, keepdims=True)
    # A select per row: its transpose gives a row that does not count no cotangent,
    # even a NaN one (as reverse mode of rule="vjp" does).
    loss_dot = jnp.squeeze(_kernel.mask_rows(loss_dot, ok), axis).astype(out[0].dtype)
    return out, (loss_dot, jnp.zeros_like(out[1]))


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def _flatten_classes(logits, labels, where, axes: tuple[int, ...]):
    """Moves the class axes to the end, in the order given, and flattens them into one
    (optax's convention for a tuple `axis`: integer labels index the row-major flattened
    classes of `logits.transpose(batch_axes + axes)`)."""
    batch_axes = tuple(k for k in range(logits.ndim) if k not in axes)
    order = batch_axes + axes
    shape = logits.shape
    batch = tuple(shape[k] for k in batch_axes)
    n = math.prod(shape[k] for k in axes)

    def merge(a):
        return jnp.transpose(jnp.broadcast_to(a, shape), order).reshape(batch + (n,))

    logits = merge(logits)
    if where is not None:
        where = merge(where)
    if not _kernel.is_integer(labels):
        labels = merge(labels)
    return logits, labels, where, len(batch)


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float | ArrayLike = 0.0,
    temperature: ArrayLike = 1.0,
    rule: Rule = "vjp",
    ignore_index: int | None = None,
    weights: ArrayLike | None = None,
    z_loss: float | ArrayLike = 0.0,
    logit_softcap: float | None = None,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Softmax cross-entropy with the fused $p - y$ derivative and the options of
    training code (ignored labels, class weights, label smoothing, z-loss, soft-capping,
    reductions).

    The call `cross_entropy(logits, labels, axis, where)` is a drop-in for optax's
    `softmax_cross_entropy_with_integer_labels` (integer labels) and
    `softmax_cross_entropy` (probability labels).

    With $s = \mathrm{softcap}(z) / T$ over `axis`, the valid classes (not masked by
    `where`, not $-\infty$), $p = \mathrm{softmax}(s)$ over them,
    $\mathrm{lse} = \log\sum_i e^{s_i}$, class weights $w$ (1 by default) and the
    effective target $\tilde y = (1-\alpha)\,y + \alpha/m$ over the $m$ valid classes
    ($y$ one-hot for integer labels), each row's loss is

    $$
    \ell = \sum_i q_i\,(\mathrm{lse} - s_i) + c\,b\,\mathrm{lse}^2
         = -\sum_i q_i \log p_i + c\,b\,\mathrm{lse}^2,
    $$

    $$
    \frac{\partial \ell}{\partial s} = \Bigl(\sum_i q_i + 2c\,b\,\mathrm{lse}\Bigr)\,p - q,
    \qquad
    \frac{\partial \ell}{\partial z} = \frac{1}{T}\frac{\partial \ell}{\partial s}
    \bigl(1 - \mathrm{softcap}(z)^2/\kappa^2\bigr),
    $$

    with $q = w_y(1-\alpha)\,e_y + \frac{\alpha}{m}\,w$ and the row weight $b = w_y$ for
    integer labels (PyTorch's `weight` with `label_smoothing`), and
    $q = w\odot\tilde y$, $b = 1$ for probability labels; without options this is
    $p - y$. Also $\partial\ell/\partial T = -\langle\partial\ell/\partial s,
    s\rangle/T$ and $\partial\ell/\partial y_i = -(1-\alpha)\,w_i\log p_i$.

    Args:
      logits: any rank >= 1; integer input is promoted to the default float dtype.
      labels: either integer class indices with the batch shape (`logits.shape`
        without `axis`), or a real probability vector per row with the shape of
        `logits` (not required to be normalised; differentiable).
      axis: the class axis; a tuple of axes whose entries together are the classes
        (integer labels index them flattened in the order given, as in optax); or
        None, every axis (one row: integer labels are a scalar).
      where: optional boolean mask, by optax's rule. With **fewer dimensions than
        the logits** it is a per-example mask that must broadcast to the batch shape:
        masked examples behave like `ignore_index`. With the **logits' rank** it masks
        entries: masked classes get probability 0 and no target mass.
      label_smoothing: $\alpha \in [0, 1]$, a number or a traced scalar (e.g. a
        schedule inside `jax.jit`; not differentiated). The smoothing mass $\alpha/m$
        goes to the $m$ valid classes.
      temperature: $T > 0$, a scalar or an array broadcastable to the batch shape;
        differentiable.
      rule: `"vjp"` (default): a `jax.custom_vjp` that keeps no new logits-sized array
        for the backward pass (it recomputes $p$ from the logits and a few numbers per
        row); reverse mode only (`jax.grad(jax.grad(...))` works). `"jvp"`: a
        `jax.custom_jvp` with the same values and formula, so `jax.jvp`, `jax.jacfwd`
        and `jax.hessian` work too.
      ignore_index: an int (integer labels only) that the labels' dtype can hold: rows
        whose label equals it have loss 0 and gradient 0 and are left out of the
        `"mean"` denominator.
      weights: per-class weights, shape `(n,)` (`n` classes; PyTorch's `weight`).
        Not differentiated.
      z_loss: $c \ge 0$, a number or a traced scalar: adds $c\,b\,\mathrm{lse}^2$ per
        row (PaLM), weighted like the row's cross-entropy so that the `"mean"` does
        not change when every class weight is scaled alike.
      logit_softcap: None or a Python number $\kappa > 0$: logits become
        $\kappa\tanh(z/\kappa)$ before everything else (Gemma 2).
      reduction: `"none"` (per row), `"sum"` or `"mean"`: PyTorch's weighted mean
        $\sum_r \ell_r / \sum_r b_r$ over the rows that count. A batch whose total
        weight is 0 gives 0 with zero gradients.

    Returns:
      The loss per example (shape `logits.shape` without `axis`) or its sum or mean (a
      scalar). float32 for 16-bit logits (computed in float32, without a float32 copy of
      the logits), else the logits' dtype promoted with float labels. Gradients have the
      logits' dtype.

    Note:
      * Rows that do not count — label equal to `ignore_index`, example masked by a
        per-example `where`, integer label on an excluded class (masked or $-\infty$),
        or no valid class at all — give loss 0 and zero gradients (even if their
        logits are NaN) and are not in the `"mean"` denominator.
      * A $-\infty$ logit is an excluded class, exactly as a masked one: probability
        0, no target mass (neither label smoothing nor probability labels put mass
        there), zero gradient. So `cross_entropy(x @ w + b, ...)` equals
        [`linear_cross_entropy`][jsoftmax.linear_cross_entropy]`(x, w, ..., bias=b)`
        with $-\infty$ entries in `b` (padded classes). optax gives NaN or `inf`.
      * The loss is never negative: the label's logit and the row maximum are read
        from the same array.
      * `logit_softcap` keeps $-\infty$ logits at $-\infty$ and maps $+\infty$ to
        $\kappa$.
      * Out-of-range integer labels other than `ignore_index` raise `IndexError` when
        `labels` (and a per-example `where`) are concrete, in the rows that count;
        under `jax.jit` such a row's loss and gradient are NaN.
      * NaN logits in a counted row give NaN, and so do $+\infty$ logits without
        `logit_softcap`, as in [`log_softmax`][jsoftmax.log_softmax].
      * Traced `label_smoothing` and `z_loss` are not range-checked.

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
      [0.6912 3.332 ]
    """
    logits = _checks.as_float_array(logits, "logits")
    axes = _checks.canonical_axes(axis, logits.ndim)
    _checks.check_rule(rule)
    labels = _checks.as_array(labels, "labels")
    opts = _checks.loss_options(
        label_smoothing, z_loss, logit_softcap, ignore_index, reduction, labels.dtype
    )
    where, example_mask = _checks.split_where(where, logits.shape, axes)
    ax = axes[0]
    if len(axes) > 1 or logits.ndim == 0:
        if not _kernel.is_integer(labels) and labels.shape != logits.shape:
            _checks.check_labels(labels, logits.shape, ax, opts.ignore_index)  # raises
        logits, labels, where, ax = _flatten_classes(logits, labels, where, axes)
    labels = _checks.check_labels(labels, logits.shape, ax, opts.ignore_index)
    n = logits.shape[ax]
    weights = _checks.check_weights(weights, n)
    t = _checks.prepare_temperature(temperature, logits.shape, (ax,))  # None for T = 1
    out_dtype = _kernel.loss_dtype(logits, labels)
    if n == 0 or logits.size == 0:
        batch = tuple(s for k, s in enumerate(logits.shape) if k != ax)
        per_row = jnp.zeros(batch, out_dtype)
        return per_row if opts.reduction == "none" else jnp.zeros((), out_dtype)
    row_ok = example_mask
    if _kernel.is_integer(labels):
        _checks.check_label_range(labels, n, opts.ignore_index, counted=example_mask)
        if opts.ignore_index is not None:
            row_ok = _kernel.both(row_ok, labels != opts.ignore_index)
    flags, coefs = _kernel.flags_and_coefs(opts, ax)
    kernel = _ce_vjp if rule == "vjp" else _ce_jvp
    per_row, weight = kernel(logits, labels, where, t, weights, row_ok, coefs, flags)
    return _kernel.reduce_rows(per_row.astype(out_dtype), weight, opts.reduction)


def cross_entropy_hessian(
    logits: ArrayLike,
    axis: int = -1,
    *,
    where: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
) -> SoftmaxJacobian:
    r"""Hessian of [`cross_entropy`][jsoftmax.cross_entropy] with respect to the logits,
    as an operator.

    For targets summing to 1 (one-hot, smoothed or probability labels) the Hessian of
    one row's loss does not depend on the labels:

    $$
    \frac{\partial^2 L}{\partial z\,\partial z^\top}
    = \frac{1}{T^2}\bigl(\mathrm{diag}(p) - pp^\top\bigr),
    \qquad p = \mathrm{softmax}(z/T).
    $$

    The loss is separable over rows, so the Hessian of `scale * sum(losses)` is block
    diagonal with these blocks times `scale`: pass `scale=1/B` for the mean over `B`
    rows. The result is a [`SoftmaxJacobian`][jsoftmax.SoftmaxJacobian]: `H @ v` costs
    $O(n)$ per row and `H.pinv_solve(g)` gives the Newton step on the logits (the
    gradient $p - y$ lies in the range of `H`).

    Args:
      logits: any rank >= 1.
      axis: the class axis.
      where: optional boolean class mask broadcastable to the logits (masked classes
        have probability 0).
      temperature: $T > 0$, scalar or broadcastable to the batch shape.
      scale: a factor (scalar or broadcastable to the batch shape), e.g. `1/B`.

    Returns:
      A [`SoftmaxJacobian`][jsoftmax.SoftmaxJacobian] with `scale` $= \mathrm{scale}/T^2$.

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
    p = softmax(logits, ax, where, rule="jvp", temperature=temperature)
    if t is None and isinstance(scale, (int, float)) and scale == 1:
        return SoftmaxJacobian(p, ax)
    hess = SoftmaxJacobian(p, ax, scale=scale)  # checks scale, shapes it like t
    if t is not None and hess.scale is not None:  # (hess.scale is set: scale was given)
        hess.scale = hess.scale / (t * t).astype(hess.scale.dtype)
    return hess
