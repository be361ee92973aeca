"""The accuracy report (:mod:`jsoftmax.tools.accuracy`), its ULP metric, and regressions
for the worst cases it found, against mpmath."""

import json
import sys

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

import jsoftmax
from jsoftmax.tools import accuracy

pytestmark = pytest.mark.slow

mpmath.mp.dps = 50


def _exact_log_softmax(x):
    xs = [mpmath.mpf(float(v)) for v in x]
    m = max(xs)
    lse = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in xs))
    return [v - lse for v in xs]


def _ulps(got, exact, dtype):
    got = np.asarray(got, np.float64)
    hi = np.array([float(v) for v in exact])
    lo = np.array([float(v - h) for v, h in zip(exact, hi, strict=True)])
    return np.abs((got - hi) - lo) / accuracy.ulp(hi, dtype)


def test_quick_report_cli_writes_valid_json(tmp_path, capsys):
    path = tmp_path / "acc.json"
    assert accuracy.main(["--quick", "--json", str(path), "--summary"]) == 0
    data = json.loads(path.read_text())
    rows = data["results"]
    assert {r["dtype"] for r in rows} == set(accuracy.DTYPES)
    assert {r["family"] for r in rows} == set(accuracy.FAMILIES)
    assert {r["impl"] for r in rows} == {"jsoftmax", "jax.nn"}
    for r in rows:
        assert r["max_ulp"] >= r["median_ulp"] >= 0
        assert r["nonfinite"] >= 0 and r["flushed"] >= 0
    # The headline claims of the README hold in the quick run too.
    high = [r for r in rows if r["impl"] == "jsoftmax" and r["op"] == "log_softmax[high]"]
    assert max(r["max_ulp"] for r in high if r["dtype"] in ("float32", "float64")) <= 4
    assert "| dtype | operation |" in capsys.readouterr().out


def test_report_rejects_unknown_names():
    with pytest.raises(ValueError, match="dtypes"):
        accuracy.run(dtypes=["float8"])
    with pytest.raises(ValueError, match="families"):
        accuracy.run(families=["cauchy"])
    with pytest.raises(ValueError, match="ops"):
        accuracy.run(ops=["softmax_hvp"])


def test_ulp_of_each_dtype():
    assert accuracy.ulp(np.array([1.0]), "float32")[0] == 2.0**-23
    assert accuracy.ulp(np.array([1.0]), "bfloat16")[0] == 2.0**-7
    assert accuracy.ulp(np.array([0.0]), "float16")[0] == 2.0**-24
    assert accuracy.ulp(np.array([3.0]), "float64")[0] == 2.0**-51


def test_errors_of_known_size():
    # Exact values hi + lo and results a known number of float32 ULPs away.
    u = 2.0**-23
    hi = np.array([1.0, 1.5, 0.75, 1.0, 0.0, 1e-40])
    lo = np.array([0.0, 0.0, 0.0, 2.0**-30, 0.0, 0.0])
    got = np.array([1.0 + 3 * u, 1.5 - u, 0.75 + u / 2, 1.0, 0.0, 0.0])
    ulps, rel, nonfinite, flushed = accuracy.errors(got, hi, lo, "float32")
    np.testing.assert_array_equal(ulps, [3.0, 1.0, 1.0, 2.0**-7, 0.0, 0.0])
    np.testing.assert_array_equal(rel[:3], [3 * u, u / 1.5, u / 2 / 0.75])
    assert not nonfinite.any()
    # 1e-40 is below float32's smallest normal and came out as 0: flushed, not an error.
    np.testing.assert_array_equal(flushed, [False] * 5 + [True])


def test_errors_of_nonfinite_results():
    hi, lo = np.array([0.5, 0.5, 1e300, -np.inf]), np.zeros(4)
    got = np.array([np.nan, np.inf, np.inf, -np.inf])
    ulps, _, nonfinite, _ = accuracy.errors(got, hi, lo, "float32")
    # NaN and inf where 0.5 is exact: infinite errors; 1e300 rounds to inf in float32, so
    # inf is right; -inf is exact.
    np.testing.assert_array_equal(ulps, [np.inf, np.inf, 0.0, 0.0])
    np.testing.assert_array_equal(nonfinite, [True, True, False, False])


def test_errors_relative_to_a_row_scale():
    # Derivatives: the error of a small component in ULPs of the row's largest one.
    hi, lo = np.array([[0.5, 2.0**-20]]), np.zeros((1, 2))
    got = hi + np.array([[0.0, 2.0**-26]])  # ulp(0.5) = 2**-24, ulp(2**-20) = 2**-43
    ulps, *_ = accuracy.errors(got, hi, lo, "float32", scale=np.full((1, 2), 0.5))
    np.testing.assert_array_equal(ulps, [[0.0, 0.25]])
    ulps, *_ = accuracy.errors(got, hi, lo, "float32")
    np.testing.assert_array_equal(ulps, [[0.0, 2.0**17]])


def test_report_measures_a_known_wrong_softmax(monkeypatch):
    # Doubling the probabilities is an error of about p / ulp(p) = 2**23 ULP in float32;
    # the jax.nn rows are untouched.
    real = jsoftmax.softmax

    def wrong(x, axis=-1, **kwargs):
        return 2 * real(x, axis, **kwargs)

    monkeypatch.setattr(jsoftmax, "softmax", wrong)
    rows = accuracy.run(quick=True, dtypes=["float32"], families=["normal"], ops=["softmax"])
    by_impl = {r["impl"]: r for r in rows}
    assert 2.0**22 <= by_impl["jsoftmax"]["max_ulp"] <= 2.0**24
    assert by_impl["jsoftmax"]["max_rel"] == pytest.approx(1.0, rel=1e-6)
    assert by_impl["jax.nn"]["max_ulp"] <= 4


