r"""The cross-entropy's forward and backward passes over a piece of each row, shared by
[`cross_entropy`][jsoftmax.cross_entropy] (the piece is the whole row) and
[`sharded.cross_entropy`][jsoftmax.sharded.cross_entropy] (a device's block of classes).

The forward pass reduces the piece to the statistics of [`jsoftmax._kernel`][], merges
the pieces and takes the loss from the merged row; the backward pass recomputes $p$
from the piece's logits and forms $\partial\ell/\partial s = (\sum q + 2cb\,
\mathrm{lse})\,p - q$, chained to the logits, the labels and the temperature. The two
losses differ only in how a piece finds its label (a gather on the row; an offset into
the device's block, which may not hold it) and in the merge (none; one `pmax` and one
`psum`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoftmax import _formulas, _kernel


class Saved(NamedTuple):
    """What the backward pass reads of the forward pass: the loss's operands and the
    merged row."""

    logits: jax.Array
    labels: jax.Array
    where: jax.Array | None
    temperature: jax.Array | None
    weights: jax.Array | None
    coefs: _kernel.Coefs
    ok: jax.Array | None  # the rows whose cotangent counts (None: all)
    row: _kernel.Row


def forward(
    logits,
    labels,
    where,
    temperature,
    weights,
    row_ok,
    coefs: _kernel.Coefs,
    flags: _kernel.Flags,
    *,
    label_at: tuple[Callable[[jax.Array], jax.Array], jax.Array] | None = None,
    merge_stats: Callable[[_kernel.RowStats], _kernel.RowStats] | None = None,
):
    """The forward pass of a cross-entropy on a piece of each row (the whole row, or a
    device's block): `((loss, weight), saved, fp)`, the per-row loss (0 where the row
    does not count) and its weight in the mean, what the backward pass reads, and the
    piece's pass.

    Integer labels come with `label_at = (pick, in_range)`: `pick` as for `piece_stats`,
    `in_range` False where the label is not a class (the loss is NaN there, not
    excluded); `merge_stats` merges the pieces' statistics (None: one piece)."""
    axis = flags.axis
    cdt = _kernel.loss_dtype(logits, labels)
    coefs_c = _kernel.coefs_as(coefs, cdt)
    fp = _kernel.logits_pass(logits, where, temperature, flags, cdt)
    w = _kernel.class_weights(weights, logits.ndim, axis, cdt)
    ok = None if row_ok is None else jnp.expand_dims(row_ok, axis)
    merged = (lambda st: st) if merge_stats is None else merge_stats
    # The smoothing sums' rare branch recomputes the pass's u from the raw logits.
    source = lambda: _kernel.logits_u(logits, where, flags, cdt)  # noqa: E731
    stats = partial(
        _kernel.piece_stats,
        fp,
        (axis,),
        w=w,
        smoothing=flags.smoothing,
        source=source,
        has_mask=where is not None,
    )
    if _kernel.is_integer(labels):
        assert label_at is not None
        pick, in_range = label_at
        label = None
        if flags.softcap is not None:
            # The label's soft-capped logit from its raw logit: gathered from the
            # soft-capped logits, those would be written out for the gather.
            label = _formulas.softcap(pick(logits.astype(cdt)), flags.softcap)
            if where is not None:
                # The mask as 0 / -inf, gathered the same way (0 where a piece does not
                # hold the label: the pieces' label values are summed).
                off = jnp.where(where, jnp.zeros((), cdt), jnp.full((), -jnp.inf, cdt))
                label = label + pick(off)
        st = merged(stats(pick=pick, label=label))
        loss, excluded, row = _kernel.integer_loss(st, coefs_c, flags, temperature)
        loss = jnp.where(in_range, loss, jnp.full((), jnp.nan, cdt))
        ok = ok_bwd = _kernel.both(ok, ~excluded | ~in_range)
    else:
        st = merged(stats(y=labels))
        loss, empty, row = _kernel.prob_loss(st, coefs_c, flags, temperature)
        # A row without valid classes has p = q = 0: its gradients are 0 without a mask.
        ok_bwd, ok = ok, _kernel.both(ok, ~empty)
    weight = _kernel.row_weight(ok, st.w_y, loss.shape, cdt)
    loss = _kernel.mask_rows(loss, ok)
    saved = Saved(logits, labels, where, temperature, weights, coefs, ok_bwd, row)
    return (jnp.squeeze(loss, axis), jnp.squeeze(weight, axis)), saved, fp


