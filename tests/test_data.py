"""Tests of layerscope.data: corpora, windows, instruction masks, multiple choice, batching."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from layerscope.data import (
    TEMPLATES,
    InstructionExample,
    MCItem,
    ScoredSequence,
    builtin_corpus,
    choice_lengths,
    instruction_sequences,
    lm_sequences,
    load_instructions,
    load_mc,
    load_texts,
    make_batches,
    mc_sequences,
    render,
    shared_data_dir,
    split_context,
    split_wikitext,
    window_targets,
)
from layerscope.data.corpus import concat_token_ids
from layerscope.errors import LayerscopeError
from layerscope.models.tiny_tokenizer import tiny_tokenizer

SHARED = shared_data_dir()
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"shared data folder {SHARED} is absent (set LAYERSCOPE_SHARED_DATA)"
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bpe_tok():
    """A GPT-2-like tokenizer with real merges: byte-level BPE, no pad, BOS == EOS, adds no BOS."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(builtin_corpus()[:10], trainer=trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    t.chat_template = (
        "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return t


@pytest.fixture(scope="module")
def bare_tok():
    """A tokenizer with no special tokens at all."""
    t = tiny_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=t.backend_tokenizer)


# ---------------------------------------------------------------------------------------------
# builtin corpus


def test_builtin_corpus_is_large_english_and_deterministic():
    docs = builtin_corpus()
    assert sum(len(d) for d in docs) >= 200_000
    assert len(docs) >= 30
    assert all(d.strip() == d and d for d in docs)
    joined = "\n".join(docs)
    assert "JSON" in joined and "Return" in joined
    assert "  \n" not in joined and "\n\n\n" not in joined  # whitespace normalised
    assert builtin_corpus() == docs
    docs.append("x")  # callers get a copy
    assert builtin_corpus()[-1] != "x"


def test_builtin_corpus_same_in_a_fresh_process():
    digest = hashlib.sha256("\x00".join(builtin_corpus()).encode()).hexdigest()
    code = (
        "import hashlib; from layerscope.data.builtin import builtin_corpus; "
        "print(hashlib.sha256('\\x00'.join(builtin_corpus()).encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == digest


# ---------------------------------------------------------------------------------------------
# corpora and windows


def _hf_reference_scored(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, set[int]]]:
    """The loop of the Hugging Face perplexity guide, transcribed: (begin, end, scored positions)."""
    out = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_len, num_tokens)
        trg_len = end - prev_end
        labelled = set(range(end - trg_len, end))  # labels[:, :-trg_len] = -100
        scored = {p for p in labelled if p > begin}  # the model shifts labels: window pos 0 unscored
        out.append((begin, end, scored))
        prev_end = end
        if end == num_tokens:
            break
    return out


@pytest.mark.parametrize(
    "num_tokens,seq_len,stride",
    [(1000, 64, 16), (1000, 64, 63), (1001, 64, 32), (37, 8, 3), (5, 8, 2), (257, 128, 1), (300, 2, 1)],
)
def test_sliding_window_scores_every_token_but_the_first_exactly_once(num_tokens, seq_len, stride):
    windows = window_targets(num_tokens, seq_len, stride)
    counts = [0] * num_tokens
    for begin, end, first in windows:
        assert 0 < end - begin <= seq_len
        for p in range(first, end):
            counts[p] += 1
    assert counts[0] == 0
    assert counts[1:] == [1] * (num_tokens - 1)
    ref = [(b, e, s) for b, e, s in _hf_reference_scored(num_tokens, seq_len, stride) if s]
    assert [(b, e, set(range(f, e))) for b, e, f in windows] == ref


