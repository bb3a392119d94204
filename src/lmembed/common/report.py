"""Reports: JSON (via utils.write_json), Markdown tables and matplotlib PNGs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import atomic_write_bytes


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 10 ** -digits):
            return f"{v:.3g}"
        return f"{v:,.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str | tuple[str, str]]) -> str:
    """columns: keys, or (key, header) pairs. Missing values print as '-'."""
    cols = [(c, c) if isinstance(c, str) else c for c in columns]
    head = "| " + " | ".join(h for _, h in cols) + " |"
    sep = "| " + " | ".join("---" for _ in cols) + " |"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    path: str | Path,
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
    markers: bool = True,
) -> None:
    """One line per label: curves[label] = (xs, ys)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="o" if markers else None, markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_report(out: Path, *, title: str, summary: str, history: Sequence[dict[str, Any]],
               history_cols: Sequence[str], curves: dict[str, str], ylabel: str, plot_title: str, alt: str,
               logy: bool = False) -> None:
    """A run directory's report.md (summary table, one row per epoch) and curves.png.

    curves: legend label -> history key, plotted against the epoch."""
    xs = [r["epoch"] for r in history]
    plot_curves(out / "curves.png", {label: (xs, [r.get(key) for r in history]) for label, key in curves.items()},
                xlabel="epoch", ylabel=ylabel, logy=logy, title=plot_title)
    hist = markdown_table(history, history_cols)
    write_text(out / "report.md", f"# {title}\n\n{summary}\n## Epochs\n\n{hist}\n![{alt}](curves.png)\n")


def plot_scatter(
    path: str | Path,
    points: Sequence[dict[str, Any]],
    *,
    x: str,
    y: str,
    label: str,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
    group: str | None = None,
) -> None:
    """Labelled points (e.g. bytes vs quality); `group` colours series that share a value."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for p in points:
        if p.get(x) is None or p.get(y) is None:
            continue
        groups.setdefault(p.get(group) if group else "", []).append(p)
    for g, pts in groups.items():
        ax.scatter([p[x] for p in pts], [p[y] for p in pts], label=str(g) if group else None, s=24)
        for p in pts:
            ax.annotate(str(p[label]), (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if group and groups:
        ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def plot_panels(
    path: str | Path,
    panels: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    cols: int = 3,
) -> None:
    """Small multiples of unlabelled scatter plots: panels[title] = (xs, ys)."""
    plt = pyplot()
    n = max(1, len(panels))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), dpi=110, squeeze=False)
    for ax, (title, (xs, ys)) in zip(axes.flat, panels.items(), strict=False):
        ax.scatter(list(xs), list(ys), s=5, alpha=0.5)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
