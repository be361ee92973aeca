"""MkDocs hooks.

* The performance and accuracy tables are generated from the JSON that
  `python -m jsoftmax bench --json` and `python -m jsoftmax accuracy --json` write, so
  no figure on those pages is copied by hand. A page asks for a table with a marker
  line, `<!-- jsoftmax:bench-tables PATH -->` or `<!-- jsoftmax:accuracy-tables PATH -->`,
  PATH relative to the repository root; `groups="a,b"` after PATH keeps those benchmark
  groups (a how-to page shows its own figures; a group the file lacks fails the build).
  A missing or malformed file fails the build,
  except that a marker ending in ` if-present` (a figure not measured yet, such as an
  accelerator's) says so instead when its file is missing. Each benchmark group gets a
  chart of its ratios above its table.
* MathJax, which renders the formulas, is copied into the site from the installed
  django-static-mathjax package (the `docs` extra), so the site needs no network.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(
    r'^<!-- jsoftmax:(bench|accuracy)-tables (\S+)(?: groups="([^"]+)")?( if-present)? -->$', re.M
)
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


# --------------------------------------------------------------------------------------
# The benchmark: per group, a ratio chart (inline SVG) above a table that fits the page.
# --------------------------------------------------------------------------------------

BENCH_META = ("date", "jax", "backend", "device", "cpu_count", "repeats", "mode")
BENCH_ROW = {
    "group": str,
    "case": str,
    "candidate": str,
    "baseline": str,
    "unit": str,
    "candidate_value": (int, float, type(None)),
    "baseline_value": (int, float, type(None)),
    "ratio": (int, float, type(None)),
    "target": (int, float, type(None)),
    "met": (bool, type(None)),
}


def check_bench(data, path: str = "bench JSON") -> None:
    """Raises PluginError, naming the file and the entry, unless `data` has the shape
    that `python -m jsoftmax bench --json` writes."""

    def fail(what: str):
        raise PluginError(f"{path}: {what}")

    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
        fail('expected an object with "meta" (an object) and "rows" (a list)')
    if not isinstance(data.get("rows"), list) or not data["rows"]:
        fail('"rows" must be a non-empty list')
    missing = [k for k in BENCH_META if k not in data["meta"]]
    if missing:
        fail(f'"meta" lacks {missing}')
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            fail(f"row {i} is not an object")
        for key, kind in BENCH_ROW.items():
            if key not in row:
                fail(f"row {i} lacks {key!r}")
            wrong_bool = key != "met" and isinstance(row[key], bool)  # bool is an int
            if not isinstance(row[key], kind) or wrong_bool:
                fail(f"row {i}: {key!r} has the wrong type ({row[key]!r})")


def _fmt_value(v, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "s":
        for scale, name in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if v >= scale:
                return f"{v / scale:.3g} {name}"
        return f"{v * 1e9:.3g} ns"
    if unit == "bytes":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if v >= scale:
                return f"{v / scale:.3g} {name}"
        return f"{v:.0f} B"
    return f"{v:.3g}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _common_prefix(texts: list[str]) -> str:
    """The longest prefix shared by all texts that ends at a space (or is empty)."""
    if len(texts) < 2:
        return ""
    prefix = texts[0]
    for t in texts[1:]:
        while not t.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind(" ")
    prefix = prefix[: cut + 1] if cut >= 0 else ""
    # Keep something to show on every bar.
    return prefix if all(len(t) > len(prefix) for t in texts) else ""


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most about `width` characters, broken at spaces or after `.` and `_`
    (so that a long identifier wraps where it reads well)."""
    lines = [""]
    for piece in re.split(r"(?<=[ ._])", text):
        if lines[-1] and len(lines[-1].rstrip()) + len(piece.rstrip()) > width:
            lines.append("")
        lines[-1] += piece
    return [line.strip() for line in lines]


def _breakable(name: str) -> str:
    """`name` for a table cell, allowed to wrap after `.` and `_` (long identifiers)."""
    return re.sub(r"([._])", r"\1<wbr>", html.escape(name))


def _target(row: dict) -> str:
    if row["met"] is None:
        return ""
    status = "met" if row["met"] else "**missed**"
    return status if row["target"] is None else f"≥ {row['target']:.3g} {status}"


# Chart geometry, in SVG user units; the SVG scales to the width of the page (about
# 700 px of content at a 1,400 px window, so one unit is about one pixel).
CHART_WIDTH = 720
LABEL_WIDTH = 300  # the case labels, left of the plot
LABEL_CHARS = 46  # characters per label line at 12 px
PAD = 48  # room for a value label beside the outermost bar ends
LINE_HEIGHT = 14
COLORS = {True: "#2e7d32", False: "#c62828", None: "#5c6bc0"}  # met, missed, no target


