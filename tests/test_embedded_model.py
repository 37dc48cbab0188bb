"""Integration tests on the real embedded SmolLM2-135M-Instruct (skipped until it is fetched)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerscope.data import builtin_corpus, lm_sequences, load_mc, mc_sequences
from layerscope.evaluate import Evaluator, mc_from_scores
from layerscope.interventions import SkipBlock, ZeroRole
from layerscope.models import architecture, load_model, model_fingerprint
from layerscope.models.embedded import embedded_gguf

pytestmark = pytest.mark.slow


def test_embedded_model_shape(embedded_model):
    model, tok = embedded_model
    arch = architecture(model)
    assert arch.family == "llama" and arch.num_layers == 30 and arch.hidden_size == 576
    assert arch.role_shape("k", 0) == (192, 576)  # 3 kv heads of 64: grouped-query attention
    assert tok.pad_token_id is not None


def test_gguf_file_loads_to_the_cached_weights(embedded_model):
    model, _ = embedded_model
    path = embedded_gguf("smollm2-135m")
    if not path.exists():
        pytest.skip("the original GGUF is not kept in this cache")
    direct, _ = load_model(str(path))
    assert model_fingerprint(direct) == model_fingerprint(model)


def test_engine_agrees_with_transformers_loss_on_the_real_model(embedded_model):
    model, tok = embedded_model
    text = builtin_corpus()[3][:2000]
    ids = tok(text, return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        hf_loss = float(model(input_ids=ids, labels=ids).loss)
    seqs = lm_sequences(tok, [tok.decode(ids[0])], seq_len=400)
    seq = seqs[0]
    assert list(seq.input_ids[: ids.shape[1]]) == ids[0].tolist()[: len(seq)]
    from layerscope.data.sequences import ScoredSequence

    exact = ScoredSequence(tuple(ids[0].tolist()), (False,) + (True,) * (ids.shape[1] - 1))
    ours = Evaluator(model, [exact], pad_id=tok.pad_token_id).score().mean_loss
    assert math.isclose(ours, hf_loss, rel_tol=1e-5)


def test_prefix_reuse_on_the_real_model(embedded_model):
    model, tok = embedded_model
    seqs = lm_sequences(tok, builtin_corpus(), seq_len=64, samples=4, seed=0)
    evaluator = Evaluator(model, seqs, pad_id=tok.pad_token_id)
    base, cache = evaluator.capture([5, 17, 29])
    for intervention in (SkipBlock([5]), SkipBlock([17, 18]), ZeroRole("down", [29])):
        full = evaluator.score([intervention]).mean_loss
        reused = evaluator.score([intervention], reuse=cache).mean_loss
        assert abs(reused - full) / full < 1e-5
        assert abs(full - base.mean_loss) > 1e-3


def test_real_model_beats_chance_on_copa(embedded_model, shared_data):
    model, tok = embedded_model
    items = load_mc("copa")
    seqs = mc_sequences(tok, items)
    result = mc_from_scores(items, seqs, Evaluator(model, seqs, pad_id=tok.pad_token_id).score())
    assert result.n_items == 100
    # A 135M instruct model gets roughly 0.6-0.7 on COPA; chance is 0.5.
    assert result.acc > 0.55, result.acc
    assert np.all((result.predictions >= 0) & (result.predictions <= 1))


def test_removing_the_top_component_of_an_outlier_layer_changes_the_loss(embedded_model, tmp_path):
    """SmolLM2 has layers whose token representations are dominated by one direction (the massive
    activation of the first token); projecting it out must hurt far more than a random direction."""
    import pandas as pd

    from layerscope.analyses.pc_removal import outlier_layer, run_pc_removal
    from layerscope.analyses.spectral import layer_spectrum
    from layerscope.capture import write_activations

    model, tok = embedded_model
    seqs = lm_sequences(tok, builtin_corpus(), seq_len=64, samples=8, seed=0)
    store = write_activations(model, seqs, tmp_path / "store", pooling="tokens", pad_id=tok.pad_token_id)
    spectra = [layer_spectrum(store, i, keep=2) for i in range(store.num_layers)]
    layer = outlier_layer(pd.DataFrame([sp.summary() for sp in spectra]))
    assert spectra[layer].ratio(1) > 0.5  # one direction carries most of that layer's variance
    basis = (spectra[layer].mean, spectra[layer].components)
    frame = run_pc_removal(model, seqs, layer, basis, tops=(1,), pad_id=tok.pad_token_id).to_frame().set_index("directions")
    top, random = frame.loc["top", "loss_change"], frame.loc["random", "loss_change"]
    assert top > 0.1, f"removing the top component of layer {layer} changed the loss by only {top:.4f}"
    assert top > 10 * abs(random)
