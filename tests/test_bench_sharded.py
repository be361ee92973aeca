"""The sharded benchmark rows (``python -m jsoftmax bench --devices N``): a 2-device run
in this process (conftest.py provides 8 simulated CPU devices) and one in a fresh
interpreter, where the devices are requested through JAX's configuration."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

import jsoftmax
from jsoftmax.tools import bench

pytestmark = pytest.mark.slow

BATCH, VOCAB = 256, 8192  # the quick problem
LOGITS_BYTES = BATCH * VOCAB * 4  # float32


@pytest.fixture(scope="module")
def two_devices():
    return bench.run(quick=True, groups=["sharded"], devices=2, repeats=1)


def _rows(result, prefix):
    return [r for r in result["rows"] if r["case"].startswith(prefix)]


def test_only_sharded_rows_for_one_and_two_devices(two_devices):
    rows = two_devices["rows"]
    assert rows and {r["group"] for r in rows} == {"sharded"}
    assert two_devices["meta"]["device_count"] >= 2
    times = _rows(two_devices, "cross_entropy value+grad")
    assert [r["case"] for r in times] == [
        "cross_entropy value+grad, vocab over 1 device",
        "cross_entropy value+grad, vocab over 2 devices",
    ]
    for r in times:
        assert r["unit"] == "s" and r["candidate_value"] > 0 and r["baseline_value"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_value"] / r["candidate_value"])
        assert r["note"] == ""  # sharded and unsharded loss and gradient agree
        assert r["shape"] == [BATCH, VOCAB] and r["dtype"] == "float32"


def test_logits_per_device_fall_as_one_over_d(two_devices):
    rows = _rows(two_devices, "logits bytes per device")
    assert [r["candidate_value"] for r in rows] == [LOGITS_BYTES, LOGITS_BYTES / 2]
    assert all(r["baseline_value"] == LOGITS_BYTES for r in rows)
    assert [r["ratio"] for r in rows] == [1.0, 2.0]


def test_compiled_step_per_device_shrinks_with_two_devices(two_devices):
    one, two = (r["candidate_value"] for r in _rows(two_devices, "compiled step footprint"))
    # Each device holds at least its half of the logits and of their gradient.
    assert two < one
    assert two >= LOGITS_BYTES


def test_rows_render_in_the_table(two_devices):
    text = bench.format_table(two_devices)
    assert "vocab over 2 devices" in text and "WARNING" not in text


def test_sharded_rows_report_a_wrong_sharded_loss(monkeypatch):
    real = jsoftmax.sharded.cross_entropy

    def wrong(*args, **kwargs):
        return 1.5 * real(*args, **kwargs)

    monkeypatch.setattr(jsoftmax.sharded, "cross_entropy", wrong)
    result = bench.run(quick=True, groups=["sharded"], devices=1, repeats=1)
    times = _rows(result, "cross_entropy value+grad")
    assert [r["note"] for r in times] == ["RESULTS DIFFER"]


def test_cli_in_a_fresh_process_requests_two_devices(tmp_path):
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    path = tmp_path / "sharded.json"
    cmd = [sys.executable, "-m", "jsoftmax", "bench", "--quick", "--only", "sharded"]
    cmd += ["--devices", "2", "--repeats", "1", "--no-progress", "--json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(path.read_text())
    assert result["meta"]["device_count"] == 2
    cases = [r["case"] for r in result["rows"]]
    assert "logits bytes per device, 2 devices" in cases
    assert all(r["group"] == "sharded" and "DIFFER" not in r["note"] for r in result["rows"])
    assert "vocab over 2 devices" in proc.stdout


def test_prepare_devices_rejects_a_non_positive_count():
    with pytest.raises(ValueError, match="positive"):
        bench.prepare_devices(0)
    with pytest.raises(ValueError, match="positive"):
        bench.prepare_devices(jnp.int32(2))
