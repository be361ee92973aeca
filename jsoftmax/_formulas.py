r"""The softmax derivative formulas, each written once.

Everything here is private, unchecked and works on arrays whose softmax axes are
given as a tuple of non-negative ints (`axes`), reduced with `keepdims=True`.
The custom differentiation rules, the Jacobian builders and the structured operator
all call these functions, so a formula fixed here is fixed everywhere.

With $p = \mathrm{softmax}(z)$ and $J = \mathrm{diag}(p) - pp^\top$:

* `jac_product(p, v)`      $Jv = p \odot (v - \langle p, v\rangle)$
  (J is symmetric, so this is the JVP *and* the VJP);
* `log_jvp(p, t)`           $t - \langle p, t\rangle$
  (the log-softmax Jacobian $I - 1p^\top$ applied to `t`);
* `log_vjp(p, g)`           $g - p\,\langle 1, g\rangle$;
* `hvp(p, u, v)`            $\sum_{jk} H_{ijk} u_j v_k$;
* `dense_*`                 explicit matrices and tensors over the last axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def dot(a: jax.Array, b: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """`<a, b>` over `axes`, kept as size-1 axes.

    A contraction (`dot_general`) rather than `sum(a * b)`: when `a` is broadcast
    against a batch of directions (what `jax.jacfwd`, `jax.jacrev` and `vmap`
    build), XLA's CPU backend in jaxlib 0.10 miscompiles `v - sum(p * v)` fused with
    its consumer for many row lengths (n = 257, 513, 1000, ...), returning entries off
    by up to 2. The contraction compiles correctly and runs at the same speed. See
    `test_regression_xla_cpu_broadcast_product` in `tests/test_jacobian.py`.
    """
    if sharded_along(a, axes) or sharded_along(b, axes):
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


def sharded_along(a: jax.Array, axes: tuple[int, ...]) -> bool:
    """True when `a` carries an explicit sharding on one of `axes`."""
    spec = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
    if not spec:
        return False
    offset = a.ndim - len(spec)
    return any(
        0 <= k % a.ndim - offset < len(spec) and spec[k % a.ndim - offset] is not None for k in axes
    )


def _sum(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    return jnp.sum(a, axis=axes, keepdims=True)


def jac_product(p: jax.Array, v: jax.Array, axes: tuple[int, ...], dot=dot) -> jax.Array:
    """`J @ v` (= `v @ J`) in O(n): `p * (v - <p, v>)`.

    `dot(a, b, axes)` computes the inner product over the softmax axes; the sharded
    functions pass one that all-reduces across devices.
    """
    return p * (v - dot(p, v, axes))


def log_jvp(p: jax.Array, t: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """`(I - 1 p^T) @ t`: the log-softmax JVP."""
    return t - dot(p, t, axes)


def log_vjp(p: jax.Array, g: jax.Array, axes: tuple[int, ...], total=_sum) -> jax.Array:
    """`g @ (I - 1 p^T)`: the log-softmax VJP; `total(a, axes)` sums over the axes."""
    return g - p * total(g, axes)


def hvp(p: jax.Array, u: jax.Array, v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    r"""Second directional derivative $\sum_{jk} H_{ijk} u_j v_k$ in O(n).

    $p_i (u_i - \bar u)(v_i - \bar v) - p_i(\overline{uv} - \bar u \bar v)$ with
    $\bar a = \langle p, a\rangle$.
    """
    u_bar = dot(p, u, axes)
    v_bar = dot(p, v, axes)
    uv_bar = dot(p, u * v, axes)
    return p * ((u - u_bar) * (v - v_bar) - (uv_bar - u_bar * v_bar))


def _eye(n: int, dtype, ndim: int = 2) -> jax.Array:
    # An iota comparison, so XLA fuses the identity into the single output pass.
    # Leading unit dimensions make it rank ``ndim``: no implicit rank promotion.
    shape = (1,) * (ndim - 2) + (n, n)
    i = lax.broadcasted_iota(jnp.int32, shape, ndim - 2)
    j = lax.broadcasted_iota(jnp.int32, shape, ndim - 1)
    return (i == j).astype(dtype)


def dense_jacobian(p: jax.Array) -> jax.Array:
    """`diag(p) - p p^T` over the last axis: `[..., i, j] = p_i (delta_ij - p_j)`."""
    # p_i * (1 - p_j) on the diagonal and p_i * (-p_j) off it: a select and a multiply
    # per output in one fused pass, measurably cheaper on CPU than subtracting p_j
    # from a float identity (same values: 1 - p_j and -p_j are rounded alike).
    diagonal = _eye(p.shape[-1], jnp.bool_, p.ndim + 1)
    row = _replicated_along_last(p)[..., None, :]
    return p[..., :, None] * jnp.where(diagonal, 1 - row, -row)


def _replicated_along_last(p: jax.Array) -> jax.Array:
    """`p` with an explicitly sharded last axis gathered (every row of a dense
    Jacobian needs all of `p`); unchanged otherwise."""
    if not sharded_along(p, (p.ndim - 1,)):
        return p
    spec = jax.typeof(p).sharding.spec
    spec = tuple(spec) + (None,) * (p.ndim - len(spec))
    return jax.sharding.reshard(p, jax.sharding.PartitionSpec(*spec[:-1], None))


def dense_log_jacobian(p: jax.Array, valid: jax.Array) -> jax.Array:
    """`I - 1 p^T` over the last axis, with rows of constant (masked) outputs zeroed."""
    n = p.shape[-1]
    rows = _eye(n, p.dtype, p.ndim + 1) - _replicated_along_last(p)[..., None, :]
    return jnp.where(valid[..., :, None], rows, jnp.zeros((), p.dtype))


def dense_hessian(p: jax.Array) -> jax.Array:
    r"""`H[..., i, j, k] = d^2 p_i / dz_j dz_k` over the last axis.

    $p_i(\delta_{ij} - p_j)(\delta_{ik} - p_k) - p_i p_j(\delta_{jk} - p_k)$.
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


