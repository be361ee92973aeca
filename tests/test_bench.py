"""Tests of ``python -m jsoftmax bench`` (:mod:`jsoftmax.tools.bench`): it runs and
writes valid JSON, its agreement check and residual count can fail, and the functions it
times are not recompiled on repeated calls. Speed is reported by the benchmark, never
asserted here."""

import json
import math
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from jsoftmax.tools import bench
from jsoftmax.tools.bench import _timing

from helpers import saved_residuals

pytestmark = pytest.mark.slow

ROW_FIELDS = {
    "group",
    "case",
    "candidate",
    "baseline",
    "unit",
    "candidate_value",
    "baseline_value",
    "ratio",
    "shape",
    "dtype",
    "candidate_iqr",
    "baseline_iqr",
    "target",
    "met",
    "note",
}
META_FIELDS = {"backend", "device", "jax", "jsoftmax", "dtype", "mode", "repeats", "date"}


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    code = bench.main(["--quick", "--repeats", "3", "--json", str(path), "--no-progress"])
    assert code == 0
    with open(path) as fh:
        return json.load(fh)


def test_quick_json_has_meta_and_rows(quick_result):
    assert META_FIELDS <= set(quick_result["meta"])
    assert quick_result["meta"]["mode"] == "quick"
    assert quick_result["meta"]["jax"] == jax.__version__
    groups = {r["group"] for r in quick_result["rows"]}
    for g in ("forward", "fwd+bwd (a)", "fwd+bwd (b)", "jacobian", "jacobian-free", "memory"):
        assert g in groups
    for row in quick_result["rows"]:
        assert set(row) == ROW_FIELDS, row
        assert row["unit"] in ("s", "bytes", "fraction")
        assert row["group"] in bench.GROUPS


def test_quick_json_timing_rows_are_consistent(quick_result):
    timed = [r for r in quick_result["rows"] if r["unit"] == "s"]
    assert timed
    for r in timed:
        c, b = r["candidate_value"], r["baseline_value"]
        assert c > 0 and b > 0 and math.isfinite(c) and math.isfinite(b)
        assert r["ratio"] == pytest.approx(b / c, rel=1e-12)
        lo, hi = r["candidate_iqr"]
        assert lo <= c <= hi
        lo, hi = r["baseline_iqr"]
        assert lo <= b <= hi
        assert "DIFFER" not in r["note"], r  # the two sides computed the same thing
        if r["target"] is not None:
            assert r["met"] == (r["ratio"] >= r["target"])


def test_quick_json_bandwidth_rows(quick_result):
    # On a CPU the quick run has the accelerator group too (a small shape, no target), so
    # that the smoke test of .ci/device runs its code: softmax and cross-entropy rows
    # whose ratio is jsoftmax's fraction of the bound, beside the baseline's.
    rows = [r for r in quick_result["rows"] if r["group"] == "bandwidth"]
    cases = [r["case"].split()[0] for r in rows]
    assert cases == ["softmax", "cross_entropy"], cases
    for r in rows:
        assert r["unit"] == "fraction" and r["ratio"] == r["candidate_value"]
        assert 0 < r["candidate_value"] and 0 < r["baseline_value"]
        assert "fraction of the bound" in r["note"] and "DIFFER" not in r["note"]
        if jax.default_backend() == "cpu":
            assert r["target"] is None and r["met"] is None


def test_quick_json_residuals_one_output_sized_array(quick_result):
    # Independent count: one float32 array of the benchmark shape.
    row = next(
        r
        for r in quick_result["rows"]
        if r["group"] == "memory" and r["candidate"] == "jsoftmax.softmax(rule='vjp')"
    )
    assert row["candidate_value"] == np.prod(row["shape"]) * 4
    assert row["met"] is True
    assert "jsoftmax 1," in row["note"]


