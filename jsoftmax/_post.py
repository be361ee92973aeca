r"""Post-training losses on dense logits: token log-probabilities with the entropy, and
the distillation divergences.

Both are per-row kernels of [`jsoftmax._kernel`][jsoftmax._kernel] with lean
`jax.custom_vjp` rules: the forward pass reduces each row to a few numbers (the row
maximum, the sum of exponentials, the label's logit, the softmax mean of the logits),
the backward pass recomputes the probabilities from the logits and those numbers. The
derivative formulas are [`jsoftmax._formulas`][jsoftmax._formulas]'
`log_prob_cotangent`, `entropy_cotangent` and `divergence_cotangent`, shared with the
fused and sharded versions.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _custom, _formulas, _kernel, _merge, _pass

# --------------------------------------------------------------------------------------
# Shared checks.
# --------------------------------------------------------------------------------------


def check_beta(beta) -> float:
    """`beta` in [0, 1], a Python number (it selects the formula)."""
    if isinstance(beta, (bool, np.bool_)) or not isinstance(
        beta, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"beta must be a Python number in [0, 1], got {beta!r}.")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}.")
    return float(beta)


def check_static_temperature(temperature) -> float | None:
    """A positive, finite Python number (None for 1)."""
    if temperature is None:
        return None
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(
        temperature, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"temperature must be a positive Python number, got {temperature!r}.")
    t = float(temperature)
    if not (t > 0 and np.isfinite(t)):
        raise ValueError(f"temperature must be positive and finite, got {temperature!r}.")
    return None if t == 1.0 else t


def check_row_mask(where, batch: tuple[int, ...]):
    """A boolean per-row mask broadcastable to the batch shape (None: every row)."""
    if where is None:
        return None
    where = _checks.as_bool_mask(_checks.as_array(where, "where"))
    if not _checks.broadcasts_to(where.shape, batch):
        raise ValueError(
            f"where of shape {where.shape} must be a per-row mask broadcastable to the "
            f"batch shape {batch}."
        )
    return jnp.broadcast_to(where, batch)


def _temperature_array(t, cdt):
    return None if t is None else jnp.asarray(t, cdt)


# --------------------------------------------------------------------------------------
# token_log_probs
# --------------------------------------------------------------------------------------


def _capped(logits, cap, cdt):
    z = logits.astype(cdt)
    return z if cap is None else _formulas.softcap(z, cap)


def _lp_forward(logits, labels, where, temperature, row_ok, axis, cap, with_entropy):
    cdt = _checks.accumulation_dtype(logits.dtype)
    # Without a soft-cap the pass takes the logits as they are (a 16-bit row maximum).
    u = logits if cap is None else _capped(logits, cap, cdt)
    fp = _pass.exp_pass(u, where, (axis,), temperature, dtype=cdt)
    n = logits.shape[axis]
    idx, in_range = _kernel.label_index(labels, n, axis)
    pick = lambda a: jnp.take_along_axis(a, idx, axis=axis)  # noqa: E731
    label = pick(u).astype(cdt)
    if where is not None:
        label = jnp.where(pick(where), label, -jnp.inf)
    entropy = "fused" if with_entropy else False
    st = _kernel.piece_stats(fp, (axis,), entropy=entropy)._replace(label=label)
    lp, excluded = _kernel.log_prob(st, temperature)
    lp = jnp.where(in_range, lp, jnp.full((), jnp.nan, cdt))
    ok = None if row_ok is None else jnp.expand_dims(row_ok, axis)
    outs = [_kernel.mask_rows(lp, ok)]
    if with_entropy:
        outs.append(_kernel.mask_rows(_kernel.entropy(st, temperature), ok))
    # A label on an excluded class: log p_y = -inf is a constant (zero gradient).
    constant = excluded & in_range
    return tuple(jnp.squeeze(o, axis) for o in outs), (fp.m, fp.total, st.ent, ok, constant)


@partial(_custom.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lp_kernel(logits, labels, where, temperature, row_ok, axis, cap, with_entropy):
    args = (logits, labels, where, temperature, row_ok, axis, cap, with_entropy)
    return _lp_forward(*args)[0]


def _lp_fwd(logits, labels, where, temperature, row_ok, axis, cap, with_entropy):
    args = (logits, labels, where, temperature, row_ok, axis, cap, with_entropy)
    out, stats = _lp_forward(*args)
    return out, (logits, labels, where, temperature, stats)


def _lp_bwd(axis, cap, with_entropy, residuals, g):
    logits, labels, where, temperature, (m, total, ent, ok, constant) = residuals
    cdt = m.dtype
    u = _capped(lax.optimization_barrier(logits) if cap is not None else logits, cap, cdt)
    masked = u if where is None else jnp.where(where, u, -jnp.inf)
    row = _kernel.Row(m, _merge.log_total(total), None, None, None)
    p = _kernel.probs(masked, row, temperature)
    n = logits.shape[axis]
    idx, in_range = _kernel.label_index(labels, n, axis)
    onehot = lax.broadcasted_iota(idx.dtype, logits.shape, axis) == idx
    g_lp = jnp.where(constant, jnp.zeros((), cdt), jnp.expand_dims(g[0].astype(cdt), axis))
    g_s = _formulas.log_prob_cotangent(p, onehot, g_lp)
    g_s = jnp.where(in_range, g_s, jnp.full((), jnp.nan, cdt))
    if with_entropy:
        st = _kernel.RowStats(m, total, ent=ent)
        centred = _pass.shifted(masked, m, None) - _kernel.mean_gap(st)
        centred = centred if temperature is None else centred / temperature.astype(cdt)
        g_h = jnp.expand_dims(g[1].astype(cdt), axis)
        g_s = g_s + _formulas.entropy_cotangent(p, jnp.where(p > 0, centred, 0), g_h)
    g_s = _kernel.mask_rows(g_s, ok)
    valid = masked > -jnp.inf
    flags = _kernel.Flags(axis, softcap=cap)
    g_z, _ = _kernel.chain_to_logits(g_s, u, valid, (axis,), flags, None)
    if temperature is not None:
        g_z = g_z / temperature.astype(cdt)
    return g_z.astype(logits.dtype), None, None, None, None


_lp_kernel.defvjp(_lp_fwd, _lp_bwd)


def token_log_probs(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    temperature: ArrayLike | None = None,
    logit_softcap: float | None = None,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""The log-probability of each row's label, and optionally the row's entropy.

    With $s = \mathrm{softcap}(z)/T$ over `axis` and $p = \mathrm{softmax}(s)$:

    $$
    \log p_y = s_y - \mathrm{lse}(s), \qquad
    H = -\sum_i p_i \log p_i = \mathrm{lse}(s) - \langle p, s\rangle,
    $$

    $$
    \frac{\partial \log p_y}{\partial s} = e_y - p, \qquad
    \frac{\partial H}{\partial s} = -p \odot (s - \langle p, s\rangle).
    $$

    What reinforcement learning on language models (PPO, GRPO) needs of the policy and
    reference models: the log-probability of each sampled token, and the entropy. A
    `jax.custom_vjp` keeps the logits and three numbers per row (no other array of the
    logits' size); gradients flow through both outputs. For logits that come from an
    output layer, [`linear_token_log_probs`][jsoftmax.linear_token_log_probs] never
    builds them.

    Args:
      logits: any rank >= 1; 16-bit logits are computed in float32.
      labels: integer class indices (the sampled tokens), the batch shape
        (`logits.shape` without `axis`).
      axis: the class axis.
      where: optional boolean mask, by [`cross_entropy`][jsoftmax.cross_entropy]'s rule:
        with fewer dimensions than the logits, per row (masked rows, e.g. padding, give
        0 and zero gradients); with their rank, a class mask.
      temperature: None (1), a positive number, or an array broadcastable to the batch
        shape: the sampling temperature. Not differentiated.
      logit_softcap: None or $\kappa > 0$: $z \mapsto \kappa\tanh(z/\kappa)$ first.
      return_entropy: also return $H$ per row.

    Returns:
      The log-probabilities (batch shape), and with `return_entropy` the pair
      `(log_probs, entropy)`; float32 for 16-bit logits, else the logits' dtype.

    Note:
      * A log-probability is never above 0 (the label's logit is compared with the row
        maximum read from the same values); the entropy is never below 0.
      * A label on an excluded class (masked, or a $-\infty$ logit) gives $-\infty$,
        with zero gradients. Out-of-range labels in counted rows raise `IndexError` when
        concrete, and give NaN under `jax.jit`.
      * NaN logits in a counted row give NaN, and so do $+\infty$ logits without
        `logit_softcap` (which maps them to $\kappa$).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jsoftmax
      >>> z = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
      >>> lp, h = jsoftmax.token_log_probs(z, jnp.array([0, 2]), return_entropy=True)
      >>> with jnp.printoptions(precision=4):
      ...     print(lp, h)
      [-0.4076 -1.0986] [0.8324 1.0986]
    """
    logits = _checks.as_float_array(logits, "logits")
    ax = _checks.canonical_axis(axis, logits.ndim)
    labels = _checks.as_array(labels, "labels")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    labels = _checks.check_labels(labels, logits.shape, ax, None)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}.")
    opts = _checks.loss_options(logit_softcap=logit_softcap)
    where, example_mask = _checks.split_where(where, logits.shape, (ax,))
    t = _checks.prepare_temperature(
        1.0 if temperature is None else temperature, logits.shape, (ax,)
    )
    t = None if t is None else lax.stop_gradient(t)
    n = logits.shape[ax]
    cdt = _checks.accumulation_dtype(logits.dtype)
    if n == 0 or logits.size == 0:
        batch = tuple(s for k, s in enumerate(logits.shape) if k != ax)
        zeros = jnp.zeros(batch, cdt)
        return (zeros, zeros) if return_entropy else zeros
    _checks.check_label_range(labels, n, None, counted=example_mask)
    out = _lp_kernel(logits, labels, where, t, example_mask, ax, opts.logit_softcap, return_entropy)
    return (out[0], out[1]) if return_entropy else out[0]


