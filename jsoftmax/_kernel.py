r"""The per-row statistics → loss kernel of every cross-entropy of jsoftmax.

A loss row is a softmax over classes that may come in **pieces**: the whole row at once
(`cross_entropy`), chunks of a vocabulary visited by a `lax.scan`
(`linear_cross_entropy`), or the blocks held by the devices of a mesh axis
(`jsoftmax.sharded`), or chunks on each device. Every piece is reduced to the same
per-row statistics ([`RowStats`][jsoftmax._kernel.RowStats]); pieces are merged by one
rule whose reductions are passed in ([`merge`][jsoftmax._kernel.merge]: a pair of
pieces in a scan, `lax.pmax`/`lax.psum` over a mesh axis); the loss and its cotangent
are functions of the merged statistics and of the piece's own logits. Every option of
the losses is defined here, once.

With $u = \mathrm{softcap}(z)$, $s = u / T$, the valid classes (not masked, not
$-\infty$), class weights $w$ (1 by default), label smoothing $\alpha$ over the $m$
valid classes, z-loss coefficient $c$ and the row's weight $b$ ($w_y$ for an integer
label $y$, 1 for probability labels), each row's loss is

$$
\ell = \sum_i q_i\,(\mathrm{lse} - s_i) + c\,b\,\mathrm{lse}^2, \qquad
\frac{\partial\ell}{\partial s} = \Bigl(\sum_i q_i + 2c\,b\,\mathrm{lse}\Bigr)\,p - q,
$$

with $q = (1-\alpha)\,b\,e_y + \frac{\alpha}{m}\,w$ (integer labels) or
$q = w\odot\bigl((1-\alpha)\,y + \frac{\alpha}{m}\bigr)$ (probability labels), both
zero off the valid classes.

Numerics. A piece's statistics are taken relative to its own row maximum $M$ of $u$
(in $u$'s units): $t = \sum \exp((u - M)/T)$, the label's raw $u_y$, and the centred
sums $\sum w (u - M)$, $\sum w y (u - M)$. The label's logit comes from the same
array as the maximum, so $u_y - M \le 0$ exactly and $-\log p_y = \log t - (u_y -
M)/T \ge 0$: no cross-entropy is ever negative. A piece without valid classes has
$t = 0$ and $M$ the lowest finite value; every select on emptiness is doubled, so
derivatives stay finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoftmax import _checks, _formulas, _merge, _pass

# --------------------------------------------------------------------------------------
# The static flags and dynamic coefficients of a loss.
# --------------------------------------------------------------------------------------


class Flags(NamedTuple):
    """The static part of a loss's options (hashable: a `nondiff_argnum`)."""

    axis: int
    smoothing: bool = False  # label smoothing on (its coefficient may be traced)
    z_loss: bool = False  # z-loss on (its coefficient may be traced)
    softcap: float | None = None


class Coefs(NamedTuple):
    r"""The dynamic coefficients: label smoothing $\\alpha$ and z-loss $c$ (None: off)."""

    alpha: jax.Array | float | None = None
    z_loss: jax.Array | float | None = None


def flags_and_coefs(opts: _checks.LossOptions, axis: int) -> tuple[Flags, Coefs]:
    """The kernel's static flags and dynamic coefficients of checked loss options."""
    flags = Flags(
        axis, opts.label_smoothing is not None, opts.z_loss is not None, opts.logit_softcap
    )
    coefs = jax.tree.map(lax.stop_gradient, Coefs(opts.label_smoothing, opts.z_loss))
    return flags, coefs


def coefs_as(coefs: Coefs, dtype) -> Coefs:
    """`coefs` in `dtype` (Python numbers and traced scalars alike)."""
    cast = lambda a: None if a is None else jnp.asarray(a).astype(dtype)  # noqa: E731
    return Coefs(cast(coefs.alpha), cast(coefs.z_loss))


def is_integer(labels) -> bool:
    """Integer class indices (else probability labels)."""
    return bool(jnp.issubdtype(labels.dtype, jnp.integer))


def label_index(labels, n: int, axis: int):
    """`(clipped index, in_range)` of integer labels for `n` classes, both with a size-1
    class axis at `axis`: the index to gather with and whether the label names a class."""
    idx = jnp.expand_dims(labels.astype(jnp.result_type(int)), axis)
    return jnp.clip(idx, 0, n - 1), (idx >= 0) & (idx < n)


