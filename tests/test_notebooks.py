"""Executes every notebook in ``notebooks/`` and fails if any cell errors.

The notebooks assert what they claim (Jacobian identities, agreement with autodiff and
float64, training accuracy), so a broken library breaks a notebook and this test. Each
notebook runs in its own Jupyter kernel on a copy held in memory, in a temporary working
directory; the committed file (stored with its outputs) is never rewritten.

Matplotlib uses the inline backend, which draws every figure to PNG with Agg and needs no
display, so a figure that cannot be rendered fails the test too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The notebooks extra (pip install -e '.[notebooks]'); the wheel and minimum-versions
# lanes install the test extra alone and run the fast suite.
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
OPTIMIZED = {"03_performance", "05_language_model"}
CELL_TIMEOUT_S = 300  # a safety net against a hung kernel, not a speed assertion


def test_notebooks_exist():
    names = [nb.name for nb in NOTEBOOKS]
    assert names == [
        "01_softmax_derivative.ipynb",
        "02_verification.ipynb",
        "03_performance.ipynb",
        "04_training.ipynb",
        "05_language_model.ipynb",
        "06_attention.ipynb",
    ], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{path.name} is committed without outputs"
    )

    # The kernel inherits this process's environment. Give it the environment of a
    # plain session: no simulated devices from conftest.py, no display.
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # Notebooks that train (05) run their small configuration here; they are stored with
    # the outputs of their full configuration.
    monkeypatch.setenv("JSOFTMAX_NOTEBOOK_QUICK", "1")
    # The notebooks that time (03) and train (05) compile as users' sessions do; the
    # others keep the suite's setting (most compiler optimizations off, tests/conftest.py).
    if path.stem in OPTIMIZED:
        monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")

    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        record_timing=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    # Errors raised after a cell finished (e.g. while drawing a figure) are recorded as
    # error outputs without failing the cell; warnings go to stderr. Both count.
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            where = f"{path.name}, cell {index}:\n{cell.source[:300]}"
            assert out.output_type != "error", f"{where}\n{out.ename}: {out.evalue}"
            if out.output_type == "stream" and out.name == "stderr":
                text = out.text
                assert "Warning" not in text and "Traceback" not in text, f"{where}\n{text}"
