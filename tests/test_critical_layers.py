"""Critical-layer prediction, the correlation of runs, and their commands, on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from layerscope.analyses.critical_layers import CriticalLayersResult
from layerscope.analyses.representation import CKAResult
from layerscope.errors import LayerscopeError
from layerscope.metrics import representation_shift
from conftest import run_cli


def cka_result(matrix: np.ndarray, window: int = 3) -> CKAResult:
    labels = [str(i) for i in range(len(matrix))]
    return CKAResult(matrix, labels, labels, shift=representation_shift(matrix, w=window), window=window)


def block_matrix(sizes: list[int], within: float = 0.95, across: float = 0.5) -> np.ndarray:
    """A CKA-like matrix with diagonal blocks of similar layers (change points at the block starts)."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    m = np.where(labels[:, None] == labels[None, :], within, across)
    np.fill_diagonal(m, 1.0)
    return m


def test_prediction_follows_the_smallest_delta_inside_the_edges():
    a = cka_result(block_matrix([4, 4, 4]))
    b = cka_result(block_matrix([4, 4, 4], within=0.9, across=0.4))
    result = CriticalLayersResult(["a", "b"], [a, b], top=2, radius=1, edge=2, select="lowest")
    mean = (a.shift + b.shift) / 2
    np.testing.assert_allclose(result.mean_delta(), mean)
    candidates = list(range(2, 10))
    expected_centres = sorted(sorted(candidates, key=lambda i: (mean[i], i))[:2])
    assert result.centres() == expected_centres
    assert result.predicted_layers() == sorted({j for c in expected_centres for j in (c - 1, c, c + 1)})
    control = result.control_layers()
    assert len(control) == len(result.predicted_layers()) or len(control) == len(set(candidates) - set(result.predicted_layers()))
    assert not set(control) & set(result.predicted_layers()) and set(control) <= set(candidates)
    assert min(mean[c] for c in control) >= max(mean[c] for c in expected_centres)


def with_delta(delta: list[float]) -> CKAResult:
    labels = [str(i) for i in range(len(delta))]
    return CKAResult(np.eye(len(delta)), labels, labels, shift=np.array(delta))


def test_dips_are_ranked_by_prominence_and_a_steady_trend_is_not_a_dip():
    delta = [0.90, 0.92, 0.94, 0.96, 0.98] + [0.99] * 15
    delta[8], delta[13], delta[16] = 0.97, 0.95, 0.985
    result = CriticalLayersResult(["a", "b"], [with_delta(delta), with_delta(delta)], top=2, radius=1, edge=2)
    assert result.centres() == [8, 13]
    assert result.predicted_layers() == [7, 8, 9, 12, 13, 14]
    assert CriticalLayersResult(["a", "b"], [with_delta(delta)] * 2, top=2, edge=2, select="lowest").centres() == [2, 13]
    # fewer dips than asked for: the rest are the lowest deltas not overlapping a chosen window
    assert CriticalLayersResult(["a", "b"], [with_delta(delta)] * 2, top=4, edge=2).centres() == [2, 8, 13, 16]
    with pytest.raises(LayerscopeError, match="'peaks'.*dips, lowest"):
        CriticalLayersResult(["a", "b"], [with_delta(delta)] * 2, select="peaks")


def test_agreement_reports_matrix_correlation_and_change_points():
    a, b = cka_result(block_matrix([3, 5, 4])), cka_result(block_matrix([3, 5, 4], within=0.8, across=0.3))
    row = CriticalLayersResult(["a", "b"], [a, b]).agreement()[0]
    iu = np.triu_indices(12, k=1)
    assert row["cka_matrix_pearson"] == pytest.approx(stats.pearsonr(a.matrix[iu], b.matrix[iu])[0])
    assert row["change_points_a"] == row["change_points_b"] == "3,8"
    assert row["same_change_points"] and row["shared_change_points"] == "3,8"
    other = cka_result(block_matrix([6, 6]))
    row = CriticalLayersResult(["a", "c"], [a, other]).agreement()[0]
    assert row["change_points_b"] == "6" and not row["same_change_points"]