def loss_dtype(logits, labels) -> np.dtype:
    """The dtype a loss is computed and returned in: float32 for 16-bit logits (a
    bfloat16 loss would be quantised), else the logits' dtype, promoted with float
    labels."""
    cdt = _checks.accumulation_dtype(logits.dtype)
    if not is_integer(labels):
        cdt = jnp.promote_types(cdt, _checks.accumulation_dtype(labels.dtype))
    return np.dtype(cdt)


def class_weights(weights, ndim: int, axis: int, cdt):
    """Per-class weights `(n,)` shaped to broadcast against logits of rank `ndim` with
    the class axis `axis` (None stays None: unit weights)."""
    if weights is None:
        return None
    shape = [1] * ndim
    shape[axis] = weights.shape[0]
    return weights.astype(cdt).reshape(shape)


# --------------------------------------------------------------------------------------
# The pass over a loss's logits.
# --------------------------------------------------------------------------------------


def logits_pass(logits, valid, temperature, flags: Flags, cdt) -> _pass.Pass:
    """`exp_pass` of the (soft-capped) logits along `flags.axis`, in `cdt`. The row
    maximum of `softcap(z)` comes from the maximum of `z` (the soft-cap is increasing):
    one `tanh` per row, not per entry, before the reduction."""
    axes = (flags.axis,)
    if flags.softcap is None:
        return _pass.exp_pass(logits, valid, axes, temperature, dtype=cdt)
    z = logits.astype(cdt)
    z_max = _pass.row_max_of(z if valid is None else jnp.where(valid, z, -jnp.inf), axes)
    m = lax.stop_gradient(_formulas.softcap(z_max, flags.softcap))
    u = _formulas.softcap(z, flags.softcap)
    return _pass.exp_pass(u, valid, axes, temperature, row_max=lambda _: m)


def logits_u(logits, valid, flags: Flags, cdt) -> jax.Array:
    """`logits_pass(logits, valid, ...).u` computed again (the (soft-capped) logits in
    `cdt`, `-inf` where not valid): for a branch that must not read the pass's `u`, and
    for the backward pass, which writes it as the forward pass does."""
    u = logits.astype(cdt)
    u = u if flags.softcap is None else _formulas.softcap(u, flags.softcap)
    return u if valid is None else jnp.where(valid, u, -jnp.inf)


# --------------------------------------------------------------------------------------
# Row statistics of a piece, and the merge of pieces.
# --------------------------------------------------------------------------------------


class RowStats(NamedTuple):
    """Per-row statistics of a piece of a loss row, relative to its maximum `m` (of `u`).

    Fields other than `m` and `total` are None when the loss does not need them; all
    but `m` add up over pieces once expressed against a common maximum (`recentre`).
    """

    m: jax.Array  # row maximum of u
    total: jax.Array  # sum_valid exp((u - m) / T)
    label: jax.Array | None = None  # u at the integer label (0 off the piece; -inf: excluded)
    w_y: jax.Array | None = None  # the label's class weight (0 off the piece)
    count: jax.Array | None = None  # number of valid classes
    wsum: jax.Array | None = None  # sum_valid w
    centred: jax.Array | None = None  # sum_valid w (u - m)
    mass: jax.Array | None = None  # probability labels: sum_valid w y
    cross: jax.Array | None = None  # probability labels: sum_valid w y (u - m)
    ent: jax.Array | None = None  # entropy: sum_valid exp((u - m) / T) (u - m)


def _sum(a, axes):
    return jnp.sum(a, axis=axes, keepdims=True)


