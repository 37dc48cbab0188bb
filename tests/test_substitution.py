"""Layer substitution: the intervention against a copy-the-weights reference (the paper's way),
the sweep with and without prefix reuse, the paper's loss average, clear refusals, and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch

from layerscope.analyses.substitution import run_substitution
from layerscope.analyses.windows import window_centres
from layerscope.data.instructions import InstructionExample, instruction_sequences
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError
from layerscope.evaluate.engine import Evaluator
from layerscope.interventions import SubstituteBlocks, intervene
from layerscope.models import model_fingerprint
from layerscope.models.architecture import architecture
from layerscope.models.tiny import TINY_MODELS, build_tiny_model
from layerscope.runner import ResultsStore
from conftest import run_cli

EXAMPLES = [
    InstructionExample("Name a colour.", "", "Blue, as in the sky."),
    InstructionExample("Summarise the text.", "Cats sleep a lot. Dogs do too.", "Pets sleep."),
    InstructionExample("Count to three.", "", "One, two, three."),
    InstructionExample("Translate 'chat' to English", "", "cat"),
    InstructionExample("What is two plus two?", "", "Four."),
]


def pair(name: str, **overrides):
    """A 'base' and a 'fine-tuned' tiny model: same family and shapes, different weights."""
    base, tok = build_tiny_model(name, seed=0, **overrides)
    tuned, _ = build_tiny_model(name, seed=1, **overrides)
    return base, tuned, tok


def copied_weights(tuned, base, layers):
    """The critical-layers code's way: a copy of the fine-tuned model with base parameters copied in."""
    model = copy.deepcopy(tuned)
    for i in layers:
        for mine, theirs in zip(architecture(model).block(i).parameters(), architecture(base).block(i).parameters()):
            mine.data.copy_(theirs.data)
    return model


def per_example_hf_losses(model, seqs):
    """Independent reference: one transformers ``model(labels=...)`` call per example."""
    losses = []
    for s in seqs:
        ids = torch.tensor([s.input_ids])
        labels = ids.clone()
        labels[0, ~torch.tensor(s.target_mask)] = -100
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return losses


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_substitution_equals_copying_the_base_weights_and_restores(name):
    base, tuned, tok = pair(name)
    seqs = instruction_sequences(tok, EXAMPLES, "dolly")
    before = model_fingerprint(tuned)
    layers = [1, 2]
    reference = Evaluator(copied_weights(tuned, base, layers), seqs).score()
    evaluator = Evaluator(tuned, seqs)
    with intervene(tuned, SubstituteBlocks(base, layers)):
        inside = evaluator.score()
    np.testing.assert_allclose(inside.logprob, reference.logprob, rtol=1e-6, atol=1e-6)
    assert model_fingerprint(tuned) == before
    assert not np.allclose(evaluator.score().logprob, reference.logprob)  # the windows really differ


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-gemma2", "tiny-falcon"])
def test_sweep_matches_the_reload_loop_with_and_without_prefix_reuse(name, tmp_path):
    base, tuned, tok = pair(name)
    seqs = instruction_sequences(tok, EXAMPLES, "dolly")
    with ResultsStore(tmp_path / "a.sqlite") as store:
        reused = run_substitution(tuned, base, seqs, window=3, store=store, run_parts={"x": 1}, progress=False).to_frame()
    with ResultsStore(tmp_path / "b.sqlite") as store:
        plain = run_substitution(tuned, base, seqs, window=3, store=store, run_parts={"x": 1}, reuse_prefix=False,
                                 progress=False).to_frame()
    assert reused["center"].tolist() == window_centres(architecture(tuned).num_layers, 3) == [1, 2]
    np.testing.assert_allclose(reused["loss"], plain["loss"], rtol=1e-6)
    tuned_ref = np.mean(per_example_hf_losses(tuned, seqs))
    base_ref = np.mean(per_example_hf_losses(base, seqs))
    for _, row in reused.iterrows():
        layers = [int(x) for x in row["layers"].split(",")]
        expected = np.mean(per_example_hf_losses(copied_weights(tuned, base, layers), seqs))
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
        assert row["finetuned_loss"] == pytest.approx(tuned_ref, rel=1e-5)
        assert row["base_loss"] == pytest.approx(base_ref, rel=1e-5)
        assert row["loss_reduction"] == pytest.approx(row["loss"] - row["finetuned_loss"], abs=1e-12)
        assert row["share"] == pytest.approx(row["loss_reduction"] / (row["base_loss"] - row["finetuned_loss"]))


def test_whole_model_substituted_gives_the_base_loss(tmp_path):
    base, tuned, tok = pair("tiny-llama")
    # Fine-tuning that touched only the blocks: embeddings, final norm and head are the base's.
    block_params = {id(p) for p in architecture(tuned).blocks().parameters()}
    for mine, theirs in zip(tuned.parameters(), base.parameters()):
        if id(mine) not in block_params:
            mine.data.copy_(theirs.data)
    seqs = instruction_sequences(tok, EXAMPLES, "dolly")
    with ResultsStore(tmp_path / "s.sqlite") as store:
        frame = run_substitution(tuned, base, seqs, window=4, store=store, run_parts={}, progress=False).to_frame()
    assert frame["center"].tolist() == [2]
    assert frame["loss"].iloc[0] == pytest.approx(frame["base_loss"].iloc[0], rel=1e-6)
    assert frame["share"].iloc[0] == pytest.approx(1.0, rel=1e-5)


