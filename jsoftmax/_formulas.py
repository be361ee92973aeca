r"""The softmax derivative formulas, each written once.

Everything here is private, unchecked and works on arrays whose softmax axes are
given as a tuple of non-negative ints (``axes``), reduced with ``keepdims=True``.
The custom differentiation rules, the Jacobian builders and the structured operator
all call these functions, so a formula fixed here is fixed everywhere.

With :math:`p = \mathrm{softmax}(z)` and :math:`J = \mathrm{diag}(p) - pp^\top`:

* ``jac_product(p, v)``      :math:`Jv = p \odot (v - \langle p, v\rangle)`
  (J is symmetric, so this is the JVP *and* the VJP);
* ``log_jvp(p, t)``           :math:`t - \langle p, t\rangle`
  (the log-softmax Jacobian :math:`I - 1p^\top` applied to ``t``);
* ``log_vjp(p, g)``           :math:`g - p\,\langle 1, g\rangle`;
* ``hvp(p, u, v)``            :math:`\sum_{jk} H_{ijk} u_j v_k`;
* ``dense_*``                 explicit matrices and tensors over the last axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _dot(a: jax.Array, b: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``<a, b>`` over ``axes``, kept as size-1 axes.

    A contraction (``dot_general``) rather than ``sum(a * b)``: when ``a`` is broadcast
    against a batch of directions (what ``jax.jacfwd``, ``jax.jacrev`` and ``vmap``
    build), XLA's CPU backend in jaxlib 0.10 miscompiles ``v - sum(p * v)`` fused with
    its consumer for many row lengths (n = 257, 513, 1000, ...), returning entries off
    by up to 2. The contraction compiles correctly and runs at the same speed. See
    ``test_regression_xla_cpu_broadcast_product`` in ``tests/test_jacobian.py``.
    """
    if _sharded_along(a, axes) or _sharded_along(b, axes):
        # Explicit-mode sharding of a contracted axis: a contraction would need an
        # output sharding, while the reduction is well defined.
        return jnp.sum(a * b, axis=axes, keepdims=True)
    ndim = max(a.ndim, b.ndim)
    axes = tuple(k % ndim for k in axes)
    a = a.reshape((1,) * (ndim - a.ndim) + a.shape)
    b = b.reshape((1,) * (ndim - b.ndim) + b.shape)
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    # A size-1 axis broadcast against a longer one is squeezed away, so the operand
    # enters the contraction unbroadcast.
    a_drop = tuple(k for k in range(ndim) if a.shape[k] == 1 and b.shape[k] != 1)
    b_drop = tuple(k for k in range(ndim) if b.shape[k] == 1 and a.shape[k] != 1)
    a_spec = "".join(c for k, c in enumerate(letters) if k not in a_drop)
    b_spec = "".join(c for k, c in enumerate(letters) if k not in b_drop)
    out = "".join(c for k, c in enumerate(letters) if k not in axes)
    # HIGHEST keeps float32 accuracy where a true matrix product is emitted on GPU/TPU
    # (a row-wise <p, v> is strength-reduced to multiply + reduce anyway).
    dot = jnp.einsum(
        f"{a_spec},{b_spec}->{out}",
        jnp.squeeze(a, a_drop),
        jnp.squeeze(b, b_drop),
        precision=lax.Precision.HIGHEST,
    )
    return jnp.expand_dims(dot, axes)


def _sharded_along(a: jax.Array, axes: tuple[int, ...]) -> bool:
    """True when ``a`` carries an explicit sharding on one of ``axes``."""
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
    if not spec:
        return False
    offset = a.ndim - len(spec)
    return any(
        0 <= k % a.ndim - offset < len(spec) and spec[k % a.ndim - offset] is not None for k in axes
    )