def _smoothing_sums(fp: _pass.Pass, axes, w, source, has_mask: bool) -> dict:
    """The smoothing statistics of a piece: the number of valid classes `count`, their
    weight `wsum` (with class weights) and `centred` $= \\sum_{valid} w_i (u_i - m)$.

    XLA's CPU backend writes a logits-sized array for a sum of a compare or select but
    fuses plain arithmetic into it, so the sums are first taken over every class without
    a mask (one fused pass); only when some row has a non-finite result (a masked or
    $-\\infty$ entry) does a `lax.cond` take the masked sums instead, as one variadic
    reduction, into which that backend fuses the compare and the selects too.
    `source()`, if given, computes `fp.u` again inside that branch from the raw logits:
    a branch's operands are buffers, and `fp.u` taken as one would be written out. With
    `has_mask` (a `where` mask: the plain sums would hardly ever be finite) the masked
    sums are taken without the plain ones.
    """
    dtype = fp.u.dtype

    def masked(m):
        # Computed here, from the raw logits, so that nothing logits-sized is written
        # (one variadic reduction).
        u = fp.u if source is None else source()
        zero = jnp.zeros((), dtype)
        valid = u > -jnp.inf
        gap = jnp.where(valid, u - m, zero)
        terms = dict(count=valid.astype(dtype), centred=gap)
        if w is not None:
            w_valid = jnp.where(valid, w.astype(dtype), zero)
            terms.update(wsum=w_valid, centred=w_valid * gap)
        return _pass.fused_sums(axes, **terms)

    if has_mask:
        return masked(fp.m)
    ones_shape = fp.m.shape
    n = 1
    for a in axes:
        n *= fp.u.shape[a]
    # sum w (u - m) as sum w u - (sum w) m: written with u - m, XLA would share it with
    # the exponential's pass and write it out.
    if w is None:
        plain_centred = _sum(fp.u, axes) - n * fp.m
        w_total = None
    else:
        w_total = jnp.broadcast_to(jnp.sum(w, axis=axes, keepdims=True), ones_shape).astype(dtype)
        plain_centred = _sum(w * fp.u, axes) - w_total * fp.m
    # `0 * plain_centred` (0 where this branch is taken) gives the constants the same
    # sharding and device variance as the masked branch's sums.
    like = 0 * plain_centred
    plain = dict(count=n + like, centred=plain_centred)
    if w_total is not None:
        plain["wsum"] = w_total + like

    return lax.cond(jnp.all(jnp.isfinite(plain_centred)), lambda _: plain, masked, fp.m)


def piece_stats(
    fp: _pass.Pass,
    axes: tuple[int, ...],
    *,
    pick: Callable[[jax.Array], jax.Array] | None = None,
    w=None,
    y=None,
    smoothing: bool = False,
    entropy: bool | Literal["fused"] = False,
    label: jax.Array | None = None,
    source: Callable[[], jax.Array] | None = None,
    has_mask: bool = False,
) -> RowStats:
    """The statistics of one piece from its pass `fp`.

    `pick(a)` gives `a` at the integer label (keepdims; 0 on a piece without the label),
    for integer labels (`label`, when given, is `pick(fp.u)` computed another way);
    `y` are probability labels (the piece's block); `w` the class
    weights broadcastable to the piece (None: 1); `source()` recomputes `fp.u` from the
    raw logits (for the smoothing sums' rare branch; None: `fp.u` is taken as it is);
    `has_mask`: the piece has a `where` mask. `entropy="fused"` takes the entropy's sum
    and the total again in one fused reduction: for a whole row, whose exponentials XLA's
    CPU backend would otherwise write out; for a chunk (written out anyway) two separate
    sums are faster.
    """
    zero = jnp.zeros((), fp.u.dtype)
    valid = fp.u > -jnp.inf
    st = RowStats(fp.m, fp.total)
    if pick is not None:
        st = st._replace(label=pick(fp.u) if label is None else label)
        if w is not None:
            st = st._replace(w_y=pick(jnp.broadcast_to(w, fp.u.shape)))
    gap = jnp.where(valid, fp.u - fp.m, zero)  # dead code for XLA when unused
    if smoothing:
        st = st._replace(**_smoothing_sums(fp, axes, w, source, has_mask))
    if y is not None:
        q = y.astype(fp.u.dtype) if w is None else w * y.astype(fp.u.dtype)
        q = jnp.where(valid, jnp.broadcast_to(q, fp.u.shape), zero)
        st = st._replace(**_pass.fused_sums(axes, mass=q, cross=q * gap))
    if entropy == "fused":
        # The total again, with the entropy sum in one fused reduction: XLA:CPU writes
        # out the exponentials (and the gap) for separate sums.
        st = st._replace(**_pass.fused_sums(axes, total=fp.e, ent=fp.e * gap))
    elif entropy:
        st = st._replace(ent=_sum(fp.e * gap, axes))
    return st


def _shift(x: jax.Array, weight, gap) -> jax.Array:
    """`x + weight * gap`, 0 added where `weight` is 0 (an empty piece's gap may be -inf)."""
    return x + jnp.where(weight == 0, jnp.zeros((), x.dtype), weight * gap)


def recentre(st: RowStats, m_new, temperature=None) -> RowStats:
    """`st` expressed against the maximum `m_new >= st.m`."""
    gap = st.m - m_new
    weight = st.count if st.wsum is None else st.wsum
    return st._replace(
        m=m_new,
        total=_merge.rescale(st.m, st.total, m_new, temperature),
        centred=None if st.centred is None else _shift(st.centred, weight, gap),
        cross=None if st.cross is None else _shift(st.cross, st.mass, gap),
        # sum e (u - M) = r (sum e (u - m) + t (m - M)), r = exp((m - M) / T)
        ent=None
        if st.ent is None
        else _merge.rescale(st.m, _shift(st.ent, st.total, gap), m_new, temperature),
    )