def test_lm_sequences_match_window_targets(tok):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(500))
    ids = concat_token_ids(tok, [text])
    assert len(ids) == 500
    for seq_len, stride in [(64, 16), (64, 64), (50, 7), (2, 1)]:
        seqs = lm_sequences(tok, [text], seq_len=seq_len, stride=stride)
        windows = window_targets(len(ids), seq_len, stride)
        assert len(seqs) == len(windows)
        for w, (seq, (begin, end, first)) in enumerate(zip(seqs, windows)):
            assert seq.group == w and seq.choice == -1
            assert list(seq.input_ids) == ids[begin:end]
            assert seq.target_mask == tuple(begin + t >= first for t in range(end - begin))
            assert not seq.target_mask[0]
        total = sum(s.num_targets for s in seqs)
        if stride < seq_len:
            assert total == len(ids) - 1
        else:  # disjoint windows: the first token of each has no context
            assert total == len(ids) - len(seqs)
            assert all(s.num_targets == len(s) - 1 for s in seqs)


def test_documents_are_joined_with_eos(tok, bare_tok):
    ids = concat_token_ids(tok, ["hello world", "foo"])
    assert tok.decode(ids) == "hello world</s>foo"
    assert ids.count(tok.eos_token_id) == 1 and tok.bos_token_id not in ids
    assert bare_tok.decode(concat_token_ids(bare_tok, ["ab", "cd"])) == "abcd"


def test_lm_sequences_sampling_is_deterministic(tok):
    text = "some text " * 300
    all_seqs = lm_sequences(tok, text, seq_len=32)
    a = lm_sequences(tok, text, seq_len=32, samples=10, seed=3)
    b = lm_sequences(tok, text, seq_len=32, samples=10, seed=3)
    c = lm_sequences(tok, text, seq_len=32, samples=10, seed=4)
    assert a == b and a != c
    groups = [s.group for s in a]
    assert groups == sorted(random.Random(3).sample(range(len(all_seqs)), 10))
    assert all(s == all_seqs[s.group] for s in a)
    with pytest.warns(UserWarning, match="only"):
        assert lm_sequences(tok, text, seq_len=32, samples=10_000) == all_seqs


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"seq_len": 1}, "seq_len"),
        ({"seq_len": 16, "stride": 0}, "stride"),
        ({"seq_len": 16, "stride": 17}, "17"),
        ({"seq_len": 16, "samples": 0}, "samples"),
    ],
)
def test_lm_sequences_refuses_bad_arguments(tok, kwargs, needle):
    with pytest.raises(LayerscopeError, match=needle):
        lm_sequences(tok, "hello world " * 20, **kwargs)


def test_lm_sequences_refuses_empty_text(tok):
    with pytest.raises(LayerscopeError, match="empty data set"):
        lm_sequences(tok, ["", ""], seq_len=8)


def test_load_texts_file_formats(tmp_path):
    import pandas as pd

    (tmp_path / "a.txt").write_text("one document\nwith two lines\n", encoding="utf-8")
    assert load_texts(tmp_path / "a.txt") == ["one document\nwith two lines\n"]
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "x": 1}) + "\n" + json.dumps({"text": " "}) + "\n"
    )
    assert load_texts(str(tmp_path / "b.jsonl")) == ["first", "second"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "alpha"}) + "\n")
    assert load_texts(tmp_path / "c.jsonl", field="body") == ["alpha"]
    with pytest.raises(LayerscopeError, match=r"c\.jsonl:1.*'text'"):
        load_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert load_texts(tmp_path / "d.json") == ["x", "y"]
    (tmp_path / "e.json").write_text(json.dumps(["p", "q"]))
    assert load_texts(tmp_path / "e.json") == ["p", "q"]
    pd.DataFrame({"text": ["r", "s"], "n": [1, 2]}).to_parquet(tmp_path / "f.parquet")
    assert load_texts(tmp_path / "f.parquet") == ["r", "s"]
    with pytest.raises(LayerscopeError, match="'content'"):
        load_texts(tmp_path / "f.parquet", field="content")
    assert load_texts("builtin") == builtin_corpus()


