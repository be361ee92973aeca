"""``python examples/language_model.py --quick``: a transformer trained with jsoftmax next to
the code written today (jax.nn.softmax attention with an additive mask, optax's
cross-entropy of the full logits), from the same parameters on the same batches.

The run trains both models on the Python standard library's source files and prints a JSON
summary as its last line. Asserted: both models learn (held-out loss well below the
initial one), the two runs agree (the math is the same), and the fused output layer makes
the compiled training step's temporaries smaller (structural, from ``memory_analysis``).
Step times are printed by the run, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flax.nnx")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "language_model.py"
TIMEOUT_S = 900  # a safety net against a hung run, not a speed assertion
KEYS = {
    "initial_loss",
    "loss_baseline",
    "loss_jsoftmax",
    "step_temp_bytes_baseline",
    "step_temp_bytes_jsoftmax",
    "step_time_ratio",
}


@pytest.mark.slow
def test_quick_run(tmp_path):
    # A plain session's environment: no simulated devices, no float64 from conftest.py.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(summary), summary

    initial = summary["initial_loss"]
    base, fused = summary["loss_baseline"], summary["loss_jsoftmax"]
    # Untrained: about log(vocabulary) = log(16 385) = 9.70.
    assert 9.0 < initial < 10.5, summary
    # Both learn: the final held-out loss is well below the initial one.
    assert base < initial - 2.0 and fused < initial - 2.0, summary
    # Same math, same parameters, same batches: the runs agree (float32 rounding only).
    assert abs(fused - base) <= 0.01 * base, summary
    assert summary["max_relative_difference"] <= 0.01, summary
    # The fused output layer never builds the tokens x vocabulary logits.
    assert summary["step_temp_bytes_jsoftmax"] < summary["step_temp_bytes_baseline"], summary
    assert summary["step_time_ratio"] > 0, summary
