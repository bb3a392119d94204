"""A readable bytes-vs-quality Pareto plot for compression benches.

One catastrophic row (a rank too low, a perplexity in the thousands) squeezes every useful point
into a line on a plain scatter. Here the quality axis is limited to a band around the dense
model (lower-is-better: up to 2x dense; higher-is-better: down to 0.7x dense); rows beyond it are
drawn on the edge as triangles with their value in the label. Single methods, pipelines and the
dense model get their own markers, and the Pareto frontier (no other row is both smaller and
better) is drawn as a step line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.report import pyplot


def frontier(rows: list[dict[str, Any]], lower_is_better: bool) -> list[dict[str, Any]]:
    """Rows no other row beats on both bytes (fewer) and metric (better), by increasing bytes."""
    def better(a: float, b: float) -> bool:
        return a < b if lower_is_better else a > b

    out = []
    for r in sorted(rows, key=lambda r: (r["stored_bytes"], r["metric"] if lower_is_better else -r["metric"])):
        if not out or better(r["metric"], out[-1]["metric"]):
            out.append(r)
    return out


def pareto_plot(path: str | Path, rows: list[dict[str, Any]], *, metric: str, lower_is_better: bool,
                title: str) -> None:
    plt = pyplot()
    rows = [r for r in rows if r.get("metric") is not None and r.get("stored_bytes")]
    dense = next((r["metric"] for r in rows if r["method"] == "dense"), None)
    lo, hi = None, None
    if dense is not None:
        if lower_is_better:
            hi = 2 * dense
            lo = min(r["metric"] for r in rows) * 0.97
        else:
            lo = 0.7 * dense
            hi = max(r["metric"] for r in rows) + 0.01 * abs(dense)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = {"dense": ("*", "black", 120), "single": ("o", "tab:blue", 30), "pipeline": ("s", "tab:orange", 30)}
    seen = set()
    many_sides = len({r.get("side") for r in rows if r["method"] != "dense"}) > 1
    for i, r in enumerate(rows):
        kind = "dense" if r["method"] == "dense" else "pipeline" if ">" in r["method"] else "single"
        marker, colour, size = styles[kind]
        y, label = r["metric"], r["method"] + (f" [{r.get('side')}]" if many_sides and kind != "dense" else "")
        if hi is not None and y > hi:
            y, marker, label = hi, "^", f"{label} ({metric} {r['metric']:.3g}, off scale)"
        elif lo is not None and y < lo:
            y, marker, label = lo, "v", f"{label} ({metric} {r['metric']:.3g}, off scale)"
        ax.scatter([r["stored_bytes"]], [y], marker=marker, c=colour, s=size,
                   label=kind if kind not in seen else None, zorder=3)
        seen.add(kind)
        ax.annotate(label, (r["stored_bytes"], y), fontsize=6.5, xytext=(4, 4 if i % 2 else -9),
                    textcoords="offset points")
    front = frontier(rows, lower_is_better)
    clip = [min(max(r["metric"], lo), hi) if lo is not None else r["metric"] for r in front]
    ax.step([r["stored_bytes"] for r in front], clip, where="post", c="tab:green", lw=1, alpha=0.6,
            label="Pareto frontier", zorder=2)
    ax.set_xscale("log")
    if lower_is_better:
        ax.set_yscale("log")
    if lo is not None and hi is not None:
        ax.set_ylim(lo, hi * (1.03 if lower_is_better else 1.0))
    ax.set_xlabel("stored embedding bytes (log)")
    ax.set_ylabel(metric + (" (log)" if lower_is_better else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
