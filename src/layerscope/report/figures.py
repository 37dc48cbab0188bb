"""Static figures (PNG) for runs: bar charts per layer, curves, layer-by-layer heatmaps.

Figures are drawn on :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas, never
through ``pyplot``: no display is needed, no global figure state is kept, and nothing leaks
between calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from layerscope.errors import LayerscopeError

DPI = 120
HIGHLIGHT = "#d62728"
BASE = "#1f77b4"


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".png", ""):
        raise LayerscopeError(f"figure path {str(path)!r} must end in .png")
    if path.suffix == "":
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _numbers(values: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise LayerscopeError(f"{what} must be numbers: {exc}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise LayerscopeError(f"{what} must be a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    return arr


def _labels(fig_ax, title: str, xlabel: str, ylabel: str) -> None:
    if title:
        fig_ax.set_title(title)
    if xlabel:
        fig_ax.set_xlabel(xlabel)
    if ylabel:
        fig_ax.set_ylabel(ylabel)


def bar_chart(
    x: Sequence[Any],
    y: Sequence[float],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    baseline: float | None = None,
    highlight_top: int | None = None,
    highlight_lowest: bool = False,
    marked: Sequence[Any] | None = None,
) -> Path:
    """One bar per ``x`` (layer, window, module ...) of height ``y``; writes a PNG and returns its path.

    ``marked`` colours the bars whose ``x`` is in it (e.g. predicted critical layers), whatever their height.

    ``baseline`` draws a dashed horizontal reference line (e.g. the unmodified model's loss).
    ``highlight_top=n`` colours the ``n`` largest bars (the ``n`` smallest with ``highlight_lowest``);
    with fewer than ``n`` bars, all are coloured.
    """
    labels = [str(v) for v in x]
    heights = _numbers(y, "bar heights")
    if len(labels) != len(heights):
        raise LayerscopeError(f"bar chart needs one label per bar: got {len(labels)} labels and {len(heights)} heights")
    if highlight_top is not None and not (isinstance(highlight_top, int) and highlight_top >= 0):
        raise LayerscopeError(f"highlight_top {highlight_top!r} must be a whole number >= 0 (more than the bars marks them all)")

    colors = [BASE] * len(heights)
    if highlight_top:
        finite = np.where(np.isfinite(heights), heights, -np.inf if not highlight_lowest else np.inf)
        order = np.argsort(finite, kind="stable")
        chosen = order[:highlight_top] if highlight_lowest else order[::-1][:highlight_top]
        for i in chosen:
            colors[int(i)] = HIGHLIGHT
    if marked is not None:
        wanted = {str(v) for v in marked}
        colors = [HIGHLIGHT if label in wanted else BASE for label in labels]

    n = len(heights)
    fig = _figure((min(max(6.0, 0.35 * n + 2.0), 24.0), 4.0))
    ax = fig.add_subplot()
    positions = np.arange(n)
    ax.bar(positions, heights, color=colors)
    step = max(1, n // 64)  # at most ~64 tick labels, however many bars
    ax.set_xticks(positions[::step], labels[::step], rotation=90 if max(len(s) for s in labels) * n / step > 80 else 0)
    if baseline is not None:
        ax.axhline(float(baseline), color="black", linestyle="--", linewidth=1, label=f"baseline {float(baseline):.4g}")
        ax.legend(loc="best")
    ax.grid(axis="y", alpha=0.3)
    _labels(ax, title, xlabel, ylabel)
    return _save(fig, path)


def line_chart(
    x: Sequence[Any] | None,
    series: Mapping[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    baseline: float | None = None,
    logx: bool = False,
    logy: bool = False,
    markers: bool = True,
) -> Path:
    """Curves, one per entry of ``series`` (name -> y values); writes a PNG and returns its path.

    All series share ``x`` (``None``: 0, 1, 2, ...), unless a series is given as its own
    ``(x, y)`` pair, e.g. loss against rank for matrices with different rank ranges.
    """
    if not isinstance(series, Mapping) or not series:
        raise LayerscopeError("line chart needs at least one series, given as a mapping of name to y values")
    fig = _figure((7.0, 4.2))
    ax = fig.add_subplot()
    for name, values in series.items():
        if isinstance(values, tuple) and len(values) == 2 and all(np.ndim(v) == 1 for v in values):
            xs, ys = _numbers(values[0], f"x values of series {name!r}"), _numbers(values[1], f"series {name!r}")
        else:
            ys = _numbers(values, f"series {name!r}")
            xs = np.arange(len(ys), dtype=float) if x is None else _numbers(x, "x values")
        if len(xs) != len(ys):
            raise LayerscopeError(f"series {name!r} has {len(ys)} values but there are {len(xs)} x values")
        ax.plot(xs, ys, marker="o" if markers else None, markersize=3, label=str(name))
    if baseline is not None:
        ax.axhline(float(baseline), color="black", linestyle="--", linewidth=1, label=f"baseline {float(baseline):.4g}")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1 or baseline is not None:
        ax.legend(loc="best", fontsize="small")
    _labels(ax, title, xlabel, ylabel)
    return _save(fig, path)


def scatter_chart(
    x: Sequence[float],
    y: Sequence[float],
    path: str | Path,
    *,
    labels: Sequence[Any] | None = None,
    marked: Sequence[Any] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """Paired values as points (e.g. representation term against substitution loss, one per layer),
    each point labelled (``labels``), those whose label is in ``marked`` in colour; writes a PNG."""
    xs, ys = _numbers(x, "x values"), _numbers(y, "y values")
    if len(xs) != len(ys):
        raise LayerscopeError(f"scatter chart needs paired values: got {len(xs)} x and {len(ys)} y values")
    names = [str(v) for v in labels] if labels is not None else [str(i) for i in range(len(xs))]
    if len(names) != len(xs):
        raise LayerscopeError(f"scatter chart needs one label per point: got {len(names)} labels and {len(xs)} points")
    wanted = {str(v) for v in marked} if marked is not None else set()
    fig = _figure((6.5, 4.8))
    ax = fig.add_subplot()
    ax.scatter(xs, ys, c=[HIGHLIGHT if n in wanted else BASE for n in names], s=22)
    for xi, yi, name in zip(xs, ys, names):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.grid(alpha=0.3)
    _labels(ax, title, xlabel, ylabel)
    return _save(fig, path)


def heatmap(
    matrix: Any,
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    xticklabels: Sequence[Any] | None = None,
    yticklabels: Sequence[Any] | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str = "",
    annotate: bool | None = None,
    symlog: float | None = None,
) -> Path:
    """A matrix (e.g. layer-by-layer CKA) as a heatmap with row 0 at the top; writes a PNG.

    ``annotate`` writes each value in its cell; by default only for matrices up to 16 x 16.
    ``symlog`` (a positive threshold) colours on a symmetric log scale, linear within
    ``+-symlog``: for values spanning orders of magnitude, e.g. loss changes from 1e-3 to 10.
    Accepts anything :func:`numpy.asarray` understands (lists, arrays, CPU tensors).
    """
    try:
        m = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError) as exc:
        raise LayerscopeError(f"heatmap needs a matrix of numbers: {exc}") from exc
    if m.ndim != 2 or 0 in m.shape:
        raise LayerscopeError(f"heatmap needs a non-empty 2-D matrix, got shape {m.shape}")
    rows, cols = m.shape
    for labels, n, what in ((xticklabels, cols, "xticklabels"), (yticklabels, rows, "yticklabels")):
        if labels is not None and len(labels) != n:
            raise LayerscopeError(f"{what} has {len(labels)} labels but the matrix has {n} along that axis")

    fig = _figure((min(2.0 + 0.4 * cols, 14.0) + 1.5, min(1.5 + 0.4 * rows, 12.0) + 0.5))
    ax = fig.add_subplot()
    if symlog is not None:
        from matplotlib.colors import SymLogNorm

        if not symlog > 0:
            raise LayerscopeError(f"symlog threshold {symlog!r} must be positive")
        finite = m[np.isfinite(m)]
        lo = vmin if vmin is not None else (float(finite.min()) if finite.size else -1.0)
        hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        norm = SymLogNorm(linthresh=symlog, vmin=min(lo, -symlog), vmax=max(hi, symlog))
        image = ax.imshow(m, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    else:
        image = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax)
    if colorbar_label:
        bar.set_label(colorbar_label)
    step_x, step_y = max(1, cols // 32), max(1, rows // 32)
    xt, yt = np.arange(0, cols, step_x), np.arange(0, rows, step_y)
    ax.set_xticks(xt, [str(xticklabels[i]) if xticklabels is not None else str(i) for i in xt], rotation=90 if cols > 16 else 0)
    ax.set_yticks(yt, [str(yticklabels[i]) if yticklabels is not None else str(i) for i in yt])
    if annotate is None:
        annotate = rows <= 16 and cols <= 16
    if annotate:
        rgba = image.cmap(image.norm(m))  # the colour of each cell, to pick readable text
        luminance = rgba[..., 0] * 0.299 + rgba[..., 1] * 0.587 + rgba[..., 2] * 0.114
        for i in range(rows):
            for j in range(cols):
                dark = bool(np.isfinite(m[i, j])) and float(luminance[i, j]) < 0.5
                ax.text(j, i, f"{m[i, j]:.2g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    _labels(ax, title, xlabel, ylabel)
    return _save(fig, path)


def proxy_panels(
    panels: Sequence[tuple[str, Mapping[str, tuple[Sequence[float], Sequence[float]]], bool]],
    path: str | Path,
    *,
    title: str = "",
    xlabel: str = "",
) -> Path:
    """Panels stacked over one shared x axis, each ``(ylabel, {name: (x, y)}, log_y)``: e.g. a
    measured quantity per layer above the proxies meant to predict it. Non-positive values are left
    out of a log-scaled panel."""
    if not panels:
        raise LayerscopeError("proxy_panels needs at least one panel")
    fig = _figure((8.0, 2.6 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (ylabel, series, log_y) in zip(axes, panels):
        for name, (xs, ys) in series.items():
            xs, ys = _numbers(xs, f"x of {name!r}"), _numbers(ys, f"series {name!r}")
            keep = np.isfinite(ys) & ((ys > 0) if log_y else True)
            ax.plot(xs[keep], ys[keep], marker="o", markersize=3, label=str(name))
        if log_y:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel, fontsize="small")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="x-small")
    if title:
        fig.suptitle(title)
    if xlabel:
        axes[-1].set_xlabel(xlabel)
    return _save(fig, path)


__all__ = ["bar_chart", "heatmap", "line_chart", "proxy_panels", "scatter_chart"]
