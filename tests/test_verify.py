"""Tests of the verification harness and `python -m jsoftmax verify`."""

import subprocess
import sys

import jax.numpy as jnp
import numpy as np

import jsoftmax
from jsoftmax import _verify
from jsoftmax.__main__ import main


def test_verify_report_agrees_and_covers_every_method():
    report = jsoftmax.verify(sizes=(2, 17), dtypes=("float32", "float64"), batched=(((3, 5), 0),))
    assert report.ok, report.table()
    methods = {r.method for r in report.rows}
    assert {
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
    } <= methods
    assert {r.dtype for r in report.rows} == {"float32", "float64"}
    assert "backend: cpu" in report.table()


def test_verify_detects_a_wrong_method(monkeypatch):
    # The harness must be able to fail: a Jacobian with the classic index slip
    # (J_ij = p_i(delta_ij - p_i)) is reported out of tolerance.
    def wrong(x, axis=-1, *, where=None):  # vectors only, as used below
        p = jsoftmax.softmax(x)
        return p[:, None] * (jnp.eye(p.shape[0], dtype=p.dtype) - p[:, None])

    monkeypatch.setattr(_verify._jacobian, "jacobian", wrong)
    report = jsoftmax.verify(sizes=(4,), dtypes=("float64",), batched=(), family=False)
    assert not report.ok
    bad = [r for r in report.rows if not r.ok]
    assert [r.method for r in bad] == ["jsoftmax.jacobian (explicit)"]


def test_reference_is_independent_numpy():
    p = _verify._np_softmax(np.array([[0.0, np.log(3.0)]]))
    np.testing.assert_allclose(p, [[0.25, 0.75]], rtol=1e-15)
    np.testing.assert_allclose(_verify._np_jacobian(p)[0], [[0.1875, -0.1875], [-0.1875, 0.1875]])


def test_cli_verify_exit_code_and_table(capsys):
    rc = main(["verify", "--sizes", "2", "5", "--dtypes", "float32", "--no-batched", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "result: all methods agree" in out and "float32" in out


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
    assert "float64" in out and "--sizes" in out