def test_load_texts_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(LayerscopeError, match="nope.txt"):
        load_texts(missing)
    with pytest.raises(LayerscopeError, match="no-such-corpus"):
        load_texts("no-such-corpus")
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(LayerscopeError, match="empty data set.*empty.txt"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(LayerscopeError, match=r"'\.csv'"):
        load_texts(tmp_path / "x.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(LayerscopeError, match=r"bad\.jsonl:2"):
        load_texts(tmp_path / "bad.jsonl")


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(LayerscopeError, match="datasets"):
        load_texts("hf:wikitext:wikitext-2-raw-v1:test")
    with pytest.raises(LayerscopeError, match="hf:name"):
        load_texts("hf:")


def test_wikitext_split_into_articles(tmp_path):
    text = " \n = First = \n \n Body one . \n \n = = Section = = \n \n More . \n = Second = \n \n Body two . \n"
    arts = split_wikitext(text)
    assert len(arts) == 2 and "".join(arts) == text
    assert arts[0].startswith(" \n = First = ") and "= = Section = =" in arts[0]
    assert arts[1].startswith(" = Second = ")
    (tmp_path / "w.txt").write_text(text)
    assert load_texts(tmp_path / "w.txt") == arts
    assert load_texts(tmp_path / "w.txt", split_articles=False) == [text]


def test_shared_data_dir_env_override(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("To be, or not to be")
    monkeypatch.setenv("LAYERSCOPE_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    assert load_texts("tinyshakespeare") == ["To be, or not to be"]
    with pytest.raises(LayerscopeError, match="wikitext-2"):
        load_texts("wikitext-2")  # the name is known, the file is not there


# ---------------------------------------------------------------------------------------------
# instructions


def test_dolly_plain_template_is_byte_exact():
    prompt, response = render(InstructionExample("Name a colour.", "", "Blue."), "dolly-plain")
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert response == "Blue."
    prompt, _ = render(InstructionExample("Summarise.", "A long text.", "Short."), "dolly-plain")
    # Data-Oblivious-Critical-Layers prompt_utils.py 'dolly': same header, "Input:" without ###.
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarise.\n\nInput:\nA long text.\n\n### Response:\n"
    )


def test_dolly_template_is_the_papers_llama2_format():
    prompt, response = render(InstructionExample("Summarise.", "A long text.", "Short."), "dolly")
    assert prompt == (
        "[INST] <<SYS>>\nBelow is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n<</SYS>>\n\n### Instruction:\n Summarise. \n \nInput: \nA long text. \n \n"
        "### Response: [/INST]"
    )
    assert response == " Short. "  # the paper's code trains on prompt + " " + response + " " + EOS
    prompt, _ = render(InstructionExample("Name a colour."), "dolly")
    assert prompt.endswith("### Instruction:\n Name a colour. \n \n### Response: [/INST]")


def test_dolly_template_reproduces_the_papers_stored_prompts(shared_data):
    """The 300 prompts of prune_16.jsonl were decoded from the paper's tokenised examples."""
    stored = [json.loads(line)["Instrunction"] for line in
              (shared_data / "critical-layers" / "prune_16.jsonl").read_text().splitlines() if line.startswith("{")]
    examples = load_instructions("prune_16")
    assert len(examples) == len(stored) == 300
    rebuilt = ["<s> " + render(example, "dolly")[0] for example in examples]
    assert rebuilt == stored


def test_alpaca_template_is_stanford_alpaca():
    prompt, _ = render(InstructionExample("Summarise.", "A long text.", "Short."), "alpaca")
    assert prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSummarise.\n\n### Input:\nA long text.\n\n### Response:\n"
    )
    prompt, _ = render(InstructionExample("Name a colour."), "alpaca")
    assert prompt == render(InstructionExample("Name a colour."), "dolly-plain")[0]


def test_chat_template_uses_the_tokenizer(tok):
    prompt, response = render(InstructionExample("Do it.", "With this.", "Done."), "chat", tok)
    assert prompt == "<s>user\nDo it.\n\nWith this.</s>\n<s>assistant\n"
    assert response == "Done."
    with pytest.raises(LayerscopeError, match="chat template"):
        render(InstructionExample("Do it."), "chat", None)
    with pytest.raises(LayerscopeError, match="'vicuna'.*alpaca"):
        render(InstructionExample("Do it."), "vicuna", tok)


EXAMPLES = [
    InstructionExample("Name a colour.", "", "Blue, as in the sky."),
    InstructionExample("Summarise the text.", "Cats sleep a lot. Dogs do too.", "Pets sleep."),
    InstructionExample("Translate 'chat' to English", "", " cat\n"),
]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("which", ["tiny", "bpe"])
def test_instruction_mask_covers_exactly_response_and_eos(template, which, tok, bpe_tok):
    t = tok if which == "tiny" else bpe_tok
    seqs = instruction_sequences(t, EXAMPLES, template, max_len=4096)
    assert [s.group for s in seqs] == [0, 1, 2]
    for seq, ex in zip(seqs, EXAMPLES):
        prompt, response = render(ex, template, t)
        ids = torch.tensor(seq.input_ids)
        mask = torch.tensor(seq.target_mask)
        assert t.decode(ids[mask].tolist()) == response + t.eos_token
        assert t.decode(ids[~mask].tolist()) == prompt
        assert ids[-1].item() == t.eos_token_id and seq.target_mask[-1]
        # the scored tokens are one contiguous block at the end
        first = seq.target_mask.index(True)
        assert all(seq.target_mask[first:]) and not any(seq.target_mask[:first])


def test_instruction_bos_is_added_once(tok):
    seqs = instruction_sequences(tok, EXAMPLES[:1], "dolly", add_bos=True)
    assert seqs[0].input_ids[0] == tok.bos_token_id and seqs[0].input_ids[1] != tok.bos_token_id
    chat = instruction_sequences(tok, EXAMPLES[:1], "chat", add_bos=True)
    assert chat[0].input_ids[:2] == (tok.bos_token_id, tok.encode("u")[0])  # template wrote <s> already
    assert instruction_sequences(tok, EXAMPLES[:1], "dolly")[0].input_ids[0] != tok.bos_token_id


def test_instruction_truncation(tok):
    full = instruction_sequences(tok, EXAMPLES[:1], "dolly")[0]
    prompt_len = full.target_mask.index(True)
    cut = instruction_sequences(tok, EXAMPLES[:1], "dolly", max_len=prompt_len + 3)[0]
    assert cut.input_ids == full.input_ids[: prompt_len + 3]
    assert cut.num_targets == 3
    with pytest.warns(UserWarning, match="1 of 2"):
        seqs = instruction_sequences(tok, [EXAMPLES[0], InstructionExample("x" * 100, "", "y")], "dolly", max_len=prompt_len + 1)
    assert [s.group for s in seqs] == [0]
    with pytest.raises(LayerscopeError, match="max_len"):
        instruction_sequences(tok, EXAMPLES, "dolly", max_len=1)
    with pytest.raises(LayerscopeError, match="empty data set"):
        instruction_sequences(tok, [], "dolly")


def test_load_instructions_formats_and_errors(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"instruction": "I1", "context": "C1", "response": "R1", "category": "x"}) + "\n"
        + json.dumps({"instruction": "I2", "context": "", "response": "R2"}) + "\n"
    )
    assert load_instructions(tmp_path / "d.jsonl") == [InstructionExample("I1", "C1", "R1"), InstructionExample("I2", "", "R2")]
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "I", "input": "N", "output": "O"}]))
    assert load_instructions(str(tmp_path / "a.json")) == [InstructionExample("I", "N", "O")]
    llama2 = (
        "<s> [INST] <<SYS>>\nBelow is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n<</SYS>>\n\n### Instruction:\n {} \n \n{}### Response: [/INST]"
    )
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"Instrunction": llama2.format("Why?", ""), "groundtruth": "Because. </s>", "output": "o", "loss": 1.0}) + "\n"
        + json.dumps({"Instrunction": llama2.format("Sum up.", "Input: \nSome text \n \n"), "groundtruth": "Ok </s>"}) + "\n"
        + "Total loss: 2.0\nAverage loss: 1.0\n"
    )
    assert load_instructions(tmp_path / "p.jsonl") == [
        InstructionExample("Why?", "", "Because."),
        InstructionExample("Sum up.", "Some text", "Ok"),
    ]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(LayerscopeError, match=r"bad\.jsonl:1.*'instruction'"):
        load_instructions(tmp_path / "bad.jsonl")
    with pytest.raises(LayerscopeError, match="missing.jsonl"):
        load_instructions(tmp_path / "missing.jsonl")
    with pytest.raises(LayerscopeError, match="limit"):
        load_instructions(tmp_path / "d.jsonl", limit=0)
    with pytest.raises(LayerscopeError, match="'nosuchset'.*dolly"):
        load_instructions("nosuchset")


