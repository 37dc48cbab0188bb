"""The LASER study: next-token scoring, the FEVER builder, the protocol, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_cli, tiny
from layerscope.analyses.laser import TaskScorer, split_index, summarise
from layerscope.data.laser_tasks import fever_items, fever_prompt, load_task
from layerscope.data.multiple_choice import MCItem
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError
from layerscope.evaluate.engine import Evaluator
from layerscope.interventions import LowRank


def _prompts(n=5):
    return [ScoredSequence(tuple(5 + (13 * i + 7 * t) % 150 for t in range(4 + i % 3)), (False,) * (4 + i % 3))
            for i in range(n)]


def test_next_token_log_probs_and_ranks_equal_a_direct_forward():
    model, tok = tiny("tiny-llama")
    seqs = _prompts()
    candidates = [[3, 17, 40], [9], [1, 2], [100, 5, 6], [7, 8]]
    evaluator = Evaluator(model, seqs, pad_id=tok.pad_token_id, max_tokens=12)
    logprob, rank = evaluator.next_token(candidates)
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([seq.input_ids])).logits[0, -1].double(), -1).numpy()
        for j, token in enumerate(candidates[i]):
            assert logprob[i, j] == pytest.approx(lp[token], abs=1e-5)
            assert rank[i, j] == int((lp > lp[token] + 1e-9).sum())
        assert np.isnan(logprob[i, len(candidates[i]):]).all() and (rank[i, len(candidates[i]):] == -1).all()
    _, cache = evaluator.capture(range(model.config.num_hidden_layers))
    edit = [LowRank("down", 2, rank=3)]
    np.testing.assert_allclose(evaluator.next_token(candidates, edit, reuse=cache)[0],
                               evaluator.next_token(candidates, edit)[0], atol=1e-6)
    with pytest.raises(LayerscopeError, match="outside the vocabulary"):
        evaluator.next_token([[10**7]] * len(seqs))


def test_fever_builder_follows_laser(tmp_path):
    path = tmp_path / "fever.jsonl"
    rows = [{"id": 1, "label": "SUPPORTS", "claim": "Paris is in France."},
            {"id": 2, "label": "REFUTES", "claim": "The Moon is made of cheese"},
            {"id": 3, "label": "NOT ENOUGH INFO", "claim": "Tilda Swinton is a vegan."},
            {"id": 4, "label": "SUPPORTS", "claim": "Water is wet."},
            {"id": 5, "label": "REFUTES", "claim": "Water is wet."},  # inconsistent: dropped
            {"id": 6, "label": "SUPPORTS", "claim": "Paris is in France."}]  # duplicate: kept once
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = fever_items(path)
    assert [(i.id, i.label) for i in items] == [("1", 0), ("2", 1)]
    assert items[0].context == "Consider the following claim: Paris is in France. Is this claim true or false. The claim is"
    assert items[1].context == fever_prompt("The Moon is made of cheese") and "cheese. Is this" in items[1].context
    assert items[0].choices == ("true", "false")
    with pytest.raises(LayerscopeError, match="unknown task 'nope'"):
        load_task("nope")


def test_shared_fever_has_only_consistent_true_false_claims(shared_data):
    items = load_task("fever")
    assert 5000 < len(items) < 6667 and {i.label for i in items} == {0, 1}
    assert len({i.context for i in items}) == len(items)


def test_protocol_split_and_summary():
    val, test = split_index(10)
    assert val.tolist() == [0, 1] and test.tolist() == list(range(2, 10))
    assert split_index(3)[0].tolist() == [0]
    with pytest.raises(LayerscopeError, match="at least 2"):
        split_index(1)
    per_item = {"correct": np.array([1, 0, 1, 1.0]), "logloss": np.array([0.1, 2.0, 0.3, 0.5]),
                "top1": np.array([1, 0, 0, 1.0]), "top5": np.ones(4), "top10": np.full(4, np.nan)}
    s = summarise(per_item, np.array([1, 2, 3]))
    assert s["accuracy"] == pytest.approx(2 / 3) and s["logloss"] == pytest.approx(2.8 / 3) and np.isnan(s["top10"])


def test_task_scorer_modes_agree_with_summed_log_probabilities():
    model, tok = tiny("tiny-llama")
    items = [MCItem(str(i), f"w{i} w{i + 1} w{i + 2}", ("a", "b", "c"), i % 3) for i in range(6)]
    scorer = TaskScorer.build(model, tok, items, pad_id=tok.pad_token_id)
    per_item = scorer.score()
    from layerscope.data.multiple_choice import mc_sequences

    seqs = mc_sequences(tok, items)
    direct = Evaluator(model, seqs, pad_id=tok.pad_token_id).score().logprob.reshape(6, 3)
    gold = direct[np.arange(6), [i.label for i in items]]
    np.testing.assert_allclose(per_item["logloss"], -gold, atol=1e-5)
    expected = (direct.argmax(axis=1) == np.array([i.label for i in items])).astype(float)
    np.testing.assert_array_equal(per_item["correct"], expected)
    if scorer.mode == "next_token":  # every choice one token: ranks are over the vocabulary
        assert np.isfinite(per_item["top10"]).all()
    else:
        assert np.isnan(per_item["top1"]).all()


def test_laser_command_end_to_end_and_resume(tmp_path, capsys):
    task = tmp_path / "task.mc.jsonl"
    rows = [{"id": str(i), "context": f"w{i} w{i + 3} is", "choices": ["yes", "no"], "label": i % 2} for i in range(20)]
    task.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    args = ["laser", "tiny-llama", "--task", str(task), "--layers", "1-2", "--lname", "fc_in,fc_out",
            "--rates", "5,9.9", "--out", str(out), "--quiet"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 2 * (1 + 2 * 2 * 2)  # (baseline + layers x lnames x rates) x splits
    assert set(frame["split"]) == {"validation", "test"}
    assert (frame[frame.split == "validation"]["n"] == 4).all() and (frame[frame.split == "test"]["n"] == 16).all()
    base = frame[(frame.lname == "dont") & (frame.split == "test")].iloc[0]
    assert "chosen on validation" in stdout and f"{base['accuracy']:.4f}" in stdout
    assert (out / "heatmap_fc_in.png").is_file() and (out / "heatmap_fc_out.png").is_file()
    # a point equals a direct evaluation with the same reduction
    model, tok = tiny("tiny-llama")
    items = load_task(str(task))
    scorer = TaskScorer.build(model, tok, items, pad_id=tok.pad_token_id)
    per_item = scorer.score([LowRank("fc_out", 2, rate=9.9)])
    row = frame[(frame.layer == 2) & (frame.lname == "fc_out") & (frame.rate == 9.9) & (frame.split == "test")].iloc[0]
    assert row["accuracy"] == pytest.approx(per_item["correct"][4:].mean())
    assert row["logloss"] == pytest.approx(per_item["logloss"][4:].mean(), abs=1e-6)
    code, _, err = run_cli(args, capsys)  # resumed: every point read back from the store
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), frame)


@pytest.mark.parametrize("args, message", [
    (["--rates", "11"], "rate"),
    (["--lname", "fc_sideways"], "unknown lname 'fc_sideways'"),
    (["--layers", "7"], "layer 7 is out of range"),
    (["--task", "nope"], "unknown task 'nope'"),
])
def test_laser_command_refuses_bad_input(tmp_path, capsys, args, message):
    code, _, err = run_cli(["laser", "tiny-llama", "--samples", "10", *args, "--out", str(tmp_path / "x"), "--quiet"], capsys)
    assert code == 2 and message in err


def test_greedy_composition_applies_the_first_choice_while_searching_the_next(tmp_path):
    from layerscope.analyses.laser import run_laser
    from layerscope.runner import ResultsStore

    model, tok = tiny("tiny-llama")
    items = [MCItem(str(i), f"w{i} w{i + 3} is", ("yes", "no"), i % 2) for i in range(20)]
    with ResultsStore(tmp_path / "s.sqlite") as store:
        result = run_laser(model, tok, items, layers=[1, 2, 3], lnames=["fc_out"], rates=[9.9], store=store,
                           run_parts={"t": 1}, pad_id=tok.pad_token_id, compose=2, progress=False)
    steps = result.composed
    assert steps[0]["step"] == 0
    if result.best["lname"] != "dont":
        assert steps[0]["interventions"] == [{"layer": result.best["layer"], "lname": "fc_out", "rate": 9.9}]
        scorer = TaskScorer.build(model, tok, items, pad_id=tok.pad_token_id)
        for step in steps[1:]:  # each later step's numbers are those of all its reductions applied together
            edits = [LowRank(c["lname"], c["layer"], rate=c["rate"]) for c in step["interventions"]]
            per_item = scorer.score(edits)
            assert step["validation_accuracy"] == pytest.approx(per_item["correct"][:4].mean())
            assert len({c["layer"] for c in step["interventions"]}) == len(step["interventions"])
            assert step["validation_accuracy"] > steps[step["step"] - 1]["validation_accuracy"] or (
                step["validation_accuracy"] == steps[step["step"] - 1]["validation_accuracy"]
                and step["validation_logloss"] < steps[step["step"] - 1]["validation_logloss"])