def ratio_chart(group: str, rows: list[dict]) -> str:
    """An inline SVG: one bar per row from 1.0 to its ratio on a log scale (right of the
    line: jsoftmax faster or smaller), a line at 1.0, and the row's target as a dashed
    mark. Bars are green where the row meets its target, red where it misses it, blue
    where it has none."""
    esc = html.escape
    cases = [r["case"] for r in rows]
    prefix = _common_prefix(cases)
    several_baselines = len({r["baseline"] for r in rows}) > 1
    labels = []
    for r in rows:
        label = r["case"][len(prefix) :]
        if several_baselines:
            label += f" vs {r['baseline']}"
        labels.append(_wrap(label, LABEL_CHARS))
    values = [r["ratio"] for r in rows if _finite(r["ratio"])]
    values += [r["target"] for r in rows if _finite(r["target"])]
    lo, hi = math.log(min(values + [1.0])), math.log(max(values + [1.0]))
    if hi - lo < math.log(1.5):  # at least a 1.5x span, centred on the data
        mid = (hi + lo) / 2
        lo, hi = mid - math.log(1.5) / 2, mid + math.log(1.5) / 2
    x0, x1 = LABEL_WIDTH + PAD, CHART_WIDTH - PAD

    def x(v: float) -> float:
        return x0 + (math.log(v) - lo) / (hi - lo) * (x1 - x0)

    top = 30
    bands = [top]
    for lines in labels:
        bands.append(bands[-1] + 12 + LINE_HEIGHT * len(lines))
    height = bands[-1] + 36
    body = []
    if prefix:  # what every row shares, said once
        title_text = esc(prefix.strip().rstrip(","))
        body.append(f'<text x="{x0 - PAD}" y="14" class="legend">{title_text}</text>')
    # Ticks: 1-2-5 per decade (every tick where the span is short), within the domain.
    ticks = []
    for e in range(math.floor(lo / math.log(10)) - 1, math.ceil(hi / math.log(10)) + 1):
        short = (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)
        for m in (1, 2, 5) if hi - lo > math.log(8) else short:
            t = m * 10.0**e
            if lo - 1e-9 <= math.log(t) <= hi + 1e-9:
                ticks.append(t)
    for t in ticks:
        xt = x(t)
        body.append(
            f'<line x1="{xt:.1f}" y1="{top - 4}" x2="{xt:.1f}" y2="{bands[-1]}" class="grid"/>'
            f'<text x="{xt:.1f}" y="{bands[-1] + 14}" text-anchor="middle" class="tick">'
            f"{t:g}</text>"
        )
    for r, lines, y_top, y_next in zip(rows, labels, bands[:-1], bands[1:], strict=True):
        mid = (y_top + y_next) / 2
        first = mid - LINE_HEIGHT * (len(lines) - 1) / 2 + 4
        text = "".join(
            f'<tspan x="{LABEL_WIDTH - 8}" y="{first + i * LINE_HEIGHT:.1f}">{esc(line)}</tspan>'
            for i, line in enumerate(lines)
        )
        body.append(f'<text text-anchor="end" class="label">{text}</text>')
        ratio = r["ratio"]
        if _finite(ratio):
            a, b = sorted((x(1.0), x(ratio)))
            body.append(
                f'<rect x="{a:.1f}" y="{mid - 7:.1f}" width="{max(b - a, 1):.1f}" height="14" '
                f'fill="{COLORS[r["met"]]}" class="bar" data-ratio="{ratio:.6g}">'
                f"<title>{esc(r['case'])}: {ratio:.3g}</title></rect>"
            )
            right = ratio >= 1
            body.append(
                f'<text x="{(b + 4) if right else (a - 4):.1f}" y="{mid + 4:.1f}" '
                f'text-anchor="{"start" if right else "end"}" class="value">{ratio:.3g}</text>'
            )
        else:
            body.append(f'<text x="{x(1.0) + 4:.1f}" y="{mid + 4:.1f}" class="value">n/a</text>')
        if _finite(r["target"]):
            xt = x(r["target"])
            body.append(
                f'<line x1="{xt:.1f}" y1="{y_top + 2}" x2="{xt:.1f}" y2="{y_next - 2}" '
                f'class="target" data-target="{r["target"]:.6g}"/>'
            )
    xp = x(1.0)
    body.append(
        f'<line x1="{xp:.1f}" y1="{top - 6}" x2="{xp:.1f}" y2="{bands[-1]}" class="parity"/>'
    )
    if all(r["unit"] == "fraction" for r in rows):
        caption = "fraction of the bound, log scale (1: the bound); dashed: the row's target"
    else:
        caption = (
            "baseline / jsoftmax, log scale: right of 1, jsoftmax is faster or smaller; "
            "dashed: the row's target"
        )
    body.append(
        f'<text x="{CHART_WIDTH / 2:.1f}" y="{bands[-1] + 30}" text-anchor="middle" '
        f'class="axis">{caption}</text>'
    )
    style = (
        "<style>"
        ".label,.tick,.value,.axis,.legend{font-size:12px;fill:currentColor}"
        ".tick,.axis{opacity:.75}.legend{font-weight:bold}"
        ".grid{stroke:currentColor;stroke-opacity:.12}"
        ".parity{stroke:currentColor;stroke-width:1.5}"
        ".target{stroke:currentColor;stroke-width:2;stroke-dasharray:3 2}"
        "</style>"
    )
    title = f"{group}: ratio of each row (baseline / jsoftmax)"
    return (
        f'<div class="bench-chart"><svg xmlns="http://www.w3.org/2000/svg" role="img" '
        f'viewBox="0 0 {CHART_WIDTH} {height}" width="100%" '
        f'aria-label="{esc(title)}"><title>{esc(title)}</title>{style}'
        + "".join(body)
        + "</svg></div>"
    )