# ---------------------------------------------------------------------------------------------
# multiple choice

ITEMS = [
    MCItem("a", "The sky is", ("blue.", "green cheese made of many things."), 0),
    MCItem("b", "Question: 2 + 2 =\nAnswer: ", ("4", "5", "22"), 0),
    MCItem("c", "", ("hello there", "goodbye"), 1),
]


@pytest.mark.parametrize("which", ["tiny", "bpe"])
def test_mc_continuation_tokens_decode_to_space_choice(which, tok, bpe_tok):
    t = tok if which == "tiny" else bpe_tok
    seqs = mc_sequences(t, ITEMS)
    assert [(s.group, s.choice) for s in seqs] == [(g, c) for g, it in enumerate(ITEMS) for c in range(len(it.choices))]
    for seq in seqs:
        item = ITEMS[seq.group]
        choice = item.choices[seq.choice]
        ids = torch.tensor(seq.input_ids)
        mask = torch.tensor(seq.target_mask)
        context, continuation = split_context(item.context, choice)
        assert t.decode(ids[mask].tolist()) == continuation
        if item.context:
            assert t.decode(ids[~mask].tolist()) == context
            assert not item.context.endswith(" ") or continuation == " " + " " + choice
        else:  # nothing to predict from: a BOS (tiny) / end-of-text (bpe) token is put first
            assert seq.input_ids[0] == t.bos_token_id and mask.sum() == len(ids) - 1
    assert t.decode(torch.tensor(seqs[0].input_ids)[torch.tensor(seqs[0].target_mask)].tolist()) == " blue."