def test_bad_prediction_settings_are_refused():
    a = cka_result(block_matrix([2, 2]))
    with pytest.raises(LayerscopeError, match="edge 2 leaves 0 candidate layers of 4"):
        CriticalLayersResult(["a", "b"], [a, a], edge=2)
    with pytest.raises(LayerscopeError, match="top 0"):
        CriticalLayersResult(["a", "b"], [a, a], top=0, edge=0)


@pytest.fixture
def instruction_file(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Write the number {i} in words.", "context": "", "response": f"It is {i}."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_critical_layers_then_substitute_then_correlate(tmp_path, capsys, instruction_file):
    from layerscope.models.tiny import build_tiny_model

    base, tok = build_tiny_model("tiny-llama", seed=0, num_hidden_layers=8)
    tuned, _ = build_tiny_model("tiny-llama", seed=1, num_hidden_layers=8)
    for model, name in ((base, "base"), (tuned, "tuned")):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    cl, sub, cor = tmp_path / "cl", tmp_path / "sub", tmp_path / "cor"
    code, out, err = run_cli(["critical-layers", str(tmp_path / "base"), "--data", str(instruction_file), "--data", "builtin",
                              "--samples", "12", "--seq-len", "32", "--top", "1", "--out", str(cl)], capsys)
    assert code == 0, err
    prediction = json.loads((cl / "prediction.json").read_text())
    frame = pd.read_csv(cl / "results.csv")
    assert frame["predicted"].tolist() == [i in prediction["predicted_layers"] for i in range(8)]
    assert f"--layers {','.join(map(str, prediction['predicted_layers']))}" in out.replace("\n", "")
    assert (cl / "cka-train.csv").is_file() and (cl / "cka-builtin.csv").is_file()
    code, _, err = run_cli(["substitute", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "tuned"),
                            "--instructions", str(instruction_file), "--window", "3", "--out", str(sub), "--quiet"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["correlate", str(sub), str(cl), "--out", str(cor), "--n-boot", "50"], capsys)
    assert code == 0, err
    result = json.loads((cor / "correlation.json").read_text())
    losses = pd.read_csv(sub / "results.csv").set_index("center")["loss"]
    layers = list(range(1, 7))  # centres of windows of 3 in 8 layers, all with a delta
    assert result["layers"] == layers
    expected = stats.spearmanr(losses.loc[layers], frame.set_index("layer")["delta"].loc[layers])[0]
    assert result["spearman"] == pytest.approx(expected)
    assert set(result["other_columns"]) == {"delta_train", "delta_builtin"}
    code, _, err = run_cli(["correlate", str(sub), str(cl), "--column", "delta_train", "--out", str(tmp_path / "c2"),
                            "--n-boot", "0"], capsys)
    assert code == 0, err
    one = json.loads((tmp_path / "c2" / "correlation.json").read_text())
    assert one["spearman"] == pytest.approx(stats.spearmanr(losses.loc[layers], frame.set_index("layer")["delta_train"].loc[layers])[0])
    assert one["spearman"] == pytest.approx(result["other_columns"]["delta_train"]["spearman"])
    code, _, err = run_cli(["correlate", str(sub), str(cl), "--column", "delta_x"], capsys)
    assert code == 2 and "no column 'delta_x'; allowed: delta, delta_train, delta_builtin" in err
    html = (cor / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # scatter, substitution bars, both heatmaps, delta
    code, _, err = run_cli(["correlate", str(sub), str(sub)], capsys)
    assert code == 2 and "one substitution run and one cka/critical-layers run" in err
    code, _, err = run_cli(["correlate", str(sub), str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "not a finished layerscope run folder" in err
    code, _, err = run_cli(["critical-layers", "tiny-llama", "--data", "builtin"], capsys)
    assert code == 2 and "at least two data sets" in err
