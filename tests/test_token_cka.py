"""Token-level CKA (every real token, streamed in chunks) against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerscope.analyses.representation import run_cka, token_cka_matrix
from layerscope.data import lm_sequences
from layerscope.errors import LayerscopeError
from layerscope.metrics import cka
from conftest import tiny

TEXTS = ["The cat sat on the mat and looked at the dog.", "A quick brown fox jumps over the lazy dog twice."]


def hidden_tokens(model, seqs):
    """Block outputs of every token, from transformers' own output_hidden_states, one sequence at a time."""
    per_layer = None
    for s in seqs:
        with torch.no_grad():
            states = model(input_ids=torch.tensor([s.input_ids]), output_hidden_states=True).hidden_states
        rows = [h[0].double().numpy() for h in states[1:-1]]  # blocks 0..L-2 (the last one is normed)
        per_layer = rows if per_layer is None else [np.vstack([a, b]) for a, b in zip(per_layer, rows)]
    return per_layer


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_one_chunk_equals_the_unbiased_cka_of_all_tokens(name):
    model, tok = tiny(name)
    seqs = lm_sequences(tok, TEXTS, seq_len=24, samples=3, seed=0)
    ours = token_cka_matrix(model, seqs, chunk=10_000)
    ref = hidden_tokens(model, seqs)
    for i in range(len(ref)):
        for j in range(len(ref)):
            assert ours[i, j] == pytest.approx(cka(ref[i], ref[j], unbiased=True), abs=1e-5)


def test_chunks_and_a_second_model():
    model, tok = tiny("tiny-llama")
    seqs = lm_sequences(tok, TEXTS, seq_len=24, samples=3, seed=0)
    chunked = token_cka_matrix(model, seqs, chunk=16)
    assert chunked.shape == (4, 4) and np.allclose(np.diag(chunked), 1.0)
    assert np.allclose(chunked, chunked.T)
    paired = run_cka(model, seqs, other=model, pooling="tokens")
    within = run_cka(model, seqs, pooling="tokens")
    np.testing.assert_allclose(paired.matrix, within.matrix, atol=1e-6)
    assert within.shift is not None and paired.shift is None
    with pytest.raises(LayerscopeError, match="chunk 2"):
        token_cka_matrix(model, seqs, chunk=2)
