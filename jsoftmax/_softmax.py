r"""``softmax`` and ``log_softmax`` with their custom differentiation rules.

The public functions check and normalise their arguments; the private kernels below
carry the rules. Two rules exist for each function:

* ``"vjp"`` — a :func:`jax.custom_vjp` whose forward pass saves exactly one
  output-sized array (the probabilities, or the log-probabilities for
  ``log_softmax``) for the backward pass. Reverse mode only.
* ``"jvp"`` — a :func:`jax.custom_jvp` with the same values, so forward mode
  (:func:`jax.jvp`, :func:`jax.jacfwd`, :func:`jax.hessian`) works as well.

Both rules delegate the derivative formulas to :mod:`jsoftmax._formulas`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _formulas

Axes = tuple[int, ...]


# --------------------------------------------------------------------------------------
# The forward computation shared by every rule.
# --------------------------------------------------------------------------------------


def _shifted_exp(x, where, temperature, axes: Axes):
    """Returns ``(s - max s, exp(s - max s), sum exp(s - max s))`` with ``s = x / T``.

    Computed in float32 for 16-bit inputs. Masked entries become ``-inf`` before the
    exponential ("double where"), so a large masked logit never reaches ``exp`` and
    never leaks NaN into a derivative. A row without any finite entry is shifted by 0,
    so it yields ``exp = 0`` and ``sum = 0``; ``+inf`` and NaN propagate to NaN.
    """
    cdt = _checks.accumulation_dtype(x.dtype)
    s = x.astype(cdt)
    if temperature is not None:
        s = s / temperature.astype(cdt)
    if where is not None:
        s = jnp.where(where, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=axes, keepdims=True))
    m = jnp.where(m == -jnp.inf, jnp.zeros((), cdt), m)
    shifted = s - m
    e = jnp.exp(shifted)
    return shifted, e, jnp.sum(e, axis=axes, keepdims=True)


def _values(x, where, temperature, axes: Axes, log: bool):
    """Probabilities (or log-probabilities) in the accumulation dtype."""
    shifted, e, total = _shifted_exp(x, where, temperature, axes)
    # For a row with any finite entry, total >= 1 (the maximum contributes exp(0)), so
    # clamping at 1 only changes rows with no finite entry: they give p = 0 (log p =
    # -inf) instead of 0/0. jnp.maximum propagates NaN.
    total = jnp.maximum(total, jnp.ones((), total.dtype))
    if log:
        return shifted - jnp.log(total)
    return e / total


def _safe_log(p):
    # log p where p > 0 and 0 elsewhere, with a derivative that stays finite at p = 0.
    positive = p > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, p, jnp.ones((), p.dtype))), 0)


# --------------------------------------------------------------------------------------
# rule="vjp": custom_vjp, one output-sized residual.
# --------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _kernel_vjp(x, where, temperature, axes: Axes, log: bool):
    return _values(x, where, temperature, axes, log).astype(x.dtype)


def _kernel_vjp_fwd(x, where, temperature, axes, log):
    out = _kernel_vjp(x, where, temperature, axes, log)
    return out, (out, temperature)


def _kernel_vjp_bwd(axes, log, residuals, g):
    out, temperature = residuals
    cdt = _checks.accumulation_dtype(out.dtype)
    out_c, g = out.astype(cdt), g.astype(cdt)
    if log:
        valid = out_c > -jnp.inf
        g = jnp.where(valid, g, jnp.zeros((), cdt))  # masked outputs are constants
        g_s = _formulas.log_vjp(jnp.exp(out_c), g, axes)
        log_p = jnp.where(valid, out_c, jnp.zeros((), cdt))
    else:
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


@partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _kernel_jvp(x, where, temperature, axes: Axes, log: bool):
    return _values(x, where, temperature, axes, log).astype(x.dtype)


@_kernel_jvp.defjvp
def _kernel_jvp_rule(axes, log, primals, tangents):
    x, where, temperature = primals
    x_dot, _, t_dot = tangents
    shifted, e, total = _shifted_exp(x, where, temperature, axes)
    cdt = shifted.dtype
    total = jnp.maximum(total, jnp.ones((), cdt))
    p = e / total
    zero = jnp.zeros((), cdt)
    valid = shifted > -jnp.inf
    s_dot = jnp.where(valid, x_dot.astype(cdt), zero)
    if temperature is not None:
        # d(x / T) = (dx - s dT) / T; the shifted s differs from s by a constant,
        # which both Jacobians annihilate.
        t = temperature.astype(cdt)
        s_dot = (s_dot - jnp.where(valid, shifted, zero) * t_dot.astype(cdt)) / t
    if log:
        out = shifted - jnp.log(total)
        out_dot = jnp.where(valid, _formulas.log_jvp(p, s_dot, axes), zero)
    else:
        out = p
        out_dot = _formulas.jac_product(p, s_dot, axes)
    return out.astype(x.dtype), out_dot.astype(x.dtype)


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def _dispatch(x, axis, where, rule, temperature, log: bool):
    x = _checks.as_float_array(x)
    axes = _checks.canonical_axes(axis, x.ndim)
    _checks.check_rule(rule)
    where = _checks.check_where(where, x.shape)
    temperature = _checks.prepare_temperature(temperature, x.shape, axes)
    if any(x.shape[a] == 0 for a in axes):
        return jnp.zeros(x.shape, x.dtype)
    kernel = _kernel_vjp if rule == "vjp" else _kernel_jvp
    return kernel(x, where, temperature, axes, log)


def softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    where: ArrayLike | None = None,
    rule: str = "vjp",
    temperature: ArrayLike = 1.0,
) -> jax.Array:
    r"""Numerically stable softmax with a lean custom derivative.

    .. math::
        p_i = \frac{\exp(z_i / T)}{\sum_k \exp(z_k / T)}, \qquad
        \frac{\partial p_i}{\partial z_j} = \frac{1}{T}\, p_i(\delta_{ij} - p_j).

    ``i`` indexes the output component and ``j`` the input component; the Jacobian
    :math:`J = \mathrm{diag}(p) - pp^\top` (for ``T = 1``) is symmetric and its rows
    sum to zero. The row maximum is subtracted before ``exp`` (shift invariance), so
    large logits never overflow.

    Args:
      x: logits, any rank >= 1. Integer input is promoted to the default float dtype.
      axis: the softmax axis (negative counts from the end), or a tuple of axes that
        are normalised together.
      where: optional boolean mask broadcastable to ``x``; ``False`` entries are
        excluded: probability 0 and gradient 0.
      rule: ``"vjp"`` (default) differentiates with a :func:`jax.custom_vjp` that
        saves only the probabilities for the backward pass, whose product is
        :math:`\bar z = p \odot (g - \langle g, p\rangle)`. A ``custom_vjp`` function
        **cannot be forward-differentiated**: :func:`jax.jvp`, :func:`jax.jacfwd`
        and :func:`jax.hessian` raise; use ``rule="jvp"`` (a
        :func:`jax.custom_jvp` with identical values) for those.
        Reverse-over-reverse (``jax.grad(jax.grad(...))``) works with both.
      temperature: ``T > 0``, a scalar or an array broadcastable to the batch shape
        (``x.shape`` without ``axis``). Differentiable:
        :math:`\partial L/\partial T = -\frac{1}{T}\langle \bar s, z/T\rangle` with
        :math:`\bar s = p\odot(g - \langle g, p\rangle)` (equivalently with
        :math:`\log p` in place of :math:`z/T`, since :math:`\langle\bar s,1\rangle=0`).

    Returns:
      Probabilities with the shape of ``x`` and its dtype (float16/bfloat16 inputs
      are computed in float32 and rounded once).

    Note:
      * A row whose entries are all masked or ``-inf`` gives all zeros, with zero
        gradients. A ``-inf`` logit behaves as a masked entry.
      * ``+inf`` or NaN anywhere in an unmasked row makes the whole row NaN (as in
        :func:`jax.nn.softmax`); masked entries never contribute, whatever they hold.
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
    return _dispatch(x, axis, where, rule, temperature, log=False)