def test_report_without_mpmath_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpmath", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"jsoftmax\[accuracy\]"):
        accuracy.run(quick=True, dtypes=["float32"], families=["normal"])
    assert accuracy.main(["--quick", "--dtypes", "float32"]) == 2
    assert "jsoftmax[accuracy]" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_log_softmax_of_dominant_logit_is_not_rounded_to_zero(dtype):
    # jax.nn gives log p = 0 for the dominant entry (log(1 + r) with r < eps); the
    # exact value is about -r = -256 exp(-gap).
    x = np.zeros(257)
    x[3] = 40.0 if dtype == "float32" else 80.0
    exact = _exact_log_softmax(x)
    got = jsoftmax.log_softmax(jnp.asarray(x, dtype), precision="high")
    assert _ulps(got, exact, dtype).max() <= 4
    assert float(got[3]) < 0
    assert float(jax.nn.log_softmax(jnp.asarray(x, dtype))[3]) == 0.0  # the known failure


def test_bfloat16_log_softmax_of_dominant_logit_within_one_ulp():
    x = np.zeros(65)
    x[0] = 20.0
    exact = _exact_log_softmax(x)
    got = jsoftmax.log_softmax(jnp.asarray(x, jnp.bfloat16), precision="high")
    assert _ulps(got, exact, "bfloat16").max() <= 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_high_precision_with_a_gap_of_sixty(dtype):
    # The rounding of s - max s alone costs ~|s - max s| / 2 ULP without the TwoSum
    # correction; float64 also needs the split sum (1 + many small terms).
    rng = np.random.default_rng(3)
    x = rng.standard_normal(257)
    x[10] = x.max() + 60.0
    x = np.asarray(jnp.asarray(x, dtype), np.float64)
    exact = [mpmath.exp(v) for v in _exact_log_softmax(x)]
    got = jsoftmax.softmax(jnp.asarray(x, dtype), precision="high")
    assert _ulps(got, exact, dtype).max() <= 4


@pytest.mark.parametrize("rule", ["vjp", "jvp"])
def test_softmax_gradient_with_dominant_logit_does_not_cancel(rule):
    # p_k (g_k - <p, g>) with p_k = 1 - 1e-13: the naive product cancels to noise
    # (~1e7 ULP of the row's largest component); shifting g by g_k keeps it exact.
    rng = np.random.default_rng(4)
    x = rng.standard_normal(33)
    x[5] = x.max() + 35.0
    g = rng.standard_normal(33)
    x, g = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (x, g))
    p = [mpmath.exp(v) for v in _exact_log_softmax(x)]
    w = mpmath.fsum(pj * (mpmath.mpf(gj) - mpmath.mpf(g[5])) for pj, gj in zip(p, g, strict=True))
    exact = [pi * ((mpmath.mpf(gi) - mpmath.mpf(g[5])) - w) for pi, gi in zip(p, g, strict=True)]

    def f(z):
        return jsoftmax.softmax(z, rule=rule, precision="high")

    xj, gj = jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32)
    if rule == "vjp":
        got = jax.vjp(f, xj)[1](gj)[0]
    else:
        got = jax.jvp(f, (xj,), (gj,))[1]
    scale = max(abs(float(v)) for v in exact)
    err = np.abs(np.asarray(got, np.float64) - np.array([float(v) for v in exact]))
    assert err.max() / accuracy.ulp(np.array([scale]), "float32")[0] <= 8


def test_float16_softmax_of_a_million_equal_logits():
    # float16 sums overflow at 65504: jax.nn gives 0; computed in float32, 1e-6 exact.
    n = 10**6
    got = jsoftmax.softmax(jnp.zeros(n, jnp.float16))
    ulps = _ulps(got[:1], [mpmath.mpf(1) / n], "float16")
    assert ulps.max() <= 1
    assert float(jax.nn.softmax(jnp.zeros(n, jnp.float16))[0]) == 0.0


@pytest.mark.parametrize("precision", ["default", "high"])
def test_masked_and_neg_inf_entries_stay_exact_zero(precision):
    x = jnp.array([1.0, -jnp.inf, 3.0, 1e30], jnp.float32)
    where = jnp.array([True, True, True, False])
    p = jsoftmax.softmax(x, where=where, precision=precision)
    lp = jsoftmax.log_softmax(x, where=where, precision=precision)
    assert float(p[1]) == 0.0 and float(p[3]) == 0.0
    assert float(lp[1]) == -np.inf and float(lp[3]) == -np.inf
    exact = [mpmath.exp(v) for v in _exact_log_softmax(np.array([1.0, 3.0]))]
    assert _ulps(p[jnp.array([0, 2])], exact, "float32").max() <= 4
    empty = jsoftmax.log_softmax(x, where=jnp.zeros(4, bool), precision=precision)
    assert bool(jnp.all(empty == -jnp.inf))


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        jsoftmax.softmax(jnp.ones(3, jnp.float32), precision="highest")
    with pytest.raises(ValueError, match="precision"):
        jsoftmax.log_softmax(jnp.ones(3, jnp.float32), precision=None)