def test_token_average_weights_tokens_and_example_average_weights_examples(tmp_path):
    base, tuned, tok = pair("tiny-llama")
    seqs = instruction_sequences(tok, EXAMPLES, "dolly")
    scores = Evaluator(tuned, seqs).score()
    per_example = -scores.logprob / scores.n_targets
    assert scores.example_mean_loss == pytest.approx(np.mean(per_example_hf_losses(tuned, seqs)), rel=1e-5)
    assert scores.loss("token") == pytest.approx(scores.logprob.sum() / -scores.n_targets.sum())
    assert scores.loss("example") == pytest.approx(per_example.mean())
    with pytest.raises(LayerscopeError, match="'median'.*token, example"):
        scores.loss("median")


def test_example_average_skips_sequences_without_scored_tokens():
    base, tuned, tok = pair("tiny-llama")
    seqs = instruction_sequences(tok, EXAMPLES[:2], "dolly") + [ScoredSequence((1, 5, 6), (False, False, False))]
    scores = Evaluator(tuned, seqs).score()
    assert scores.example_mean_loss == pytest.approx(np.mean(-scores.logprob[:2] / scores.n_targets[:2]))


def test_models_that_cannot_stand_in_for_each_other_are_refused(tmp_path):
    llama, tok = build_tiny_model("tiny-llama")
    seqs = instruction_sequences(tok, EXAMPLES[:2], "dolly")
    store = ResultsStore(tmp_path / "s.sqlite")
    gpt2, _ = build_tiny_model("tiny-gpt2")
    with pytest.raises(LayerscopeError, match="different families: 'llama' and 'gpt2'"):
        run_substitution(llama, gpt2, seqs, store=store, run_parts={}, window=1, progress=False)
    deeper, _ = build_tiny_model("tiny-llama", num_hidden_layers=6)
    with pytest.raises(LayerscopeError, match="4 and 6 blocks"):
        run_substitution(llama, deeper, seqs, store=store, run_parts={}, window=1, progress=False)
    wider, _ = build_tiny_model("tiny-llama", intermediate_size=96)
    with pytest.raises(LayerscopeError, match="block 0 differs.*mlp"):
        with intervene(llama, SubstituteBlocks(wider, [0])):
            pass
    half, _ = build_tiny_model("tiny-llama", dtype=torch.bfloat16)
    with pytest.raises(LayerscopeError, match="block 0 differs.*bfloat16"):
        with intervene(llama, SubstituteBlocks(half, [0])):
            pass
    with pytest.raises(LayerscopeError, match="layer 7"):
        with intervene(llama, SubstituteBlocks(llama, [7])):
            pass
    with pytest.raises(LayerscopeError, match="window 9"):
        run_substitution(llama, llama, seqs, store=store, run_parts={}, window=9, progress=False)
    store.close()


def test_substitute_command_writes_the_documented_columns(tmp_path, capsys):
    base, tuned, tok = pair("tiny-llama")
    for model, where in ((base, "base"), (tuned, "tuned")):
        model.save_pretrained(tmp_path / where)
        tok.save_pretrained(tmp_path / where)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"instruction": e.instruction, "context": e.input, "response": e.response}) + "\n"
                            for e in EXAMPLES))
    out = tmp_path / "run"
    args = ["substitute", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "tuned"), "--window", "3",
            "--instructions", str(data), "--out", str(out), "--quiet"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    frame = pd.read_csv(out / "results.csv")
    assert {"center", "loss", "finetuned_loss", "base_loss", "loss_reduction", "share"} <= set(frame.columns)
    assert frame["center"].tolist() == [1, 2]
    seqs = instruction_sequences(tok, EXAMPLES, "dolly")
    assert frame["finetuned_loss"].iloc[0] == pytest.approx(np.mean(per_example_hf_losses(tuned, seqs)), rel=1e-5)
    assert (out / "substitution.png").stat().st_size > 1000 and "data:image/png" in (out / "report.html").read_text()
    code, _, err = run_cli(["substitute", "--base", str(tmp_path / "base"), "--finetuned", "tiny-gpt2",
                            "--instructions", str(data), "--quiet", "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "different families" in err and "Traceback" not in err


def test_optional_generation_with_the_window_substituted(tmp_path):
    from layerscope.evaluate.generation import generate

    base, tuned, tok = pair("tiny-llama")
    seqs = instruction_sequences(tok, EXAMPLES, "dolly")
    prompts = ["Hello", "Name a colour."]
    with ResultsStore(tmp_path / "g.sqlite") as store:
        frame = run_substitution(tuned, base, seqs, window=3, store=store, run_parts={}, progress=False,
                                 generate_prompts=prompts, tokenizer=tok, max_new_tokens=5).to_frame()
    expected = generate(copied_weights(tuned, base, [0, 1, 2]), tok, prompts, max_new_tokens=5)
    assert json.loads(frame.loc[frame["center"] == 1, "generations"].iloc[0]) == expected
    with ResultsStore(tmp_path / "h.sqlite") as store:
        plain = run_substitution(tuned, base, seqs, window=3, store=store, run_parts={}, progress=False).to_frame()
    assert "generations" not in plain  # off by default
    with pytest.raises(LayerscopeError, match="needs the tokenizer"):
        run_substitution(tuned, base, seqs, window=3, store=ResultsStore(tmp_path / "i.sqlite"), run_parts={},
                         progress=False, generate_prompts=prompts)