def log_softmax(
    x: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    where: ArrayLike | None = None,
    rule: str = "vjp",
    temperature: ArrayLike = 1.0,
) -> jax.Array:
    r"""Numerically stable log-softmax.

    .. math::
        y_i = \frac{z_i}{T} - \log\sum_k \exp(z_k / T), \qquad
        \frac{\partial y_i}{\partial z_j} = \frac{1}{T}(\delta_{ij} - p_j).

    Computed as :math:`(s_i - m) - \log\sum_k \exp(s_k - m)` with :math:`s = z/T` and
    :math:`m = \max_k s_k`, so it neither overflows nor underflows to ``log(0)``.

    Args:
      x: logits, any rank >= 1.
      axis: the softmax axis or a tuple of axes.
      where: optional boolean mask broadcastable to ``x``; masked entries give
        ``-inf`` and gradient 0.
      rule: ``"vjp"`` (default; a :func:`jax.custom_vjp` saving only the output,
        backward :math:`\bar z = g - p\sum_i g_i`; reverse mode only) or ``"jvp"``
        (a :func:`jax.custom_jvp`, forward mode too). See :func:`softmax`.
      temperature: ``T > 0``, scalar or broadcastable to the batch shape;
        :math:`\partial L/\partial T = -\frac{1}{T}\langle \bar s, y\rangle` with
        :math:`\bar s = g - p\sum_i g_i`.

    Returns:
      Log-probabilities with the shape and dtype of ``x``.

    Note:
      * Masked and ``-inf`` entries give ``-inf``; the cotangent arriving at such an
        entry is ignored (the output is a constant there). A row with no finite
        entry is ``-inf`` everywhere with zero gradients.
      * float16/bfloat16 inputs accumulate in float32: 100 000 equal float16 logits
        give ``log(1e-5)``, not ``-inf``.
      * ``+inf`` or NaN in an unmasked row gives NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.log_softmax(jnp.array([1.0, 2.0, 3.0])))
      [-2.4076 -1.4076 -0.4076]
    """
    return _dispatch(x, axis, where, rule, temperature, log=True)
