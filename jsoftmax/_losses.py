r"""Softmax cross-entropy with the fused :math:`p - y` derivative, and its Hessian.

The forward pass reuses the log-softmax values of :mod:`jsoftmax._softmax`; the
backward pass turns the saved log-probabilities into :math:`p` once and applies the
fused cotangent :math:`(\sum_i y_i)\,p - y`. The Hessian is returned as a
:class:`jsoftmax.SoftmaxJacobian`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _formulas
from jsoftmax._operator import SoftmaxJacobian
from jsoftmax._softmax import _kernel_jvp, _scaled_logits, log_normalizer, softmax

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


def _targets(labels, where, shape, axis: int, alpha: float, cdt):
    """The dense effective target ``y`` (``cdt``) and, for integer labels, a keepdims
    boolean ``in_range`` (else None)."""
    n = shape[axis]
    in_range = None
    if _is_integer(labels):
        # Casting to the default int type keeps in-range values; huge unsigned values
        # wrap to negative ones, which stay out of range.
        idx = jnp.expand_dims(labels.astype(jnp.result_type(int)), axis)
        y = (lax.broadcasted_iota(idx.dtype, shape, axis) == idx).astype(cdt)
        in_range = (idx >= 0) & (idx < n)
    else:
        y = labels.astype(cdt)
    zero = jnp.zeros((), cdt)
    if where is not None:
        y = jnp.where(where, y, zero)
    if alpha:
        if where is None:
            y = (1 - alpha) * y + alpha / n
        else:
            m = jnp.maximum(jnp.sum(where, axis=axis, keepdims=True), 1).astype(cdt)
            y = jnp.where(where, (1 - alpha) * y + alpha / m, zero)
    return y, in_range


def _forward(kernel, logits, labels, where, temperature, axis: int, alpha: float):
    """Returns ``(loss, log p, y, in_range)``, all in the compute dtype.

    ``log p`` comes from a log-softmax kernel of :mod:`jsoftmax._softmax` (``kernel``
    is ``_kernel_vjp`` or ``_kernel_jvp``), so differentiating this function (second
    order) uses the log-softmax rules.
    """
    cdt = _compute_dtype(logits, labels)
    log_p = kernel(logits.astype(cdt), where, temperature, (axis,), True)
    y, in_range = _targets(labels, where, logits.shape, axis, alpha, cdt)
    # 0 * log 0 = 0 ("double where": no NaN reaches a derivative); y > 0 on a -inf
    # log-probability gives +inf. NaN log-probabilities (NaN/+inf logits) stay NaN.
    finite = log_p != -jnp.inf
    safe = jnp.where(finite, log_p, jnp.zeros((), cdt))
    loss = -jnp.sum(y * safe, axis=axis, keepdims=True)
    loss = jnp.where(jnp.any((y != 0) & ~finite, axis=axis, keepdims=True), jnp.inf, loss)
    if in_range is not None:
        loss = jnp.where(in_range, loss, jnp.nan)
    return loss, log_p, y, in_range


def _grad_s(log_p, y, in_range, axis: int):
    r"""Returns ``(dL/ds, safe log p)`` with ``s = logits / T``: :math:`(\sum y)\,p - y`."""
    p = jnp.exp(log_p)
    g_s = jnp.sum(y, axis=axis, keepdims=True) * p - y
    if in_range is not None:
        g_s = jnp.where(in_range, g_s, jnp.nan)
    safe = jnp.where(log_p != -jnp.inf, log_p, jnp.zeros((), log_p.dtype))
    return g_s, safe


def _out_dtype(logits, labels):
    return logits.dtype if _is_integer(labels) else jnp.result_type(logits.dtype, labels.dtype)


# --------------------------------------------------------------------------------------
# rule="vjp": custom_vjp saving the log-probabilities only.
# --------------------------------------------------------------------------------------


def _label_index(labels, n: int, axis: int):
    """``(clipped index, in_range)`` of integer labels, both with a size-1 class axis."""
    idx = jnp.expand_dims(labels.astype(jnp.result_type(int)), axis)
    in_range = (idx >= 0) & (idx < n)
    return jnp.clip(idx, 0, n - 1), in_range


def _integer_loss(logits, normalizer, labels, where, temperature, axis: int):
    """``log_total - (s[label] - m)`` from a gather of the logits (no pass over the classes).

    Out-of-range labels give NaN; a label on a masked class gives 0 (no target mass);
    a label on a ``-inf`` logit gives ``+inf``. Agrees with the dense ``-<y, log p>``.
    """
    idx, in_range = _label_index(labels, logits.shape[axis], axis)
    if _formulas._sharded_along(logits, (axis,)):
        # Explicitly sharded classes: a one-hot sum is a plain reduction (one scalar
        # all-reduce per row), where a gather would need an output sharding.
        onehot = lax.broadcasted_iota(idx.dtype, logits.shape, axis) == idx
        pick = lambda a: jnp.sum(jnp.where(onehot, a, jnp.zeros((), a.dtype)), axis, keepdims=True)
        where_label = None if where is None else pick(where.astype(jnp.int32)) > 0
        x_label = pick(logits)
    else:
        where_label = None if where is None else jnp.take_along_axis(where, idx, axis=axis)
        x_label = jnp.take_along_axis(logits, idx, axis=axis)
    s_label = _scaled_logits(x_label, where_label, temperature)
    m, log_total = normalizer
    loss = log_total - (s_label - m)
    zero = jnp.zeros((), loss.dtype)
    if where_label is not None:
        loss = jnp.where(where_label, loss, zero)
    return jnp.where(in_range, loss, jnp.full((), jnp.nan, loss.dtype))


def _integer_grad_s(log_p, labels, where, axis: int):
    """``dL/ds = p - onehot`` for integer labels; 0 for a masked label, NaN out of range."""
    idx, in_range = _label_index(labels, log_p.shape[axis], axis)
    onehot = lax.broadcasted_iota(idx.dtype, log_p.shape, axis) == idx
    weight = jnp.ones(idx.shape, log_p.dtype)  # sum of the targets: 1, or 0 if masked
    if where is not None:
        weight = jnp.take_along_axis(where, idx, axis=axis).astype(log_p.dtype)
    weight = jnp.where(in_range, weight, jnp.nan)
    return weight * (jnp.exp(log_p) - onehot.astype(log_p.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ce_vjp(logits, labels, where, temperature, axis: int, alpha: float):
    return _ce_vjp_fwd(logits, labels, where, temperature, axis, alpha)[0]


def _ce_vjp_fwd(logits, labels, where, temperature, axis, alpha):
    cdt = _compute_dtype(logits, labels)
    log_p, normalizer = log_normalizer(logits.astype(cdt), where, temperature, (axis,))
    if _is_integer(labels) and not alpha:
        loss = _integer_loss(logits.astype(cdt), normalizer, labels, where, temperature, axis)
    else:
        y, in_range = _targets(labels, where, logits.shape, axis, alpha, cdt)
        # -sum y log p with 0 * log 0 = 0; y > 0 on a -inf log-probability gives +inf.
        terms = jnp.where(y != 0, y * log_p, jnp.zeros((), cdt))
        loss = -jnp.sum(terms, axis=axis, keepdims=True)
        if in_range is not None:
            loss = jnp.where(in_range, loss, jnp.nan)
    out = jnp.squeeze(loss, axis).astype(_out_dtype(logits, labels))
    # The only logits-sized residual is the logits themselves (already in memory): the
    # backward pass recomputes log p = (s - m) - log_total from them and the per-row
    # (m, log_total), in the same fused pass that writes the gradient.
    return out, (logits, normalizer, labels, where, temperature)


def _ce_vjp_bwd(axis, alpha, residuals, g):
    logits, (m, log_total), labels, where, temperature = residuals
    dtype = logits.dtype
    cdt = _compute_dtype(logits, labels)
    log_p = (_scaled_logits(logits.astype(cdt), where, temperature) - m) - log_total
    if _is_integer(labels) and not alpha:
        g_s = _integer_grad_s(log_p, labels, where, axis)
        safe = jnp.where(log_p != -jnp.inf, log_p, jnp.zeros((), cdt))
    else:
        y, in_range = _targets(labels, where, logits.shape, axis, alpha, cdt)
        g_s, safe = _grad_s(log_p, y, in_range, axis)
    g = jnp.expand_dims(g, axis).astype(cdt)
    g_s = g_s * g
    if _is_integer(labels):
        g_labels = None
    else:
        g_labels = (-(1 - alpha) * g * safe).astype(labels.dtype)
    if temperature is None:
        return g_s.astype(dtype), g_labels, None, None
    t = temperature.astype(cdt)
    g_t = -jnp.sum(g_s * safe, axis=axis, keepdims=True) / t
    g_x = (g_s / t).astype(dtype)
    return g_x, g_labels, None, g_t.astype(temperature.dtype)


_ce_vjp.defvjp(_ce_vjp_fwd, _ce_vjp_bwd)


# --------------------------------------------------------------------------------------
# rule="jvp": custom_jvp, so forward mode (jax.jvp, jax.hessian) works.
# --------------------------------------------------------------------------------------


@partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _ce_jvp(logits, labels, where, temperature, axis: int, alpha: float):
    loss = _forward(_kernel_jvp, logits, labels, where, temperature, axis, alpha)[0]
    return jnp.squeeze(loss, axis).astype(_out_dtype(logits, labels))


@_ce_jvp.defjvp
def _ce_jvp_rule(axis, alpha, primals, tangents):
    logits, labels, where, temperature = primals
    logits_dot, labels_dot, _, t_dot = tangents
    loss, log_p, y, in_range = _forward(
        _kernel_jvp, logits, labels, where, temperature, axis, alpha
    )
    cdt = log_p.dtype
    g_s, safe = _grad_s(log_p, y, in_range, axis)
    s_dot = logits_dot.astype(cdt)
    if temperature is not None:
        # d(z / T) = (dz - (z / T) dT) / T; log p stands in for z / T since <g_s, 1> = 0.
        s_dot = (s_dot - safe * t_dot.astype(cdt)) / temperature.astype(cdt)
    loss_dot = jnp.sum(g_s * s_dot, axis=axis, keepdims=True)
    if not _is_integer(labels):
        loss_dot = loss_dot - (1 - alpha) * jnp.sum(
            safe * labels_dot.astype(cdt), axis, keepdims=True
        )
    out_dtype = _out_dtype(logits, labels)
    return (
        jnp.squeeze(loss, axis).astype(out_dtype),
        jnp.squeeze(loss_dot, axis).astype(out_dtype),
    )


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def _check_labels(labels, logits: jax.Array, axis: int) -> jax.Array:
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
        if _checks.is_concrete(labels) and labels.size:
            values = np.asarray(labels)  # numpy: jnp would be staged inside a trace
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= n:
                raise IndexError(
                    f"labels has entries out of range for {n} classes: got values in "
                    f"[{lo}, {hi}], valid class indices are 0 to {n - 1}."
                )
        return labels
    if labels.shape != logits.shape:
        hint = " For class indices use an integer dtype." if labels.shape == batch else ""
        raise ValueError(
            f"float labels (a probability vector per row) must have the logits' shape "
            f"{logits.shape}, got {labels.shape}.{hint}"
        )
    return labels


def _check_label_smoothing(alpha) -> float:
    if isinstance(alpha, (bool, np.bool_)):
        raise TypeError(f"label_smoothing must be a number in [0, 1], got {alpha!r}.")
    if not isinstance(alpha, (int, float, np.integer, np.floating)):
        arr = jnp.asarray(alpha)
        if not _checks.is_concrete(arr) or arr.ndim != 0:
            raise TypeError(
                "label_smoothing must be a Python number (or concrete scalar) in [0, 1]; "
                "it is a static argument and cannot be traced."
            )
        alpha = arr.item()
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {alpha!r}.")
    return alpha


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int = -1,
    *,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    temperature: ArrayLike = 1.0,
    rule: str = "vjp",
) -> jax.Array:
    r"""Softmax cross-entropy per example, with the fused :math:`p - y` derivative.

    With :math:`p = \mathrm{softmax}(z / T)` over ``axis`` and target :math:`y`
    (one-hot for integer labels), optionally smoothed over the :math:`m` valid
    classes, :math:`\tilde y = (1-\alpha)\,y + \alpha/m`:

    .. math::
        L = -\sum_i \tilde y_i \log p_i, \qquad
        \frac{\partial L}{\partial z} = \frac{1}{T}\Bigl(\bigl(\textstyle\sum_i
        \tilde y_i\bigr) p - \tilde y\Bigr) = \frac{p - \tilde y}{T}
        \quad\text{when } \textstyle\sum_i \tilde y_i = 1,

    .. math::
        \frac{\partial L}{\partial T} = -\frac{1}{T}\Bigl\langle
        \frac{\partial L}{\partial s}, s\Bigr\rangle
        = -\frac{1}{T}\Bigl\langle \frac{\partial L}{\partial s}, \log p\Bigr\rangle
        = \frac{H(p) - L}{T}, \qquad
        \frac{\partial L}{\partial y_i} = -(1 - \alpha)\log p_i,

    with :math:`s = z/T`, :math:`\partial L/\partial s = (\sum\tilde y)p - \tilde y`
    (its entries sum to 0, so the shift-invariant :math:`\log p` can replace
    :math:`s`) and :math:`H(p) = -\sum_i p_i\log p_i` (last form for
    :math:`\sum\tilde y = 1`).

    Args:
      logits: any rank >= 1; integer input is promoted to the default float dtype.
      labels: either integer class indices with the batch shape (``logits.shape``
        without ``axis``), or a real probability vector per row with the shape of
        ``logits`` (not required to be normalised; differentiable).
      axis: the class axis (one int).
      where: optional boolean mask broadcastable to ``logits``; masked classes get
        probability 0 and **no target mass** (labels there are ignored).
      label_smoothing: :math:`\alpha \in [0, 1]`, a static Python number. The
        smoothing mass :math:`\alpha/m` goes to the :math:`m` unmasked classes of
        each row (:math:`m = n` without ``where``).
      temperature: ``T > 0``, a scalar or an array broadcastable to the batch
        shape; differentiable.
      rule: ``"vjp"`` (default): a :func:`jax.custom_vjp` whose forward pass saves
        one output-sized array (the log-probabilities, in the logits' dtype) and
        whose backward pass is the fused formula above; reverse mode only
        (``jax.grad(jax.grad(...))`` works). ``"jvp"``: a :func:`jax.custom_jvp`
        with the same values and derivative formula, so :func:`jax.jvp`,
        :func:`jax.jacfwd` and :func:`jax.hessian` work too (reverse mode then
        keeps whatever residuals JAX's transposition needs).

    Returns:
      The loss per example, shape ``logits.shape`` without ``axis``; dtype of
      ``logits`` (promoted with float ``labels``). 16-bit inputs are computed in
      float32.

    Note:
      * ``-inf`` logits (and masked classes) with zero target mass contribute 0:
        loss and gradients stay finite (optax gives NaN there). A ``-inf`` logit
        that is not masked but receives target mass (its label, float mass, or
        label smoothing, which reaches every unmasked class) makes the loss
        ``+inf``; its logit gradient is then the finite :math:`-\tilde y_i/T`.
        Mask such classes with ``where`` to exclude them from smoothing.
      * A row with no valid class (fully masked) gives loss 0 and zero gradients.
        An integer label pointing at a masked class gives that row no target mass:
        loss 0 and zero gradient (like an "ignore" label).
      * The label gradient :math:`-(1-\alpha)\log p_i` is taken as 0 where
        :math:`p_i = 0` (masked or ``-inf`` logits).
      * Out-of-range integer labels (outside ``[0, n)``; negative indices do not
        wrap) raise ``IndexError`` when ``labels`` is concrete. Under
        :func:`jax.jit` they cannot be checked: that row's loss and gradient are
        NaN.
      * ``+inf``/NaN logits in an unmasked row give NaN, as in
        :func:`jsoftmax.log_softmax`.

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
    """
    logits = _checks.as_float_array(logits, "logits")
    ax = _checks.canonical_axis(axis, logits.ndim)
    _checks.check_rule(rule)
    labels = _check_labels(labels, logits, ax)
    where = _checks.check_where(where, logits.shape)
    alpha = _check_label_smoothing(label_smoothing)
    temperature = _checks.prepare_temperature(temperature, logits.shape, (ax,))
    if logits.shape[ax] == 0:
        batch = tuple(s for k, s in enumerate(logits.shape) if k != ax)
        return jnp.zeros(batch, _out_dtype(logits, labels))
    kernel = _ce_vjp if rule == "vjp" else _ce_jvp
    return kernel(logits, labels, where, temperature, ax, alpha)


def cross_entropy_hessian(
    logits: ArrayLike,
    axis: int = -1,
    *,
    where: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    scale: ArrayLike = 1.0,
) -> SoftmaxJacobian:
    r"""Hessian of :func:`cross_entropy` with respect to the logits, as an operator.

    For targets summing to 1 (one-hot, smoothed or probability labels) the Hessian of
    one row's loss does not depend on the labels:

    .. math::
        \frac{\partial^2 L}{\partial z\,\partial z^\top}
        = \frac{1}{T^2}\bigl(\mathrm{diag}(p) - pp^\top\bigr),
        \qquad p = \mathrm{softmax}(z/T).

    The loss is separable over rows, so the Hessian of ``scale * sum(losses)`` is
    block diagonal with these blocks times ``scale``: pass ``scale=1/B`` for the mean
    over ``B`` rows. The result is a :class:`jsoftmax.SoftmaxJacobian`: ``H @ v`` costs
    :math:`O(n)` per row and ``H.pinv_solve(g)`` gives the Newton step on the logits
    (the gradient :math:`p - y` lies in the range of ``H``).

    Args:
      logits: any rank >= 1.
      axis: the class axis.
      where: optional boolean class mask, as in :func:`cross_entropy`.
      temperature: ``T > 0``, scalar or broadcastable to the batch shape.
      scale: a factor (scalar or broadcastable to the batch shape), e.g. ``1/B``.

    Returns:
      A :class:`jsoftmax.SoftmaxJacobian` with ``scale`` :math:`= \mathrm{scale}/T^2`.

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
    if t is not None:
        hess.scale = hess.scale / (t * t).astype(hess.scale.dtype)
    return hess
