"""``python examples/language_model.py --quick --context 1024``: a transformer trained with
jsoftmax next to the code written today (the attention scores, an additive mask and
jax.nn.softmax; optax's cross-entropy of the full logits), from the same parameters on the
same batches.

The run trains both models on the Python standard library's source files and prints a JSON
summary as its last line. Asserted: both models learn (held-out loss well below the
initial one), the two runs agree (the math is the same), and the blockwise attention and
the fused output layer make the compiled temporaries smaller (structural, from
``memory_analysis``). Step times are printed by the run, never asserted. The two attention
functions the runs pass to the model are checked against ``jax.nn.dot_product_attention``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax.nnx")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "language_model.py"
TIMEOUT_S = 900  # a safety net against a hung run, not a speed assertion
CONTEXT = 1024  # several default blocks (512 x 512 for 2 heads); the quick batch is 1 sequence
KEYS = {
    "initial_loss",
    "loss_baseline",
    "loss_jsoftmax",
    "step_temp_bytes_baseline",
    "step_temp_bytes_jsoftmax",
    "attention_temp_bytes_baseline",
    "attention_temp_bytes_jsoftmax",
    "step_time_ratio",
}


def _example():
    """examples/language_model.py as a module (registered first: it defines dataclasses)."""
    if "language_model" not in sys.modules:
        spec = importlib.util.spec_from_file_location("language_model", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["language_model"] = module
        spec.loader.exec_module(module)
    return sys.modules["language_model"]


@pytest.mark.parametrize("name", ["baseline_attention", "jsoftmax_attention"])
def test_attention_functions_match_jax_nn(name):
    attend = getattr(_example(), name)
    # (B, T, heads, head dim), the layout the model passes; T not a multiple of a block.
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(key, (2, 77, 2, 8), jnp.float32) for key in (kq, kk, kv, kg))

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

    def objective(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * g)

    np.testing.assert_allclose(attend(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
    grads = jax.grad(objective(attend), (0, 1, 2))(q, k, v)
    expected = jax.grad(objective(reference), (0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_quick_run(tmp_path):
    # A plain session's environment: no simulated devices, no float64 from conftest.py,
    # the compiler's full optimization.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--context", str(CONTEXT)],
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
    # Blockwise attention never builds the (batch, heads, T, T) scores: at T = 1024 one
    # attention layer's forward and backward pass needs several times less memory.
    attention_b = summary["attention_temp_bytes_baseline"]
    attention_j = summary["attention_temp_bytes_jsoftmax"]
    assert 0 < 3 * attention_j < attention_b, summary
    # The baseline holds at least the float32 scores of one layer: batch 1, 2 heads, T x T.
    assert attention_b >= 2 * CONTEXT * CONTEXT * 4, summary
    # Neither the scores nor the tokens x vocabulary logits: the whole step is smaller.
    assert summary["step_temp_bytes_jsoftmax"] < summary["step_temp_bytes_baseline"], summary
    assert summary["step_time_ratio"] > 0, summary
