"""The documentation site: every page's Python examples run as written (each page in
order, in a fresh interpreter), and the site builds with MkDocs in strict mode (any
warning, e.g. a broken link, an unresolved cross-reference or a docstring mkdocstrings
cannot parse, fails). The built pages show no raw reStructuredText, and their formulas
are marked for MathJax, which the site serves itself."""

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
    api = tmp_path / "api" / "index.html"
    assert api.exists()
    pages = [p for p in tmp_path.rglob("*.html") if "notebooks" not in p.parts]
    raw = {str(p.relative_to(tmp_path)): _raw_markup(p.read_text()) for p in pages}
    raw = {page: lines for page, lines in raw.items() if lines}
    assert not raw, f"raw reStructuredText or unrendered math in the built site: {raw}"
    # The formulas of the docstrings reach the page as arithmatex markup, and MathJax is
    # served from the site itself (the site renders them without a network).
    assert api.read_text().count('class="arithmatex"') >= 50
    mathjax = tmp_path / "assets" / "mathjax" / "tex-svg-full.js"
    assert mathjax.stat().st_size > 1_000_000
    assert 'src="../assets/mathjax/tex-svg-full.js"' in api.read_text()


# Markup that Markdown leaves as it is: reStructuredText roles (`:func:`, `:math:`, ...),
# directives (`.. math::`), double backticks and unconverted `$` math.
_RAW = re.compile(
    r":(?:func|class|meth|mod|math|attr|data|obj|exc|ref|doc|py:\w+):(?=\S)"
    r"|\.\. [a-z][\w-]*::"
    r"|``"
    r"|\$"
)


def _raw_markup(html: str) -> list[str]:
    """The lines of a built page's visible text (code blocks and formulas left out)
    that hold raw reStructuredText or unrendered math."""
    body = re.sub(r"<(pre|script|style)\b.*?</\1>", "", html, flags=re.S)
    body = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', "", body, flags=re.S)
    text = re.sub(r"<[^>]+>", "", body)
    return [line.strip() for line in text.splitlines() if _RAW.search(line)]


@pytest.mark.parametrize(
    "html",
    [
        "<p>The Jacobian of :func:<code>jsoftmax.softmax</code>.</p>",
        "<p>Cost :math:<code>O(n)</code>.</p>",
        "<p>.. math::\n    p_i = e^{z_i}</p>",
        "<p>keys ``group, case,</p>",
        "<p>Cost $O(n)$.</p>",
    ],
)
def test_raw_markup_is_found(html):
    assert _raw_markup(html)


def test_rendered_markup_passes():
    html = (
        '<p>The Jacobian of <a href="#jsoftmax.softmax"><code>jsoftmax.softmax</code></a>, '
        'cost <span class="arithmatex">\\(O(n)\\)</span>.</p>'
        '<div class="arithmatex">\\[J = \\mathrm{diag}(p) - pp^\\top\\]</div>'
        "<pre><code>x = ``raw`` $1</code></pre>"
    )
    assert _raw_markup(html) == []


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
