"""The results store: one SQLite file, one row per finished point of a sweep.

Each point is written and committed the moment it finishes, so a run that is interrupted (an
exception, Ctrl-C, a killed process, a lost machine) keeps everything it computed, and a rerun
computes only what is missing. A point is identified by its run id and a hash of its parameters
(:func:`point_key`); the table refuses a second copy of the same point, so a point is never
stored twice, whichever process finishes it.

The file is opened in WAL mode with a busy timeout, so several processes (workers of one sweep,
a reader polling progress) can use it at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerscope.errors import LayerscopeError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id    TEXT NOT NULL,
    point_key TEXT NOT NULL,
    params    TEXT NOT NULL,
    metrics   TEXT NOT NULL,
    created   REAL NOT NULL,
    UNIQUE (run_id, point_key)
);
"""


def _to_jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy / torch scalars and arrays, paths, sets, dataclasses."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, torch tensors
    if callable(tolist):
        return tolist()
    raise TypeError(f"{obj!r} (type {type(obj).__name__}) cannot be stored as JSON")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_to_jsonable, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise LayerscopeError(f"value cannot be stored in the results store: {exc}") from exc


def point_key(params: Mapping[str, Any]) -> str:
    """The identity of a point: sha256 (hex) of its parameters as canonical JSON.

    The order of the keys does not matter; ``1`` and ``1.0`` are different values.
    """
    if not isinstance(params, Mapping):
        raise LayerscopeError(f"a point's parameters must be a mapping of name to value, got {type(params).__name__}")
    return hashlib.sha256(canonical_json(dict(params)).encode("utf-8")).hexdigest()


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A short stable hash (hex) of JSON-able parts: model weights hash, data description, config, version.

    Used as (part of) a run id, so that a rerun of the same study on the same model and data resumes
    the same run, and anything that changes the results starts a new one.
    """
    if not 8 <= length <= 64:
        raise LayerscopeError(f"fingerprint length {length} is out of range, allowed 8..64")
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()[:length]


class ResultsStore:
    """A SQLite file of finished points, keyed by ``(run_id, point_key(params))``.

    >>> with ResultsStore(":memory:") as store:
    ...     store.put("run", {"layer": 3}, {"loss": 2.5})
    ...     store.rows("run")
    True
    [{'layer': 3, 'loss': 2.5}]
    """

    def __init__(self, path: str | Path, *, timeout: float = 60.0) -> None:
        self.path = path if str(path) == ":memory:" else Path(path)
        if isinstance(self.path, Path):
            if self.path.is_dir():
                raise LayerscopeError(f"results store path {str(self.path)!r} is a folder, expected a file such as results.sqlite")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, each put is committed on its own.
        self._conn: sqlite3.Connection | None = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self._retry(lambda: self._conn.execute("PRAGMA journal_mode = WAL").fetchone(), timeout)
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._retry(lambda: self._conn.executescript(_SCHEMA), timeout)
        if self._conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            self._retry(lambda: self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}"), timeout)

    @staticmethod
    def _retry(fn, timeout: float):
        """Run ``fn``, retrying while another process holds a lock SQLite's busy handler does not cover."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LayerscopeError(f"results store {str(self.path)!r} is closed")
        return self._conn

    # -- writing -------------------------------------------------------------------------------

    def put(self, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, Any]) -> bool:
        """Store one finished point and commit. Returns False (and stores nothing) if it is already there."""
        if not isinstance(run_id, str) or not run_id:
            raise LayerscopeError(f"run id must be a non-empty string, got {run_id!r}")
        if not isinstance(metrics, Mapping):
            raise LayerscopeError(f"a point's metrics must be a mapping of name to value, got {type(metrics).__name__}")
        clash = sorted(set(params) & set(metrics))
        if clash:
            raise LayerscopeError(f"metric names {clash} clash with parameter names of the same point; rename the metrics")
        key = point_key(params)
        params_json = canonical_json(dict(params))
        metrics_json = canonical_json(dict(metrics))
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO points (run_id, point_key, params, metrics, created) VALUES (?, ?, ?, ?, ?)",
            (run_id, key, params_json, metrics_json, time.time()),
        )
        return cur.rowcount == 1

    # -- reading -------------------------------------------------------------------------------

    def done_keys(self, run_id: str) -> set[str]:
        """Keys of the points of ``run_id`` already stored."""
        return {k for (k,) in self.conn.execute("SELECT point_key FROM points WHERE run_id = ?", (run_id,))}

    def has(self, run_id: str, params: Mapping[str, Any]) -> bool:
        key = point_key(params)
        return self.conn.execute("SELECT 1 FROM points WHERE run_id = ? AND point_key = ?", (run_id, key)).fetchone() is not None

    def get(self, run_id: str, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored row (params merged with metrics) of one point, or None."""
        row = self.conn.execute(
            "SELECT params, metrics FROM points WHERE run_id = ? AND point_key = ?", (run_id, point_key(params))
        ).fetchone()
        return None if row is None else _merge(*row)

    def rows(self, run_id: str) -> list[dict[str, Any]]:
        """All points of ``run_id``, parameters merged with metrics, in the order they were stored."""
        cur = self.conn.execute("SELECT params, metrics FROM points WHERE run_id = ? ORDER BY seq", (run_id,))
        return [_merge(p, m) for p, m in cur]

    def rows_by_key(self, run_id: str) -> dict[str, dict[str, Any]]:
        """All points of ``run_id`` as ``{point_key: row}``, in the order they were stored."""
        cur = self.conn.execute("SELECT point_key, params, metrics FROM points WHERE run_id = ? ORDER BY seq", (run_id,))
        return {k: _merge(p, m) for k, p, m in cur}

    def count(self, run_id: str | None = None) -> int:
        if run_id is None:
            return self.conn.execute("SELECT COUNT(*) FROM points").fetchone()[0]
        return self.conn.execute("SELECT COUNT(*) FROM points WHERE run_id = ?", (run_id,)).fetchone()[0]

    def runs(self) -> list[str]:
        """Run ids in the store, in the order their first point was stored."""
        cur = self.conn.execute("SELECT run_id FROM points GROUP BY run_id ORDER BY MIN(seq)")
        return [r for (r,) in cur]

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"


def _merge(params_json: str, metrics_json: str) -> dict[str, Any]:
    row = json.loads(params_json)
    row.update(json.loads(metrics_json))
    return row


__all__ = ["ResultsStore", "canonical_json", "fingerprint", "point_key"]