def test_mc_trailing_whitespace_moves_to_continuation():
    assert split_context("Answer: ", "4") == ("Answer:", "  4")
    assert split_context("Answer:\n", "4") == ("Answer:", "\n 4")
    assert split_context("Answer:", "4") == ("Answer:", " 4")


def test_mc_prefix_without_bos(bare_tok, tok):
    eos_only = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    seqs = mc_sequences(eos_only, ITEMS[2:])
    assert seqs[0].input_ids[0] == eos_only.eos_token_id
    with pytest.raises(LayerscopeError, match="neither BOS nor EOS"):
        mc_sequences(bare_tok, ITEMS[2:])
    with_bos = mc_sequences(tok, ITEMS[:1], add_bos=True)
    assert with_bos[0].input_ids[0] == tok.bos_token_id and tok.decode(with_bos[0].input_ids) == "<s>The sky is blue."


def test_choice_lengths():
    lengths = choice_lengths(ITEMS)
    assert lengths[(0, 0)] == len(" blue.") and lengths[(1, 2)] == 3 and lengths[(2, 1)] == len(" goodbye")
    assert len(lengths) == sum(len(it.choices) for it in ITEMS)


def test_load_mc_validates_rows(tmp_path):
    good = {"id": "q1", "context": "c", "choices": ["x", "y"], "label": 1}
    (tmp_path / "ok.jsonl").write_text(json.dumps(good) + "\n")
    assert load_mc(tmp_path / "ok.jsonl") == [MCItem("q1", "c", ("x", "y"), 1)]
    cases = [
        ({**good, "label": 2}, "label 2"),
        ({**good, "label": -1}, "label -1"),
        ({**good, "choices": ["only"]}, "at least 2"),
        ({"id": "q", "context": "c", "choices": ["x", "y"]}, "label"),
    ]
    for row, needle in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(LayerscopeError, match=rf"bad\.jsonl:2.*{needle}"):
            load_mc(path)
    with pytest.raises(LayerscopeError, match="nosuchtask"):
        load_mc("nosuchtask")