def softcap(z: jax.Array, cap: float, keep_neg_inf: bool = True) -> jax.Array:
    """`cap * tanh(z / cap)` (Gemma 2's logit soft-capping); `-inf` stays `-inf` (or,
    with `keep_neg_inf=False`, becomes `-cap`, where the derivative is 0 all the same).

    The `-inf` is kept by adding `min(z, lowest) - lowest`, which is 0 for a finite `z`
    and for `z = +inf` (so `+inf` becomes `cap`), `-inf` for `z = -inf` and NaN for a NaN:
    arithmetic rather than a select, so that XLA's CPU backend
    fuses the soft-cap into the reductions that read it instead of writing it out.
    """
    u = cap * jnp.tanh(z / cap)
    if not keep_neg_inf:
        return u
    lowest = jnp.asarray(jnp.finfo(z.dtype).min, z.dtype)
    return u + (jnp.minimum(z, lowest) - lowest)


def softcap_derivative(u: jax.Array, cap: float) -> jax.Array:
    """`d softcap(z) / dz = 1 - tanh(z / cap)^2`, from the capped value `u`.

    Written in terms of `u` so that the backward pass reuses the forward's `tanh`;
    0 where `|u| >= cap` (`z = ±inf`, and `u = -inf`: an excluded class) and where `u`
    is NaN, so a caller may pass the logits unmasked: a masked class or a row that does
    not count has a cotangent of 0, which stays 0 (a NaN cotangent stays NaN).
    """
    r2 = jnp.square(u / cap)
    return jnp.where(r2 < 1, 1 - r2, jnp.zeros((), u.dtype))


def ce_cotangent_scale(mass, lse: jax.Array, z_loss) -> jax.Array:
    """The factor of `p` in `d loss / d s = (sum q + 2 c lse) p - q`: `mass = sum q`
    plus the z-loss term `2 c lse` (`c` per row: the z-loss times the row's weight)."""
    return mass + (2 * z_loss) * lse


def ce_cotangent(p, q, scale) -> jax.Array:
    """`d loss / d s = scale * p - q` from `p`, the targets `q` (any block of
    classes) and the per-row factor `scale` of `ce_cotangent_scale` (`sum q`
    over the whole row without a z-loss)."""
    return scale * p - q


def z_loss_term(lse: jax.Array, z_loss) -> jax.Array:
    """PaLM's auxiliary loss `c * lse^2` per row."""
    return z_loss * (lse * lse)


def smoothing_mass(alpha, count: jax.Array) -> jax.Array:
    """`k = alpha / m`: the smoothing mass each of the `m` valid classes receives."""
    return alpha / count


# --------------------------------------------------------------------------------------
# Log-sum-exp and the merge of partial softmax results.
# --------------------------------------------------------------------------------------


