"""A self-contained HTML report per run: one file, figures embedded, inline CSS, no external URLs.

Everything that comes from data or configuration is escaped, so a model name or a prompt that
contains markup is shown as text, never run.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from layerscope.errors import LayerscopeError

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml", ".gif": "image/gif"}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
.meta { color: #666; font-size: 0.85rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
th { background: #f4f4f4; }
table.summary th, table.summary td { text-align: left; }
td.value { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; white-space: pre-wrap; }
.table-wrap { overflow-x: auto; max-height: 40rem; overflow-y: auto; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.85rem; }
ul.notes li { margin: 0.2rem 0; }
"""


def _text(value: Any) -> str:
    """A summary value as escaped text; containers as indented JSON."""
    if isinstance(value, (Mapping, list, tuple)):
        value = json.dumps(value, indent=2, default=str, ensure_ascii=False)
    elif isinstance(value, float):
        value = f"{value:.6g}"
    return html.escape(str(value))


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise LayerscopeError(f"figure {str(path)!r} has an unsupported type, allowed: {', '.join(sorted(_MIME))}")
    if not path.is_file():
        raise LayerscopeError(f"figure {str(path)!r} does not exist")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _float(value: float) -> str:
    return f"{value:.6g}"


def render_report(
    *,
    title: str,
    summary: Mapping[str, Any],
    table: pd.DataFrame,
    figures: Sequence[str | Path | tuple[str | Path, str]] = (),
    notes: Sequence[str] = (),
    max_rows: int | None = 2000,
) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    if not isinstance(table, pd.DataFrame):
        raise LayerscopeError(f"report table must be a pandas DataFrame, got {type(table).__name__}")
    if not isinstance(summary, Mapping):
        raise LayerscopeError(f"report summary must be a mapping of name to value, got {type(summary).__name__}")
    esc_title = html.escape(str(title))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc_title}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc_title}</h1>",
        f'<p class="meta">written {html.escape(datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"))}'
        " by layerscope</p>",
    ]

    if summary:
        parts.append("<h2>Summary</h2>")
        parts.append('<table class="summary"><tbody>')
        for key, value in summary.items():
            parts.append(f'<tr><th scope="row">{html.escape(str(key))}</th><td class="value">{_text(value)}</td></tr>')
        parts.append("</tbody></table>")

    if figures:
        parts.append("<h2>Figures</h2>")
        for item in figures:
            fig_path, caption = (Path(item[0]), str(item[1])) if isinstance(item, tuple) else (Path(item), Path(item).stem.replace("_", " "))
            esc_caption = html.escape(caption)
            parts.append(
                f'<figure><img src="{_data_uri(fig_path)}" alt="{esc_caption}"><figcaption>{esc_caption}</figcaption></figure>'
            )

    if notes:
        parts.append("<h2>Notes</h2>")
        parts.append('<ul class="notes">')
        parts.extend(f"<li>{html.escape(str(note))}</li>" for note in notes)
        parts.append("</ul>")

    parts.append("<h2>Results</h2>")
    shown = table
    if max_rows is not None and len(table) > max_rows:
        shown = table.head(max_rows)
        parts.append(f'<p class="meta">first {max_rows} of {len(table)} rows; the full table is in the run folder.</p>')
    # Column names and index labels are escaped too (escape=True covers them in to_html).
    table_html = shown.to_html(
        escape=True,
        index=any(n is not None for n in shown.index.names),
        na_rep="",
        float_format=_float,
        border=0,
        render_links=False,
        classes="results",
    )
    parts.append(f'<div class="table-wrap">{table_html}</div>')
    parts.append("</body>")
    parts.append("</html>")
    return "\n".join(parts) + "\n"


def write_report(
    path: str | Path,
    *,
    title: str,
    summary: Mapping[str, Any],
    table: pd.DataFrame,
    figures: Sequence[str | Path | tuple[str | Path, str]] = (),
    notes: Sequence[str] = (),
    max_rows: int | None = 2000,
) -> Path:
    """Write one self-contained HTML report and return its path.

    ``summary`` is shown as a two-column table (values that are dicts or lists as JSON), ``figures``
    are PNG (or JPEG / SVG) files embedded as base64 data URIs, each optionally given as
    ``(path, caption)``; ``notes`` are plain-text remarks; ``table`` is the tidy results table
    (at most ``max_rows`` rows shown). All text is HTML-escaped; the file references no URL.
    """
    text = render_report(title=title, summary=summary, table=table, figures=figures, notes=notes, max_rows=max_rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["render_report", "write_report"]