# ---------------------------------------------------------------------------------------------
# batching


def _random_seqs(n: int, seed: int) -> list[ScoredSequence]:
    rng = random.Random(seed)
    seqs = []
    for i in range(n):
        length = rng.choice([1, 3, 5, 5, 8, 13, 21])
        ids = tuple(rng.randrange(4, 200) for _ in range(length))
        mask = (False,) + tuple(rng.random() < 0.6 for _ in range(length - 1))
        seqs.append(ScoredSequence(ids, mask, group=i))
    return seqs


@pytest.mark.parametrize("batch_size,max_tokens", [(4, None), (None, 50), (3, 40), (1, None), (None, 21)])
def test_batches_round_trip_and_respect_limits(batch_size, max_tokens):
    seqs = _random_seqs(57, seed=1)
    batches = make_batches(seqs, batch_size=batch_size, max_tokens=max_tokens, pad_id=3)
    seen = []
    lengths = []
    for b in batches:
        rows, width = b.input_ids.shape
        assert b.input_ids.dtype == torch.long and b.attention_mask.dtype == torch.long and b.target_mask.dtype == torch.bool
        assert len(b.index) == rows
        if batch_size is not None:
            assert rows <= batch_size
        if max_tokens is not None:
            assert rows * width <= max_tokens
        for row, i in enumerate(b.index):
            n = int(b.attention_mask[row].sum())
            assert b.attention_mask[row, :n].all() and not b.attention_mask[row, n:].any()
            assert tuple(b.input_ids[row, :n].tolist()) == seqs[i].input_ids
            assert tuple(b.target_mask[row, :n].tolist()) == seqs[i].target_mask
            assert (b.input_ids[row, n:] == 3).all() and not b.target_mask[row, n:].any()
            lengths.append(n)
        assert int(b.attention_mask[0].sum()) == width  # the first row is the longest
        seen.extend(b.index)
    assert sorted(seen) == list(range(len(seqs)))
    assert lengths == sorted(lengths, reverse=True)
    # stable: among equal lengths, the input order is kept
    assert seen == sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    again = make_batches(seqs, batch_size=batch_size, max_tokens=max_tokens, pad_id=3)
    assert [b.index for b in again] == [b.index for b in batches]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(again, batches))


def test_token_budget_packs_greedily():
    seqs = [ScoredSequence((5,) * n, (False,) + (True,) * (n - 1)) for n in (10, 10, 10, 4, 4, 4, 4, 4)]
    batches = make_batches(seqs, max_tokens=25)
    assert [b.index for b in batches] == [[0, 1], [2, 3], [4, 5, 6, 7]]
    assert [tuple(b.input_ids.shape) for b in batches] == [(2, 10), (2, 10), (4, 4)]
    assert [b.num_tokens for b in batches] == [20, 14, 16]
    both = make_batches(seqs, batch_size=3, max_tokens=25)
    assert [b.index for b in both] == [[0, 1], [2, 3], [4, 5, 6], [7]]


def test_batching_errors():
    seqs = _random_seqs(5, seed=2)
    with pytest.raises(LayerscopeError, match="empty data set"):
        make_batches([], batch_size=2)
    with pytest.raises(LayerscopeError, match="batch_size or max_tokens"):
        make_batches(seqs)
    with pytest.raises(LayerscopeError, match="batch_size.*0"):
        make_batches(seqs, batch_size=0)
    longest = max(len(s) for s in seqs)
    with pytest.raises(LayerscopeError, match=f"max_tokens={longest - 1}.*{longest}"):
        make_batches(seqs, max_tokens=longest - 1)
    batches = make_batches(seqs, batch_size=2, pad_id=None)  # GPT-2's pad_token_id
    assert batches[-1].input_ids.shape[0] == 1


