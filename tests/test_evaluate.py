"""Task-level evaluation against brute-force references on tiny models."""

from __future__ import annotations

import numpy as np
import torch

from conftest import tiny
from layerscope.data import MCItem, instruction_sequences, mc_sequences
from layerscope.data.instructions import InstructionExample
from layerscope.evaluate import Evaluator, generate, mc_from_scores


def _continuation_loglik(model, tok, context: str, continuation: str) -> float:
    """lm-eval's definition, computed directly: log p(continuation tokens | context tokens)."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))


def test_mc_accuracy_matches_brute_force():
    model, tok = tiny("tiny-qwen2")
    items = [
        MCItem("a", "The sky is", ("blue", "a very long green answer", "x"), 0),
        MCItem("b", "One plus one is", ("two", "three"), 1),
        MCItem("c", "Cats say", ("meow meow meow", "woof"), 0),
        MCItem("d", "Paris is in", ("France", "Spain", "the middle of the Pacific"), 2),
    ]
    seqs = mc_sequences(tok, items)
    result = mc_from_scores(items, seqs, Evaluator(model, seqs, pad_id=0, max_tokens=64).score())
    ll = [[_continuation_loglik(model, tok, it.context, " " + c) for c in it.choices] for it in items]
    preds = [int(np.argmax(x)) for x in ll]
    preds_norm = [int(np.argmax([v / len(" " + c) for v, c in zip(x, it.choices)])) for x, it in zip(ll, items)]
    assert result.predictions.tolist() == preds
    assert result.predictions_norm.tolist() == preds_norm
    assert result.acc == np.mean([p == it.label for p, it in zip(preds, items)])
    assert result.acc_norm == np.mean([p == it.label for p, it in zip(preds_norm, items)])


def test_instruction_loss_counts_only_response_tokens():
    model, tok = tiny("tiny-llama")
    examples = [InstructionExample("Say hi.", "", "Hi there."), InstructionExample("Add.", "1 and 2", "3")]
    seqs = instruction_sequences(tok, examples, "dolly-plain")
    scores = Evaluator(model, seqs, pad_id=0).score()
    # Response-only: "Hi there." is 9 bytes + EOS, "3" is 1 byte + EOS in the byte-level tokenizer.
    assert scores.n_targets.tolist() == [10, 2]
    # The paper's template scores " " + response + " " + EOS.
    paper = instruction_sequences(tok, examples, "dolly")
    assert Evaluator(model, paper, pad_id=0).score().n_targets.tolist() == [12, 4]
    # Changing the prompt changes the loss (it conditions), but its tokens are never scored.
    other = instruction_sequences(tok, [InstructionExample("Say hello.", "", "Hi there.")], "dolly-plain")
    assert Evaluator(model, other, pad_id=0).score().n_targets.tolist() == [10]


def test_greedy_generation_equals_an_argmax_loop():
    model, tok = tiny("tiny-gpt-neox")
    prompt = "Once upon"
    text = generate(model, tok, [prompt], max_new_tokens=6)[0]
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    expected = tok.decode(ids[0, len(tok(prompt).input_ids):], skip_special_tokens=True)
    assert text == expected