def _sum(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.sum(a, axis=axes, keepdims=True)


def jac_product(p: jax.Array, v: jax.Array, axes: tuple[int, ...], dot=_dot) -> jax.Array:
    """``J @ v`` (= ``v @ J``) in O(n): ``p * (v - <p, v>)``.

    ``dot(a, b, axes)`` computes the inner product over the softmax axes; the sharded
    functions pass one that all-reduces across devices.
    """
    return p * (v - dot(p, v, axes))


def log_jvp(p: jax.Array, t: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``(I - 1 p^T) @ t``: the log-softmax JVP."""
    return t - _dot(p, t, axes)


def log_vjp(p: jax.Array, g: jax.Array, axes: tuple[int, ...], total=_sum) -> jax.Array:
    """``g @ (I - 1 p^T)``: the log-softmax VJP; ``total(a, axes)`` sums over the axes."""
    return g - p * total(g, axes)


def hvp(p: jax.Array, u: jax.Array, v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    r"""Second directional derivative :math:`\sum_{jk} H_{ijk} u_j v_k` in O(n).

    :math:`p_i (u_i - \bar u)(v_i - \bar v) - p_i(\overline{uv} - \bar u \bar v)` with
    :math:`\bar a = \langle p, a\rangle`.
    """
    u_bar = _dot(p, u, axes)
    v_bar = _dot(p, v, axes)
    uv_bar = _dot(p, u * v, axes)
    return p * ((u - u_bar) * (v - v_bar) - (uv_bar - u_bar * v_bar))


def _eye(n: int, dtype, ndim: int = 2) -> jax.Array:
    # An iota comparison, so XLA fuses the identity into the single output pass.
    # Leading unit dimensions make it rank ``ndim``: no implicit rank promotion.
    shape = (1,) * (ndim - 2) + (n, n)
    i = lax.broadcasted_iota(jnp.int32, shape, ndim - 2)
    j = lax.broadcasted_iota(jnp.int32, shape, ndim - 1)
    return (i == j).astype(dtype)


def dense_jacobian(p: jax.Array) -> jax.Array:
    """``diag(p) - p p^T`` over the last axis: ``[..., i, j] = p_i (delta_ij - p_j)``."""
    # p_i * (1 - p_j) on the diagonal and p_i * (-p_j) off it: a select and a multiply
    # per output in one fused pass, measurably cheaper on CPU than subtracting p_j
    # from a float identity (same values: 1 - p_j and -p_j are rounded alike).
    diagonal = _eye(p.shape[-1], jnp.bool_, p.ndim + 1)
    row = _replicated_along_last(p)[..., None, :]
    return p[..., :, None] * jnp.where(diagonal, 1 - row, -row)


def _replicated_along_last(p: jax.Array) -> jax.Array:
    """``p`` with an explicitly sharded last axis gathered (every row of a dense
    Jacobian needs all of ``p``); unchanged otherwise."""
    if not _sharded_along(p, (p.ndim - 1,)):
        return p
    spec = jax.typeof(p).sharding.spec
    spec = tuple(spec) + (None,) * (p.ndim - len(spec))
    return jax.sharding.reshard(p, jax.sharding.PartitionSpec(*spec[:-1], None))


def dense_log_jacobian(p: jax.Array, valid: jax.Array) -> jax.Array:
    """``I - 1 p^T`` over the last axis, with rows of constant (masked) outputs zeroed."""
    n = p.shape[-1]
    rows = _eye(n, p.dtype, p.ndim + 1) - _replicated_along_last(p)[..., None, :]
    return jnp.where(valid[..., :, None], rows, jnp.zeros((), p.dtype))


def dense_hessian(p: jax.Array) -> jax.Array:
    r"""``H[..., i, j, k] = d^2 p_i / dz_j dz_k`` over the last axis.

    :math:`p_i(\delta_{ij} - p_j)(\delta_{ik} - p_k) - p_i p_j(\delta_{jk} - p_k)`.
    """
    eye = _eye(p.shape[-1], p.dtype, p.ndim + 1)
    a = eye - p[..., None, :]  # a[i, j] = delta_ij - p_j
    pi = p[..., :, None, None]
    pj = p[..., None, :, None]
    return pi * (a[..., :, :, None] * a[..., :, None, :] - pj * a[..., None, :, :])


# --------------------------------------------------------------------------------------
# The cross-entropy family: one definition of each option, shared by every loss.
# --------------------------------------------------------------------------------------
#
# Every loss of jsoftmax is, per row, with s the (soft-capped, temperature-scaled,
# masked) logits, lse = log sum exp s and q >= 0 the weighted effective target:
#
#     loss = sum_i q_i (lse - s_i) + c lse^2                     (c: the z-loss)
#     d loss / d s = (sum_i q_i + 2 c lse) p - q
#
# Integer labels have q = b e_y + k (w * valid) with per-row b = (1 - alpha) w_y and
# k = alpha / (number of valid classes); probability labels q = w * ((1 - alpha) y +
# alpha / m) * valid. The functions below are the pieces every loss reuses.


def softcap(z: jax.Array, cap: float) -> jax.Array:
    """``cap * tanh(z / cap)`` (Gemma 2's logit soft-capping); ``-inf`` stays ``-inf``."""
    capped = cap * jnp.tanh(z / cap)
    return jnp.where(z == -jnp.inf, z, capped)


def softcap_derivative(u: jax.Array, cap: float) -> jax.Array:
    """``d softcap(z) / dz = 1 - tanh(z / cap)^2``, from the capped value ``u``.

    Written in terms of ``u`` so that the backward pass reuses the forward's ``tanh``;
    0 where ``u = -inf`` (an excluded class).
    """
    r = u / cap
    return jnp.where(u == -jnp.inf, jnp.zeros((), u.dtype), 1 - r * r)


def ce_cotangent_scale(mass: jax.Array, lse: jax.Array | None, z_loss: float) -> jax.Array:
    """The factor of ``p`` in ``d loss / d s = (sum q + 2 c lse) p - q``; ``lse`` is
    needed only with a z-loss (``z_loss != 0``) and may be None otherwise."""
    if not z_loss:
        return mass
    if lse is None:
        raise ValueError("a z-loss needs the log-sum-exp lse.")
    return mass + (2 * z_loss) * lse


def ce_cotangent(p, q, mass, lse, z_loss: float) -> jax.Array:
    """``d loss / d s = (sum q + 2 c lse) p - q`` from ``p``, the targets ``q`` (any block
    of classes) and the per-row ``mass = sum q`` over the whole row."""
    return ce_cotangent_scale(mass, lse, z_loss) * p - q


def z_loss_term(lse: jax.Array, z_loss: float) -> jax.Array:
    """PaLM's auxiliary loss ``c * lse^2`` per row."""
    return z_loss * (lse * lse)


def smoothing_mass(alpha: float, count: jax.Array) -> jax.Array:
    """``k = alpha / m``: the smoothing mass each of the ``m`` valid classes receives."""
    return alpha / count


# --------------------------------------------------------------------------------------
# Log-sum-exp and the merge of partial softmax results.
# --------------------------------------------------------------------------------------


def lse_jvp(p: jax.Array, t: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    r"""``<p, t>``: the JVP of :math:`\log\sum_k e^{z_k}`, whose gradient is ``p = softmax(z)``."""
    return _dot(p, t, axes)


def lse_vjp(p: jax.Array, g: jax.Array) -> jax.Array:
    """``g * p``: the log-sum-exp VJP for a per-row cotangent ``g`` (size-1 softmax axes)."""
    return p * g


def merge_jvp(
    w: jax.Array,
    o: jax.Array,
    value: jax.Array,
    o_dot: jax.Array,
    lse_dot: jax.Array,
    axes: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    r"""Tangents of the merge of partial results over the pieces axis ``axes``.

    For pieces :math:`k` with log-sum-exp :math:`\ell_k` and results :math:`o_k`, the
    merge is :math:`\ell = \log\sum_k e^{\ell_k}` and :math:`v = \sum_k w_k o_k` with
    weights :math:`w = \mathrm{softmax}(\ell_\cdot)`, so

    .. math::
        \dot\ell = \langle w, \dot\ell_\cdot\rangle, \qquad
        \dot v = \sum_k w_k\,(\dot o_k + o_k\,\dot\ell_k) - v\,\dot\ell .

    ``w`` and ``lse_dot`` carry size-1 axes where ``o`` has its trailing (per-piece
    result) axes; ``value`` has a size-1 pieces axis. Linear in ``(o_dot, lse_dot)``,
    so JAX transposes it for reverse mode: the cotangent of :math:`\ell_k` is
    :math:`w_k(\langle \bar v, o_k - v\rangle + \bar\ell)`, the weight's softmax
    Jacobian applied to :math:`\langle \bar v, o_k\rangle`.
    """
    lse_out_dot = lse_jvp(w, lse_dot, axes)
    value_dot = _dot(w, o_dot + o * lse_dot, axes) - value * lse_out_dot
    return value_dot, lse_out_dot


# --------------------------------------------------------------------------------------
# Attention: the softmax VJP of each row of scores, its inner product from the output.
# --------------------------------------------------------------------------------------
#
# With P = softmax(S) row by row and O = P V, the cotangent dO gives dP = dO V^T and
#
#     dS_i = (diag(P_i) - P_i P_i^T) dP_i = P_i * (dP_i - <P_i, dP_i>)     (jac_product)
#
# where <P_i, dP_i> = sum_j P_ij (dO_i . V_j) = dO_i . O_i: the inner product is read from
# the output instead of being summed over the keys, so a block of keys needs nothing
# but its own P and dP. A cotangent dlse_i of the row's log-sum-exp adds P_i dlse_i
# (the log-sum-exp VJP), i.e. subtracts dlse_i from that inner product.


def attention_row_term(o: jax.Array, d_o: jax.Array, d_lse: jax.Array) -> jax.Array:
    """``D_i = <dO_i, O_i> - dlse_i``: the inner product ``<P_i, dP_i>`` of the softmax VJP
    of row ``i`` (computed from the output ``O_i``), less the cotangent of its
    log-sum-exp. ``o`` and ``d_o`` have the value axis last; the result drops it.

    A contraction (:func:`_dot`): on XLA's CPU backend in jaxlib 0.10 the reduction
    ``sum(o * d_o, axis=-1)`` over a short last axis (a head dimension of 64) runs about
    ten times slower than the same contraction.
    """
    return _dot(o, d_o, (o.ndim - 1,))[..., 0] - d_lse


def attention_score_cotangent(p: jax.Array, d_p: jax.Array, d_row: jax.Array) -> jax.Array:
    """``dS = P * (dP - D)``: :func:`jac_product` over a block of keys, the row's inner
    product ``<P, dP>`` (less ``dlse``) given as ``d_row`` (size-1 key axis) from
    :func:`attention_row_term` rather than summed over the block."""
    return jac_product(p, d_p, (-1,), dot=lambda a, b, axes: d_row)


def sink_cotangent(sink: jax.Array, lse: jax.Array, d_row: jax.Array) -> jax.Array:
    """Per row, the cotangent of a sink logit ``sink`` that joins the row's softmax
    denominator with a zero value: ``-p_sink * D`` with ``p_sink = exp(sink - lse)``
    (its probability) and ``D`` from :func:`attention_row_term`. A row with
    ``lse = -inf`` (possible only for ``sink = -inf``) gives 0."""
    empty = lse == -jnp.inf
    gap = jnp.where(empty, jnp.zeros((), lse.dtype), sink - lse)
    p_sink = jnp.where(empty, jnp.zeros((), lse.dtype), jnp.exp(gap))
    return -p_sink * d_row
