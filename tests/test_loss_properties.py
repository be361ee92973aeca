"""Property-based tests of the losses: `cross_entropy` and `linear_cross_entropy` give
the same answer eagerly, under `jit`, `vmap` and `grad`, over batch shapes, class counts
(1 included), dtypes, every training option, integer and probability labels and logits
with -inf, +inf and NaN entries; where the float64 reference (written from the
definitions, `helpers.ce_reference`) is finite they match it, values and gradients; bad
options fail before tracing with a message naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jsoftmax

from helpers import REF_DTYPE, X64, ce_reference, examples

pytestmark = pytest.mark.slow

SETTINGS = settings(max_examples=examples(16), deadline=None, derandomize=True)
DTYPES = [jnp.float32, jnp.bfloat16] + ([jnp.float64] if X64 else [])
SPECIALS = [-np.inf, np.inf, np.nan, 1e30]


def _close(a, b, dtype, scale=1.0):
    """Equal up to the dtype's rounding; NaN and inf in the same places."""
    tol = {jnp.bfloat16: 2e-2, jnp.float32: 2e-5}.get(dtype, 1e-11) * scale
    np.testing.assert_allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol
    )


@st.composite
def ce_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    # The first choices are what hypothesis starts from and shrinks to: informative ones.
    batch = draw(st.sampled_from([(4,), (2, 3), (1,)]))
    n = draw(st.sampled_from([5, 2, 1]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    z = rng.standard_normal((*batch, n)) * 3
    specials = draw(st.lists(st.sampled_from(SPECIALS), max_size=3))
    flat = z.reshape(-1)
    for value in specials:
        flat[rng.integers(flat.size)] = value
    probs = draw(st.booleans())
    if probs:
        labels = jnp.asarray(rng.dirichlet(np.ones(n), batch), dtype)
    else:
        labels = jnp.asarray(rng.integers(0, n, batch))
    kw = dict(
        label_smoothing=draw(st.sampled_from([0.1, 0.0])),
        z_loss=draw(st.sampled_from([1e-3, 0.0])),
        logit_softcap=draw(st.sampled_from([None, 5.0])),
        temperature=draw(st.sampled_from([0.7, 1.0])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        rule=draw(st.sampled_from(["vjp", "jvp"])),
    )
    if draw(st.booleans()):
        kw["weights"] = jnp.linspace(0.5, 2.0, n)
    if not probs and draw(st.booleans()):
        labels = labels.reshape(-1).at[0].set(-100).reshape(batch)
        kw["ignore_index"] = -100
    if n > 1 and draw(st.booleans()):
        # A class mask (the logits' rank; one of lower rank masks examples).
        kw["where"] = jnp.ones((*(1 for _ in batch), n), bool).at[..., n - 1].set(False)
    return jnp.asarray(z, dtype), labels, kw, bool(specials)


def _reference_kwargs(kw):
    """`ce_reference`'s names for `cross_entropy`'s options."""
    ref = {k: v for k, v in kw.items() if k in ("weights", "ignore_index", "reduction")}
    if "where" in kw:
        ref["where"] = kw["where"].reshape(1, -1)
    ref.update(alpha=kw["label_smoothing"], z_loss=kw["z_loss"], cap=kw["logit_softcap"])
    ref["temperature"] = kw["temperature"]
    return ref


@SETTINGS
@given(ce_cases())
def test_cross_entropy_eager_jit_vmap_grad_agree_and_match_the_reference(case):
    z, labels, kw, has_specials = case
    dtype = z.dtype.type if z.dtype != jnp.bfloat16 else jnp.bfloat16

    def f(z, labels):
        return jsoftmax.cross_entropy(z, labels, **kw)

    eager = f(z, labels)
    _close(jax.jit(f)(z, labels), eager, dtype)
    assert eager.dtype == (jnp.float32 if z.dtype == jnp.bfloat16 else z.dtype)
    # vmap over a new leading axis: the same logits, and the logits negated.
    stacked = jnp.stack([z, -z]), jnp.stack([labels, labels])
    batched = jax.vmap(f)(*stacked)
    _close(batched[0], eager, dtype)
    _close(batched[1], f(-z, labels), dtype)

    def total(z):
        out = f(z, labels)
        return jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0))

    g = jax.grad(total)(z)
    _close(jax.jit(jax.grad(total))(z), g, dtype)
    assert g.dtype == z.dtype and g.shape == z.shape

    if has_specials or z.dtype == jnp.bfloat16:
        return
    # Finite logits: against the float64 reference, values and gradients.
    n = z.shape[-1]
    rows = z.reshape(-1, n)
    lab = labels.reshape(-1, n) if labels.ndim == z.ndim else labels.reshape(-1)
    ref_kw = _reference_kwargs(kw)

    def ref(rows):
        out = ce_reference(rows, lab, **ref_kw)
        return out.reshape(z.shape[:-1]) if kw["reduction"] == "none" else out

    _close(eager, ref(rows), dtype, scale=10)
    g_ref = jax.grad(lambda r: jnp.sum(ref(r)))(rows.astype(REF_DTYPE)).reshape(z.shape)
    _close(g, g_ref, dtype, scale=10)


@st.composite
def linear_cases(draw):
    dtype = draw(st.sampled_from([jnp.float32] + ([jnp.float64] if X64 else [])))
    rows, h, v = draw(st.sampled_from([(6, 4, 7), (1, 3, 5), (5, 2, 1)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = jnp.asarray(rng.standard_normal((rows, h)), dtype)
    w = jnp.asarray(rng.standard_normal((h, v)), dtype)
    labels = jnp.asarray(rng.integers(0, v, rows))
    kw = dict(
        label_smoothing=draw(st.sampled_from([0.1, 0.0])),
        z_loss=draw(st.sampled_from([1e-3, 0.0])),
        logit_softcap=draw(st.sampled_from([None, 5.0])),
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
        chunk_size=draw(st.sampled_from([2, None])),
    )
    if draw(st.booleans()):
        kw["bias"] = jnp.asarray(rng.standard_normal(v), dtype).at[0].set(-jnp.inf)
    if draw(st.booleans()):
        labels = labels.at[0].set(-100)
        kw["ignore_index"] = -100
    return x, w, labels, kw


@SETTINGS
@given(linear_cases())
def test_linear_cross_entropy_eager_jit_vmap_grad_agree_with_the_dense_loss(case):
    x, w, labels, kw = case
    dtype = x.dtype.type
    dense_kw = {k: val for k, val in kw.items() if k not in ("bias", "chunk_size")}

    def fused(x, w, labels):
        return jsoftmax.linear_cross_entropy(x, w, labels, **kw)

    def dense(x, w, labels):
        logits = x @ w if "bias" not in kw else x @ w + kw["bias"][None]
        return jsoftmax.cross_entropy(logits, labels, **dense_kw)

    eager = fused(x, w, labels)
    _close(jax.jit(fused)(x, w, labels), eager, dtype)
    _close(eager, dense(x, w, labels), dtype, scale=10)
    batched = jax.vmap(fused)(jnp.stack([x, 2 * x]), jnp.stack([w, w]), jnp.stack([labels] * 2))
    _close(batched[0], eager, dtype)
    _close(batched[1], fused(2 * x, w, labels), dtype)

    def total(f):
        return lambda x, w: jnp.sum(f(x, w, labels))

    g = jax.grad(total(fused), (0, 1))(x, w)
    for a, b in zip(jax.jit(jax.grad(total(fused), (0, 1)))(x, w), g, strict=True):
        _close(a, b, dtype)
    for a, b in zip(g, jax.grad(total(dense), (0, 1))(x, w), strict=True):
        _close(a, b, dtype, scale=10)


_BAD_OPTIONS = [
    ("weights", dict(weights=jnp.ones(3))),
    ("weights", dict(weights=jnp.ones(4, jnp.complex64))),
    ("reduction", dict(reduction="avg")),
    ("z_loss", dict(z_loss=-1.0)),
    ("logit_softcap", dict(logit_softcap=0.0)),
    ("label_smoothing", dict(label_smoothing=1.5)),
    ("label_smoothing", dict(label_smoothing=-0.1)),
    ("temperature", dict(temperature=0.0)),
    ("temperature", dict(temperature=jnp.ones(5))),
    ("rule", dict(rule="fwd")),
    ("where", dict(where=jnp.ones((2, 5), bool))),
    ("axis", dict(axis=2)),
    ("labels", dict(labels=jnp.array([0, 1]))),
    ("labels", dict(labels=jnp.full((3, 3), 1 / 3))),
    ("ignore_index", dict(labels=jnp.full((3, 4), 0.25), ignore_index=-100)),
    ("logits", dict(logits="a")),
]


@settings(max_examples=len(_BAD_OPTIONS), deadline=None, derandomize=True)
@given(st.sampled_from(_BAD_OPTIONS), st.sampled_from(["cross_entropy", "jit"]))
def test_bad_options_fail_naming_the_argument(bad, how):
    name, kw = bad[0], dict(bad[1])
    args = dict(logits=jnp.zeros((3, 4)), labels=jnp.array([0, 1, 2]))
    args.update({k: kw.pop(k) for k in ("logits", "labels") if k in kw})
    call = lambda: jsoftmax.cross_entropy(args["logits"], args["labels"], **kw)  # noqa: E731
    if how == "jit":
        # Checked before tracing: the same error from inside a jitted function.
        static = dict(args)
        call = lambda: jax.jit(  # noqa: E731
            lambda: jsoftmax.cross_entropy(static["logits"], static["labels"], **kw)
        )()
    with pytest.raises((ValueError, TypeError, IndexError), match=name):
        call()