# --------------------------------------------------------------------------------------
# kl_divergence
# --------------------------------------------------------------------------------------


def _log_probs(logits, where, axis, t, cdt):
    """`(log p, m, total)` of `logits / t` over `axis` (-inf off the valid classes)."""
    fp = _pass.exp_pass(logits, where, (axis,), t, dtype=cdt)
    return fp.d - _merge.log_total(fp.total), fp.m, fp.total


def _kl_forward(logits, teacher, where, row_ok, axis, beta, t):
    cdt = _checks.accumulation_dtype(jnp.promote_types(logits.dtype, teacher.dtype))
    tt = _temperature_array(t, cdt)
    log_ps, m_s, total_s = _log_probs(logits, where, axis, tt, cdt)
    log_pt, m_t, total_t = _log_probs(lax.stop_gradient(teacher), where, axis, tt, cdt)
    terms, kl_s = _formulas.divergence_terms(log_ps, log_pt, beta)
    if beta in (0.0, 1.0):
        value = jnp.sum(terms, axis=axis, keepdims=True)
        kl_s = None if kl_s is None else value
    else:
        # Both sums of the mixture's terms in one reduction, which XLA:CPU fuses with
        # the terms (as two sums, one more logits-sized array was written out).
        assert kl_s is not None
        sums = _pass.fused_sums((axis,), value=terms, kl_s=kl_s)
        value, kl_s = sums["value"], sums["kl_s"]
    ok = None if row_ok is None else jnp.expand_dims(row_ok, axis)
    # Both rows' statistics: the backward pass reads the teacher's too.
    stats = (m_s, total_s, m_t, total_t, kl_s, ok)
    return jnp.squeeze(_kernel.mask_rows(value, ok), axis), stats