def test_format_table_names_backend_and_misses():
    result = {
        "meta": {
            "jsoftmax": "0",
            "mode": "quick",
            "repeats": 1,
            "date": "d",
            "backend": "cpu",
            "device": "cpu: cpu",
            "device_count": 1,
            "jax": jax.__version__,
            "cpu_count": 2,
            "dtype": "float32",
            "peak_bytes_in_use": "n/a",
        },
        "rows": [
            bench.Row(
                group="forward",
                case="softmax (2, 3) float32",
                candidate="jsoftmax.softmax",
                baseline="jax.nn.softmax",
                unit="s",
                candidate_value=2e-3,
                baseline_value=1e-3,
                ratio=0.5,
                candidate_iqr=[1e-3, 3e-3],
                baseline_iqr=[1e-3, 1e-3],
                target=0.95,
                met=False,
            ).as_dict()
        ],
    }
    text = bench.format_table(result)
    assert "backend: cpu" in text and f"jax {jax.__version__}" in text
    assert "targets met: 0/1" in text
    assert "MISSED" in text and "2.00 ms" in text


def test_time_interleaved_counts_calls():
    calls = {"a": 0, "b": 0}

    def make(name):
        def f():
            calls[name] += 1
            return jnp.zeros((), jnp.float32)

        return f

    t = bench.time_interleaved({"a": make("a"), "b": make("b")}, repeats=3, min_sample_s=0.0)
    assert set(t) == {"a", "b"}
    for name in ("a", "b"):
        # 2 warm-up calls + 3 repeats of 1 call each.
        assert calls[name] == 5
        assert t[name].repeats == 3 and t[name].min <= t[name].median <= t[name].max


def test_bad_arguments_exit_2(capsys):
    assert bench.main(["--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert bench.main(["--only", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    with pytest.raises(ValueError, match="groups"):
        bench.run(groups=["nonsense"])


def test_plot_without_matplotlib_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert bench.main(["--quick", "--plot", str(tmp_path / "p.png")]) == 2
    assert "matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_sharded_group_needs_devices(capsys):
    assert bench.main(["--quick", "--only", "sharded"]) == 2
    assert "--devices" in capsys.readouterr().err
    with pytest.raises(ValueError, match="devices"):
        bench.run(groups=["sharded"])


def test_devices_beyond_what_jax_has_says_so(capsys):
    # The test process's backends have started with 8 devices; 16 cannot be had.
    assert bench.main(["--quick", "--only", "sharded", "--devices", "16"]) == 2
    assert "needs 16 devices" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The agreement check and the residual count can fail.
# --------------------------------------------------------------------------------------


def test_agree_flags_different_results():
    a = jnp.array([0.25, 0.75], jnp.float32)
    assert _timing.agree(a, a + 1e-7, jnp.float32) == ""
    assert _timing.agree(a, a[::-1], jnp.float32) == "RESULTS DIFFER"
    assert _timing.agree(a, jnp.concatenate([a, a]), jnp.float32) == "RESULTS DIFFER"  # shape
    assert _timing.agree((a, a), (a,), jnp.float32) == "RESULTS DIFFER"  # structure
    # 16-bit: a relative difference of 1e-2 is rounding, 1e-1 is not.
    b = jnp.array([1.0, 2.0], jnp.bfloat16)
    assert _timing.agree(b, b * 1.01, jnp.bfloat16) == ""
    assert _timing.agree(b, b * 1.1, jnp.bfloat16) == "RESULTS DIFFER"


def test_bench_reports_a_wrong_candidate(monkeypatch):
    # A softmax of the wrong temperature: every forward row must say the results differ,
    # and the table must warn.
    real = jsoftmax.softmax

    def wrong(x, axis=-1, *, where=None, **kwargs):
        return real(2 * x, axis, where=where, **kwargs)

    monkeypatch.setattr(jsoftmax, "softmax", wrong)
    result = bench.run(quick=True, groups=["forward"], repeats=1)
    rows = [r for r in result["rows"] if r["candidate"] == "jsoftmax.softmax"]
    assert rows and all(r["note"] == "RESULTS DIFFER" for r in rows)
    # The log_softmax rows of the group use the real implementation and agree.
    assert all(r["note"] == "" for r in result["rows"] if r not in rows)
    assert "WARNING: RESULTS DIFFER" in bench.format_table(result)


def _printed_residuals(f, *args):
    # jax's public printer (through the tests' one residual helper): count and bytes.
    res = saved_residuals(f, *args)
    return len(res), sum(aval.size * aval.dtype.itemsize for aval, _ in res)


@pytest.mark.parametrize(
    "name, f",
    [
        ("jsoftmax.softmax", jsoftmax.softmax),
        ("jsoftmax.softmax jvp", lambda x: jsoftmax.softmax(x, rule="jvp")),
        ("jax.nn.softmax", jax.nn.softmax),
        ("jax.nn.log_softmax", jax.nn.log_softmax),
    ],
)
def test_residual_count_matches_jax_printer(name, f):
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    assert _timing.residuals(f, x) == _printed_residuals(f, x), name


def test_residual_count_of_known_functions():
    x = jax.ShapeDtypeStruct((5, 3), jnp.float32)
    assert _timing.residuals(jnp.sin, x) == (1, 60)  # cos(x)
    assert _timing.residuals(lambda x: x * x, x) == (1, 60)  # the argument
    assert _timing.residuals(lambda x: x + 1.0, x) == (0, 0)  # nothing needed
    assert _timing.residuals(jsoftmax.softmax, x) == (1, 60)  # the output only


# --------------------------------------------------------------------------------------
# No recompilation across repeated calls with equal shapes.
# --------------------------------------------------------------------------------------

_FUNCTIONS = {
    "softmax": jsoftmax.softmax,
    "log_softmax": jsoftmax.log_softmax,
    "jacobian": jsoftmax.jacobian,
}


@pytest.mark.parametrize("name", sorted(_FUNCTIONS))
def test_jit_traces_once_for_equal_shapes(name):
    fn = _FUNCTIONS[name]

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x):
        return fn(x)

    key = jax.random.PRNGKey(0)
    for i in range(4):
        x = jax.random.normal(jax.random.fold_in(key, i), (3, 5), dtype=jnp.float32)
        f(x).block_until_ready()
    chex.clear_trace_counter()


class _CompileCounter:
    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration_secs, **kwargs):
        if event == self.EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(_FUNCTIONS))
