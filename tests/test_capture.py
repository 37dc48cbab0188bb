"""Residual-stream capture against transformers' own hidden states, and the `cka` command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny
from layerscope.capture import capture_block_outputs, pool_positions
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError
from layerscope.metrics import cka_matrix, representation_shift


def _seqs():
    out = []
    for i, n in enumerate((9, 14, 6, 11)):
        ids = tuple(5 + (7 * i + 3 * t) % 200 for t in range(n))
        prompt = n // 2
        out.append(ScoredSequence(ids, (False,) * prompt + (True,) * (n - prompt)))
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bloom", "tiny-gemma2", "tiny-gpt-neo"])
@pytest.mark.parametrize("pooling", ["last_prompt", "last", "mean"])
def test_pooled_block_outputs_match_hidden_states(name, pooling):
    model, tok = tiny(name)
    seqs = _seqs()
    acts = capture_block_outputs(model, seqs, pooling=pooling, include_embeddings=True, pad_id=tok.pad_token_id, max_tokens=20)
    assert len(acts) == model.config.num_hidden_layers + 1
    for row, seq in enumerate(seqs):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([seq.input_ids]), output_hidden_states=True).hidden_states
        if pooling == "mean":
            pick = lambda h: h[0].mean(0)
        elif pooling == "last":
            pick = lambda h: h[0, -1]
        else:
            first_target = seq.target_mask.index(True)
            pick = lambda h, p=first_target - 1: h[0, p]
        # hidden_states[0] is the block-0 input; [l+1] the output of block l (the last one may be
        # normed by transformers, so compare blocks 0..L-2 and the embeddings).
        for layer in range(model.config.num_hidden_layers):
            np.testing.assert_allclose(acts[layer][row], pick(hidden[layer]).numpy(), rtol=1e-4, atol=1e-5)


def test_pool_positions_rows_sum_to_one_and_ignore_padding():
    target = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    for pooling in ("last_prompt", "last", "mean"):
        w = pool_positions(target, attn, pooling)
        torch.testing.assert_close(w.sum(1), torch.ones(2))
        assert float(w[attn == 0].abs().sum()) == 0.0
    assert pool_positions(target, attn, "last_prompt").argmax(1).tolist() == [1, 0]
    assert pool_positions(target, attn, "last").argmax(1).tolist() == [3, 2]
    with pytest.raises(LayerscopeError, match="unknown pooling 'max'"):
        pool_positions(target, attn, "max")


def test_cka_command_writes_matrix_and_delta(tmp_path):
    from layerscope.api import cka_study

    result, folder = cka_study("tiny-qwen2", samples=16, seq_len=32, out=tmp_path / "c")
    frame = pd.read_csv(folder / "cka.csv", index_col="layer")
    assert list(frame.columns) == ["0", "1", "2", "3"] and frame.shape == (4, 4)
    np.testing.assert_allclose(np.diag(frame.values), 1.0, atol=1e-9)
    np.testing.assert_allclose(frame.values, frame.values.T, atol=1e-12)
    table = pd.read_csv(folder / "results.csv")
    np.testing.assert_allclose(table["delta"], representation_shift(frame.values, w=3))
    np.testing.assert_allclose(table["cka_next"][:-1], np.diag(frame.values, k=1))
    assert table["change_point"].tolist() == [i in result.change_points() for i in range(4)]
    assert result.shift_layers(1) == [int(np.argmin(result.shift))]
    for name in ("cka.png", "delta.png", "report.html", "run.json"):
        assert (folder / name).exists()


def test_cka_between_a_model_and_itself_is_the_within_model_matrix(tmp_path):
    from layerscope.api import cka_study

    one, _ = cka_study("tiny-opt", samples=12, seq_len=24, out=tmp_path / "a")
    two, _ = cka_study("tiny-opt", vs="tiny-opt", samples=12, seq_len=24, out=tmp_path / "b")
    np.testing.assert_allclose(two.matrix, one.matrix, atol=1e-9)
    assert two.shift is None


def test_cka_matrix_of_captured_layers_matches_direct():
    model, tok = tiny("tiny-phi3")
    acts = capture_block_outputs(model, _seqs() * 3, pooling="mean", pad_id=tok.pad_token_id)
    matrix = cka_matrix(acts)
    from layerscope.metrics import linear_cka

    assert abs(matrix[0, 2] - linear_cka(acts[0], acts[2])) < 1e-9