def merge(st: RowStats, reduce_max: Callable, reduce_sum: Callable, temperature=None) -> RowStats:
    """Merges pieces: `M = reduce_max(m)`, then every other field recentred to `M` and
    reduced by one `reduce_sum` call (over devices: one `lax.psum` of all fields)."""
    m_new = lax.stop_gradient(reduce_max(lax.stop_gradient(st.m)))
    fields = recentre(st, m_new, temperature)
    summed = reduce_sum(fields[1:])  # every field but the maximum, in one reduction
    return RowStats(m_new, *summed)


def merge_pair(a: RowStats, b: RowStats, temperature=None) -> RowStats:
    """The merge of two pieces' statistics (a step of a scan over chunks)."""
    m_new = jnp.maximum(a.m, b.m)
    ra, rb = recentre(a, m_new, temperature), recentre(b, m_new, temperature)
    return jax.tree.map(jnp.add, ra, rb)._replace(m=m_new)


def merge_devices(st: RowStats, axis_name, temperature=None) -> RowStats:
    """[`merge`][jsoftmax._kernel.merge] over a mesh axis: one `pmax`, one `psum`."""
    return merge(
        st,
        lambda m: lax.pmax(m, axis_name),
        lambda tree: lax.psum(tree, axis_name),
        temperature,
    )


def empty_like(st: RowStats) -> RowStats:
    """The statistics of a piece without entries, shaped like `st` (a scan's first carry)."""
    m = jnp.full(st.m.shape, jnp.finfo(st.m.dtype).min, st.m.dtype)
    return jax.tree.map(jnp.zeros_like, st)._replace(m=m)


# --------------------------------------------------------------------------------------
# The loss of a row from its merged statistics.
# --------------------------------------------------------------------------------------


class Row(NamedTuple):
    """What the loss's cotangent needs of a merged row (all keepdims)."""

    m: jax.Array
    log_total: jax.Array  # log of the merged sum-exp (0 for a row without valid classes)
    scale: jax.Array | float | None  # the factor of p in d loss / d s (None: 1)
    onehot_q: jax.Array | float | None  # (1 - alpha) b, the target mass at the label (None: 1)
    k: jax.Array | float | None  # alpha / m, the smoothing mass of each valid class


def _over_t(a, temperature):
    return a if temperature is None else a / temperature.astype(a.dtype)


def lse_of(st: RowStats, temperature=None):
    r"""The row's log-sum-exp $M/T + \\log t$ (`-inf` for a row without valid classes)."""
    return _merge.lse_of(_over_t(st.m, temperature), st.total)


def _smoothing(st: RowStats, coefs: Coefs):
    r"""`(k, W)`: the smoothing mass $\\alpha/m$ and the valid classes' total weight."""
    assert coefs.alpha is not None and st.count is not None
    k = _formulas.smoothing_mass(coefs.alpha, jnp.maximum(st.count, 1))
    return k, st.count if st.wsum is None else st.wsum


def _z_loss(loss, scale, m, log_total, coefs: Coefs, temperature=None, b=None):
    """`loss` plus the z-loss $c\\,b\\,\\mathrm{lse}^2$, and the cotangent's scale of $p$
    with its term (`scale`, `b`: None stands for 1)."""
    assert coefs.z_loss is not None
    lse = _over_t(m, temperature) + log_total
    cb = coefs.z_loss if b is None else coefs.z_loss * b
    one = jnp.ones((), lse.dtype)
    scale = _formulas.ce_cotangent_scale(one if scale is None else scale, lse, cb)
    return loss + _formulas.z_loss_term(lse, cb), scale


