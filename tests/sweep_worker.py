"""Run a small deterministic sweep into a results store; used by the kill/resume test in test_runner.py.

Usage: python tests/sweep_worker.py DB RUN_ID N DELAY

Prints ``computed <k>`` on its last line: how many points this process computed (not skipped).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layerscope.runner import ResultsStore, run_sweep  # noqa: E402


def points(n: int) -> list[dict]:
    return [{"i": i, "name": f"p{i:03d}"} for i in range(n)]


def value(params: dict) -> dict:
    """Deterministic metrics of one point, with a little real arithmetic."""
    i = params["i"]
    acc = 0.0
    for k in range(1, 200):
        acc += math.sin(i * k) / k
    return {"root": float(i) ** 0.5, "series": round(acc, 12), "square": i * i}


def main(argv: list[str]) -> int:
    db, run_id, n, delay = argv[0], argv[1], int(argv[2]), float(argv[3])
    calls = 0

    def compute(params: dict) -> dict:
        nonlocal calls
        calls += 1
        time.sleep(delay)
        return value(params)

    with ResultsStore(db) as store:
        rows = run_sweep(points(n), compute, store, run_id, progress=False)
    assert len(rows) == n
    print(f"computed {calls}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
