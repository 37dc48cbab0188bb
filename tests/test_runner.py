"""Results store, sweeps, resume after an exception and after SIGKILL."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from layerscope.errors import LayerscopeError
from layerscope.runner import ResultsStore, fingerprint, point_key, run_sweep

WORKER = Path(__file__).with_name("sweep_worker.py")


def _load_worker():
    spec = importlib.util.spec_from_file_location("sweep_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


# -- store ---------------------------------------------------------------------------------------


def test_put_rows_done_keys(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        assert store.rows("a") == [] and store.done_keys("a") == set()
        assert store.put("a", {"layer": 2, "rank": 8}, {"loss": 1.5})
        assert store.put("a", {"layer": 0, "rank": 8}, {"loss": 2.5, "acc": 0.25})
        assert store.rows("a") == [{"layer": 2, "rank": 8, "loss": 1.5}, {"layer": 0, "rank": 8, "loss": 2.5, "acc": 0.25}]
        assert store.done_keys("a") == {point_key({"layer": 2, "rank": 8}), point_key({"layer": 0, "rank": 8})}
        assert store.get("a", {"rank": 8, "layer": 0}) == {"layer": 0, "rank": 8, "loss": 2.5, "acc": 0.25}
        assert store.get("a", {"layer": 1, "rank": 8}) is None
    # committed: a fresh connection sees everything
    with ResultsStore(tmp_path / "r.sqlite") as store:
        assert [r["layer"] for r in store.rows("a")] == [2, 0]
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_duplicate_put_is_ignored(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        assert store.put("a", {"x": 1}, {"y": 10.0}) is True
        assert store.put("a", {"x": 1}, {"y": 99.0}) is False
        assert store.rows("a") == [{"x": 1, "y": 10.0}]
        assert store.conn.execute("SELECT COUNT(*) FROM points").fetchone()[0] == 1


def test_key_ignores_dict_order_but_not_values():
    assert point_key({"a": 1, "b": [1, 2], "c": {"x": 1, "y": 2}}) == point_key({"c": {"y": 2, "x": 1}, "b": [1, 2], "a": 1})
    assert point_key({"a": 1}) != point_key({"a": 2})
    assert point_key({"a": 1}) != point_key({"b": 1})
    assert point_key({"a": [1, 2]}) != point_key({"a": [2, 1]})
    assert len(point_key({})) == 64


def test_same_params_other_order_is_same_point(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        assert store.put("a", {"layer": 1, "rank": 4}, {"loss": 1.0})
        assert not store.put("a", {"rank": 4, "layer": 1}, {"loss": 2.0})
        assert store.rows("a") == [{"layer": 1, "rank": 4, "loss": 1.0}]


def test_run_ids_are_separate(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        assert store.put("run-b", {"x": 1}, {"y": 1.0})
        assert store.put("run-a", {"x": 1}, {"y": 2.0})  # same point, other run: stored
        assert store.put("run-a", {"x": 2}, {"y": 3.0})
        assert store.rows("run-a") == [{"x": 1, "y": 2.0}, {"x": 2, "y": 3.0}]
        assert store.rows("run-b") == [{"x": 1, "y": 1.0}]
        assert store.runs() == ["run-b", "run-a"]
        assert store.done_keys("run-c") == set()
        assert store.count("run-a") == 2 and store.count() == 3


def test_values_round_trip(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.put("a", {"window": (2, 5), "np": np.int64(3)}, {"loss": np.float32(0.5), "nan": float("nan"), "v": np.array([1.0, 2.0])})
        (row,) = store.rows("a")
        assert row["window"] == [2, 5] and row["np"] == 3 and row["loss"] == 0.5 and row["v"] == [1.0, 2.0]
        assert math.isnan(row["nan"])
        assert point_key({"np": np.int64(3)}) == point_key({"np": 3})


def test_bad_input_is_refused(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(LayerscopeError, match="clash"):
            store.put("a", {"loss": 1}, {"loss": 2.0})
        with pytest.raises(LayerscopeError, match="run id"):
            store.put("", {"x": 1}, {"y": 1})
        with pytest.raises(LayerscopeError, match="cannot be stored"):
            store.put("a", {"x": object()}, {"y": 1})
        with pytest.raises(LayerscopeError):
            store.put("a", {"x": 1}, [1, 2])
        assert store.rows("a") == []
    store.close()
    with pytest.raises(LayerscopeError, match="closed"):
        store.rows("a")
    with pytest.raises(LayerscopeError, match="folder"):
        ResultsStore(tmp_path)


def test_fingerprint_is_stable_and_sensitive():
    a = fingerprint("weights-abc", {"corpus": "wiki", "n": 64}, {"lr": 1e-3}, "0.1.0")
    assert a == fingerprint("weights-abc", {"n": 64, "corpus": "wiki"}, {"lr": 1e-3}, "0.1.0")
    assert a != fingerprint("weights-abd", {"corpus": "wiki", "n": 64}, {"lr": 1e-3}, "0.1.0")
    assert a != fingerprint("weights-abc", {"corpus": "wiki", "n": 65}, {"lr": 1e-3}, "0.1.0")
    assert len(a) == 16 and int(a, 16) >= 0
    assert len(fingerprint("x", length=64)) == 64


def test_concurrent_writers_store_each_point_once(tmp_path):
    db = tmp_path / "r.sqlite"
    ResultsStore(db).close()
    inserted = []
    errors = []

    def writer():
        try:
            with ResultsStore(db) as store:
                inserted.append(sum(store.put("a", {"i": i}, {"v": i * 2}) for i in range(100)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(inserted) == 100
    with ResultsStore(db) as store:
        assert sorted(r["i"] for r in store.rows("a")) == list(range(100))


# -- sweeps ----------------------------------------------------------------------------------------


def _points(n):
    return [{"layer": i, "rank": 2 ** (i % 3)} for i in range(n)]


def _metrics(p):
    return {"loss": p["layer"] * 0.5 + 1.0 / p["rank"], "tag": f"L{p['layer']}"}


def test_sweep_computes_all_in_order_and_returns_rows(tmp_path):
    calls = []

    def compute(p):
        calls.append(p["layer"])
        return _metrics(p)

    with ResultsStore(tmp_path / "r.sqlite") as store:
        rows = run_sweep(_points(6), compute, store, "run", progress=False)
        assert calls == list(range(6))
        assert rows == [{**p, **_metrics(p)} for p in _points(6)]
        # everything done: a second sweep computes nothing and returns the same rows
        again = run_sweep(_points(6), compute, store, "run", progress=False)
        assert calls == list(range(6)) and again == rows
        # rows come back in the order of the points asked for, not the order stored
        assert run_sweep(_points(6)[::-1], compute, store, "run", progress=False) == rows[::-1]


def test_sweep_resumes_after_exception(tmp_path):
    points = _points(10)
    calls = []

    def failing(p):
        calls.append(p["layer"])
        if p["layer"] == 4:
            raise RuntimeError("boom at 4")
        return _metrics(p)

    with ResultsStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(RuntimeError, match="boom at 4"):
            run_sweep(points, failing, store, "run", progress=False)
        assert calls == [0, 1, 2, 3, 4]
        assert [r["layer"] for r in store.rows("run")] == [0, 1, 2, 3]

        calls.clear()

        def counting(p):
            calls.append(p["layer"])
            return _metrics(p)

        resumed = run_sweep(points, counting, store, "run", progress=False)
        assert calls == [4, 5, 6, 7, 8, 9]
        assert store.count("run") == 10

    with ResultsStore(tmp_path / "fresh.sqlite") as fresh:
        assert resumed == run_sweep(points, _metrics, fresh, "run", progress=False)


def test_sweep_keyboard_interrupt_keeps_finished_points(tmp_path):
    def interrupted(p):
        if p["layer"] == 3:
            raise KeyboardInterrupt
        return _metrics(p)

    with ResultsStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(_points(5), interrupted, store, "run", progress=False)
        assert [r["layer"] for r in store.rows("run")] == [0, 1, 2]


def test_sweep_duplicate_points_computed_once(tmp_path):
    calls = []

    def compute(p):
        calls.append(p["x"])
        return {"y": p["x"] + 1}

    with ResultsStore(tmp_path / "r.sqlite") as store:
        rows = run_sweep([{"x": 1}, {"x": 2}, {"x": 1}], compute, store, "run", progress=False)
        assert calls == [1, 2]
        assert rows == [{"x": 1, "y": 2}, {"x": 2, "y": 3}, {"x": 1, "y": 2}]


def test_sweep_refuses_bad_points_and_metrics(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        with pytest.raises(LayerscopeError, match="point 1"):
            run_sweep([{"x": 1}, 5], lambda p: {"y": 1}, store, "run", progress=False)
        with pytest.raises(LayerscopeError, match="mapping"):
            run_sweep([{"x": 1}], lambda p: 3.0, store, "run", progress=False)
        assert store.rows("run") == []


def test_sweep_shows_progress_on_a_terminal(tmp_path):
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.put("run", _points(4)[0], _metrics(_points(4)[0]))
        run_sweep(_points(4), _metrics, store, "run", description="windows", console=console)
    out = buf.getvalue()
    assert "windows" in out and "4/4" in out
    quiet = io.StringIO()
    with ResultsStore(tmp_path / "q.sqlite") as store:
        run_sweep(_points(3), _metrics, store, "run", progress=False, console=Console(file=quiet, force_terminal=True))
    assert quiet.getvalue() == ""


# -- SIGKILL in the middle of a sweep -------------------------------------------------------------


def _count(db: Path, run_id: str) -> int:
    try:
        con = sqlite3.connect(str(db), timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM points WHERE run_id = ?", (run_id,)).fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError:  # table not created yet
        return 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sweep_survives_sigkill_and_resumes(tmp_path):
    n, delay, run_id = 40, 0.04, "killed-run"
    db = tmp_path / "killed.sqlite"
    cmd = [sys.executable, str(WORKER), str(db), run_id, str(n), str(delay)]

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while _count(db, run_id) < n // 2:
            assert proc.poll() is None, f"worker ended early: {proc.communicate()}"
            assert time.monotonic() < deadline, "worker too slow"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # the file is intact and holds a strict part of the sweep
    con = sqlite3.connect(str(db))
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with ResultsStore(db) as store:
        stored_before = store.count(run_id)
        first_rows = store.rows(run_id)
    assert n // 2 <= stored_before < n
    assert [r["i"] for r in first_rows] == list(range(stored_before))

    # restart: only the missing points are computed
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == f"computed {n - stored_before}"

    con = sqlite3.connect(str(db))
    per_key = con.execute("SELECT point_key, COUNT(*) FROM points WHERE run_id = ? GROUP BY point_key", (run_id,)).fetchall()
    con.close()
    assert len(per_key) == n and all(c == 1 for _, c in per_key)

    with ResultsStore(db) as store:
        resumed = store.rows(run_id)
    assert resumed[:stored_before] == first_rows  # nothing stored before the kill changed
    with ResultsStore(tmp_path / "clean.sqlite") as clean:
        uninterrupted = run_sweep(worker.points(n), worker.value, clean, run_id, progress=False)
    assert resumed == uninterrupted
    assert {point_key({"i": r["i"], "name": r["name"]}) for r in resumed} == {point_key(p) for p in worker.points(n)}