def lse_jvp(p: jax.Array, t: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    r"""`<p, t>`: the JVP of $\log\sum_k e^{z_k}$, whose gradient is `p = softmax(z)`."""
    return dot(p, t, axes)


def lse_vjp(p: jax.Array, g: jax.Array) -> jax.Array:
    """`g * p`: the log-sum-exp VJP for a per-row cotangent `g` (size-1 softmax axes)."""
    return p * g


def merge_jvp(
    w: jax.Array,
    o: jax.Array,
    value: jax.Array,
    o_dot: jax.Array,
    lse_dot: jax.Array,
    axes: tuple[int, ...],
) -> tuple[jax.Array, jax.Array]:
    r"""Tangents of the merge of partial results over the pieces axis `axes`.

    For pieces $k$ with log-sum-exp $\ell_k$ and results $o_k$, the
    merge is $\ell = \log\sum_k e^{\ell_k}$ and $v = \sum_k w_k o_k$ with
    weights $w = \mathrm{softmax}(\ell_\cdot)$, so

    $$
    \dot\ell = \langle w, \dot\ell_\cdot\rangle, \qquad
    \dot v = \sum_k w_k\,(\dot o_k + o_k\,\dot\ell_k) - v\,\dot\ell .
    $$

    `w` and `lse_dot` carry size-1 axes where `o` has its trailing (per-piece
    result) axes; `value` has a size-1 pieces axis. Linear in `(o_dot, lse_dot)`,
    so JAX transposes it for reverse mode: the cotangent of $\ell_k$ is
    $w_k(\langle \bar v, o_k - v\rangle + \bar\ell)$, the weight's softmax
    Jacobian applied to $\langle \bar v, o_k\rangle$.
    r"""
    lse_out_dot = lse_jvp(w, lse_dot, axes)
    value_dot = dot(w, o_dot + o * lse_dot, axes) - value * lse_out_dot
    return value_dot, lse_out_dot


# --------------------------------------------------------------------------------------
# Post-training: token log-probabilities, entropy, and the distillation divergences.
# --------------------------------------------------------------------------------------


def log_prob_cotangent(p, onehot, g):
    r"""$\partial(g\log p_y)/\partial s = g\,(e_y - p)$ (the cross-entropy's $p - q$,
    negated, with the one-hot target)."""
    return g * (jnp.where(onehot, jnp.ones((), p.dtype), jnp.zeros((), p.dtype)) - p)


def entropy_cotangent(p, s_centred, g):
    r"""$\partial(g H)/\partial s = -g\,p \odot (s - E_p[s])$ for the entropy
    $H = \mathrm{lse} - \langle p, s\rangle$; `s_centred` is $s - E_p[s]$."""
    return -g * p * s_centred


def _xlogy_ratio(p, log_a, log_b):
    r"""$p(\log a - \log b)$ with $0 \log 0 = 0$ (double where: finite derivatives)."""
    live = p > 0
    zero = jnp.zeros((), p.dtype)
    diff = jnp.where(live, log_a, zero) - jnp.where(live, log_b, zero)
    return jnp.where(live, p * diff, zero)


def _log_mixture(p_s, p_t, beta: float):
    r"""$\log m$ with $m = \beta p_t + (1 - \beta) p_s$ (0 where $m = 0$: only products with
    $p = 0$ read it)."""
    m = beta * p_t + (1 - beta) * p_s
    live = m > 0
    return jnp.where(live, jnp.log(jnp.where(live, m, jnp.ones((), m.dtype))), 0.0), m


def divergence_terms(log_ps, log_pt, beta: float):
    r"""`(terms, kl_s)` per class of the generalised Jensen-Shannon divergence (TRL's GKD
    convention): summed over the classes, `terms` is $\mathrm{KL}(p_t\|p_s)$ for
    $\beta = 0$, $\mathrm{KL}(p_s\|p_t)$ for $\beta = 1$, and
    $\beta\,\mathrm{KL}(p_t\|m) + (1-\beta)\,\mathrm{KL}(p_s\|m)$ otherwise, with
    $m = \beta p_t + (1-\beta) p_s$. `kl_s` sums to the per-row number the cotangent
    needs ($\mathrm{KL}(p_s\|p_t)$ for $\beta = 1$, $\mathrm{KL}(p_s\|m)$ for
    $0 < \beta < 1$; None for $\beta = 0$). Classes with $p = 0$ add 0."""
    p_s, p_t = jnp.exp(log_ps), jnp.exp(log_pt)
    if beta == 0:
        return _xlogy_ratio(p_t, log_pt, log_ps), None
    if beta == 1:
        terms = _xlogy_ratio(p_s, log_ps, log_pt)
        return terms, terms
    log_m, m = _log_mixture(p_s, p_t, beta)
    # beta p_t (log p_t - log m) + (1 - beta) p_s (log p_s - log m)
    #   = beta p_t log p_t + (1 - beta) p_s log p_s - m log m   (m = beta p_t + (1 - beta) p_s)
    kl_s = _xlogy_ratio(p_s, log_ps, log_m)
    zero = jnp.zeros((), p_s.dtype)
    plogp = lambda p, log_p: jnp.where(p > 0, p * jnp.where(p > 0, log_p, zero), zero)  # noqa: E731
    terms = beta * plogp(p_t, log_pt) + (1 - beta) * plogp(p_s, log_ps) - m * log_m
    return terms, kl_s


def divergence_cotangent(log_ps, log_pt, kl_s, beta: float):
    r"""$\partial D/\partial s$ (the student's scaled logits $s$, before the
    temperature's $1/T$): $p_s - p_t$ for $\beta = 0$,
    $p_s \odot (\log p_s - \log p_t - \mathrm{KL}(p_s\|p_t))$ for $\beta = 1$, and
    $(1-\beta)\,p_s \odot (\log(p_s/m) - \mathrm{KL}(p_s\|m))$ otherwise: the softmax
    VJP of $\partial D/\partial p_s = (1-\beta)\log(p_s/m)$. `kl_s` is the row's sum of
    `divergence_terms`' second output."""
    p_s = jnp.exp(log_ps)
    if beta == 0:
        return p_s - jnp.exp(log_pt)
    zero = jnp.zeros((), p_s.dtype)
    live = p_s > 0
    if beta == 1:
        g_p = jnp.where(live, log_ps, zero) - jnp.where(live, log_pt, zero)
        return jnp.where(live, p_s * (g_p - kl_s), zero)
    log_m, _ = _log_mixture(p_s, jnp.exp(log_pt), beta)
    g_p = jnp.where(live, log_ps, zero) - jnp.where(live, log_m, zero)
    return jnp.where(live, (1 - beta) * p_s * (g_p - kl_s), zero)


def kl_from_cross(cross, total_a, lse_a, lse_b, temperature=None):
    r"""$\mathrm{KL}(p_a \| p_b)$ from one pass's row numbers: with
    $p = \mathrm{softmax}(\cdot / T)$ of logits $a$ and $b$ over the same classes,
    $\mathrm{KL} = \langle p_a, a - b\rangle / T - \mathrm{lse}_a + \mathrm{lse}_b$, where
    `cross` $= \sum_i e^{(a_i - M)/T}(a_i - b_i)$ and `total_a` $= \sum_i e^{(a_i - M)/T}$
    (the same shift $M$), and the log-sum-exps are of $a/T$ and $b/T$. A row where
    $p_a$ has no mass gives 0."""
    empty = total_a == 0
    mean = cross / jnp.where(empty, jnp.ones((), total_a.dtype), total_a)
    if temperature is not None:
        mean = mean / temperature
    kl = mean - lse_a + lse_b
    return jnp.where(empty, jnp.zeros((), kl.dtype), kl)


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
    """`D_i = <dO_i, O_i> - dlse_i`: the inner product `<P_i, dP_i>` of the softmax VJP
    of row `i` (computed from the output `O_i`), less the cotangent of its
    log-sum-exp. `o` and `d_o` have the value axis last; the result drops it.

    A contraction (`dot`): on XLA's CPU backend in jaxlib 0.10 the reduction
    `sum(o * d_o, axis=-1)` over a short last axis (a head dimension of 64) runs about
    ten times slower than the same contraction.
    """
    return dot(o, d_o, (o.ndim - 1,))[..., 0] - d_lse


def attention_score_cotangent(p: jax.Array, d_p: jax.Array, d_row: jax.Array) -> jax.Array:
    """`dS = P * (dP - D)`: `jac_product` over a block of keys, the row's inner
    product `<P, dP>` (less `dlse`) given as `d_row` (size-1 key axis) from
    `attention_row_term` rather than summed over the block."""
    return jac_product(p, d_p, (-1,), dot=lambda a, b, axes: d_row)


def sink_cotangent(sink: jax.Array, lse: jax.Array, d_row: jax.Array) -> jax.Array:
    """Per row, the cotangent of a sink logit `sink` that joins the row's softmax
    denominator with a zero value: `-p_sink * D` with `p_sink = exp(sink - lse)`
    (its probability) and `D` from `attention_row_term`. A row with
    `lse = -inf` (possible only for `sink = -inf`) gives 0."""
    empty = lse == -jnp.inf
    gap = jnp.where(empty, jnp.zeros((), lse.dtype), sink - lse)
    p_sink = jnp.where(empty, jnp.zeros((), lse.dtype), jnp.exp(gap))
    return -p_sink * d_row
