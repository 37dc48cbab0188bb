"""The CLI end to end on tiny models, and its error messages (exit code 2, one line, no traceback)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import run_cli


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Commands without --out write runs/<analysis>-<time> under the working directory: keep it out of the repository."""
    monkeypatch.chdir(tmp_path)


def test_ablate_writes_a_complete_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["ablate", "tiny-llama", "--samples", "4", "--seq-len", "32", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    frame = pd.read_csv(out / "results.csv")
    assert list(frame.columns[:4]) == ["layer", "window_start", "window_end", "layers"]
    assert {"layer", "loss", "baseline_loss", "delta"} <= set(frame.columns)
    assert frame["layer"].tolist() == [0, 1, 2, 3]
    assert (frame["delta"] - (frame["loss"] - frame["baseline_loss"])).abs().max() < 1e-12
    assert pd.read_parquet(out / "results.parquet").shape == frame.shape
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and run["config"]["model"] == "tiny-llama"
    assert (out / "ablation.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "tiny-llama" in html
    assert str(out) in stdout.replace("\n", "")


def test_ablate_rerun_resumes_without_recomputing(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["ablate", "tiny-gpt2", "--samples", "3", "--seq-len", "24", "--window", "3", "--out", str(out), "--quiet"]
    assert run_cli(args, capsys)[0] == 0
    first = pd.read_csv(out / "results.csv")
    assert first["layer"].tolist() == [1, 2]  # only whole windows of 3 in a 4-layer model
    assert first["layers"].tolist() == ["0,1,2", "1,2,3"]
    assert run_cli(args, capsys)[0] == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), first)
    # The rerun found its points under the same run id: nothing was recomputed or stored twice.
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(DISTINCT run_id), COUNT(*) FROM points").fetchone() == (1, 2)


def test_ablate_resumes_in_a_new_process_after_sigkill(tmp_path):
    """Kill a real `layerscope ablate` half-way, run it again, and compare with an uninterrupted run."""
    out, clean = tmp_path / "killed", tmp_path / "clean"
    args = [sys.executable, "-m", "layerscope", "ablate", "tiny-gpt-neo", "--samples", "600", "--seq-len", "128", "--quiet"]
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    stored = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with sqlite3.connect(out / "results.sqlite", timeout=5) as db:
                stored = db.execute("SELECT COUNT(*) FROM points").fetchone()[0]
        except sqlite3.OperationalError:
            continue
        if stored >= 2:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    if not 1 <= stored < 4:
        pytest.skip(f"could not catch the sweep half-way (stored {stored} of 4 points before it ended)")
    assert not (out / "results.csv").exists()  # it really died before finishing
    assert subprocess.run([*args, "--out", str(out)], capture_output=True).returncode == 0
    assert subprocess.run([*args, "--out", str(clean)], capture_output=True).returncode == 0
    with sqlite3.connect(out / "results.sqlite") as db:
        keys = db.execute("SELECT point_key, COUNT(*) FROM points GROUP BY point_key").fetchall()
    assert len(keys) == 4 and all(count == 1 for _, count in keys)
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), pd.read_csv(clean / "results.csv"))


@pytest.mark.parametrize("args, fragment", [
    (["ablate", "no-such-model"], "unknown model 'no-such-model'"),
    (["ablate", "tiny-llama", "--window", "9"], "window 9 is out of range"),
    (["ablate", "tiny-llama", "--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["ablate", "tiny-llama", "--samples", "0"], "samples 0"),
    (["ablate", "tiny-llama", "--role", "gate_proj"], "role 'gate_proj'"),
    (["evaluate", "tiny-llama", "--task", "/nonexistent/x.mc.jsonl"], "/nonexistent/x.mc.jsonl"),
    (["generate", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens 0"),
    (["ablate", "tiny-llama", "--dtype", "float8"], "unknown dtype 'float8'"),
])
def test_bad_input_exits_2_with_one_line(args, fragment, capsys, tmp_path):
    code, _out, err = run_cli([*args, *(["--out", str(tmp_path / "o")] if args[0] == "ablate" else [])], capsys)
    assert code == 2
    assert fragment in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_empty_data_set_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    code, _, err = run_cli(["ablate", "tiny-llama", "--data", str(empty), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "empty" in err.lower() and "Traceback" not in err


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "layerscope", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("ablate", "cka", "evaluate", "generate", "models", "fetch"):
        assert command in result.stdout


def test_subprocess_error_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "layerscope", "ablate", "tiny-llama", "--window", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: window 0 is out of range: allowed 1..4 for this 4-layer model"


def test_evaluate_and_generate_on_a_tiny_model(capsys):
    code, out, err = run_cli(["evaluate", "tiny-llama", "--samples", "3", "--seq-len", "32"], capsys)
    assert code == 0, err
    assert "perplexity" in out
    code, out, err = run_cli(["generate", "tiny-llama", "--prompt", "Hello", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert "Hello" in out
