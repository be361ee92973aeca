"""The README's Python examples run as written (in order, in a fresh interpreter)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    # The multi-host recipe needs several processes and a coordinator: not runnable here.
    return [b for b in blocks if "jax.distributed.initialize" not in b]


def test_readme_has_examples():
    assert len(_blocks()) >= 1


def test_readme_examples_run(tmp_path):
    script = tmp_path / "readme_examples.py"
    script.write_text("\n".join(_blocks()))
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # the sharded examples
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
