"""cross_entropy options (ignore_index, class weights, label smoothing, z-loss,
soft-capping, masks, reductions) against a reference written from the definitions
(PyTorch's ``CrossEntropyLoss`` with ``weight``, ``ignore_index`` and
``label_smoothing``; PaLM's z-loss; Gemma 2's soft-capping), computed in float64 (in
float32 where float64 is off, except for the low-precision checks)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax

from helpers import (
    REF_DTYPE,
    ce_reference,
    f64,
    fast_subset,
    make_logits,
    np_log_softmax,
    saved_residuals,
    tol,
)

B, N = 6, 5

# (rtol, atol) against the reference: values, first and second derivatives.
VALUE_TOL = tol(REF_DTYPE, (1e-12, 1e-12), (2e-6, 2e-6))
GRAD_TOL = tol(REF_DTYPE, (1e-10, 1e-12), (1e-5, 1e-6))
HESSIAN_TOL = tol(REF_DTYPE, (1e-9, 1e-11), (1e-5, 1e-6))


reference = ce_reference


LABELS = jnp.array([0, 4, 2, -100, 1, 3])  # row 3 is ignored with ignore_index=-100
WEIGHTS = jnp.array([0.5, 2.0, 1.0, 3.0, 0.25])
CLASS_MASK = jnp.array([[True, True, True, True, False]])  # the logits' rank: a class mask
EXAMPLE_MASK = jnp.array([True, True, False, True, True, True])

# Each option alone, pairs, and everything at once.
COMBOS = {
    "plain": {},
    "ignore": dict(ignore_index=-100),
    "weights": dict(weights=WEIGHTS),
    "smoothing": dict(alpha=0.2),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(cap=2.5),
    "temperature": dict(temperature=jnp.array([0.5, 1.0, 2.0, 1.5, 0.7, 3.0])),
    "class_mask": dict(where=CLASS_MASK),
    "example_mask": dict(example_mask=EXAMPLE_MASK),
    "weights_smoothing_ignore": dict(weights=WEIGHTS, alpha=0.1, ignore_index=-100),
    "z_loss_softcap_temperature": dict(z_loss=1e-3, cap=3.0, temperature=0.8),
    "all": dict(
        ignore_index=-100,
        weights=WEIGHTS,
        alpha=0.15,
        z_loss=1e-2,
        cap=3.0,
        temperature=jnp.array([0.5, 1.0, 2.0, 1.5, 0.7, 3.0]),
        where=CLASS_MASK,
        example_mask=EXAMPLE_MASK,
    ),
}


def _ours_kwargs(opts):
    kw = {}
    names = {"alpha": "label_smoothing", "cap": "logit_softcap"}
    for k, v in opts.items():
        if k == "example_mask":
            continue
        kw[names.get(k, k)] = v
    if "example_mask" in opts:
        where = opts.get("where")
        if where is None:
            kw["where"] = opts["example_mask"]
        else:  # both: fold the example mask into a (B, N) class mask
            kw["where"] = jnp.broadcast_to(where, (B, N)) & opts["example_mask"][:, None]
    return kw


def _labels_for(opts):
    if "ignore_index" in opts:
        return LABELS
    lab = LABELS.at[3].set(2)
    if opts.get("where") is not None:
        lab = jnp.where(lab == 4, 1, lab)  # keep labels off the masked class ...
    return lab


def _assert_close(a, b, rtol, atol):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol, atol)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("combo", fast_subset(list(COMBOS), ["plain", "all"]))
def test_integer_labels_match_reference(combo, reduction):
    opts = COMBOS[combo]
    z = make_logits((B, N), REF_DTYPE)
    lab = _labels_for(opts)
    kw = _ours_kwargs(opts)
    jit = combo.startswith(("w", "s", "a"))  # about half of the cases jitted
    ce = jsoftmax.cross_entropy

    def ours(z, kw=kw):
        return ce(z, lab, reduction=reduction, **kw)

    def ref(z):
        return reference(z, lab, reduction=reduction, **opts)

    f = jax.jit(ours) if jit else ours
    _assert_close(f(z), ref(z), *VALUE_TOL)
    cot = jnp.linspace(0.5, 1.5, B) if reduction == "none" else 1.0
    g = jax.grad(lambda z: jnp.sum(f(z) * cot))(z)
    g_ref = jax.grad(lambda z: jnp.sum(ref(z) * cot))(z)
    _assert_close(g, g_ref, *GRAD_TOL)
    if isinstance(opts.get("temperature"), jax.Array):  # dL/dT against autodiff

        def with_t(t, fn):
            o = dict(opts, temperature=t)
            return jnp.sum(fn(o) * cot)

        t0 = opts["temperature"]
        gt = jax.grad(
            lambda t: with_t(t, lambda o: ce(z, lab, reduction=reduction, **_ours_kwargs(o)))
        )(t0)
        gt_ref = jax.grad(
            lambda t: with_t(t, lambda o: reference(z, lab, reduction=reduction, **o))
        )(t0)
        _assert_close(gt, gt_ref, *GRAD_TOL)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize(
    "combo",
    fast_subset(
        ["plain", "weights", "smoothing", "z_loss", "softcap", "class_mask", "all"],
        ["plain", "all"],
    ),
)
def test_probability_labels_match_reference(combo, reduction):
    opts = {k: v for k, v in COMBOS[combo].items() if k != "ignore_index"}
    z = make_logits((B, N), REF_DTYPE)
    y = jax.nn.softmax(make_logits((B, N), REF_DTYPE, seed=1))
    kw = _ours_kwargs(opts)

    def ours(z, y):
        return jsoftmax.cross_entropy(z, y, reduction=reduction, **kw)

    def ref(z, y):
        return reference(z, y, reduction=reduction, **opts)

    _assert_close(ours(z, y), ref(z, y), *VALUE_TOL)
    cot = jnp.linspace(0.5, 1.5, B) if reduction == "none" else 1.0
    for arg in (0, 1):
        g = jax.grad(lambda z, y: jnp.sum(ours(z, y) * cot), arg)(z, y)
        g_ref = jax.grad(lambda z, y: jnp.sum(ref(z, y) * cot), arg)(z, y)
        _assert_close(g, g_ref, *GRAD_TOL)


@pytest.mark.parametrize(
    "combo",
    fast_subset(["weights_smoothing_ignore", "z_loss_softcap_temperature", "all"], ["all"]),
)
def test_jvp_rule_forward_mode_and_hessian(combo):
    opts = COMBOS[combo]
    z = make_logits((B, N), REF_DTYPE)
    lab = _labels_for(opts)
    kw = _ours_kwargs(opts)

    def ours(z):
        return jsoftmax.cross_entropy(z, lab, rule="jvp", reduction="mean", **kw)

    def ref(z):
        return reference(z, lab, reduction="mean", **opts)

    v = make_logits(z.shape, REF_DTYPE, seed=5, scale=1.0)
    out, tangent = jax.jvp(ours, (z,), (v,))
    out_ref, tangent_ref = jax.jvp(ref, (z,), (v,))
    _assert_close(out, out_ref, *VALUE_TOL)
    _assert_close(tangent, tangent_ref, *GRAD_TOL)
    # Second order in forward-over-reverse mode, on two rows.
    lab2 = lab[:2]

    def ours2(z):
        return jsoftmax.cross_entropy(z, lab2, rule="jvp", reduction="sum", **_small(kw))

    def ref2(z):
        return reference(z, lab2, reduction="sum", **_small(opts))

    _assert_close(jax.hessian(ours2)(z[:2]), jax.hessian(ref2)(z[:2]), *HESSIAN_TOL)


def _small(opts):
    """The options restricted to the first two rows (per-row arrays sliced)."""
    out = {}
    for k, v in opts.items():
        if k in ("temperature", "example_mask") and isinstance(v, jax.Array) and v.ndim:
            v = v[:2]
        if k == "where" and v.shape == (B, N):
            v = v[:2]
        out[k] = v
    return out


# --------------------------------------------------------------------------------------
# Dtypes: float32 and bfloat16 against the float64 definition.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rule", ["vjp", "jvp"])
def test_low_precision_with_options(dtype, rule):
    opts = COMBOS["all"]
    z = make_logits((B, N), dtype=dtype)
    kw = _ours_kwargs(opts)
    f = jax.jit(lambda z: jsoftmax.cross_entropy(z, LABELS, rule=rule, reduction="mean", **kw))
    out = f(z)
    g = jax.grad(f)(z)
    assert out.dtype == jnp.float32 and g.dtype == dtype
    # The reference alone is computed with float64 enabled (also in JAX's default config).
    with jax.enable_x64(True):
        ref_fn = lambda z: reference(z, LABELS, reduction="mean", dtype=jnp.float64, **opts)  # noqa: E731
        z64 = jnp.asarray(f64(z))
        ref, g_ref = f64(ref_fn(z64)), f64(jax.grad(ref_fn)(z64))
    eps32 = float(jnp.finfo(jnp.float32).eps)
    # The loss is computed in float32 from the (exactly representable) 16-bit logits.
    _assert_close(out, ref, 16 * eps32, 16 * eps32)
    # The gradient is rounded once to the logits' dtype.
    eps = float(jnp.finfo(dtype).eps)
    _assert_close(g, g_ref, 0, 2 * eps * float(np.max(np.abs(g_ref))) + 16 * eps32)


def test_bfloat16_loss_is_not_quantised():
    # optax#1020: a bfloat16 loss near 8 is a multiple of 1/16. jsoftmax returns float32.
    z = jnp.zeros((1, 3000), jnp.bfloat16)  # loss = log(3000) = 8.006...
    out = jsoftmax.cross_entropy(z, jnp.array([0]))
    assert out.dtype == jnp.float32
    _assert_close(out, np.log(3000.0), 1e-6, 0)
    assert abs(float(out[0]) - np.log(3000.0)) < 1e-5 < abs(8.0 - np.log(3000.0))


# --------------------------------------------------------------------------------------
# PyTorch's edge cases and the documented behaviours.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
def test_all_rows_ignored_mean_is_zero_with_zero_gradient(rule):
    z = make_logits((B, N), REF_DTYPE)
    lab = jnp.full((B,), -100)

    def f(z):
        return jsoftmax.cross_entropy(z, lab, ignore_index=-100, reduction="mean", rule=rule)

    assert float(f(z)) == 0.0
    g = jax.grad(f)(z)
    assert np.all(np.asarray(g) == 0)
    # Total weight 0 through the weights: also 0 (PyTorch gives NaN).
    lab0 = jnp.zeros((B,), jnp.int32)
    w = jnp.array([0.0, 1, 1, 1, 1])
    h = lambda z: jsoftmax.cross_entropy(z, lab0, weights=w, reduction="mean", rule=rule)  # noqa: E731
    assert float(h(z)) == 0.0 and np.all(np.asarray(jax.grad(h)(z)) == 0)


def test_weighted_mean_denominator_by_hand():
    # Two rows, classes 3; labels 0 and 2, weights 1 and 3, one row ignored.
    z = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [3.0, 1.0, 0.0]], REF_DTYPE)
    lab = jnp.array([0, 2, 7])
    w = jnp.array([1.0, 2.0, 3.0], REF_DTYPE)
    nll = -np_log_softmax(z)
    expected = (1.0 * nll[0, 0] + 3.0 * nll[1, 2]) / (1.0 + 3.0)
    out = jsoftmax.cross_entropy(z, lab, weights=w, ignore_index=7, reduction="mean")
    rtol = tol(REF_DTYPE, 1e-14, 1e-6)
    _assert_close(out, expected, rtol, 0)
    per_row = jsoftmax.cross_entropy(z, lab, weights=w, ignore_index=7)
    _assert_close(per_row, [nll[0, 0], 3.0 * nll[1, 2], 0.0], rtol, 0)


def test_ignore_index_inside_the_class_range():
    z = make_logits((B, N), REF_DTYPE)
    lab = jnp.array([0, 1, 2, 0, 3, 0])
    out = jsoftmax.cross_entropy(z, lab, ignore_index=0)
    ref = optax.softmax_cross_entropy_with_integer_labels(z, lab)
    _assert_close(out, jnp.where(lab == 0, 0.0, ref), *VALUE_TOL)


def test_ignored_and_masked_rows_stay_zero_with_nan_logits():
    z = make_logits((B, N), REF_DTYPE).at[3].set(jnp.nan).at[2, 1].set(jnp.inf)
    lab = LABELS  # row 3 ignored; row 2 masked per example
    f = lambda z: jsoftmax.cross_entropy(  # noqa: E731
        z,
        lab,
        ignore_index=-100,
        where=EXAMPLE_MASK,
        reduction="sum",
        logit_softcap=3.0,
        temperature=jnp.full((B,), 2.0),
    )
    ref = reference(
        jnp.nan_to_num(z, nan=0.0, posinf=0.0),
        lab,
        ignore_index=-100,
        example_mask=EXAMPLE_MASK,
        reduction="sum",
        cap=3.0,
        temperature=2.0,
    )
    _assert_close(f(z), ref, *VALUE_TOL)
    g = jax.grad(f)(z)
    assert np.all(np.asarray(g[2:4]) == 0)
    chex.assert_tree_all_finite(g)
    gt = jax.grad(
        lambda t: jsoftmax.cross_entropy(
            z, lab, ignore_index=-100, where=EXAMPLE_MASK, temperature=t, reduction="sum"
        )
    )(jnp.full((B,), 2.0))
    chex.assert_tree_all_finite(gt)
    assert np.all(np.asarray(gt[2:4]) == 0)


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
def test_nan_cotangent_of_a_row_that_does_not_count_stays_out(rule):
    # A select `where(counts, loss, 0)` gives a row that does not count no cotangent,
    # whatever it is (NaN, inf): autodiff of the reference with those entries set to 0.
    z = make_logits((B, N), REF_DTYPE)
    opts = dict(ignore_index=-100, where=EXAMPLE_MASK)
    ct = jnp.ones((B,), REF_DTYPE).at[3].set(jnp.nan).at[2].set(jnp.inf)
    f = lambda z: jsoftmax.cross_entropy(z, LABELS, rule=rule, **opts)  # noqa: E731
    g = jax.vjp(f, z)[1](ct)[0]
    ref_f = lambda z: reference(z, LABELS, ignore_index=-100, example_mask=EXAMPLE_MASK)  # noqa: E731
    ref = jax.vjp(ref_f, z)[1](jnp.where(jnp.isfinite(ct), ct, 0.0))[0]
    assert np.all(np.asarray(g[2:4]) == 0)
    _assert_close(g, ref, *GRAD_TOL)


def test_out_of_range_labels_other_than_ignore_index():
    z = make_logits((B, N), REF_DTYPE)
    with pytest.raises(IndexError, match="or ignore_index=-100"):
        jsoftmax.cross_entropy(z, LABELS.at[0].set(5), ignore_index=-100)
    # Under jit: NaN for that row only, and the mean is NaN.
    f = jax.jit(lambda z, lab: jsoftmax.cross_entropy(z, lab, ignore_index=-100))
    out = np.asarray(f(z, LABELS.at[0].set(5)))
    assert np.isnan(out[0]) and out[3] == 0 and np.all(np.isfinite(out[1:]))


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softcap_maps_pos_inf_to_the_cap(rule, smoothing):
    # Regression: +inf became cap + (inf - inf) = NaN inside the soft-cap.
    z = make_logits((B, N), REF_DTYPE).at[:, 2].set(jnp.inf).at[0, 4].set(jnp.inf)
    lab = jnp.array([0, 1, 2, 3, 1, 0])
    f = lambda z: jsoftmax.cross_entropy(  # noqa: E731
        z, lab, logit_softcap=2.0, label_smoothing=smoothing, rule=rule
    )
    g_ref = lambda z: reference(z, lab, cap=2.0, alpha=smoothing)  # noqa: E731
    assert np.all(np.isfinite(np.asarray(g_ref(z))))
    _assert_close(f(z), g_ref(z), *VALUE_TOL)
    _assert_close(
        jax.grad(lambda z: f(z).sum())(z), jax.grad(lambda z: g_ref(z).sum())(z), *GRAD_TOL
    )


@pytest.mark.parametrize("temperature", [None, 0.5])
def test_softcap_keeps_neg_inf_excluded(temperature):
    z = make_logits((B, N), REF_DTYPE).at[:, 4].set(-jnp.inf)
    lab = jnp.array([0, 1, 2, 3, 1, 0])
    t = 1.0 if temperature is None else temperature
    kw = {} if temperature is None else {"temperature": temperature}
    f = lambda z: jsoftmax.cross_entropy(z, lab, logit_softcap=2.0, **kw)  # noqa: E731
    g_ref = lambda z: reference(z, lab, cap=2.0, temperature=t)  # noqa: E731
    _assert_close(f(z), g_ref(z[:, :4]), *VALUE_TOL)
    g = jax.grad(lambda z: f(z).sum())(z)
    assert np.all(np.asarray(g[:, 4]) == 0)
    # The finite classes' gradients (the backward pass without a select on the valid
    # classes: the soft-cap's derivative is 0 at -inf).
    _assert_close(g[:, :4], jax.grad(lambda z: g_ref(z).sum())(z[:, :4]), *GRAD_TOL)


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
@pytest.mark.parametrize("options", ["smoothing", "weights", "softcap", "where"])
def test_label_smoothing_over_the_finite_classes_with_neg_inf_logits(options, rule):
    # -inf logits make the plain smoothing sums non-finite: the loss takes the masked
    # sums (recomputed from the raw logits), which count only the finite classes.
    z = make_logits((B, N), REF_DTYPE).at[:, 4].set(-jnp.inf).at[1, 0].set(-jnp.inf)
    lab = jnp.array([0, 1, 2, 3, 1, 0]).at[1].set(2)
    kw, ref_kw = {}, {}
    if options == "weights":
        kw = ref_kw = dict(weights=WEIGHTS)
    if options == "softcap":
        kw, ref_kw = dict(logit_softcap=2.0), dict(cap=2.0)
    if options == "where":
        kw = ref_kw = dict(where=jnp.array([[True, True, False, True, True]]))
        lab = lab.at[2].set(0)
    f = lambda z: jsoftmax.cross_entropy(z, lab, label_smoothing=0.2, rule=rule, **kw)
    ref = lambda z: reference(z, lab, alpha=0.2, **ref_kw)
    _assert_close(f(z), ref(z), *VALUE_TOL)
    finite = jnp.isfinite(z)
    g = jax.grad(lambda z: f(z).sum())(z)
    # The reference differentiated in the finite logits only (-inf a constant).
    at = lambda zf: jnp.where(finite, zf, -jnp.inf)
    g_ref = jax.grad(lambda zf: ref(at(zf)).sum())(jnp.where(finite, z, 0.0))
    _assert_close(jnp.where(finite, g, 0), jnp.where(finite, g_ref, 0), *GRAD_TOL)
    assert np.all(np.asarray(g)[~np.asarray(finite)] == 0)


def test_tuple_axis_matches_optax():
    z = make_logits((3, 2, 4), REF_DTYPE)
    lab = jnp.array([0, 7, 5])
    out = jsoftmax.cross_entropy(z, lab, axis=(1, 2))
    ref = optax.softmax_cross_entropy_with_integer_labels(z, lab, axis=(1, 2))
    _assert_close(out, ref, *VALUE_TOL)
    g = jax.grad(lambda z: jsoftmax.cross_entropy(z, lab, axis=(1, 2)).sum())(z)
    g_ref = jax.grad(
        lambda z: optax.softmax_cross_entropy_with_integer_labels(z, lab, axis=(1, 2)).sum()
    )(z)
    _assert_close(g, g_ref, *VALUE_TOL)
    # Non-adjacent class axes and probability labels.
    zt = jnp.moveaxis(z, 1, 0)  # (2, 3, 4): classes on axes 0 and 2
    y = jax.nn.softmax(make_logits((3, 2, 4), REF_DTYPE, seed=2).reshape(3, 8)).reshape(3, 2, 4)
    yt = jnp.moveaxis(y, 1, 0)
    out = jsoftmax.cross_entropy(zt, yt, axis=(0, 2))
    _assert_close(out, optax.softmax_cross_entropy(z, y, axis=(1, 2)), *VALUE_TOL)


def test_example_where_equals_ignore_index():
    z = make_logits((B, N), REF_DTYPE)
    lab = LABELS.at[3].set(2)
    a = jsoftmax.cross_entropy(z, lab, where=EXAMPLE_MASK, reduction="mean")
    b = jsoftmax.cross_entropy(
        z, jnp.where(EXAMPLE_MASK, lab, -1), ignore_index=-1, reduction="mean"
    )
    _assert_close(a, b, tol(REF_DTYPE, 1e-15, 5e-7), 0)
    _assert_close(
        a,
        optax.softmax_cross_entropy_with_integer_labels(z, lab)[EXAMPLE_MASK].mean(),
        VALUE_TOL[0],
        0,
    )


def test_empty_batch_and_single_class():
    z = jnp.zeros((0, N), REF_DTYPE)
    lab = jnp.zeros((0,), jnp.int32)
    for reduction in ("sum", "mean"):
        out = jsoftmax.cross_entropy(z, lab, reduction=reduction, ignore_index=-100)
        assert out.shape == () and float(out) == 0.0
    one = make_logits((B, 1), REF_DTYPE)
    out = jsoftmax.cross_entropy(one, jnp.zeros((B,), jnp.int32), z_loss=0.1, reduction="mean")
    ref = reference(one, jnp.zeros((B,), jnp.int32), z_loss=0.1, reduction="mean")
    _assert_close(out, ref, *VALUE_TOL)


def test_no_new_logits_sized_residual_with_every_option():
    z = make_logits((8, 6), REF_DTYPE)
    lab = jnp.array([0, 1, 2, 3, 4, 5, -1, 2])
    w = jnp.linspace(0.5, 2.0, 6)
    t = jnp.full((8,), 1.5)

    def f(z):
        return jsoftmax.cross_entropy(
            z,
            lab,
            ignore_index=-1,
            weights=w,
            label_smoothing=0.1,
            z_loss=1e-3,
            logit_softcap=5.0,
            temperature=t,
            reduction="mean",
        )

    res = saved_residuals(f, z)
    big = [r for r in res if r[0].shape == (8, 6)]
    assert len(big) == 1 and "from the argument" in big[0][1], res  # the logits themselves
    assert all(r[0].size <= 8 for r in res if r not in big), res
    # The check can fail: optax saves the exponentials.
    res_optax = saved_residuals(
        lambda z: optax.softmax_cross_entropy_with_integer_labels(z, lab % 6).mean(), z
    )
    assert any(r[0].shape == (8, 6) and "from the argument" not in r[1] for r in res_optax)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion")
@pytest.mark.parametrize(
    "options",
    ["smoothing", "where", "where_weights", "softcap", "softcap_where", "probs", "probs_smoothing"],
)
def test_training_step_writes_no_logits_sized_temporary(options):
    # Sums over the valid classes (a compare and a select under a sum: label smoothing,
    # probability labels) were written out by XLA:CPU as logits-sized arrays (up to four
    # of 4 MiB here, also in a rarely taken branch, whose buffers are allocated anyway),
    # and so were probability labels masked once for both passes; optax on probability
    # labels writes two.
    n, v = 256, 4096
    z = jnp.zeros((n, v), jnp.float32)
    lab = jnp.zeros((n,), jnp.int32)
    mask = jnp.ones((1, v), bool).at[0, -1].set(False)
    probs = jnp.full((n, v), 1.0 / v, jnp.float32)
    kw = {
        "smoothing": dict(label_smoothing=0.1),
        "where": dict(label_smoothing=0.1, where=mask),
        "where_weights": dict(label_smoothing=0.1, where=mask, weights=jnp.linspace(0.5, 2, v)),
        "softcap": dict(label_smoothing=0.1, logit_softcap=30.0),
        "softcap_where": dict(logit_softcap=30.0, where=mask),
        "probs": {},
        "probs_smoothing": dict(label_smoothing=0.1, where=mask),
    }[options]
    labels = probs if options.startswith("probs") else lab

    def step(z, labels):
        loss = lambda z: jsoftmax.cross_entropy(z, labels, reduction="mean", **kw)
        return jax.value_and_grad(loss)(z)

    temp = jax.jit(step).lower(z, labels).compile().memory_analysis().temp_size_in_bytes
    assert temp < z.nbytes // 8, temp


def test_errors_name_the_argument():
    z = make_logits((B, N), REF_DTYPE)
    lab = LABELS.at[3].set(0)
    y = jax.nn.softmax(z)
    with pytest.raises(ValueError, match=r"weights must have one entry per class, shape \(5,\)"):
        jsoftmax.cross_entropy(z, lab, weights=jnp.ones(4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        jsoftmax.cross_entropy(z, lab, reduction="average")
    with pytest.raises(ValueError, match="z_loss must be a finite number >= 0"):
        jsoftmax.cross_entropy(z, lab, z_loss=-1e-4)
    with pytest.raises(ValueError, match="logit_softcap must be None or a finite number > 0"):
        jsoftmax.cross_entropy(z, lab, logit_softcap=0.0)
    with pytest.raises(ValueError, match="ignore_index applies to integer class labels"):
        jsoftmax.cross_entropy(z, y, ignore_index=-100)
    with pytest.raises(TypeError, match="ignore_index must be None or a Python int"):
        jsoftmax.cross_entropy(z, lab, ignore_index=1.5)
    with pytest.raises(
        ValueError,
        match="where of shape .* per-example mask, and must broadcast to the batch shape",
    ):
        jsoftmax.cross_entropy(z, lab, where=jnp.ones((B + 1,), bool))
    with pytest.raises(TypeError, match="where must be a boolean mask"):
        jsoftmax.cross_entropy(z, lab, where=jnp.ones((B,), jnp.int32))
    with pytest.raises(TypeError, match="weights must be a real array"):
        jsoftmax.cross_entropy(z, lab, weights=jnp.ones(5, bool))


def test_no_retracing_with_options():
    z = make_logits((B, N), REF_DTYPE)
    lab = LABELS

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(z, lab):
        return jax.value_and_grad(
            lambda z: jsoftmax.cross_entropy(
                z, lab, ignore_index=-100, weights=WEIGHTS, z_loss=1e-4, reduction="mean"
            )
        )(z)

    for k in range(3):
        step(z + k, lab)
