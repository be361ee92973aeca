"""MkDocs hooks.

* The performance and accuracy tables are generated from the JSON that
  `python -m jsoftmax bench --json` and `python -m jsoftmax accuracy --json` write, so
  no figure on those pages is copied by hand. A page asks for a table with a marker
  line, `<!-- jsoftmax:bench-tables PATH -->` or `<!-- jsoftmax:accuracy-tables PATH -->`,
  PATH relative to the repository root. A missing or malformed file fails the build.
* MathJax, which renders the formulas, is copied into the site from the installed
  django-static-mathjax package (the `docs` extra), so the site needs no network.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- jsoftmax:(bench|accuracy)-tables (\S+) -->$", re.M)
# Where the site serves MathJax (mkdocs.yml's extra_javascript names it) and the file of
# the installed package it comes from: MathJax 3's TeX-to-SVG bundle with every TeX
# extension, one self-contained script that needs no fonts.
MATHJAX_URI = "assets/mathjax/tex-svg-full.js"
MATHJAX_FILE = ("static", "mathjax", "es5", "tex-svg-full.js")


def mathjax_source() -> Path:
    """The MathJax bundle of the installed package; a clear error when it is missing."""
    spec = importlib.util.find_spec("mathjax")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent.joinpath(*MATHJAX_FILE)
        if path.is_file():
            return path
    raise PluginError(
        "MathJax is not installed: the docs need the django-static-mathjax package "
        "(pip install -e '.[docs]')"
    )


def on_files(files, config):
    files.append(File.generated(config, MATHJAX_URI, abs_src_path=str(mathjax_source())))
    return files


def _fmt(x, digits=3):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def bench_tables(data: dict) -> str:
    meta = data["meta"]
    out = [
        f"Run: `python -m jsoftmax bench {meta.get('args', '')}`".rstrip() + " — "
        f"{meta['date']}, jax {meta['jax']}, backend {meta['backend']} ({meta['device']}), "
        f"{meta['cpu_count']} CPU cores, {meta['repeats']} repeats, {meta['mode']} mode. "
        "Ratio = baseline / jsoftmax (> 1: jsoftmax faster or smaller).",
    ]
    groups: dict[str, list[dict]] = {}
    for row in data["rows"]:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        out += [
            "",
            f"### {group}",
            "",
            "| case | jsoftmax | baseline | jsoftmax value | baseline value | ratio | target |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            unit = r["unit"]
            target = (
                ""
                if r["target"] is None
                else f"≥ {r['target']:g} " + ("met" if r["met"] else "**missed**")
            )
            out.append(
                f"| {r['case']} | {r['candidate']} | {r['baseline']} | "
                f"{_fmt(r['candidate_value'])} {unit} | {_fmt(r['baseline_value'])} {unit} | "
                f"{_fmt(r['ratio'])} | {target} |"
            )
    return "\n".join(out)


def accuracy_tables(data: dict) -> str:
    out = [
        f"Run: `python -m jsoftmax accuracy{' --quick' if data['quick'] else ''} "
        f"--seed {data['seed']}` — jax {data['jax_version']}, backend {data['backend']}, "
        f"mpmath at {data['digits']} digits. Largest error in ULPs of the output dtype "
        "(derivatives: relative to the largest exact component of the row), worst input "
        "family per dtype and operation.",
        "",
        "| dtype | operation | jsoftmax max ULP (family) | jax.nn max ULP (family) |",
        "|---|---|---|---|",
    ]
    worst: dict = {}
    for r in data["results"]:
        key = (r["impl"], r["dtype"], r["op"])
        rank = (r["nonfinite"], r["max_ulp"] if r["max_ulp"] is not None else float("inf"))
        if key not in worst or rank > worst[key][0]:
            worst[key] = (rank, r)
    for (impl, dtype, op), (_, r) in worst.items():
        if impl != "jsoftmax":
            continue
        other = worst.get(("jax.nn", dtype, op))

        def cell(row):
            if row is None:
                return "n/a"
            extra = f", {row['nonfinite']} non-finite" if row["nonfinite"] else ""
            return f"{_fmt(row['max_ulp'])}{extra} ({row['family']})"

        out.append(f"| {dtype} | {op} | {cell(r)} | {cell(other and other[1])} |")
    return "\n".join(out)


def on_page_markdown(markdown: str, **kwargs) -> str:
    def replace(match: re.Match) -> str:
        kind, path = match.group(1), match.group(2)
        data = json.loads((ROOT / path).read_text())
        return bench_tables(data) if kind == "bench" else accuracy_tables(data)

    return MARKER.sub(replace, markdown)