@partial(_custom.custom_vjp, nondiff_argnums=(4, 5, 6))
def _kl_kernel(logits, teacher, where, row_ok, axis, beta, t):
    return _kl_forward(logits, teacher, where, row_ok, axis, beta, t)[0]


def _kl_fwd(logits, teacher, where, row_ok, axis, beta, t):
    out, stats = _kl_forward(logits, teacher, where, row_ok, axis, beta, t)
    return out, (logits, teacher, where, stats)


def _kl_bwd(axis, beta, t, residuals, g):
    logits, teacher, where, (m_s, total_s, m_t, total_t, kl_s, ok) = residuals
    cdt = m_s.dtype
    tt = _temperature_array(t, cdt)

    def log_probs(z, m, total):
        u = z.astype(cdt)
        masked = u if where is None else jnp.where(where, u, -jnp.inf)
        return _pass.shifted(masked, m, tt) - _merge.log_total(total)

    log_ps, log_pt = log_probs(logits, m_s, total_s), log_probs(teacher, m_t, total_t)
    g_s = _formulas.divergence_cotangent(log_ps, log_pt, kl_s, beta)
    g_s = _kernel.mask_rows(g_s * jnp.expand_dims(g.astype(cdt), axis), ok)
    if tt is not None:
        g_s = g_s / tt
    return g_s.astype(logits.dtype), None, None, None


_kl_kernel.defvjp(_kl_fwd, _kl_bwd)


