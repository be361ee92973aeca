"""Tests of jsoftmax.softmax: values, both custom rules, masks, edge cases, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsoftmax

from helpers import REF_DTYPE, fast_subset, make_logits, np_softmax, saved_residuals, tol

RULES = ("vjp", "jvp")
TOL = {
    jnp.float16: dict(rtol=2e-3, atol=1e-4),
    jnp.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    jnp.float32: dict(rtol=2e-6, atol=1e-7),
    jnp.float64: dict(rtol=1e-12, atol=1e-14),
}


# ------------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "shape,axis",
    fast_subset(
        [((7,), -1), ((4, 9), -1), ((4, 9), 0), ((2, 5, 3), 1), ((3, 2, 4, 5), -3)],
        [((4, 9), 0), ((3, 2, 4, 5), -3)],
        unpack=True,
    ),
)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("jit", [False, True])
def test_values_match_float64_reference_and_jax_nn(dtype, shape, axis, rule, jit):
    x = make_logits(shape, dtype)
    f = lambda z: jsoftmax.softmax(z, axis, rule=rule)
    p = jax.jit(f)(x) if jit else f(x)
    assert p.dtype == dtype and p.shape == shape
    ref = np_softmax(x, axis)
    np.testing.assert_allclose(np.asarray(p, np.float64), ref, **TOL[dtype])
    if dtype in (jnp.float32, jnp.float64):
        chex.assert_trees_all_close(p, jax.nn.softmax(x, axis), **TOL[dtype])


def test_tuple_axis_normalises_jointly():
    x = make_logits((3, 4, 5), REF_DTYPE)
    p = jsoftmax.softmax(x, axis=(0, 2))
    rtol = TOL[REF_DTYPE]["rtol"]
    chex.assert_trees_all_close(p, jax.nn.softmax(x, axis=(0, 2)), rtol=rtol)
    chex.assert_trees_all_close(p.sum(axis=(0, 2)), jnp.ones(4, REF_DTYPE), rtol=rtol)


@pytest.mark.parametrize("rule", RULES)
def test_vmap_matches_batched_call(rule):
    x = make_logits((6, 4, 10), REF_DTYPE)
    f = lambda z: jsoftmax.softmax(z, rule=rule)
    chex.assert_trees_all_close(jax.vmap(f)(x), f(x), rtol=tol(REF_DTYPE, 1e-14, 1e-6))
    w = jnp.broadcast_to(jnp.arange(10.0, dtype=REF_DTYPE), (4, 10))
    g = jax.vmap(jax.grad(lambda z: jnp.sum(f(z) * w)))
    ref = jax.vmap(jax.grad(lambda z: jnp.sum(jax.nn.softmax(z) * w)))
    # p_i (w_i - <p, w>) with w up to 9: absolute errors of a few ULP of 9 p_i.
    atol = tol(REF_DTYPE, 1e-14, 1e-6)
    chex.assert_trees_all_close(g(x), ref(x), rtol=TOL[REF_DTYPE]["rtol"], atol=atol)


def test_huge_logits_are_stable():
    x = jnp.array([1e4, 1e4 + 1.0, -1e4], jnp.float32)
    p = jsoftmax.softmax(x)
    chex.assert_tree_all_finite(p)
    np.testing.assert_allclose(p, np_softmax(x, -1), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("rule", RULES)
def test_shift_invariance(rule):
    x = make_logits((5, 8), REF_DTYPE)
    p = jsoftmax.softmax(x, rule=rule)
    # x + 123 rounds by up to 64 ULP of x: p moves by up to twice that, relatively.
    rtol = tol(REF_DTYPE, 1e-11, 3e-5)
    chex.assert_trees_all_close(jsoftmax.softmax(x + 123.0, rule=rule), p, rtol=rtol)


# ---------------------------------------------------------------------------- gradients


def _loss(f, w):
    return lambda z: jnp.sum(jnp.sin(f(z)) * w)


@pytest.mark.parametrize("shape,axis", [((6,), -1), ((3, 5), 0), ((2, 3, 4), 1)])
@pytest.mark.parametrize("rule", RULES)
def test_grad_matches_jax_nn(shape, axis, rule):
    x = make_logits(shape, REF_DTYPE)
    w = make_logits(shape, REF_DTYPE, seed=1)
    ours = jax.grad(_loss(lambda z: jsoftmax.softmax(z, axis, rule=rule), w))(x)
    ref = jax.grad(_loss(lambda z: jax.nn.softmax(z, axis), w))(x)
    chex.assert_trees_all_close(ours, ref, **TOL[REF_DTYPE])


def test_jvp_rule_forward_mode_matches_jax_nn():
    x = make_logits((3, 6), REF_DTYPE)
    t = make_logits((3, 6), REF_DTYPE, seed=2)
    f = lambda z: jsoftmax.softmax(z, rule="jvp")
    p, dp = jax.jvp(f, (x,), (t,))
    p_ref, dp_ref = jax.jvp(jax.nn.softmax, (x,), (t,))
    chex.assert_trees_all_close((p, dp), (p_ref, dp_ref), **TOL[REF_DTYPE])


def test_vjp_rule_cannot_be_forward_differentiated():
    # Documented: a custom_vjp function has no forward-mode rule; rule="jvp" has one.
    x = make_logits((4,), jnp.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jacfwd(lambda z: jsoftmax.softmax(z, rule="vjp"))(x)
    jax.jacfwd(lambda z: jsoftmax.softmax(z, rule="jvp"))(x)


@pytest.mark.x64  # float32 finite differences carry errors near check_grads' tolerance
def test_check_grads_order_2_vjp_rule():
    x = make_logits((2, 5), jnp.float64)
    check_grads(lambda z: jsoftmax.softmax(z, rule="vjp"), (x,), order=2, modes=["rev"])


@pytest.mark.x64
def test_check_grads_order_2_jvp_rule():
    x = make_logits((2, 5), jnp.float64)
    check_grads(lambda z: jsoftmax.softmax(z, rule="jvp"), (x,), order=2, modes=["fwd", "rev"])


@pytest.mark.x64
def test_check_grads_with_mask_and_non_last_axis():
    x = make_logits((5, 3), jnp.float64)
    where = jnp.array([[True, False, True]] * 4 + [[False, True, True]])
    for rule, modes in (("vjp", ["rev"]), ("jvp", ["fwd", "rev"])):
        f = lambda z, rule=rule: jsoftmax.softmax(z, 0, where=where, rule=rule)
        check_grads(f, (x,), order=2, modes=modes)


@pytest.mark.parametrize("rule", RULES)
def test_second_derivative_matches_reference(rule):
    x = make_logits((5,), REF_DTYPE)
    f = lambda z: jsoftmax.softmax(z, rule=rule)
    ours = jax.jacrev(jax.jacrev(f))(x)
    ref = jax.jacfwd(jax.jacfwd(jax.nn.softmax))(x)
    rtol, atol = tol(REF_DTYPE, 1e-11, 1e-5), tol(REF_DTYPE, 1e-14, 1e-7)
    chex.assert_trees_all_close(ours, ref, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- residuals


def _output_sized(res, shape):
    return [aval for aval, _ in res if aval.shape == tuple(shape)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_vjp_rule_saves_exactly_one_output_sized_residual(dtype):
    x = make_logits((8, 32), dtype)
    res = saved_residuals(lambda z: jsoftmax.softmax(z), x)
    assert len(res) == 1, res
    ((aval, _),) = res
    assert aval.shape == x.shape and aval.dtype == dtype
    # jax.nn.softmax keeps more than that (the exponentials and per-row terms).
    assert len(saved_residuals(jax.nn.softmax, x)) > 1


def test_vjp_rule_with_mask_saves_no_mask():
    x = make_logits((8, 32), jnp.float32)
    where = jnp.arange(32) < 20
    res = saved_residuals(lambda z: jsoftmax.softmax(z, where=where), x)
    assert len(res) == 1 and res[0][0].shape == x.shape


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("variant", ["plain", "where", "where-argument", "temperature"])
@pytest.mark.parametrize("fn", [jsoftmax.softmax, jsoftmax.log_softmax], ids=lambda f: f.__name__)
@pytest.mark.parametrize("rule", RULES)
def test_both_rules_keep_one_output_sized_residual(rule, fn, variant, dtype):
    """jax.vjp through either rule keeps exactly one output-sized array: the output, in
    its dtype (jax.nn.softmax keeps one too). A mask is an input: it may be kept as an
    argument, never as an array computed from the output."""
    x = make_logits((8, 32), dtype)
    where = np.arange(32) % 5 != 2
    where = np.broadcast_to(where, (8, 32)).copy()
    where[3] = False  # a fully masked row
    where = jnp.asarray(where)
    x = x.at[1, 4].set(-jnp.inf)
    if variant == "plain":
        res = saved_residuals(lambda z: fn(z, rule=rule), x)
    elif variant == "where":
        res = saved_residuals(lambda z: fn(z, rule=rule, where=where), x)
    elif variant == "where-argument":
        res = saved_residuals(lambda z, m: fn(z, rule=rule, where=m), x, where)
    else:
        t = jnp.linspace(0.5, 2.0, 8, dtype=jnp.float32)
        res = saved_residuals(lambda z, t: fn(z, rule=rule, temperature=t), x, t)
    big = [r for r in res if r[0].shape == x.shape and "from the argument" not in r[1]]
    assert len(big) == 1, res
    ((kept, _),) = big
    assert kept.dtype == dtype, res
    # Everything else is an argument or a per-row number.
    others = [r for r in res if r not in big]
    assert all(r[0].shape != x.shape or "from the argument" in r[1] for r in others), res
    assert all(r[0].dtype != jnp.bool_ or "from the argument" in r[1] for r in others), res


# -------------------------------------------------------------------------- masks, inf


@pytest.mark.parametrize("rule", RULES)
def test_mask_gives_zero_probability_and_gradient(rule):
    x = make_logits((3, 6), REF_DTYPE)
    where = jnp.array([[True, False, True, True, False, True]] * 3)
    p = jsoftmax.softmax(x, where=where, rule=rule)
    ref = jax.nn.softmax(jnp.where(where, x, -jnp.inf))
    chex.assert_trees_all_close(p, ref, rtol=TOL[REF_DTYPE]["rtol"])
    g = jax.grad(lambda z: jnp.sum(jsoftmax.softmax(z, where=where, rule=rule) ** 2))(x)
    assert np.all(np.asarray(g)[~np.asarray(where)] == 0)
    g_ref = jax.grad(lambda z: jnp.sum(jax.nn.softmax(jnp.where(where, z, -jnp.inf)) ** 2))(x)
    atol = tol(REF_DTYPE, 1e-15, 1e-7)
    chex.assert_trees_all_close(g, g_ref, rtol=TOL[REF_DTYPE]["rtol"], atol=atol)


@pytest.mark.parametrize("rule", RULES)
def test_regression_jax_19490_large_masked_logits_do_not_leak_nan(rule):
    # jax #19490 / #17117: masked entries holding huge values produced NaN gradients.
    x = jnp.array([1.0, 2.0, 1e38, jnp.inf, jnp.nan], jnp.float32)
    where = jnp.array([True, True, False, False, False])
    p = jsoftmax.softmax(x, where=where, rule=rule)
    np.testing.assert_allclose(p[:2], np_softmax(x[:2], -1), rtol=1e-6)
    assert np.all(np.asarray(p[2:]) == 0)
    g = jax.grad(lambda z: jnp.sum(jsoftmax.softmax(z, where=where, rule=rule) * z[0]))(x)
    chex.assert_tree_all_finite(g)
    assert np.all(np.asarray(g[2:]) == 0)


@pytest.mark.parametrize("rule", RULES)
def test_fully_masked_row_gives_zeros_with_zero_finite_gradient(rule):
    x = make_logits((2, 4), REF_DTYPE)
    where = jnp.array([[False] * 4, [True, True, False, True]])
    f = lambda z: jsoftmax.softmax(z, where=where, rule=rule)
    p = f(x)
    assert np.all(np.asarray(p[0]) == 0)
    rtol = tol(REF_DTYPE, 1e-14, 5e-7)
    chex.assert_trees_all_close(p[1].sum(), jnp.ones((), REF_DTYPE), rtol=rtol)
    jac = jax.jacrev(f)(x)
    chex.assert_tree_all_finite(jac)
    assert np.all(np.asarray(jac[0]) == 0)


@pytest.mark.parametrize("rule", RULES)
def test_neg_inf_logit_behaves_as_masked(rule):
    x = jnp.array([0.5, -jnp.inf, 1.5, -jnp.inf], REF_DTYPE)
    where = jnp.isfinite(x)
    f = lambda z: jsoftmax.softmax(z, rule=rule)
    rtol = tol(REF_DTYPE, 1e-15, 5e-7)
    chex.assert_trees_all_close(f(x), jsoftmax.softmax(x, where=where), rtol=rtol)
    jac = jax.jacrev(f)(x)
    chex.assert_tree_all_finite(jac)
    assert np.all(np.asarray(jac)[:, ~np.asarray(where)] == 0)


@pytest.mark.parametrize("rule", RULES)
def test_all_neg_inf_row_gives_zeros(rule):
    x = jnp.full((3,), -jnp.inf, jnp.float32)
    p = jsoftmax.softmax(x, rule=rule)
    assert np.all(np.asarray(p) == 0)
    g = jax.grad(lambda z: jnp.sum(jsoftmax.softmax(z, rule=rule) * jnp.arange(3.0)))(x)
    assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("bad", [jnp.inf, jnp.nan])
def test_pos_inf_or_nan_gives_nan_row(bad):
    # Documented: +inf and NaN are not hidden; only the affected row is NaN.
    x = jnp.array([[1.0, bad, 0.0], [1.0, 2.0, 3.0]], jnp.float32)
    p = jsoftmax.softmax(x)
    assert np.all(np.isnan(np.asarray(p[0])))
    chex.assert_tree_all_finite(p[1])


def test_n_equals_one():
    x = jnp.array([[3.0], [-7.0]], REF_DTYPE)
    chex.assert_trees_all_close(jsoftmax.softmax(x), jnp.ones((2, 1), REF_DTYPE))
    jac = jax.jacfwd(lambda z: jsoftmax.softmax(z, rule="jvp"))(x[0])
    assert np.all(np.asarray(jac) == 0)
    g = jax.grad(lambda z: jsoftmax.softmax(z)[0, 0])(x)
    assert np.all(np.asarray(g) == 0)


def test_empty_axis_returns_empty():
    x = jnp.zeros((3, 0), jnp.float32)
    p = jsoftmax.softmax(x)
    assert p.shape == (3, 0) and p.dtype == jnp.float32


def test_integer_input_is_promoted_to_default_float():
    p = jsoftmax.softmax(jnp.array([1, 2, 3], jnp.int32))
    assert p.dtype == jnp.result_type(float)
    ref = np_softmax(np.array([1.0, 2.0, 3.0]), -1)
    np.testing.assert_allclose(p, ref, rtol=tol(p.dtype, 1e-12, 2e-6))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_regression_low_precision_accumulates_in_float32(dtype):
    # jax.nn.softmax sums 100 000 float16 ones in float16, overflowing to inf: p = 0.
    x = jnp.zeros((100_000,), dtype)
    p = jsoftmax.softmax(x)
    assert p.dtype == dtype
    np.testing.assert_allclose(np.asarray(p, np.float64), 1e-5, rtol=2**-7)
    g = jax.grad(lambda z: jnp.sum(jsoftmax.softmax(z).astype(jnp.float32) ** 2))(x)
    chex.assert_tree_all_finite(g)


_LABELS = jnp.zeros((4,), jnp.int32)


def _sharded_cross_entropy(x):
    mesh = jax.make_mesh((1,), ("vocab",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.PartitionSpec
    f = lambda x: jsoftmax.sharded.cross_entropy(x, _LABELS, "vocab")  # noqa: E731
    return jax.shard_map(f, mesh=mesh, in_specs=spec(None, "vocab"), out_specs=spec())(x)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize(
    "fn",
    [
        jsoftmax.softmax,
        jsoftmax.log_softmax,
        lambda x: jsoftmax.cross_entropy(x, _LABELS),
        lambda x: jsoftmax.token_log_probs(x, _LABELS),
        _sharded_cross_entropy,
    ],
    ids=["softmax", "log_softmax", "cross_entropy", "token_log_probs", "sharded_ce"],
)
def test_16bit_row_maximum_is_taken_in_the_input_dtype(fn, dtype):
    # The maximum is exact in any dtype; a 16-bit reduction reads half the bytes of a
    # float32 copy. The sum stays float32.
    text = jax.jit(fn).lower(jnp.zeros((4, 8), dtype)).as_text()
    name = jnp.dtype(dtype).name.replace("float", "f")
    reductions = [line for line in text.splitlines() if "stablehlo.reduce" in line]
    assert any("maximum" in r and f"tensor<4x8x{name}>" in r for r in reductions), reductions
    assert any("add" in r and "tensor<4x8xf32>" in r for r in reductions), reductions


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion")
def test_bfloat16_vjp_keeps_no_more_temporaries_than_jax_nn():
    # The shift by the dominant entry is arithmetic, not a select, so the value and VJP
    # compile to fused kernels. With a select XLA:CPU split the VJP into three kernels
    # with three float32 arrays of the input's size (48 MiB here; jax.nn: 16.5 MiB).
    x = jnp.zeros((4096, 1024), jnp.bfloat16)

    def temporaries(sm):
        def value_and_vjp(x, g):
            y, pullback = jax.vjp(sm, x)
            return y, pullback(g)[0]

        compiled = jax.jit(value_and_vjp).lower(x, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries(jsoftmax.softmax) <= temporaries(jax.nn.softmax)


def test_no_retracing_for_equal_shapes():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(z):
        return jsoftmax.softmax(z)

    for seed in range(3):
        f(make_logits((4, 7), jnp.float32, seed=seed)).block_until_ready()


# ------------------------------------------------------------------------------ errors


def test_error_scalar_input():
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        jsoftmax.softmax(jnp.float32(1.0))


@pytest.mark.parametrize("axis", [2, -3])
def test_error_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=f"axis={axis} is out of range"):
        jsoftmax.softmax(jnp.zeros((2, 3)), axis=axis)


def test_error_axis_not_int():
    with pytest.raises(TypeError, match="axis must be an int"):
        jsoftmax.softmax(jnp.zeros((2, 3)), axis=1.0)


def test_error_where_does_not_broadcast():
    with pytest.raises(ValueError, match=r"where of shape \(4,\) does not broadcast"):
        jsoftmax.softmax(jnp.zeros((2, 3)), where=jnp.ones(4, bool))


def test_error_where_not_boolean():
    with pytest.raises(TypeError, match="where must be a boolean mask"):
        jsoftmax.softmax(jnp.zeros((2, 3)), where=jnp.ones(3))


def test_error_unknown_rule():
    with pytest.raises(ValueError, match="rule must be one of"):
        jsoftmax.softmax(jnp.zeros(3), rule="fwd")


def test_error_raised_before_tracing():
    # The check runs on static shapes, so it fires inside jit at trace time too.
    with pytest.raises(ValueError, match="axis=5 is out of range"):
        jax.jit(lambda z: jsoftmax.softmax(z, axis=5))(jnp.zeros((2, 3)))


def test_error_complex_input():
    with pytest.raises(TypeError, match="x must be real"):
        jsoftmax.softmax(jnp.zeros(3, jnp.complex64))


@pytest.mark.parametrize("with_t", [False, True], ids=["T=1", "temperature"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_jvp_rule_forward_mode_edge_rows(log, with_t):
    # The jvp rule reads which entries are constants from its output: masked and -inf
    # entries drop their (here infinite) tangents, a NaN row stays NaN, a fully masked
    # row has a zero tangent.
    fn, ref_fn = (
        (jsoftmax.log_softmax, jax.nn.log_softmax) if log else (jsoftmax.softmax, jax.nn.softmax)
    )
    x = make_logits((4, 6), REF_DTYPE)
    x = x.at[0, 1].set(-jnp.inf).at[2, 3].set(jnp.nan)
    where = jnp.ones((4, 6), bool).at[0, 4].set(False).at[3].set(False)
    dx = make_logits((4, 6), REF_DTYPE, seed=1)
    dx = dx.at[0, 1].set(jnp.inf).at[0, 4].set(-jnp.inf).at[3, 0].set(jnp.inf)
    t = jnp.array([0.7, 1.3, 2.0, 0.9], REF_DTYPE)
    dt = jnp.array([0.3, -0.2, 0.1, 0.5], REF_DTYPE)
    if with_t:
        out, tan = jax.jvp(
            lambda z, s: fn(z, where=where, rule="jvp", temperature=s), (x, t), (dx, dt)
        )
    else:
        out, tan = jax.jvp(lambda z: fn(z, where=where, rule="jvp"), (x,), (dx,))
    live = jnp.array([0, 2, 3, 5])
    z0, d0 = x[0, live], dx[0, live]
    if with_t:
        ref = jax.jvp(lambda z, s: ref_fn(z / s), (z0, t[0]), (d0, dt[0]))[1]
        ref1 = jax.jvp(lambda z, s: ref_fn(z / s), (x[1], t[1]), (dx[1], dt[1]))[1]
    else:
        ref = jax.jvp(ref_fn, (z0,), (d0,))[1]
        ref1 = jax.jvp(ref_fn, (x[1],), (dx[1],))[1]
    rtol, atol = tol(REF_DTYPE, (1e-12, 1e-14), (2e-6, 1e-7))
    chex.assert_trees_all_close(tan[0, live], ref, rtol=rtol, atol=atol)
    chex.assert_trees_all_close(tan[1], ref1, rtol=rtol, atol=atol)
    assert tan[0, 1] == 0 and tan[0, 4] == 0  # constants: -inf logit, masked entry
    assert np.all(np.isnan(np.asarray(out[2]))) and np.all(np.isnan(np.asarray(tan[2])))
    assert np.all(np.asarray(tan[3]) == 0)  # fully masked row
