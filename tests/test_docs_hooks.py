"""The MkDocs hook of the docs site (docs/hooks.py): the performance page's chart and
table per benchmark group, generated from the JSON of `python -m jsoftmax bench --json`,
and a build that fails on a malformed file."""

import copy
import importlib.util
import json
import pathlib
import re

import pytest

pytest.importorskip("mkdocs")
from mkdocs.exceptions import PluginError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "data" / "bench.json"


def _load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def _row(group, case, ratio, target=None, baseline="jax.nn.softmax", unit="s"):
    met = None if target is None else ratio >= target
    return {
        "group": group,
        "case": case,
        "candidate": "jsoftmax.softmax",
        "baseline": baseline,
        "unit": unit,
        "candidate_value": 1.0,
        "baseline_value": ratio,
        "ratio": ratio,
        "target": target,
        "met": met,
        "note": "",
    }


def _data(rows):
    meta = json.loads(BENCH.read_text())["meta"]
    return {"meta": meta, "rows": rows}


def _sections(markdown: str) -> dict[str, str]:
    """`### group` heading -> the text up to the next heading."""
    parts = re.split(r"^### (.+)$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _bars(svg: str) -> list[tuple[float, float, float]]:
    """(x, width, ratio) of each bar of a chart."""
    return [
        (float(x), float(w), float(r))
        for x, w, r in re.findall(
            r'<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)" height="14" '
            r'fill="#[0-9a-f]+" class="bar" data-ratio="([\d.e+-]+)"',
            svg,
        )
    ]


def _parity_x(svg: str) -> float:
    return float(re.search(r'<line x1="([\d.]+)"[^>]*class="parity"', svg).group(1))


def test_the_page_gets_a_chart_above_the_table_of_each_group():
    data = json.loads(BENCH.read_text())
    out = hooks.on_page_markdown("<!-- jsoftmax:bench-tables docs/data/bench.json -->")
    sections = _sections(out)
    groups = list(dict.fromkeys(r["group"] for r in data["rows"]))
    assert list(sections) == groups
    for group, text in sections.items():
        rows = [r for r in data["rows"] if r["group"] == group]
        assert text.count("<svg") == 1, group
        assert text.index("<svg") < text.index("| case |"), group  # the chart comes first
        table = [line for line in text.splitlines() if line.startswith("| ")]
        assert len(table) == 1 + len(rows), group  # header + one line per row
        svg = text[text.index("<svg") : text.index("</svg>")]
        assert len(_bars(svg)) == len(rows), group
        assert svg.count('class="parity"') == 1, group
        targets = sum(r["target"] is not None for r in rows)
        assert svg.count('class="target"') == targets, group


def test_bars_start_at_one_and_grow_with_the_ratio_on_a_log_scale():
    rows = [
        _row("g", "softmax (8,) float32", 2.0, target=0.95),
        _row("g", "softmax (16,) float32", 0.5, target=0.95),
        _row("g", "softmax (32,) float32", 4.0),
        _row("g", "softmax (64,) float32", 1.0),
    ]
    svg = hooks.ratio_chart("g", rows)
    one = _parity_x(svg)
    (x2, w2, _), (x05, w05, _), (x4, w4, _), (x1, w1, _) = _bars(svg)
    assert x2 == pytest.approx(one, abs=0.1) and x4 == pytest.approx(one, abs=0.1)
    assert x05 + w05 == pytest.approx(one, abs=0.1)  # below 1: to the left of the line
    assert w2 == pytest.approx(w05, abs=0.2)  # 2x and 1/2x are equally far (log scale)
    assert w4 == pytest.approx(2 * w2, abs=0.2)
    assert w1 <= 1
    # The target line of the first two rows sits left of 1, at 0.95.
    xs = [float(x) for x in re.findall(r'<line x1="([\d.]+)"[^>]*class="target"', svg)]
    assert len(xs) == 2 and all(x < one for x in xs)
    # Met targets are green, missed ones red, rows without a target blue.
    fills = re.findall(r'fill="(#[0-9a-f]+)" class="bar"', svg)
    colors = hooks.COLORS
    assert fills == [colors[True], colors[False], colors[None], colors[None]]
    # The shared prefix of the cases is said once; the bars carry the rest.
    assert ">softmax<" in svg and ">(8,) float32<" in svg


def test_a_row_without_a_ratio_is_drawn_as_n_a():
    rows = [_row("g", "a (8,)", 1.5), _row("g", "b (8,)", 2.0)]
    rows[1]["ratio"] = None
    svg = hooks.ratio_chart("g", rows)
    assert len(_bars(svg)) == 1 and ">n/a<" in svg


def test_the_table_keeps_only_the_columns_that_differ():
    same = hooks.bench_tables(_data([_row("g", "a (8,)", 1.5), _row("g", "b (8,)", 2.0)]))
    assert "| case | jsoftmax | baseline | ratio | target |" in same
    assert "the baseline `jax.nn.softmax`" in same
    rows = [_row("g", "a (8,)", 1.5), _row("g", "a (8,)", 2.0, baseline="write bound")]
    differ = hooks.bench_tables(_data(rows))
    assert "| case | baseline | jsoftmax | baseline value | ratio | target |" in differ
    assert "jax.<wbr>nn.<wbr>softmax" in differ  # long names may wrap after . and _


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda d: d.pop("rows"), '"rows"'),
        (lambda d: d.update(rows=[]), '"rows"'),
        (lambda d: d["meta"].pop("date"), "date"),
        (lambda d: d["rows"][1].pop("ratio"), "row 1 lacks 'ratio'"),
        (lambda d: d["rows"][0].update(ratio="1.5"), "row 0: 'ratio'"),
        (lambda d: d["rows"][0].update(target=True), "row 0: 'target'"),
        (lambda d: d["rows"][2].update(met="yes"), "row 2: 'met'"),
    ],
)
def test_a_malformed_benchmark_file_fails_the_build(spoil, message):
    data = copy.deepcopy(json.loads(BENCH.read_text()))
    spoil(data)
    with pytest.raises(PluginError, match=re.escape(message)):
        hooks.bench_tables(data, "docs/data/bench.json")


