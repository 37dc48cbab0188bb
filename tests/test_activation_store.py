"""The on-disk activation store against in-memory capture and transformers' own hidden states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny
from layerscope.capture import capture_block_outputs
from layerscope.capture.activation_store import ActivationStore, open_store, write_activations
from layerscope.data.sequences import ScoredSequence, sequences_fingerprint
from layerscope.errors import LayerscopeError
from layerscope.models import architecture, model_fingerprint

LENGTHS = (9, 14, 6, 11, 3, 8, 12)


def _seqs(lengths=LENGTHS):
    out = []
    for i, n in enumerate(lengths):
        ids = tuple(5 + (7 * i + 3 * t) % 200 for t in range(n))
        prompt = max(n // 2, 1)
        out.append(ScoredSequence(ids, (False,) * prompt + (True,) * (n - prompt)))
    return out


def _hidden_states(model, seq):
    with torch.no_grad():
        return model(input_ids=torch.tensor([seq.input_ids]), output_hidden_states=True).hidden_states


class _Counter:
    """Counts forward calls and rows through block 0; raises on call ``fail_on`` (1-based)."""

    def __init__(self, model, fail_on=None):
        self.calls = 0
        self.rows = 0
        self.fail_on = fail_on
        self.handle = architecture(model).block(0).register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated interruption")
        self.rows += (args[0] if args else kwargs["hidden_states"]).shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("pooling", ["last_prompt", "last", "mean"])
def test_pooled_store_equals_in_memory_capture(tmp_path, name, pooling):
    model, tok = tiny(name)
    seqs = _seqs()
    store = write_activations(model, seqs, tmp_path / "s", pooling=pooling, include_embeddings=True,
                              pad_id=tok.pad_token_id, max_tokens=30)
    want = capture_block_outputs(model, seqs, pooling=pooling, include_embeddings=True,
                                 pad_id=tok.pad_token_id, max_tokens=200)
    num_layers = model.config.num_hidden_layers
    assert store.labels == ["emb"] + [str(i) for i in range(num_layers)]
    assert store.num_layers == len(want) == num_layers + 1
    assert (store.num_rows, store.hidden, store.pooling) == (len(seqs), model.config.hidden_size, pooling)
    for i in range(store.num_layers):
        np.testing.assert_allclose(store.layer(i), want[i], rtol=0, atol=1e-6)
    assert store.rows.dtype == np.int64 and store.rows[:, 0].tolist() == list(range(len(seqs)))
    if pooling == "mean":
        positions = [-1] * len(seqs)
    elif pooling == "last":
        positions = [len(s) - 1 for s in seqs]
    else:
        positions = [s.target_mask.index(True) - 1 for s in seqs]
    assert store.rows[:, 1].tolist() == positions
    # the pooled position really is the one stored (checked against transformers on layer 0)
    if pooling != "mean":
        for row, seq in enumerate(seqs):
            np.testing.assert_allclose(store.layer(1)[row], _hidden_states(model, seq)[1][0, positions[row]],
                                       rtol=1e-4, atol=1e-5)


def test_store_without_embeddings_and_manifest(tmp_path):
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    store = write_activations(model, seqs, tmp_path / "s", pooling="mean", pad_id=tok.pad_token_id,
                              meta={"model": "tiny-llama", "data": "synthetic"})
    want = capture_block_outputs(model, seqs, pooling="mean", pad_id=tok.pad_token_id)
    assert store.labels == [str(i) for i in range(model.config.num_hidden_layers)]
    for i in range(store.num_layers):
        np.testing.assert_allclose(store.layer(i), want[i], rtol=0, atol=1e-6)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest == store.manifest
    assert manifest["complete"] is True and manifest["include_embeddings"] is False
    assert manifest["model_fingerprint"] == model_fingerprint(model)
    assert manifest["data_fingerprint"] == sequences_fingerprint(seqs)
    assert manifest["model"] == "tiny-llama" and manifest["data"] == "synthetic"
    assert (manifest["num_rows"], manifest["num_examples"], manifest["dtype"]) == (len(seqs), len(seqs), "float32")
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["done.npy", *[f"layer_{i:03d}.npy" for i in range(store.num_layers)], "manifest.json", "rows.npy"]
    assert np.load(tmp_path / "s" / "done.npy").all()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_token_rows_equal_hidden_states(tmp_path, name):
    model, tok = tiny(name)
    seqs = _seqs()
    store = write_activations(model, seqs, tmp_path / "t", pooling="tokens", include_embeddings=True,
                              pad_id=tok.pad_token_id, max_tokens=30)
    assert store.num_rows == sum(LENGTHS)
    expected_rows = [(i, t) for i, n in enumerate(LENGTHS) for t in range(n)]
    assert [tuple(r) for r in store.rows.tolist()] == expected_rows
    num_layers = model.config.num_hidden_layers
    for i, seq in enumerate(seqs):
        hidden = _hidden_states(model, seq)
        rows = slice(sum(LENGTHS[:i]), sum(LENGTHS[:i + 1]))
        # stored layer l is hidden_states[l] (embeddings, then blocks); the last hidden state may be
        # normed by transformers, so compare the embeddings and blocks 0..L-2.
        for layer in range(num_layers):
            np.testing.assert_allclose(store.layer(layer)[rows], hidden[layer][0].numpy(), rtol=1e-4, atol=1e-5)


def test_token_budget_truncates_to_exactly_the_budget(tmp_path):
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    budget = LENGTHS[0] + LENGTHS[1] + 4  # examples 0, 1 whole and the first 4 tokens of example 2
    store = write_activations(model, seqs, tmp_path / "b", pooling="tokens", token_budget=budget,
                              pad_id=tok.pad_token_id)
    assert store.num_rows == budget and store.manifest["num_examples"] == 3
    assert store.rows[:, 0].tolist() == [0] * LENGTHS[0] + [1] * LENGTHS[1] + [2] * 4
    assert store.rows[-4:, 1].tolist() == [0, 1, 2, 3]
    cut = seqs[:2] + [ScoredSequence(seqs[2].input_ids[:4], seqs[2].target_mask[:4])]
    assert store.manifest["data_fingerprint"] == sequences_fingerprint(cut)
    hidden = _hidden_states(model, seqs[2])  # the full sequence: causal, so its first 4 states agree
    np.testing.assert_allclose(store.layer(1)[-4:], hidden[2][0, :4].numpy(), rtol=1e-4, atol=1e-5)
    whole = write_activations(model, seqs, tmp_path / "w", pooling="tokens", token_budget=10_000,
                              pad_id=tok.pad_token_id)
    assert whole.num_rows == sum(LENGTHS) and whole.manifest["num_examples"] == len(seqs)


def test_float16_store_is_close_to_float32(tmp_path):
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    full = write_activations(model, seqs, tmp_path / "a", pooling="tokens", pad_id=tok.pad_token_id)
    half = write_activations(model, seqs, tmp_path / "b", pooling="tokens", pad_id=tok.pad_token_id, dtype="float16")
    assert half.layer(0).dtype == np.float16 and half.manifest["dtype"] == "float16"
    for i in range(full.num_layers):
        reference = np.asarray(full.layer(i))
        np.testing.assert_allclose(half.layer(i).astype(np.float32), reference,
                                   rtol=2e-3, atol=2e-3 * np.abs(reference).max())
        assert next(half.chunks(i)).dtype == np.float32


def test_lazy_reading_memmap_and_chunks(tmp_path):
    model, tok = tiny("tiny-gpt2")
    store = write_activations(model, _seqs(), tmp_path / "s", pooling="tokens", pad_id=tok.pad_token_id)
    reopened = open_store(tmp_path / "s")
    assert isinstance(reopened, ActivationStore)
    for i in range(reopened.num_layers):
        data = reopened.layer(i)
        assert isinstance(data, np.memmap) and not data.flags.writeable
        blocks = list(reopened.chunks(i, rows=10))
        assert [len(b) for b in blocks] == [10] * (sum(LENGTHS) // 10) + [sum(LENGTHS) % 10]
        np.testing.assert_array_equal(np.concatenate(blocks), np.asarray(store.layer(i)))
    with pytest.raises(LayerscopeError, match=r"layer 4 is out of range.*allowed 0\.\.3"):
        reopened.layer(4)
    with pytest.raises(LayerscopeError, match="layer -1 is out of range"):
        reopened.layer(-1)
    with pytest.raises(LayerscopeError, match="rows must be a positive integer, got 0"):
        next(reopened.chunks(0, rows=0))


@pytest.mark.parametrize("pooling", ["tokens", "mean"])
def test_interrupted_capture_resumes_with_only_the_missing_examples(tmp_path, pooling):
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    kwargs = dict(pooling=pooling, include_embeddings=True, pad_id=tok.pad_token_id, max_tokens=24)
    whole = write_activations(model, seqs, tmp_path / "whole", **kwargs)

    with _Counter(model, fail_on=2) as counter, pytest.raises(RuntimeError, match="simulated interruption"):
        write_activations(model, seqs, tmp_path / "cut", **kwargs)
    first_batch = counter.rows
    assert 0 < first_batch < len(seqs)
    done = np.load(tmp_path / "cut" / "done.npy")
    assert done.sum() == first_batch
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["complete"] is False
    with pytest.raises(LayerscopeError, match="incomplete"):
        ActivationStore(tmp_path / "cut")

    with _Counter(model) as counter:
        resumed = write_activations(model, seqs, tmp_path / "cut", **kwargs)
    assert counter.rows == len(seqs) - first_batch and counter.calls >= 1
    assert resumed.manifest["complete"] is True
    for i in range(whole.num_layers):
        np.testing.assert_array_equal(np.asarray(resumed.layer(i)), np.asarray(whole.layer(i)))
    np.testing.assert_array_equal(np.asarray(resumed.rows), np.asarray(whole.rows))


def test_complete_store_is_reopened_without_running_the_model(tmp_path):
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    first = write_activations(model, seqs, tmp_path / "s", pooling="last", pad_id=tok.pad_token_id)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()}
    with _Counter(model) as counter:
        again = write_activations(model, seqs, tmp_path / "s", pooling="last", pad_id=tok.pad_token_id,
                                  progress=True)
    assert counter.calls == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").iterdir()} == stamps  # nothing rewritten
    np.testing.assert_array_equal(np.asarray(again.layer(2)), np.asarray(first.layer(2)))


def test_different_capture_or_unrelated_files_refused(tmp_path):
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    write_activations(model, seqs, tmp_path / "s", pooling="mean", pad_id=tok.pad_token_id)
    with pytest.raises(LayerscopeError, match=r"different activation capture \(pooling: stored 'mean', asked 'last'\)"
                                              r".*choose another --out"):
        write_activations(model, seqs, tmp_path / "s", pooling="last", pad_id=tok.pad_token_id)
    with pytest.raises(LayerscopeError, match="data_fingerprint: stored"):
        write_activations(model, seqs[:3], tmp_path / "s", pooling="mean", pad_id=tok.pad_token_id)
    other, _ = tiny("tiny-gpt2")
    with pytest.raises(LayerscopeError, match="model_fingerprint: stored"):
        write_activations(other, seqs, tmp_path / "s", pooling="mean")
    with pytest.raises(LayerscopeError, match="dtype: stored 'float32', asked 'float16'"):
        write_activations(model, seqs, tmp_path / "s", pooling="mean", pad_id=tok.pad_token_id, dtype="float16")

    unrelated = tmp_path / "u"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(LayerscopeError, match="holds files but no activation store.*choose another --out"):
        write_activations(model, seqs, unrelated, pad_id=tok.pad_token_id)
    assert sorted(p.name for p in unrelated.iterdir()) == ["notes.txt"]


def test_bad_inputs_refused(tmp_path):
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    out = tmp_path / "x"
    with pytest.raises(LayerscopeError, match="empty data set"):
        write_activations(model, [], out)
    with pytest.raises(LayerscopeError, match="unknown pooling 'max'; allowed: last_prompt, last, mean, tokens"):
        write_activations(model, seqs, out, pooling="max")
    with pytest.raises(LayerscopeError, match="token_budget must be a positive integer.*got 0"):
        write_activations(model, seqs, out, pooling="tokens", token_budget=0)
    with pytest.raises(LayerscopeError, match="token_budget=5 applies only to pooling='tokens'"):
        write_activations(model, seqs, out, pooling="mean", token_budget=5)
    with pytest.raises(LayerscopeError, match="unknown dtype 'bfloat16'.*allowed: float32, float16"):
        write_activations(model, seqs, out, dtype="bfloat16")
    with pytest.raises(LayerscopeError, match="meta may not set.*pooling"):
        write_activations(model, seqs, out, meta={"pooling": "x"})
    assert not out.exists()  # nothing written for refused input
    with pytest.raises(LayerscopeError, match="no activation store at .*manifest.json is absent"):
        ActivationStore(tmp_path / "missing")


def test_corrupt_store_refused(tmp_path):
    model, tok = tiny("tiny-llama")
    write_activations(model, _seqs(), tmp_path / "s", pooling="mean", pad_id=tok.pad_token_id)
    (tmp_path / "s" / "layer_001.npy").unlink()
    with pytest.raises(LayerscopeError, match="corrupt: layer_001.npy is missing"):
        open_store(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(LayerscopeError, match="corrupt: manifest.json is not readable JSON"):
        open_store(tmp_path / "s")


def test_skip_first_leaves_out_the_first_positions_and_the_budget_counts_kept_rows(tmp_path):
    model, tok = tiny("tiny-llama")
    seqs = _seqs()
    store = write_activations(model, seqs, tmp_path / "s", pooling="tokens", skip_first=2, pad_id=tok.pad_token_id,
                              max_tokens=30)
    assert store.num_rows == sum(n - 2 for n in LENGTHS) and store.skip_first == 2
    assert [tuple(r) for r in store.rows.tolist()] == [(i, t) for i, n in enumerate(LENGTHS) for t in range(2, n)]
    for i, seq in enumerate(seqs):
        hidden = _hidden_states(model, seq)
        rows = store.rows[:, 0] == i
        np.testing.assert_allclose(store.layer(1)[rows], hidden[2][0, 2:].numpy(), rtol=1e-4, atol=1e-5)
    budget = (LENGTHS[0] - 2) + 3  # example 0 whole (7 kept rows) and 3 kept rows of example 1
    cut = write_activations(model, seqs, tmp_path / "b", pooling="tokens", skip_first=2, token_budget=budget,
                            pad_id=tok.pad_token_id)
    assert cut.num_rows == budget and cut.rows[-3:].tolist() == [[1, 2], [1, 3], [1, 4]]
    with pytest.raises(LayerscopeError, match="different activation capture.*skip_first"):
        write_activations(model, seqs, tmp_path / "s", pooling="tokens", skip_first=1, pad_id=tok.pad_token_id)
    with pytest.raises(LayerscopeError, match="applies only to pooling 'tokens'"):
        write_activations(model, seqs, tmp_path / "m", pooling="mean", skip_first=1)
    with pytest.raises(LayerscopeError, match="no token is left"):
        write_activations(model, seqs, tmp_path / "e", pooling="tokens", skip_first=100)
