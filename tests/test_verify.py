"""Tests of the verification harness (:mod:`jsoftmax.tools.verify`) and
`python -m jsoftmax verify`."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax
from jsoftmax.__main__ import main
from jsoftmax.tools import verify as verify_module

from helpers import REF_DTYPE, X64

pytestmark = pytest.mark.slow

METHODS = {
    "jsoftmax.jacobian (explicit)",
    "jacrev(softmax, rule=vjp)",
    "jacfwd(softmax, rule=jvp)",
    "jacrev(softmax, rule=jvp)",
    "jacfwd(jax.nn.softmax)",
    "jsoftmax.log_softmax_jacobian",
    "jsoftmax.softmax_jvp",
    "jsoftmax.softmax_vjp",
    "jsoftmax.hessian (explicit)",
    "hessian(softmax, rule=jvp)",
    "SoftmaxJacobian @ v",
    "v @ SoftmaxJacobian",
    "SoftmaxJacobian.dense()",
    "jsoftmax.linear_cross_entropy (chunked)",
    "jsoftmax.cross_entropy(h @ w) (dense)",
    "jacrev(jsoftmax.attention)",
    "jsoftmax.merge_partials(attention halves)",
    "jsoftmax.token_log_probs",
    "jsoftmax.linear_token_log_probs",
    "jsoftmax.kl_divergence",
    "jsoftmax.linear_kl_divergence",
}
POST_METHODS = {
    "jsoftmax.token_log_probs",
    "jsoftmax.linear_token_log_probs",
    "jsoftmax.kl_divergence",
    "jsoftmax.linear_kl_divergence",
}


def test_verify_report_agrees_and_covers_every_method():
    report = jsoftmax.verify(sizes=(17,), dtypes=("float32", "float64"), batched=(((3, 5), 0),))
    assert report.ok, report.table()
    assert {r.method for r in report.rows} == METHODS
    # float64 is skipped where it is off.
    assert {r.dtype for r in report.rows} == ({"float32", "float64"} if X64 else {"float32"})
    assert f"backend: {jax.default_backend()}" in report.table()


def test_a_wrong_fused_loss_attention_or_post_training_loss_fails(monkeypatch):
    # linear_cross_entropy, attention and each of the four post-training functions off by
    # 0.1%, in one run: each must be caught by its own rows, and nothing else may fail.
    def off_by_a_bit(real):
        def wrong(*args, **kw):
            out = real(*args, **kw)
            return tuple(1.001 * o for o in out) if isinstance(out, tuple) else 1.001 * out

        return wrong

    real_attention = jsoftmax.attention

    def wrong_attention(q, k, v, *args, **kw):
        out = real_attention(q, k, v, *args, **kw)
        return (1.001 * out[0], out[1]) if kw.get("return_lse") else 1.001 * out

    for attr in ["linear_cross_entropy"] + [name.split(".")[1] for name in POST_METHODS]:
        monkeypatch.setattr(jsoftmax, attr, off_by_a_bit(getattr(jsoftmax, attr)))
    monkeypatch.setattr(jsoftmax, "attention", wrong_attention)
    report = jsoftmax.verify(sizes=(17,), dtypes=("float32",), batched=())
    bad = {r.method for r in report.rows if r.gating and not r.ok}
    assert not report.ok
    assert (
        bad
        == {
            "jsoftmax.linear_cross_entropy (chunked)",
            "jacrev(jsoftmax.attention)",
            "jsoftmax.merge_partials(attention halves)",
        }
        | POST_METHODS
    )


def test_top_level_name_is_the_tool():
    assert jsoftmax.verify is verify_module.verify
    assert jsoftmax.tools.verify.verify is verify_module.verify


def _wrong_jacobian(x, axis=-1, *, where=None):  # vectors only, as used below
    # The classic index slip: J_ij = p_i (delta_ij - p_i).
    p = jsoftmax.softmax(x)
    return p[:, None] * (jnp.eye(p.shape[0], dtype=p.dtype) - p[:, None])


def test_verify_detects_a_wrong_method(monkeypatch):
    # The harness must be able to fail.
    monkeypatch.setattr(jsoftmax, "jacobian", _wrong_jacobian)
    dtype = np.dtype(REF_DTYPE).name
    report = jsoftmax.verify(sizes=(4,), dtypes=(dtype,), batched=(), family=False)
    assert not report.ok
    bad = [r for r in report.rows if not r.ok]
    assert [r.method for r in bad] == ["jsoftmax.jacobian (explicit)"]


def test_reference_is_independent_numpy():
    p = verify_module._np_softmax(np.array([[0.0, np.log(3.0)]]))
    np.testing.assert_allclose(p, [[0.25, 0.75]], rtol=1e-15)
    np.testing.assert_allclose(
        verify_module._np_jacobian(p)[0], [[0.1875, -0.1875], [-0.1875, 0.1875]]
    )


# --------------------------------------------------------------------------------------
# The summary, --full and --json.
# --------------------------------------------------------------------------------------

ARGS = ["verify", "--sizes", "2", "5", "--dtypes", "float32", "--no-batched", "--quiet"]
# Two inputs (n = 2, 5 <= 64, so the Hessians too), one row per method, three (loss,
# d/dh, d/dw) for the two linear cross-entropy methods; once per dtype, the two attention
# methods and the post-training rows (log-probs: values and gradients, dense and fused;
# divergences: three betas, dense and fused).
N_ROWS = 2 * (len(METHODS) - 2 - len(POST_METHODS) + 4) + 2 + 10


def _table_lines(out: str) -> list[str]:
    # The lines between the dashed separator and the blank line after the table.
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    end = lines.index("", start)
    return lines[start:end]


def test_cli_summary_full_table_and_json(monkeypatch, tmp_path, capsys):
    # Three invocations of the same check: the first computes the report, the others
    # print it again (each invocation parses its arguments, runs `verify` and formats).
    real, reports = verify_module.verify, {}

    def once(*args, **kw):
        key = repr((args, {k: v for k, v in kw.items() if k != "progress"}))
        if key not in reports:
            reports[key] = real(*args, **kw)
        return reports[key]

    monkeypatch.setattr(verify_module, "verify", once)

    # The default: a summary, one line per method (the worst of its rows), each once.
    assert main(ARGS) == 0
    out = capsys.readouterr().out
    rows = _table_lines(out)
    assert len(rows) == len(METHODS)
    for method in METHODS:
        assert sum(method in re.split(r"\s{2,}", line) for line in rows) == 1, method
    assert "float32" in out and "eps" in out
    assert "--full" in out
    assert out.rstrip().endswith(f"result: all methods agree ({N_ROWS} comparisons)")
    assert len(out.splitlines()) < 30

    # --full: every comparison.
    assert main([*ARGS, "--full"]) == 0
    out = capsys.readouterr().out
    rows = _table_lines(out)
    assert len(rows) == N_ROWS
    assert sum(line.startswith("H = d2 softmax") for line in rows) == 4
    assert out.rstrip().endswith(f"result: all methods agree ({N_ROWS} comparisons)")

    # --json: every comparison, written.
    path = tmp_path / "verify.json"
    assert main([*ARGS, "--json", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["backend"] == jax.default_backend()
    assert len(data["rows"]) == N_ROWS
    assert {r["method"] for r in data["rows"]} == METHODS
    for r in data["rows"]:
        # attention: (B, T, N, H); post-training: (N, V) dense, (N, H, H_t, V) fused
        shapes = ([2], [5], [1, 6, 4, 4], [6, 11], [6, 5, 7, 11])
        assert r["shape"] in shapes and r["axis"] == -1
        assert r["dtype"] == "float32"
        assert r["ok"] == (r["max_rel_err"] <= r["tolerance"])
        assert 0 <= r["max_rel_err"] <= r["tolerance"] or not r["gating"]
    assert len(reports) == 1


def test_cli_summary_shows_failures_in_full(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(jsoftmax, "jacobian", _wrong_jacobian)
    path = tmp_path / "verify.json"
    args = ["verify", "--sizes", "4", "--dtypes", "float64", "--no-batched", "--no-family"]
    assert main([*args, "--quiet", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    assert "out of tolerance:" in out
    failing = [line for line in out.splitlines() if line.endswith("FAIL")]
    # Once in the summary (float64 column), once in full below it.
    assert len(failing) == 2 and all("jsoftmax.jacobian (explicit)" in f for f in failing)
    assert out.rstrip().endswith("result: 1 comparison(s) out of tolerance (5 comparisons)")
    data = json.loads(path.read_text())
    assert data["ok"] is False
    assert [r["method"] for r in data["rows"] if not r["ok"]] == ["jsoftmax.jacobian (explicit)"]


def test_cli_float64_leaves_the_jax_configuration_alone(tmp_path, capsys):
    # float64 is on for the run only: a caller in JAX's default configuration keeps it.
    path = tmp_path / "verify.json"
    args = ["verify", "--sizes", "3", "--dtypes", "float64", "--no-batched", "--no-family"]
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", False)
    try:
        assert main([*args, "--quiet", "--json", str(path)]) == 0
        assert jax.config.read("jax_enable_x64") is False
    finally:
        jax.config.update("jax_enable_x64", before)
    rows = json.loads(path.read_text())["rows"]
    assert rows and all(r["dtype"] == "float64" for r in rows)


def test_cli_rejects_bad_sizes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["verify", "--sizes", "0"])
    assert e.value.code == 2
    assert "--sizes" in capsys.readouterr().err


def test_cli_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "verify" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "jsoftmax", "verify", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "float64" in out and "--sizes" in out and "--full" in out and "--json" in out