def test_a_file_that_is_not_json_or_missing_fails_the_build(tmp_path, monkeypatch):
    (tmp_path / "broken.json").write_text('{"meta": {}, "rows": [')
    monkeypatch.setattr(hooks, "ROOT", tmp_path)
    with pytest.raises(PluginError, match="broken.json"):
        hooks.on_page_markdown("<!-- jsoftmax:bench-tables broken.json -->")
    with pytest.raises(PluginError, match="missing.json"):
        hooks.on_page_markdown("<!-- jsoftmax:bench-tables missing.json -->")


def test_an_accelerator_file_not_written_yet_is_announced(tmp_path, monkeypatch):
    monkeypatch.setattr(hooks, "ROOT", tmp_path)
    marker = "<!-- jsoftmax:bench-tables bench-gpu.json if-present -->"
    out = hooks.on_page_markdown(marker)
    assert "No figures yet" in out and "bench-gpu.json" in out and "<svg" not in out
    (tmp_path / "bench-gpu.json").write_text(BENCH.read_text())
    assert "<svg" in hooks.on_page_markdown(marker)
    (tmp_path / "bench-gpu.json").write_text("{")  # present but malformed: an error
    with pytest.raises(PluginError, match="bench-gpu.json"):
        hooks.on_page_markdown(marker)


def test_a_group_of_bandwidth_fractions_is_labelled_as_such():
    rows = [_row("bandwidth", "softmax (8,)", 0.6, unit="fraction")]
    assert "fraction of the bound" in hooks.ratio_chart("bandwidth", rows)
    assert "baseline / jsoftmax" in hooks.ratio_chart("g", [_row("g", "softmax (8,)", 1.2)])


def test_a_marker_can_keep_some_groups_and_names_one_the_file_lacks(tmp_path, monkeypatch):
    rows = [_row("a", "x (8,)", 1.5), _row("b c", "y (8,)", 2.0), _row("d", "z (8,)", 0.5)]
    (tmp_path / "b.json").write_text(json.dumps(_data(rows)))
    monkeypatch.setattr(hooks, "ROOT", tmp_path)
    out = hooks.on_page_markdown('<!-- jsoftmax:bench-tables b.json groups="a,b c" -->')
    assert list(_sections(out)) == ["a", "b c"]
    assert "z (8,)" not in out and "x (8,)" in out and "y (8,)" in out
    assert list(_sections(hooks.on_page_markdown("<!-- jsoftmax:bench-tables b.json -->"))) == [
        "a",
        "b c",
        "d",
    ]
    with pytest.raises(PluginError, match="no benchmark group named \\['e'\\]"):
        hooks.on_page_markdown('<!-- jsoftmax:bench-tables b.json groups="a,e" -->')