def probs(logits, where, temperature, flags: _kernel.Flags, row: _kernel.Row, m_piece):
    """`p` on the piece, recomputed from its logits and the merged row (`m_piece`: the
    piece's own row maximum, the shift of its forward pass)."""
    cdt = row.m.dtype
    # The (soft-capped) logits written as in the forward pass, so that XLA computes the
    # exponential once and this pass writes the gradient over it.
    u = _kernel.logits_u(logits, where, flags, cdt)
    if cdt == logits.dtype:
        return _kernel.probs_as_forward(u, m_piece, row, temperature)
    # 16-bit logits: a differently written exponential, so XLA does not keep a float32
    # copy of the logits' size between the passes.
    return _kernel.probs(u, row, temperature)


def cotangent(s: Saved, flags: _kernel.Flags, p, label_at=None, g=None):
    """`(g * d loss / d s, valid, u, w)` on the piece (0 where the row does not count,
    `g` None: 1), with `u` the soft-capped logits.

    Integer labels come with `label_at = (index, in_range)`: the label's index in the
    piece (matching no class where the piece does not hold it) and False where the label
    is not a class (the cotangent is NaN there).

    `valid` is None where no select on it is needed: integer labels without `where` or
    smoothing. There `p` is exactly 0 on the `-inf` logits (with a temperature too:
    `exp(lowest / T)` underflows) and a row that counts has its label on a valid class,
    so `q` is 0 there too and the cotangent is 0 without reading the logits again (one
    logits-sized pass fewer); the soft-cap's derivative is 0 there as well."""
    logits, labels, where, row = s.logits, s.labels, s.where, s.row
    axis = flags.axis
    cdt = row.m.dtype
    coefs = _kernel.coefs_as(s.coefs, cdt)
    z = logits.astype(cdt)
    integer = _kernel.is_integer(labels)
    plain = integer and where is None and not flags.smoothing
    # Behind a barrier: not shared with the forward pass's soft-cap, which XLA would
    # then write out. Without a select on `valid`, the soft-cap's `-inf` is not needed
    # (its derivative is 0 at `-cap` too).
    u = (
        z
        if flags.softcap is None
        else _formulas.softcap(lax.optimization_barrier(z), flags.softcap, keep_neg_inf=not plain)
    )
    if plain:
        valid = None
    else:
        valid = u > -jnp.inf if where is None else (u > -jnp.inf) & where
    w = _kernel.class_weights(s.weights, logits.ndim, axis, cdt)
    if integer:
        assert label_at is not None
        index, in_range = label_at
        onehot = lax.broadcasted_iota(index.dtype, logits.shape, axis) == index
        q = _kernel.targets(row, valid, onehot=onehot, w=w)
        g_s = _kernel.score_cotangent(p, q, row)
        g_s = jnp.where(in_range, g_s, jnp.full((), jnp.nan, cdt))
    else:
        alpha = coefs.alpha if flags.smoothing else None
        # Behind a barrier: the masked labels, shared with the forward pass's sums, would
        # be written out.
        y = lax.optimization_barrier(labels)
        q = _kernel.targets(row, valid, w=w, y=y, alpha=alpha)
        g_s = _kernel.score_cotangent(p, q, row)
    if g is not None:
        g_s = g_s * g
    # Selects, not products: a row that does not count gets exactly 0, even if NaN.
    return _kernel.mask_rows(g_s, s.ok), valid, u, w


def backward(s: Saved, flags: _kernel.Flags, m_piece, g, label_at=None):
    """The reverse-mode pass on the piece: `(d/d logits, d/d labels, d/d T)` of the
    per-row loss times its cotangent `g` (`d/d labels` None for integer labels; `d/d T`
    this piece's part, None without a temperature)."""
    cdt = s.row.m.dtype
    axis = flags.axis
    p = probs(s.logits, s.where, s.temperature, flags, s.row, m_piece)
    g = jnp.expand_dims(g.astype(cdt), axis)
    g_s, valid, u, w = cotangent(s, flags, p, label_at, g)
    g_z, g_t = _kernel.chain_to_logits(g_s, u, valid, (axis,), flags, s.temperature)
    g_labels = None
    if not _kernel.is_integer(s.labels):
        alpha = _kernel.coefs_as(s.coefs, cdt).alpha if flags.smoothing else None
        g_y = _kernel.label_cotangent(u, s.row, valid, w, alpha, s.temperature) * g
        g_labels = _kernel.mask_rows(g_y, s.ok).astype(s.labels.dtype)
    return g_z.astype(s.logits.dtype), g_labels, g_t
