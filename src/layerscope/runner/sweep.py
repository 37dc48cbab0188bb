"""Run the points of a sweep one by one, storing each as soon as it finishes, resuming where it stopped."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from layerscope.errors import LayerscopeError
from layerscope.runner.store import ResultsStore, point_key


def run_sweep(
    points: Sequence[Mapping[str, Any]],
    compute: Callable[[dict[str, Any]], Mapping[str, Any]],
    store: ResultsStore,
    run_id: str,
    *,
    description: str = "",
    progress: bool = True,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    """Compute every point of ``points`` not yet in ``store`` under ``run_id``, and return all their rows.

    ``compute(params)`` returns the point's metrics (a mapping of name to JSON-able value). Each
    point is committed to the store the moment it finishes; points already stored are skipped, so
    calling this again after an exception, Ctrl-C or a killed process computes only what is missing.
    A point that appears twice in ``points`` is computed once.

    Returns one row (parameters merged with metrics) per entry of ``points``, in that order, read
    back from the store, so resumed and freshly computed rows look alike.
    Exceptions from ``compute`` (and KeyboardInterrupt) propagate after the points finished so far
    are safely stored.
    """
    points = [dict(p) if isinstance(p, Mapping) else _bad_point(i, p) for i, p in enumerate(points)]
    keys = [point_key(p) for p in points]
    done = store.done_keys(run_id)
    todo: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for key, params in zip(keys, points):
        if key not in done and key not in seen:
            todo.append((key, params))
            seen.add(key)
    unique_total = len(set(keys))

    console = console if console is not None else Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not progress or not console.is_terminal,
    )
    with bar:
        task = bar.add_task(description or run_id, total=unique_total, completed=unique_total - len(todo))
        for key, params in todo:
            metrics = compute(dict(params))
            if not isinstance(metrics, Mapping):
                raise LayerscopeError(
                    f"compute() must return a mapping of metric name to value, got {type(metrics).__name__} for point {params}"
                )
            store.put(run_id, params, metrics)
            bar.advance(task)

    by_key = store.rows_by_key(run_id)
    missing = [p for k, p in zip(keys, points) if k not in by_key]
    if missing:  # pragma: no cover - only if another process deleted rows under us
        raise LayerscopeError(f"{len(missing)} points of run {run_id!r} are missing from the store after the sweep, e.g. {missing[0]}")
    return [dict(by_key[k]) for k in keys]


def _bad_point(index: int, point: object) -> dict[str, Any]:
    raise LayerscopeError(f"point {index} of the sweep must be a mapping of parameter name to value, got {point!r}")


__all__ = ["run_sweep"]
