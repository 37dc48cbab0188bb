"""The `activations` and `spectral` commands end to end on a tiny model, checked against the stored activations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from layerscope.capture import open_store
from layerscope.metrics import pc_subspace_cca, representation_shift, cka_matrix


def test_activations_command_writes_a_store_and_resumes(tmp_path, capsys):
    out = tmp_path / "acts"
    args = ["activations", "tiny-llama", "--samples", "6", "--seq-len", "16", "--pooling", "tokens",
            "--token-budget", "50", "--out", str(out), "--quiet"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    store = open_store(out)
    assert store.num_rows == 50 and store.pooling == "tokens" and store.labels[0] == "0"
    assert json.loads((out / "run.json").read_text())["config"]["rows"] == 50
    stamp = (out / "layer_000.npy").stat().st_mtime_ns
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert (out / "layer_000.npy").stat().st_mtime_ns == stamp  # complete: reused, not recomputed


def test_spectral_command_curves_match_direct_computation_on_the_stored_activations(tmp_path, capsys):
    out = tmp_path / "spectral"
    code, stdout, err = run_cli(["spectral", "tiny-llama", "--samples", "48", "--seq-len", "16", "--k", "1,3",
                                 "--keep", "6", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert "against delta: Spearman" in stdout
    store = open_store(out / "activations")
    assert store.pooling == "mean" and store.num_rows == 48
    layers = [np.asarray(store.layer(i), dtype=np.float64) for i in range(store.num_layers)]
    curves = pd.read_csv(out / "curves.csv")
    L = len(layers)
    for layer in range(L):
        expected = np.mean([pc_subspace_cca(layers[layer], layers[m], 3).mean
                            for m in (layer - 2, layer - 1, layer + 1, layer + 2) if 0 <= m < L])
        assert curves.loc[layer, "cca_k3"] == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(curves["delta"], representation_shift(cka_matrix(layers), w=5), atol=1e-6)
    tidy = pd.read_csv(out / "results.csv")
    assert set(tidy["metric"]) == {"delta", "pc_cca"} and set(tidy["k"].dropna()) == {1, 3}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "Spearman(cca_k3, delta)" in html
    assert (out / "pca.safetensors").is_file()


def test_spectral_versus_the_same_model_is_perfectly_similar(tmp_path, capsys):
    out = tmp_path / "vs"
    code, _, err = run_cli(["spectral", "tiny-llama", "--vs", "tiny-llama", "--samples", "12", "--seq-len", "16",
                            "--pooling", "tokens", "--token-budget", "160", "--k", "1,3", "--keep", "4",
                            "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    versus = pd.read_csv(out / "versus.csv")
    assert len(versus) == 4 and not versus["few_samples"].any()  # 160 token rows for a width of 64
    for column in ("cca_k1", "cca_k3", "svcca", "pwcca", "cka"):
        np.testing.assert_allclose(versus[column], 1.0, atol=1e-6)
    assert (out / "activations-vs" / "manifest.json").is_file()
    assert "data:image/png;base64," in (out / "report.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["spectral", "tiny-llama", "--k", "0"], "must be integers in 1.."),
    (["spectral", "tiny-llama", "--k", "one"], "comma-separated integers"),
    (["spectral", "tiny-llama", "--pooling", "max"], "max"),
    (["activations", "tiny-llama", "--pooling", "mean", "--token-budget", "10"], "token_budget"),
])
def test_spectral_commands_refuse_bad_input(tmp_path, capsys, args, message):
    code, _, err = run_cli([*args, "--samples", "8", "--seq-len", "16", "--out", str(tmp_path / "x"), "--quiet"], capsys)
    assert code == 2
    assert message in err