def kl_rows(logits, teacher, row_ok, beta: float, t):
    """The divergence of whole rows (axis 1, in the accumulation dtype) and its
    cotangent with respect to `logits` for a unit cotangent per row (0 where `row_ok`,
    `(rows, 1)`, is False): the formulas of `kl_divergence` on the log-probabilities
    computed once, for a loop over chunks of rows that forms the gradient in its forward
    pass (`jsoftmax.linear_kl_divergence` with a reduction)."""
    cdt = logits.dtype
    tt = _temperature_array(t, cdt)
    log_ps, _, _ = _log_probs(logits, None, 1, tt, cdt)
    log_pt, _, _ = _log_probs(teacher, None, 1, tt, cdt)
    terms, kl_s = _formulas.divergence_terms(log_ps, log_pt, beta)
    kl_s = None if kl_s is None else jnp.sum(kl_s, axis=1, keepdims=True)
    g_s = _kernel.mask_rows(_formulas.divergence_cotangent(log_ps, log_pt, kl_s, beta), row_ok)
    value = _kernel.mask_rows(jnp.sum(terms, axis=1), row_ok[:, 0])
    return value, g_s if tt is None else g_s / tt


def kl_divergence(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    axis: int = -1,
    beta: float = 0.0,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""The distillation divergence between a student's and a teacher's softmax, per row.

    The generalised Jensen-Shannon divergence with TRL's GKD convention. With
    $p_s = \mathrm{softmax}(z_s / T)$ (the student, `logits`) and
    $p_t = \mathrm{softmax}(z_t / T)$ (the teacher):

    $$
    D_\beta = \begin{cases}
    \mathrm{KL}(p_t \| p_s) & \beta = 0 \text{ (forward KL, classic distillation)}\\
    \mathrm{KL}(p_s \| p_t) & \beta = 1 \text{ (reverse KL)}\\
    \beta\,\mathrm{KL}(p_t\|m) + (1-\beta)\,\mathrm{KL}(p_s\|m), \ \
    m = \beta p_t + (1-\beta) p_s & 0 < \beta < 1.
    \end{cases}
    $$

    Its gradient in the student's logits is the softmax VJP of
    $\partial D/\partial p_s$, divided by $T$: $(p_s - p_t)/T$ for $\beta = 0$,
    $p_s\odot(\log(p_s/p_t) - \mathrm{KL}(p_s\|p_t))/T$ for $\beta = 1$ and
    $(1-\beta)\,p_s\odot(\log(p_s/m) - \mathrm{KL}(p_s\|m))/T$ otherwise. No factor
    $T^2$ is applied (multiply the result by $T^2$ for Hinton's scaling).

    Args:
      logits: the student's logits, any rank >= 1.
      teacher_logits: the teacher's logits, the same shape. A constant: no gradient
        flows to it.
      axis: the class axis.
      beta: $\beta \in [0, 1]$, a Python number.
      temperature: $T > 0$, a Python number, for both softmaxes.
      where: optional boolean mask by [`cross_entropy`][jsoftmax.cross_entropy]'s rule:
        per row with fewer dimensions than the logits (masked rows give 0 and zero
        gradients), a class mask (for both models) with their rank.

    Returns:
      The divergence per row (the batch shape), float32 for 16-bit logits.

    Note:
      * Classes where a probability is 0 add 0 ($0 \log 0 = 0$). Where the teacher
        gives a class probability 0 and the student does not, the reverse KL
        ($\beta = 1$) is $+\infty$, as its definition says.
      * For logits that come from output layers,
        [`linear_kl_divergence`][jsoftmax.linear_kl_divergence] never builds them.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> s = jnp.array([[2.0, 1.0, 0.0]])
      >>> t = jnp.array([[0.0, 1.0, 2.0]])
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.kl_divergence(s, t), jsoftmax.kl_divergence(s, t, beta=0.5))
      [1.1504] [0.2476]
    """
    logits = _checks.as_float_array(logits, "logits")
    teacher = _checks.as_float_array(teacher_logits, "teacher_logits")
    if teacher.shape != logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of logits {logits.shape}, got {teacher.shape}."
        )
    ax = _checks.canonical_axis(axis, logits.ndim)
    beta = check_beta(beta)
    t = check_static_temperature(temperature)
    where, example_mask = _checks.split_where(where, logits.shape, (ax,))
    if logits.size == 0:
        batch = tuple(s for k, s in enumerate(logits.shape) if k != ax)
        return jnp.zeros(batch, _checks.accumulation_dtype(logits.dtype))
    return _kl_kernel(logits, teacher, where, example_mask, ax, beta, t)
