"""The documentation site: every page's Python examples run as written (each page in
order, in a fresh interpreter), and the site builds with MkDocs in strict mode (any
warning, e.g. a broken link or a docstring mkdocstrings cannot parse, fails)."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "notebooks" not in p.parts)


def _blocks(page: pathlib.Path) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    # The multi-host recipe needs several processes and a coordinator: not runnable here.
    return [b for b in blocks if "jax.distributed.initialize" not in b]


def test_docs_have_examples():
    assert sum(len(_blocks(p)) for p in PAGES) >= 10


@pytest.mark.parametrize(
    "page", [p for p in PAGES if _blocks(p)], ids=lambda p: str(p.relative_to(DOCS))
)
def test_page_examples_run(page, tmp_path):
    script = tmp_path / "page_examples.py"
    script.write_text("\n".join(_blocks(page)))
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # the sharded examples
    env.pop("JAX_ENABLE_X64", None)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_site_builds_in_strict_mode(tmp_path):
    if shutil.which("mkdocs") is None and not _has_module("mkdocs"):
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "api" / "index.html").exists()


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