def bench_tables(data: dict, path: str = "bench JSON", only: list[str] | None = None) -> str:
    check_bench(data, path)
    meta = data["meta"]
    if only is not None:
        missing = [g for g in only if not any(r["group"] == g for r in data["rows"])]
        if missing:
            raise PluginError(f"{path}: no benchmark group named {missing} (groups=...)")
        data = {**data, "rows": [r for r in data["rows"] if r["group"] in only]}
    out = [
        f"Run: `python -m jsoftmax bench {meta.get('args', '')}`".rstrip() + " — "
        f"{meta['date']}, jax {meta['jax']}, backend {meta['backend']} ({meta['device']}), "
        f"{meta['cpu_count']} CPU cores, {meta['repeats']} repeats, {meta['mode']} mode. "
        "Ratio = baseline / jsoftmax (> 1: jsoftmax faster or smaller); times are medians "
        "per call. Each group's chart shows its rows' ratios; its table, the values.",
    ]
    for group, when in meta.get("reruns", {}).items():
        if only is not None and group not in only:
            continue
        out[0] += f" The {group} group's rows are from a later run: {when}."
    groups: dict[str, list[dict]] = {}
    for row in data["rows"]:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        out += ["", f"### {group}", "", ratio_chart(group, rows), ""]
        candidates = sorted({r["candidate"] for r in rows})
        baselines = sorted({r["baseline"] for r in rows})
        if len(candidates) == 1 and len(baselines) == 1:
            out += [
                f"In every row, jsoftmax is `{candidates[0]}` and the baseline `{baselines[0]}`.",
                "",
            ]
        elif len(baselines) == 1:
            out += [f"In every row the baseline is `{baselines[0]}`.", ""]
        elif len(candidates) == 1:
            out += [f"In every row jsoftmax is `{candidates[0]}`.", ""]
        # The names that every row shares are said once above; the table keeps the
        # columns that differ, so that it fits the page.
        head = ["case"] + (["baseline"] if len(baselines) > 1 else [])
        head += ["jsoftmax", "baseline" if len(baselines) == 1 else "baseline value"]
        head += ["ratio", "target"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            note = r.get("note") or ""
            case = r["case"] + (f"<br><small>{html.escape(note)}</small>" if note else "")
            cells = [case] + ([_breakable(r["baseline"])] if len(baselines) > 1 else [])
            cells += [
                _fmt_value(r["candidate_value"], r["unit"]),
                _fmt_value(r["baseline_value"], r["unit"]),
                _fmt(r["ratio"]),
                _target(r),
            ]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
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
        kind, path, groups, if_present = match.groups()
        only = None if groups is None else [g.strip() for g in groups.split(",")]
        if if_present and not (ROOT / path).exists():
            return f"*No figures yet: `{path}` has not been written.*"
        try:
            data = json.loads((ROOT / path).read_text())
        except (OSError, ValueError) as e:
            raise PluginError(f"{path}: {e}") from e
        return bench_tables(data, path, only) if kind == "bench" else accuracy_tables(data)

    return MARKER.sub(replace, markdown)
