"""The post-training check of `python -m jsoftmax verify` (`jsoftmax.tools.verify`).

[`jsoftmax.token_log_probs`][] (with the entropy), [`jsoftmax.kl_divergence`][]
($\\beta \\in \\{0, 0.5, 1\\}$) and their fused output-layer versions
[`jsoftmax.linear_token_log_probs`][] and [`jsoftmax.linear_kl_divergence`][] on one
small case per dtype, with a temperature, soft-capping, a bias and vocabulary chunks that
do not divide the vocabulary: values and gradients (a random cotangent) against
`jax.grad` of dense float64 functions written from the definitions. A value's error is
divided by the largest $|\\log p|$ (the size of the terms it sums), a gradient's by its
largest reference entry. The errors come back as plain numbers; `verify` makes them rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jsoftmax

# (N, H, H_t, V): 6 rows, hidden sizes 5 (student) and 7 (teacher), 11 classes visited
# in chunks of 4.
SHAPE = (6, 5, 7, 11)
CHUNK = 4
TEMPERATURE = 1.5
SOFTCAP = 4.0
BETAS = (0.0, 0.5, 1.0)
# The quantities (one summary line per function; --full lists the values' and the
# gradients' rows, and the three betas', separately).
LOG_PROBS = "log p_y, entropy; d / d logits"
FUSED_LOG_PROBS = "log p_y, entropy; d / d (x, w, b)"
DIVERGENCE = "divergence (beta 0, .5, 1); d / d s"
FUSED_DIVERGENCE = "divergence (beta 0, .5, 1); d / d (x, w, b)"


def _f64(a) -> np.ndarray:
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.floating) and jnp.finfo(a.dtype).bits < 32:
        a = a.astype(jnp.float32)
    return np.asarray(a).astype(np.float64)


def _log_p(z, temperature, cap=None):
    s = z if cap is None else cap * jnp.tanh(z / cap)
    return jax.nn.log_softmax(s / temperature, axis=-1)


def _dense_log_probs(z, labels):
    """`(log p_y, H)` per row, from the definition."""
    log_p = _log_p(z, TEMPERATURE, SOFTCAP)
    log_py = jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    return log_py, -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _kl(log_a, log_b):
    return jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)


def _dense_divergence(z_s, z_t, beta):
    """The generalised Jensen-Shannon divergence per row, from the definition."""
    log_s, log_t = _log_p(z_s, TEMPERATURE), _log_p(z_t, TEMPERATURE)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = jnp.log(beta * jnp.exp(log_t) + (1 - beta) * jnp.exp(log_s))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def _compare(found, quantity, method, shape, results, refs, scales):
    """Appends the worst of several comparisons (each divided by its scale)."""
    abs_err, rel_err = 0.0, 0.0
    for result, ref, scale in zip(results, refs, scales, strict=True):
        err = float(np.abs(_f64(result) - np.asarray(ref)).max())
        abs_err, rel_err = max(abs_err, err), max(rel_err, err / scale)
    found.append((quantity, method, shape, abs_err, rel_err))


def errors(dtype_name: str, rng: np.random.Generator):
    """`[(quantity, method, shape, max abs error, normalised error), ...]`."""
    n, h, h_t, v = SHAPE
    dtype = jnp.dtype(dtype_name)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    x, w, bias = draw(n, h), draw(h, v), draw(v)
    t_x, t_w = draw(n, h_t), draw(h_t, v)
    labels = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    g1, g2 = (jnp.asarray(rng.standard_normal(n), jnp.float32) for _ in range(2))
    z = (x.astype(jnp.float32) @ w.astype(jnp.float32) + bias[None]).astype(dtype)
    z_t = (t_x.astype(jnp.float32) @ t_w.astype(jnp.float32)).astype(dtype)

    with jax.enable_x64(True):
        a64 = {k: jnp.asarray(_f64(a)) for k, a in dict(x=x, w=w, b=bias, tx=t_x, tw=t_w).items()}
        z64, zt64, y, c1, c2 = (jnp.asarray(_f64(a)) for a in (z, z_t, labels, g1, g2))
        y = y.astype(jnp.int32)

        def lp_loss(z):
            lp, ent = _dense_log_probs(z, y)
            return jnp.sum(c1 * lp + c2 * ent), (lp, ent)

        def lin_lp_loss(x, w, b):
            return lp_loss(x @ w + b[None])

        (_, lp_ref), dz_ref = jax.value_and_grad(lp_loss, has_aux=True)(z64)
        (_, lin_ref), dlin_ref = jax.value_and_grad(lin_lp_loss, (0, 1, 2), has_aux=True)(
            a64["x"], a64["w"], a64["b"]
        )
        div_refs = {}
        for beta in BETAS:
            dense = lambda z, beta=beta: jnp.sum(c1 * _dense_divergence(z, zt64, beta))  # noqa: E731
            lin = lambda x, w, b, beta=beta: jnp.sum(  # noqa: E731
                c1 * _dense_divergence(x @ w + b[None], a64["tx"] @ a64["tw"], beta)
            )
            div_refs[beta] = (
                np.asarray(_dense_divergence(z64, zt64, beta)),
                np.asarray(jax.grad(dense)(z64)),
                np.asarray(
                    _dense_divergence(
                        a64["x"] @ a64["w"] + a64["b"][None], a64["tx"] @ a64["tw"], beta
                    )
                ),
                [np.asarray(d) for d in jax.grad(lin, (0, 1, 2))(a64["x"], a64["w"], a64["b"])],
            )
        lp_ref = [np.asarray(r) for r in lp_ref]
        lin_ref = [np.asarray(r) for r in lin_ref]
        log_p_scale = float(np.abs(np.asarray(_log_p(z64, TEMPERATURE))).max())
        log_pt_scale = float(np.abs(np.asarray(_log_p(zt64, TEMPERATURE))).max())
    # Values sum terms p log p, each at most max |log p| in size; gradients are divided
    # by their largest reference entry.
    value_scale = max(log_p_scale, log_pt_scale, 1.0)
    top = lambda refs: tuple(float(np.abs(r).max()) for r in refs)  # noqa: E731

    found: list = []

    def lp(z):
        lp, ent = jsoftmax.token_log_probs(
            z, labels, temperature=TEMPERATURE, logit_softcap=SOFTCAP, return_entropy=True
        )
        return jnp.sum(g1 * lp + g2 * ent), (lp, ent)

    (_, vals), dz = jax.jit(jax.value_and_grad(lp, has_aux=True))(z)
    _compare(
        found,
        LOG_PROBS,
        "jsoftmax.token_log_probs",
        (n, v),
        vals,
        lp_ref,
        (value_scale,) * 2,
    )
    _compare(
        found,
        LOG_PROBS,
        "jsoftmax.token_log_probs",
        (n, v),
        (dz,),
        (np.asarray(dz_ref),),
        top([dz_ref]),
    )

    def lin_lp(x, w, b):
        lp, ent = jsoftmax.linear_token_log_probs(
            x,
            w,
            labels,
            bias=b,
            chunk_size=CHUNK,
            temperature=TEMPERATURE,
            logit_softcap=SOFTCAP,
            return_entropy=True,
        )
        return jnp.sum(g1 * lp + g2 * ent), (lp, ent)

    (_, vals), grads = jax.jit(jax.value_and_grad(lin_lp, (0, 1, 2), has_aux=True))(x, w, bias)
    name = "jsoftmax.linear_token_log_probs"
    _compare(found, FUSED_LOG_PROBS, name, SHAPE, vals, lin_ref, (value_scale,) * 2)
    _compare(
        found,
        FUSED_LOG_PROBS,
        name,
        SHAPE,
        grads,
        [np.asarray(d) for d in dlin_ref],
        top(dlin_ref),
    )

    for beta in BETAS:
        val_ref, dz_ref_b, lin_val_ref, lin_grad_ref = div_refs[beta]
        kw = dict(beta=beta, temperature=TEMPERATURE)
        fn = lambda z, kw=kw: jnp.sum(g1 * jsoftmax.kl_divergence(z, z_t, **kw))  # noqa: E731
        val = jax.jit(lambda z, kw=kw: jsoftmax.kl_divergence(z, z_t, **kw))(z)
        dz_b = jax.jit(jax.grad(fn))(z)
        _compare(
            found,
            DIVERGENCE,
            "jsoftmax.kl_divergence",
            (n, v),
            (val, dz_b),
            (val_ref, dz_ref_b),
            (value_scale, *top([dz_ref_b])),
        )

        def lin_fn(x, w, b, kw=kw):
            d = jsoftmax.linear_kl_divergence(x, w, t_x, t_w, bias=b, chunk_size=CHUNK, **kw)
            return jnp.sum(g1 * d), d

        (_, val), grads = jax.jit(jax.value_and_grad(lin_fn, (0, 1, 2), has_aux=True))(x, w, bias)
        _compare(
            found,
            FUSED_DIVERGENCE,
            "jsoftmax.linear_kl_divergence",
            SHAPE,
            (val, *grads),
            (lin_val_ref, *lin_grad_ref),
            (value_scale, *top(lin_grad_ref)),
        )
    return found
