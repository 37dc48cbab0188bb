"""The pc-remove study: the fitted PCA, the loss with directions removed, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_cli, tiny
from layerscope.analyses.pc_removal import fit_layer_pca, outlier_layer, random_directions, run_pc_removal
from layerscope.analyses.spectral import layer_spectrum
from layerscope.capture import write_activations
from layerscope.data.sequences import ScoredSequence
from layerscope.evaluate.engine import Evaluator
from layerscope.interventions import PCRemoval


def _seqs(n=6):
    out = []
    for i in range(n):
        length = 8 + (3 * i) % 7
        ids = tuple(5 + (11 * i + 7 * t) % 200 for t in range(length))
        out.append(ScoredSequence(ids, (False,) + (True,) * (length - 1)))
    return out


def _hidden_tokens(model, seqs, layer):
    rows = []
    for s in seqs:
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([s.input_ids]), output_hidden_states=True).hidden_states
        rows.append(hs[layer + 1][0].double())
    return torch.cat(rows).numpy()


def test_fit_layer_pca_equals_eigh_of_the_token_covariance():
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    fitted = fit_layer_pca(model, seqs, 1, pad_id=tok.pad_token_id, keep=5)
    X = _hidden_tokens(model, seqs, 1)
    evals, evecs = np.linalg.eigh(np.cov(X, rowvar=False))
    order = np.argsort(evals)[::-1][:5]
    np.testing.assert_allclose(fitted.explained_variance, evals[order], rtol=1e-4)
    np.testing.assert_allclose(np.abs(fitted.components @ evecs[:, order]), np.eye(5), atol=1e-3)
    np.testing.assert_allclose(fitted.mean, X.mean(axis=0), atol=1e-5)


def test_random_directions_are_orthonormal_and_seeded():
    V = random_directions(16, 4, seed=3)
    np.testing.assert_allclose(V @ V.T, np.eye(4), atol=1e-12)
    assert np.array_equal(V, random_directions(16, 4, seed=3))
    assert not np.allclose(V, random_directions(16, 4, seed=4))


def test_run_pc_removal_losses_equal_a_direct_evaluation_and_restore_the_model():
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    basis = fit_layer_pca(model, seqs, 2, pad_id=tok.pad_token_id, keep=4)
    before = model(input_ids=torch.tensor([seqs[0].input_ids])).logits
    result = run_pc_removal(model, seqs, 2, basis, tops=(1, 3), pad_id=tok.pad_token_id, seed=5)
    frame = result.to_frame()
    assert list(zip(frame["directions"], frame["k"])) == [("top", 1), ("random", 1), ("top", 3), ("random", 3)]
    evaluator = Evaluator(model, seqs, pad_id=tok.pad_token_id)
    assert result.baseline_loss == pytest.approx(evaluator.score().mean_loss, abs=1e-9)
    for _, row in frame.iterrows():
        directions = basis.components if row["directions"] == "top" else random_directions(len(basis.mean), row["k"], 5 + row["k"])
        direct = evaluator.score([PCRemoval(2, (basis.mean, directions), int(row["k"]))]).mean_loss
        assert row["loss"] == pytest.approx(direct, abs=1e-6)
        assert row["loss_change"] == pytest.approx(direct - result.baseline_loss, abs=1e-6)
    assert torch.equal(before, model(input_ids=torch.tensor([seqs[0].input_ids])).logits)


def test_outlier_layer_is_the_largest_top_component_share(tmp_path):
    model, tok = tiny("tiny-llama")
    store = write_activations(model, _seqs(), tmp_path / "s", pooling="tokens", pad_id=tok.pad_token_id)
    spectra = pd.DataFrame([layer_spectrum(store, i, keep=1).summary() for i in range(store.num_layers)])
    shares = []
    for layer in range(store.num_layers):
        X = np.asarray(store.layer(layer), dtype=np.float64)
        ev = np.linalg.eigvalsh(np.cov(X, rowvar=False))
        shares.append(ev.max() / ev.sum())
    assert outlier_layer(spectra) == int(np.argmax(shares))


def test_pc_remove_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "pcr"
    code, stdout, err = run_cli(["pc-remove", "tiny-llama", "--layer", "1", "--top", "1,2", "--samples", "4",
                                 "--seq-len", "16", "--prompt", "the cat [/INST]", "--max-new-tokens", "4", "--out", str(out)],
                                capsys)
    assert code == 0, err
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 4 and set(frame["directions"]) == {"top", "random"}
    np.testing.assert_allclose(frame["loss"] - frame["baseline_loss"], frame["loss_change"], atol=1e-12)
    generations = pd.read_json(out / "generations.jsonl", lines=True)
    assert list(generations.columns) == ["prompt", "original", "top1_removed_at_last_prompt_token", "top1_removed_everywhere"]
    assert generations["prompt"].tolist() == ["the cat [/INST]"]  # rich markup must not eat it
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["layer"] == 1 and config["layer_chosen_by"] == "given"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "the cat [/INST]" in html and "the cat [/INST]" in stdout


def test_pc_remove_auto_layer_and_bad_layer(tmp_path, capsys):
    code, _, err = run_cli(["pc-remove", "tiny-llama", "--top", "1", "--samples", "3", "--seq-len", "16",
                            "--no-control", "--out", str(tmp_path / "auto")], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "auto" / "run.json").read_text())["config"]
    assert config["layer_chosen_by"] == "largest top-PC variance share"
    assert len(pd.read_csv(tmp_path / "auto" / "results.csv")) == 1
    code, _, err = run_cli(["pc-remove", "tiny-llama", "--layer", "9", "--samples", "3", "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "layer 9 is out of range" in err
    code, _, err = run_cli(["pc-remove", "tiny-llama", "--layer", "1", "--top", "99", "--samples", "3", "--seq-len", "16",
                            "--out", str(tmp_path / "bad2")], capsys)
    assert code == 2 and "must be in 1.." in err
