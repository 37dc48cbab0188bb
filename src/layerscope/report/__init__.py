"""Figures (PNG) and a self-contained HTML report per run."""

from layerscope.report.figures import bar_chart, heatmap, line_chart
from layerscope.report.html import render_report, write_report

__all__ = ["bar_chart", "heatmap", "line_chart", "render_report", "write_report"]