def integer_loss(st: RowStats, coefs: Coefs, flags: Flags, temperature=None):
    """`(loss, excluded, row)` of integer labels from merged statistics.

    `excluded` marks rows whose label is on an excluded class (masked, `-inf` logit,
    padding): they do not count. The loss is NaN where the label is NaN-poisoned.
    """
    log_total = _merge.log_total(st.total)
    assert st.label is not None
    excluded = st.label == -jnp.inf
    # u_y <= m exactly (the same array); the minimum guards a soft-cap whose rounding
    # is not monotone. -log p_y >= 0.
    # (Selects, not jnp.minimum: at a tie the derivative must pass through whole.)
    zero = jnp.zeros((), st.m.dtype)
    gap = st.label - st.m
    gap = jnp.where(excluded | (gap > 0), zero, gap)
    nll = log_total - _over_t(gap, temperature)
    b = st.w_y
    # None stands for 1 (no class weights, no smoothing): nothing saved, nothing scaled.
    onehot_q = b
    loss = nll if b is None else b * nll
    mass = onehot_q
    k = None
    if flags.smoothing:
        assert coefs.alpha is not None and st.centred is not None
        k, wsum = _smoothing(st, coefs)
        onehot_q = (1 - coefs.alpha) * (1 if b is None else b)
        # sum_valid w_i (lse - s_i) >= 0, each term; rounding may not cancel exactly.
        smooth = wsum * log_total - _over_t(st.centred, temperature)
        smooth = jnp.where(smooth < 0, zero, smooth)
        loss = (1 - coefs.alpha) * loss + k * smooth
        mass = onehot_q + k * wsum
    scale = mass
    if flags.z_loss:
        loss, scale = _z_loss(loss, scale, st.m, log_total, coefs, temperature, b)
    return loss, excluded, Row(st.m, log_total, scale, onehot_q, k)


def prob_loss(st: RowStats, coefs: Coefs, flags: Flags, temperature=None):
    r"""`(loss, empty, row)` of probability labels from merged statistics: the loss is
    $(\\sum q)\\log t - \\sum q (u - M)/T + c\\,\\mathrm{lse}^2$, two non-negative
    terms; `empty` marks rows without valid classes (they do not count)."""
    assert st.mass is not None and st.cross is not None
    log_total = _merge.log_total(st.total)
    mass, cross, k = st.mass, st.cross, None
    if flags.smoothing:
        assert coefs.alpha is not None and st.centred is not None
        k, wsum = _smoothing(st, coefs)
        mass = (1 - coefs.alpha) * mass + k * wsum
        cross = (1 - coefs.alpha) * cross + k * st.centred
    loss = mass * log_total - _over_t(cross, temperature)
    scale = mass
    if flags.z_loss:
        loss, scale = _z_loss(loss, scale, st.m, log_total, coefs, temperature)
    return loss, st.total == 0, Row(st.m, log_total, scale, None, k)


def log_prob(st: RowStats, temperature=None):
    """`(log p_y, excluded)` of the integer label from merged statistics: never above 0
    (the label's logit is clamped to the row maximum), `-inf` for a label on an excluded
    class."""
    assert st.label is not None
    log_total = _merge.log_total(st.total)
    excluded = st.label == -jnp.inf
    gap = st.label - st.m
    gap = jnp.where(excluded | (gap > 0), jnp.zeros((), gap.dtype), gap)
    lp = _over_t(gap, temperature) - log_total
    return jnp.where(excluded, jnp.full((), -jnp.inf, lp.dtype), lp), excluded


def mean_gap(st: RowStats):
    """$E_p[u - M]$, the softmax mean of the logits against the row maximum (0 for a
    row without valid classes)."""
    assert st.ent is not None
    return st.ent / jnp.where(st.total == 0, jnp.ones((), st.total.dtype), st.total)


def entropy(st: RowStats, temperature=None):
    r"""The entropy $H = \mathrm{lse} - E_p[s] = \log t - E_p[u - M]/T$ (0 for a row
    without valid classes, and never below 0)."""
    h = _merge.log_total(st.total) - _over_t(mean_gap(st), temperature)
    return jnp.where(h < 0, jnp.zeros((), h.dtype), h)


# --------------------------------------------------------------------------------------
# The cotangent of a piece, from its own logits and the merged row.
# --------------------------------------------------------------------------------------


def probs(u, row: Row, temperature=None):
    """The softmax of the merged row on a piece: `exp((u - M)/T - log t)`; 0 where `u` is
    `-inf` (not valid)."""
    return jnp.exp(_pass.exp_arg(u, row.m, temperature) - row.log_total)


def probs_as_forward(u, m_piece, row: Row, temperature=None):
    """`probs`, with the exponential written as the piece's forward pass wrote it,
    `exp((u - m_piece)/T)` (`m_piece`: the piece's own shift, `M` for a whole row), then
    rescaled by `exp((m_piece - M)/T - log t)`: compiled together with the forward pass,
    XLA computes the exponential once and writes the gradient over it."""
    e = jnp.exp(_pass.exp_arg(u, m_piece, temperature))
    return e * jnp.exp(_pass.exp_arg(m_piece, row.m, temperature) - row.log_total)


