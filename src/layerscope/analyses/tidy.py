"""Tidy result tables: one row per (point, metric), the point's parameters as columns."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from ..errors import LayerscopeError


def tidy_frame(rows: Sequence[dict], params: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Melt wide rows (a point's parameters and metrics in one dict) into columns
    ``params + ["metric", "value"]``; a metric missing from a row is left out for that row."""
    if not rows:
        raise LayerscopeError("no rows to tabulate")
    out = []
    for row in rows:
        missing = [p for p in params if p not in row]
        if missing:
            raise LayerscopeError(f"row {row} lacks the parameter columns {missing}")
        for metric in metrics:
            if metric in row:
                out.append({**{p: row[p] for p in params}, "metric": metric, "value": row[metric]})
    return pd.DataFrame(out, columns=[*params, "metric", "value"])


def wide_frame(tidy: pd.DataFrame, params: Sequence[str]) -> pd.DataFrame:
    """The inverse of :func:`tidy_frame`: one row per point, one column per metric."""
    wide = tidy.pivot_table(index=list(params), columns="metric", values="value", aggfunc="first", dropna=False)
    return wide.reset_index().rename_axis(columns=None)