def test_no_backend_compile_on_repeated_calls(name, jit):
    fn = jax.jit(_FUNCTIONS[name]) if jit else _FUNCTIONS[name]
    key = jax.random.PRNGKey(1)
    xs = [jax.random.normal(jax.random.fold_in(key, i), (4, 6), jnp.float32) for i in range(4)]
    ref = jax.nn.softmax(xs[0])  # an independent check that the calls compute something
    first = fn(xs[0])
    jax.block_until_ready(first)
    if name == "softmax":
        np.testing.assert_allclose(first, ref, rtol=1e-6, atol=1e-7)
    with _CompileCounter() as counter:
        for x in xs[1:]:
            jax.block_until_ready(fn(x))
    assert counter.count == 0


def test_compile_counter_sees_a_compilation():
    # The control for the test above: a new function with a new shape compiles.
    with _CompileCounter() as counter:
        jax.jit(lambda x: x * 3)(jnp.ones((7, 3), jnp.float32)).block_until_ready()
    assert counter.count >= 1


def test_plot_scaling_writes_the_linear_ce_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from jsoftmax.tools.bench._report import plot_scaling

    def row(unit, v, cand, base):
        return {
            "group": "linear-ce scaling",
            "unit": unit,
            "shape": [8, 4, v],
            "candidate_value": cand,
            "baseline_value": base,
        }

    rows = [row("bytes", 64, 1e6, 2e6), row("bytes", 128, 1e6, 4e6), row("s", 64, 0.1, 0.2)]
    result = {"meta": {"device": "cpu", "jax": "x"}, "rows": rows}
    path = tmp_path / "scaling.png"
    assert plot_scaling(result, str(path)) and path.stat().st_size > 1000
    assert not plot_scaling({"meta": result["meta"], "rows": []}, str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()