def targets(row: Row, valid, *, onehot=None, w=None, y=None, alpha=None):
    """The target mass `q` on a piece: `(1 - alpha) b` at the integer label (`onehot`),
    or `(1 - alpha) w y` for probability labels, plus `k w` on every valid class."""
    zero = jnp.zeros((), row.m.dtype)
    if onehot is not None:
        one = jnp.ones((), row.m.dtype) if row.onehot_q is None else row.onehot_q
        q = jnp.where(onehot, one, zero)
    else:
        assert y is not None
        q = y.astype(row.m.dtype)
        if alpha is not None:
            q = (1 - alpha) * q
        if w is not None:
            q = w * q
    if row.k is not None:
        q = q + (row.k if w is None else row.k * w)
    return q if valid is None else jnp.where(valid, q, zero)


def score_cotangent(p, q, row: Row):
    r"""$\\partial\\ell/\\partial s = (\\sum q + 2cb\\,\\mathrm{lse})\\,p - q$."""
    return _formulas.ce_cotangent(p, q, 1 if row.scale is None else row.scale)


def chain_to_logits(g_s, u, valid, axes, flags: Flags, temperature=None):
    """`(dL/dz, dL/dT)` from `g_s = dL/ds`, with `s = softcap(z) / T`; 0 off the valid
    classes (`u` holds `-inf` there). `valid=None`: `g_s` is 0 there already."""
    zero = jnp.zeros((), g_s.dtype)
    if valid is not None:
        g_s = jnp.where(valid, g_s, zero)
    g_u = _over_t(g_s, temperature)
    g_t = None
    if temperature is not None:
        # dL/dT = -<g_s, s> / T, with s itself: with a z-loss g_s does not sum to 0.
        # (Only where dL/dT is used does this read the logits.)
        s = _over_t(u if valid is None else jnp.where(valid, u, zero), temperature)
        # A select: a row that does not count (g_s = 0) adds 0 even where s is inf.
        g_t = -_over_t(_sum(jnp.where(g_s == 0, zero, g_s * s), axes), temperature)
    if flags.softcap is not None:
        # The derivative is finite everywhere (0 at -inf and NaN): g_u stays 0 where
        # g_s is.
        g_u = g_u * _formulas.softcap_derivative(u, flags.softcap)
    return g_u, g_t


def label_cotangent(u, row: Row, valid, w, alpha, temperature=None):
    r"""$\\partial\\ell/\\partial y_i = (1-\\alpha)\\,w_i\\,(\\mathrm{lse} - s_i) =
    -(1-\\alpha) w_i \\log p_i$ on valid classes, 0 elsewhere."""
    zero = jnp.zeros((), row.m.dtype)
    neg_log_p = row.log_total - _over_t(jnp.where(valid, u, row.m) - row.m, temperature)
    d = jnp.where(valid, neg_log_p, zero)
    if alpha is not None:
        d = (1 - alpha) * d
    return d if w is None else w * d


# --------------------------------------------------------------------------------------
# Rows that count, and the reductions over rows.
# --------------------------------------------------------------------------------------


def mask_rows(a, row_ok):
    """`a` where the row counts, 0 elsewhere (a select: NaN in an ignored row stays out)."""
    if row_ok is None:
        return a
    return jnp.where(row_ok, a, jnp.zeros((), a.dtype))


def both(a, b):
    """`a & b` for optional masks (None: all True)."""
    if a is None:
        return b
    return a if b is None else a & b


def reduce_rows(per_row, weight, reduction: str):
    """`"none"`, `"sum"` or the weighted `"mean"`: the sum over the total `weight` of the
    rows (0 where a row does not count; 1 per counted row without class weights). A
    total weight of 0 gives 0 with zero gradients; a negative one divides as well."""
    if reduction == "none":
        return per_row
    total = jnp.sum(per_row)
    if reduction == "sum":
        return total
    denom = lax.stop_gradient(jnp.sum(weight.astype(per_row.dtype)))
    nonzero = denom != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, denom, 1), jnp.zeros((), total.dtype))


def row_weight(row_ok, w_y, shape, dtype):
    """The weight of each row in the `"mean"` denominator (0 where it does not count)."""
    w = jnp.ones(shape, dtype) if w_y is None else jnp.broadcast_to(w_y, shape).astype(dtype)
    return lax.stop_gradient(mask_rows(w, row_ok))
