"""The layout of the tools: data flows one way (core -> jsoftmax.tools), no import
cycles among the tools, no private JAX imports, small modules, documented entry points,
and the ``jsoftmax`` console script."""

import ast
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys

import pytest

import jsoftmax
from jsoftmax.tools import accuracy, bench, verify

from helpers import fast_subset

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The package that is imported: the source tree, or the installed wheel (.ci/wheel).
PACKAGE = pathlib.Path(jsoftmax.__file__).resolve().parent
MAX_TOOL_LINES = 600


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, modules) -> set[str]:
    """Every module ``path`` imports (at any depth of the file), resolved to module names
    where they are modules of the package (``from pkg import submodule`` included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(
                f"{node.module}.{a.name}"
                for a in node.names
                if f"{node.module}.{a.name}" in modules
            )
    return names


def test_the_scan_sees_the_tools():
    modules = _modules()
    assert "jsoftmax.tools.bench._timing" in modules
    assert "jsoftmax.tools.bench._forward" in _imports(
        modules["jsoftmax.tools.bench._plan"], modules
    )


def test_no_private_jax_imports():
    for name, path in _modules().items():
        bad = {m for m in _imports(path, {}) if m == "jax._src" or m.startswith("jax._src.")}
        assert not bad, (name, bad)
        assert "jax._src" not in path.read_text(), name


def test_no_module_switches_float64_on_globally():
    # The tools scope float64 with jax.enable_x64: a global update would leak into the
    # caller's process (a notebook, a test session).
    for name, path in _modules().items():
        assert not re.search(r"config\.update\(\s*.jax_enable_x64", path.read_text()), name


def test_core_never_imports_the_tools():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("jsoftmax.tools") or name == "jsoftmax.__main__":
            continue
        tools = {m for m in _imports(path, modules) if m.startswith("jsoftmax.tools")}
        # The package's __init__ re-exports jsoftmax.verify, and nothing else.
        allowed = {"jsoftmax.tools", "jsoftmax.tools.verify"} if name == "jsoftmax" else set()
        assert tools <= allowed, (name, tools)


def test_no_import_cycles_among_the_tools():
    modules = _modules()
    tools = {n for n in modules if n.startswith("jsoftmax.tools")}
    graph = {n: {m for m in _imports(modules[n], modules) if m in tools and m != n} for n in tools}
    # A package's __init__ re-exporting its submodules is not a cycle: edges *into* a
    # package __init__ are only its own parents, which Python loads first anyway.
    packages = {n for n in tools if modules[n].name == "__init__.py"}
    graph = {n: {m for m in deps if m not in packages} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for m in sorted(graph[n]):
            assert state.get(m) != 1, f"import cycle: {' -> '.join([*path, n, m])}"
            if m not in state:
                visit(m, [*path, n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])


def test_shared_timing_module_imports_no_benchmark():
    modules = _modules()
    deps = _imports(modules["jsoftmax.tools.bench._timing"], modules)
    assert not {m for m in deps if m.startswith("jsoftmax")}, deps


def test_tool_modules_are_small():
    for name, path in _modules().items():
        if name.startswith("jsoftmax.tools"):
            n = len(path.read_text().splitlines())
            assert n <= MAX_TOOL_LINES, (name, n)


@pytest.mark.parametrize(
    "fn", [bench.run, bench.format_table, accuracy.run, accuracy.format_table, verify.verify]
)
def test_entry_points_are_documented_with_examples(fn):
    doc = fn.__doc__
    assert "Examples:" in doc and ">>>" in doc, fn.__qualname__
    assert "Args:" in doc or fn.__name__ == "format_table", fn.__qualname__


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("JAX_ENABLE_X64", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


@pytest.mark.parametrize(
    "first",
    fast_subset(
        ["jsoftmax", "jsoftmax.tools", "jsoftmax.tools.verify", "jsoftmax.tools.bench",
         "jsoftmax.tools.accuracy", "jsoftmax.__main__"],
        ["jsoftmax.tools.bench", "jsoftmax.tools.accuracy"],
    ),
)  # fmt: skip
def test_imports_in_any_order(first):
    # Importing a tool first starts the package, which imports the verify tool back.
    code = (
        f"import {first}\n"
        "import jsoftmax, jsoftmax.tools.verify as v\n"
        "assert jsoftmax.verify is v.verify\n"
        "assert jsoftmax.tools.bench.run and jsoftmax.tools.accuracy.run\n"
    )
    proc = _fresh(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_import_jsoftmax_does_not_load_the_bench_or_the_report():
    code = (
        "import sys, jsoftmax\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('jsoftmax.tools.bench',"
        " 'jsoftmax.tools.accuracy', 'mpmath', 'matplotlib', 'optax')))\n"
        "assert not loaded, loaded\n"
    )
    proc = _fresh(code)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unknown_tool_attribute():
    with pytest.raises(AttributeError, match="nonsense"):
        jsoftmax.tools.nonsense  # noqa: B018


# --------------------------------------------------------------------------------------
# Packaging: the console script and the extras.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pyproject():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_console_script_resolves_to_the_cli(pyproject, capsys):
    value = pyproject["project"]["scripts"]["jsoftmax"]
    entry = importlib.metadata.EntryPoint(name="jsoftmax", value=value, group="console_scripts")
    main = entry.load()  # what the installed `jsoftmax` script calls
    from jsoftmax.__main__ import main as module_main

    assert main is module_main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("verify", "bench", "accuracy"))


def test_extras_match_the_commands(pyproject):
    extras = pyproject["project"]["optional-dependencies"]

    def names(extra):
        return {req.split(">")[0].split("=")[0].strip() for req in extras[extra]}

    assert "mpmath" in names("accuracy")
    assert {"matplotlib", "optax"} <= names("bench")
    assert {"test", "notebooks"} <= set(extras)
