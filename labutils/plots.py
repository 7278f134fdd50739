"""The few plot and table styles every lab shares.

Functions return a matplotlib ``Figure`` (never ``plt.show()`` state), so a cell
can display it, save it with ``results.save_figure`` and re-run cleanly.

Used in every lab, first in lab0 §Benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "module://ipykernel")):
    matplotlib.use("Agg")  # headless (CI, scripts) unless a notebook backend is active
import matplotlib.pyplot as plt  # noqa: E402


def figure(title: str, xlabel: str, ylabel: str, *, logx=False, logy=False, size=(7, 4.2)):
    """A fresh (fig, ax) with the labs' common look."""
    fig, ax = plt.subplots(figsize=size)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    plt.close(fig)  # the caller displays it; no hidden global figure left behind
    return fig, ax


def bars(labels: Sequence[str], values: Sequence[float], *, title: str, ylabel: str,
         errors: Sequence[tuple[float, float]] | None = None, ceiling: float | None = None,
         ceiling_label: str = "ceiling"):
    """Bar chart with optional (low, high) error bars and a horizontal ceiling line."""
    fig, ax = figure(title, "", ylabel)
    yerr = None
    if errors:
        yerr = [[v - lo for v, (lo, _) in zip(values, errors)], [hi - v for v, (_, hi) in zip(values, errors)]]
    ax.bar(range(len(values)), values, yerr=yerr, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right")
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    if ceiling:
        ax.axhline(ceiling, color="tab:red", ls="--", label=ceiling_label)
        ax.legend()
    return fig


def lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
          ylabel: str, logx=False, logy=False, marker="o", annotate: dict[str, Sequence[str]] | None = None):
    """One line per series: {label: (xs, ys)}; optional per-point text labels."""
    fig, ax = figure(title, xlabel, ylabel, logx=logx, logy=logy)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=marker, label=label)
        for x, y, t in zip(xs, ys, (annotate or {}).get(label, [])):
            ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(series) > 1:
        ax.legend()
    return fig


def table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3g") -> str:
    """A Markdown table from a list of dicts (display with IPython.display.Markdown)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())

    def cell(v):
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def show_table(rows: Sequence[dict], columns: Sequence[str] | None = None, floatfmt: str = ".3g"):
    """``table`` wrapped for display in a notebook cell."""
    from IPython.display import Markdown

    return Markdown(table(rows, columns, floatfmt))
