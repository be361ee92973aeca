"""Rendering a benchmark result: [`format_table`][jsoftmax.tools.bench.format_table] and `plot`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jsoftmax.tools.bench._timing import DIFFER


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt_bytes(b: float) -> str:
    if b < 0:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{int(b)} B"


def _fmt_value(row: Mapping[str, Any], which: str) -> str:
    v = row[f"{which}_value"]
    if v is None:
        return "n/a"
    if not isinstance(v, (int, float)):
        return str(v)
    if row["unit"] == "s":
        iqr = row.get(f"{which}_iqr")
        if not iqr:
            return _fmt_time(v)
        return f"{_fmt_time(v)} ({_fmt_time(iqr[0])}-{_fmt_time(iqr[1])})"
    if row["unit"] == "bytes":
        return _fmt_bytes(v)
    return f"{v:.2f}"


def _fmt_target(row: Mapping[str, Any]) -> str:
    if row["met"] is None:
        return ""
    t = row["target"]
    goal = f">= {t:.2f}" if t is not None else "1 array"
    return f"{goal} {'met' if row['met'] else 'MISSED'}"


def format_table(result: Mapping[str, Any]) -> str:
    """The result of `run` as a plain-text table with a header and a summary.

    A warning line names any row whose two sides computed different results; the
    summary counts the targets met and lists those missed.

    Examples:
      >>> from jsoftmax.tools.bench import Row, format_table
      >>> meta = {"jsoftmax": "0.1", "mode": "quick", "repeats": 3, "date": "2026-11-23",
      ...         "backend": "cpu", "device": "cpu: cpu", "device_count": 1, "jax": "0.10",
      ...         "cpu_count": 2, "dtype": "float32", "peak_bytes_in_use": "n/a"}
      >>> row = Row("forward", "softmax (8,) float32", "jsoftmax.softmax", "jax.nn.softmax",
      ...           "s", 1e-5, 2e-5, 2.0, target=0.95, met=True)
      >>> print(format_table({"meta": meta, "rows": [row.as_dict()]}).splitlines()[-3])
      targets met: 1/1
    """
    meta, rows = result["meta"], result["rows"]
    lines = [
        f"jsoftmax {meta['jsoftmax']} benchmark ({meta['mode']}, {meta['repeats']} repeats, "
        f"{meta['date']})",
        f"backend: {meta['backend']}   device: {meta['device']} x{meta['device_count']}   "
        f"jax {meta['jax']}   cpu cores: {meta['cpu_count']}   dtype: {meta['dtype']}",
        "ratio = baseline / jsoftmax (> 1: jsoftmax faster or smaller); times are medians "
        "per call with the interquartile range.",
        "",
    ]
    header = ("group", "case", "baseline", "jsoftmax: value", "baseline: value", "ratio", "target")
    table: list[tuple[str, ...]] = [header]
    for r in rows:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        table.append(
            (
                r["group"],
                r["case"],
                r["baseline"],
                _fmt_value(r, "candidate"),
                _fmt_value(r, "baseline"),
                ratio,
                _fmt_target(r),
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = sorted({r["note"] for r in rows if r["note"] and DIFFER in r["note"]})
    if notes:
        lines += ["", "WARNING: " + "; ".join(notes)]
    checked = [r for r in rows if r["met"] is not None]
    missed = [r for r in checked if not r["met"]]
    lines += [
        "",
        f"targets met: {len(checked) - len(missed)}/{len(checked)}",
    ]
    for r in missed:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"  missed: {r['group']}: {r['case']} vs {r['baseline']} ({ratio})")
    lines.append(f"peak bytes in use (device): {meta['peak_bytes_in_use']}")
    lines.append(f"elapsed: {meta.get('elapsed_s', '?')} s")
    return "\n".join(lines)


def require_matplotlib():
    """`matplotlib.pyplot` with the Agg backend, or an ImportError naming the extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "--plot needs matplotlib, which is an optional extra: "
            "pip install 'jsoftmax[bench]' (or pip install matplotlib)."
        ) from e
    return plt


def plot(result: Mapping[str, Any], path: str) -> None:
    """Writes a PNG bar chart of the ratios (log scale) with the targets marked.

    Needs matplotlib (`pip install 'jsoftmax[bench]'`).
    """
    plt = require_matplotlib()
    rows = [r for r in result["rows"] if r["ratio"] is not None and r["unit"] != "fraction"]
    labels = [f"{r['case']} vs {r['baseline']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    colors = [
        "tab:gray" if r["met"] is None else ("tab:green" if r["met"] else "tab:red") for r in rows
    ]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    y = np.arange(len(rows))
    ax.barh(y, ratios, color=colors)
    for i, r in enumerate(rows):
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="black", lw=1.5)
    ax.axvline(1.0, color="black", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    meta = result["meta"]
    ax.set_xlabel("baseline / jsoftmax (> 1: jsoftmax better); black tick: target")
    ax.set_title(f"jsoftmax bench: {meta['device']}, jax {meta['jax']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(result: Mapping[str, Any], path: str) -> bool:
    """Writes a PNG of the `linear-ce scaling` rows: compiled temporary memory and time
    of the fused and the dense loss against the vocabulary size (log-log). Returns False
    (and writes nothing) when the result has no such rows. Needs matplotlib."""
    rows = [r for r in result["rows"] if r["group"] == "linear-ce scaling"]
    if not rows:
        return False
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, unit, scale, label in (
        (axes[0], "bytes", 2**20, "compiled temporaries (MiB)"),
        (axes[1], "s", 1.0, "value_and_grad time (s)"),
    ):
        sel = [r for r in rows if r["unit"] == unit]
        v = [r["shape"][2] for r in sel]
        ax.plot(v, [r["candidate_value"] / scale for r in sel], "o-", label="fused (jsoftmax)")
        ax.plot(v, [r["baseline_value"] / scale for r in sel], "s--", label="dense (x @ w, optax)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    n, h = rows[0]["shape"][:2]
    meta = result["meta"]
    fig.suptitle(
        f"linear_cross_entropy vs dense, (N, H) = ({n}, {h}): {meta['device']}, jax {meta['jax']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