def test_end_to_end_batches_of_mc_and_lm(tok):
    seqs = mc_sequences(tok, ITEMS) + lm_sequences(tok, "a fairly short text " * 10, seq_len=32, stride=8)
    batches = make_batches(seqs, max_tokens=128, pad_id=tok.pad_token_id)
    assert sum(int(b.target_mask.sum()) for b in batches) == sum(s.num_targets for s in seqs)


# ---------------------------------------------------------------------------------------------
# the real shared files

MC_COUNTS = {
    "piqa": 1838,
    "arc-easy": 2376,
    "arc-challenge": 1172,
    "boolq": 3270,
    "hellaswag": 10042,
    "winogrande": 1267,
    "openbookqa": 500,
    "copa": 100,
}


@needs_shared
@pytest.mark.parametrize("name,count", sorted(MC_COUNTS.items()))
def test_shared_mc_tasks_have_the_documented_counts(name, count):
    items = load_mc(name)
    assert len(items) == count
    assert all(0 <= it.label < len(it.choices) and len(it.choices) >= 2 for it in items)
    assert len({it.id for it in items}) == count


@needs_shared
def test_shared_mc_details(tok):
    arc = load_mc("arc-easy")
    assert sum(len(it.choices) == 3 for it in arc) == 7 and sum(len(it.choices) == 5 for it in arc) == 4
    copa = load_mc("copa")
    assert copa[0] == MCItem("copa-0", "The man turned on the faucet, therefore", (
        "the toilet filled with water.", "water flowed from the spout."), 1)
    sub = load_mc("piqa", limit=20, seed=7)
    assert len(sub) == 20 and sub == load_mc("piqa", limit=20, seed=7)
    ids = [int(it.id.rsplit("-", 1)[1]) for it in sub]
    assert ids == sorted(ids)
    seqs = mc_sequences(tok, copa[:2])
    assert tok.decode([t for t, m in zip(seqs[1].input_ids, seqs[1].target_mask) if m]) == " water flowed from the spout."


@needs_shared
def test_shared_instruction_sets_have_the_documented_counts():
    dolly = load_instructions("dolly")
    assert len(dolly) == 387 and all(ex.instruction and ex.response for ex in dolly)
    alpaca = load_instructions("alpaca")
    assert len(alpaca) == 5000 and sum(bool(ex.input) for ex in alpaca) == 1943
    prune = load_instructions(SHARED / "critical-layers" / "prune_16.jsonl")
    assert len(prune) == 300
    assert prune[-1].instruction == "What is the Masters?" and prune[-1].input == ""
    assert prune[-1].response.startswith("The Masters Tournament is a golf tournament")
    assert not any(ex.response.endswith("</s>") or "[INST]" in ex.instruction for ex in prune)
    assert sum(bool(ex.input) for ex in prune) == 93
    assert load_instructions("prune_16", limit=10, seed=1) == load_instructions("prune_16", limit=10, seed=1)


@needs_shared
def test_shared_corpora():
    assert len(load_texts("wikitext-2")) == 62
    assert len(load_texts("wikitext-2-valid")) == 60
    raw = load_texts("wikitext-2-raw")
    assert len(raw) == 62 and "\r" not in raw[0] and raw[0].startswith(" = Robert Boulter = \n")
    assert sum(len(a.split()) for a in load_texts("wikitext-2")) == 241_211
    shakespeare = load_texts("tinyshakespeare")
    assert len(shakespeare) == 1 and len(shakespeare[0]) == 1_115_394
    assert shakespeare[0].startswith("First Citizen:")


@needs_shared
def test_shared_wikitext_windows_cover_the_corpus(tok):
    texts = load_texts("wikitext-2")[:3]
    seqs = lm_sequences(tok, texts, seq_len=512, stride=256)
    n = len(concat_token_ids(tok, texts))
    assert sum(s.num_targets for s in seqs) == n - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampled = lm_sequences(tok, texts, seq_len=512, samples=8, seed=0)
    assert len(sampled) == 8 and all(len(s) == 512 for s in sampled)
