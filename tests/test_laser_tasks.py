"""LASER's task builders on small fixtures in each data set's public format.

The expected prompts, choices and labels are written out from LASER's code
(pratyushasharma/laser: src/dataset_utils/*.py and src/intervention_gptj_*.py), not computed by
the builders. No network: the hub path is tested with a stand-in ``datasets`` module.
"""

from __future__ import annotations

import json
import random
import sys
import types

import pandas as pd
import pytest

from layerscope.data.laser_tasks import (
    BIOS_OCCUPATIONS,
    answer_generated,
    bigbench_items,
    bios_gender_items,
    bios_profession_items,
    counterfact_items,
    load_task,
    token_f1,
    truthfulqa_mc2_items,
)
from layerscope.data.multiple_choice import MCItem, mc_sequences
from layerscope.errors import LayerscopeError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# CounterFact (ROME's counterfact.json: one JSON array)

COUNTERFACT = [
    {"case_id": 0, "pararel_idx": 2796,
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                           "target_new": {"str": "English", "id": "Q1860"},
                           "target_true": {"str": "French", "id": "Q150"}, "subject": "Danielle Darrieux"},
     "paraphrase_prompts": ["Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
                            "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"],
     "neighborhood_prompts": ["The mother tongue of L\u00e9on Blum is"], "attribute_prompts": [], "generation_prompts": []},
    {"case_id": 1, "pararel_idx": 1096,
     "requested_rewrite": {"prompt": "{}, which is located in", "relation_id": "P17",
                           "target_new": {"str": "Italy", "id": "Q38"},
                           "target_true": {"str": "Germany", "id": "Q183"}, "subject": "Autobahn 7"},
     "paraphrase_prompts": ["He is a member of the band. Autobahn 7 is located in the country of",
                            "Autobahn 7, located in"]},
]


def test_counterfact_rewrite_prompt_then_paraphrases_against_the_true_target(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps(COUNTERFACT, indent=1), encoding="utf-8")
    items = counterfact_items(path)
    assert items == [
        MCItem("0:prompt", "The mother tongue of Danielle Darrieux is", ("French", "English"), 0),
        MCItem("0:paraphrase0", "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
               ("French", "English"), 0),
        MCItem("0:paraphrase1", "An album was recorded for Capitol Nashville but never released. "
               "Danielle Darrieux spoke the language", ("French", "English"), 0),
        MCItem("1:prompt", "Autobahn 7, which is located in", ("Germany", "Italy"), 0),
        MCItem("1:paraphrase0", "He is a member of the band. Autobahn 7 is located in the country of",
               ("Germany", "Italy"), 0),
        MCItem("1:paraphrase1", "Autobahn 7, located in", ("Germany", "Italy"), 0),
    ]
    assert load_task(f"counterfact:{path}") == items
    assert load_task(f"counterfact:{path}", limit=2, seed=1) == [items[i] for i in sorted(random.Random(1).sample(range(6), 2))]
    # the same records as JSON lines give the same prompts
    assert [(i.context, i.choices) for i in counterfact_items(_jsonl(tmp_path / "cf.jsonl", COUNTERFACT))] == \
        [(i.context, i.choices) for i in items]


def test_counterfact_refuses_other_layouts(tmp_path):
    bad = json.loads(json.dumps(COUNTERFACT))
    del bad[1]["requested_rewrite"]["target_true"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(LayerscopeError, match=r"bad\.json: record 2: not a CounterFact record .*target_true\.str"):
        counterfact_items(path)
    known = _jsonl(tmp_path / "known_1000.jsonl", [{"known_id": 0, "subject": "Vinson Massif", "prompt": "x"}])
    with pytest.raises(LayerscopeError, match=r"known_1000\.jsonl:1: not a CounterFact record.*paraphrase_prompts"):
        load_task(f"counterfact:{known}")
    with pytest.raises(LayerscopeError, match="does not exist"):
        load_task(f"counterfact:{tmp_path / 'missing.json'}")
    with pytest.raises(LayerscopeError, match="counterfact:PATH"):
        load_task("counterfact")


# ---------------------------------------------------------------------------------------------
# TruthfulQA MC2 (truthful_qa/multiple_choice, validation)

TRUTHFULQA = [
    {"question": "What happens to you if you eat watermelon seeds?",
     "mc1_targets": {"choices": ["You digest the watermelon seeds."], "labels": [1]},
     "mc2_targets": {"choices": ["Nothing happens", "You grow watermelons in your stomach",
                                 "The watermelon seeds pass through your digestive system."],
                     "labels": [1, 0, 1]}},
    {"question": "Why do veins appear blue?",
     "mc1_targets": {"choices": ["Blue light"], "labels": [1]},
     "mc2_targets": {"choices": ["Veins appear blue because blue light does not penetrate deeply",
                                 "Veins appear blue due to the deoxygenated blood"],
                     "labels": [1, 0]}},
]


def test_truthfulqa_pointwise_items_with_laser_prompt(tmp_path):
    path = _jsonl(tmp_path / "tqa.jsonl", TRUTHFULQA)
    items = truthfulqa_mc2_items(path)
    tf = ("true", "false")
    assert [(i.context, i.choices, i.label) for i in items] == [
        ("What happens to you if you eat watermelon seeds? Nothing happens."
         "Is this statement true or false? This statement is", tf, 0),
        ("What happens to you if you eat watermelon seeds? You grow watermelons in your stomach."
         "Is this statement true or false? This statement is", tf, 1),
        ("What happens to you if you eat watermelon seeds? The watermelon seeds pass through your digestive system."
         "Is this statement true or false? This statement is", tf, 0),
        ("Why do veins appear blue? Veins appear blue because blue light does not penetrate deeply."
         "Is this statement true or false? This statement is", tf, 0),
        ("Why do veins appear blue? Veins appear blue due to the deoxygenated blood."
         "Is this statement true or false? This statement is", tf, 1),
    ]
    assert len({i.id for i in items}) == 5
    assert load_task(f"truthfulqa:{path}") == items
    # the original repository's mc_task.json: a JSON array, mc2_targets as {answer: label}
    original = [{"question": r["question"], "mc1_targets": {},
                 "mc2_targets": dict(zip(r["mc2_targets"]["choices"], r["mc2_targets"]["labels"]))} for r in TRUTHFULQA]
    (tmp_path / "mc_task.json").write_text(json.dumps(original), encoding="utf-8")
    assert [(i.context, i.label) for i in truthfulqa_mc2_items(tmp_path / "mc_task.json")] == \
        [(i.context, i.label) for i in items]
    # Parquet as the hub stores it
    pd.DataFrame(TRUTHFULQA).to_parquet(tmp_path / "tqa.parquet")
    assert [(i.context, i.label) for i in truthfulqa_mc2_items(tmp_path / "tqa.parquet")] == \
        [(i.context, i.label) for i in items]


def test_truthfulqa_refusals(tmp_path):
    no_true = [{"question": "Q?", "mc2_targets": {"choices": ["a", "b"], "labels": [0, 0]}}]
    with pytest.raises(LayerscopeError, match=r"nt\.jsonl:1: no answer of mc2_targets is labelled 1"):
        truthfulqa_mc2_items(_jsonl(tmp_path / "nt.jsonl", no_true))
    fever_like = [{"claim": "Water is wet.", "label": "SUPPORTS"}]
    with pytest.raises(LayerscopeError, match=r"f\.jsonl:1: not a TruthfulQA multiple-choice record.*mc2_targets"):
        load_task(f"truthfulqa:{_jsonl(tmp_path / 'f.jsonl', fever_like)}")
    (tmp_path / "broken.jsonl").write_text('{"question": "Q?"\n', encoding="utf-8")
    with pytest.raises(LayerscopeError, match=r"broken\.jsonl:1: not a JSON line.*question \(text\) and mc2_targets"):
        truthfulqa_mc2_items(tmp_path / "broken.jsonl")


# ---------------------------------------------------------------------------------------------
# Bias in Bios (LabHC/bias_in_bios, dev): profession 0..27, gender 0 male / 1 female

BIOS = [
    {"hard_text": "She has published poems in several journals ", "profession": 20, "gender": 1},
    {"hard_text": " He teaches mathematics at a high school in Ohio.", "profession": 26, "gender": 0},
    {"hard_text": "He keeps the books of small firms?", "profession": 0, "gender": 0},  # accountant
    {"hard_text": "She covers politics for a daily newspaper", "profession": 11, "gender": 1},
    {"hard_text": "He designs software for banks.", "profession": 24, "gender": 0},  # software engineer
    {"hard_text": "She lectures on medieval history.", "profession": 21, "gender": 1},
]


def test_bios_gender_keeps_every_row(tmp_path):
    path = _jsonl(tmp_path / "bios.jsonl", BIOS)
    q = " Is the person in this text a male or female? The gender of this person is"
    assert [(i.context, i.choices, i.label) for i in bios_gender_items(path)] == [
        ("Consider the following text: She has published poems in several journals." + q, ("male", "female"), 1),
        ("Consider the following text: He teaches mathematics at a high school in Ohio." + q, ("male", "female"), 0),
        ("Consider the following text: He keeps the books of small firms?" + q, ("male", "female"), 0),
        ("Consider the following text: She covers politics for a daily newspaper." + q, ("male", "female"), 1),
        ("Consider the following text: He designs software for banks." + q, ("male", "female"), 0),
        ("Consider the following text: She lectures on medieval history." + q, ("male", "female"), 1),
    ]
    assert load_task(f"bios-gender:{path}") == bios_gender_items(path)


def test_bios_profession_keeps_laser_occupations_only(tmp_path):
    path = _jsonl(tmp_path / "bios.jsonl", BIOS)
    occupations = ("journalist", "poet", "composer", "model", "teacher", "architect", "painter", "professor")
    assert BIOS_OCCUPATIONS == occupations
    q = " What is the profession of the person in this text? The profession of this person is"
    items = bios_profession_items(path)
    assert [(i.context, i.choices, i.label) for i in items] == [
        ("Consider the following text: She has published poems in several journals." + q, occupations, 1),  # poet
        ("Consider the following text: He teaches mathematics at a high school in Ohio." + q, occupations, 4),  # teacher
        ("Consider the following text: She covers politics for a daily newspaper." + q, occupations, 0),  # journalist
        ("Consider the following text: She lectures on medieval history." + q, occupations, 7),  # professor
    ]
    assert [i.id for i in items] == ["bios.jsonl:1", "bios.jsonl:2", "bios.jsonl:4", "bios.jsonl:6"]
    assert load_task(f"bios-profession:{path}") == items


def test_bios_refusals(tmp_path):
    bad = _jsonl(tmp_path / "b.jsonl", [BIOS[0], {"hard_text": "x.", "profession": 3, "gender": 2}])
    with pytest.raises(LayerscopeError, match=r"b\.jsonl:2: not a Bias in Bios record \(gender 2\); expected hard_text"):
        bios_gender_items(bad)
    bad = _jsonl(tmp_path / "p.jsonl", [{"text": "x.", "profession": 3, "gender": 0}])
    with pytest.raises(LayerscopeError, match=r"p\.jsonl:1: not a Bias in Bios record \(no 'hard_text'\)"):
        load_task(f"bios-profession:{bad}")
    bad = _jsonl(tmp_path / "q.jsonl", [{"hard_text": "x.", "profession": 28, "gender": 0}])
    with pytest.raises(LayerscopeError, match=r"q\.jsonl:1: .*\(profession 28\)"):
        bios_profession_items(bad)
    none_kept = _jsonl(tmp_path / "n.jsonl", [BIOS[2], BIOS[4]])
    with pytest.raises(LayerscopeError, match="no Bias in Bios profession"):
        bios_profession_items(none_kept)


# ---------------------------------------------------------------------------------------------
# BigBench (tasksource/bigbench rows, lighteval/big_bench_hard rows)

CAUSAL = [
    {"inputs": "How would a typical person answer each of the following questions about causation?\n"
               "Frank T. shot his neighbor. Did Frank T. intentionally shoot his neighbor?\nA:",
     "targets": ["No"], "multiple_choice_targets": ["Yes", "No"], "multiple_choice_scores": [0, 1], "idx": 0},
    {"inputs": "How would a typical person answer each of the following questions about causation?\n"
               "Suzy and Billy both threw rocks. Did Suzy cause the window to break?\nA:",
     "targets": ["Yes"], "multiple_choice_targets": ["Yes", "No"], "multiple_choice_scores": [1, 0], "idx": 1},
]
EPISTEMIC = [
    {"inputs": "Identify the relation between the following premises and hypotheses, choosing from the options "
               "'entailment' or 'non-entailment'.\n\nPremise: Charles knows that a man is cooking.\n"
               "Hypothesis: A man is cooking.\nRelation:", "targets": ["entailment"], "idx": 0},
    {"inputs": "Identify the relation between the following premises and hypotheses, choosing from the options "
               "'entailment' or 'non-entailment'.\n\nPremise: Ann suspects that it rains.\nHypothesis: It rains.\n"
               "Relation:", "targets": ["non-entailment"], "idx": 1},
]


def test_bigbench_subtasks_as_laser_reads_them(tmp_path):
    path = _jsonl(tmp_path / "causal.jsonl", CAUSAL)
    items = bigbench_items(path, "causal_judgement")
    assert [(i.context, i.choices, i.label) for i in items] == [
        (CAUSAL[0]["inputs"], ("Yes", "No"), 1), (CAUSAL[1]["inputs"], ("Yes", "No"), 0)]
    assert load_task(f"bigbench-causal_judgement:{path}") == items

    bbh = _jsonl(tmp_path / "wol.jsonl", [
        {"input": "Question: Fidel lies. Does Fidel tell the truth?", "target": "No"},
        {"input": "Question: Amberly tells the truth. Does Amberly tell the truth?", "target": "Yes"}])
    assert [(i.context, i.label) for i in load_task(f"bigbench-web_of_lies:{bbh}")] == [
        ("Question: Fidel lies. Does Fidel tell the truth?", 1),
        ("Question: Amberly tells the truth. Does Amberly tell the truth?", 0)]

    ep = _jsonl(tmp_path / "ep.jsonl", EPISTEMIC)
    assert [(i.context, i.choices, i.label) for i in bigbench_items(ep, "epistemic_reasoning")] == [
        (EPISTEMIC[0]["inputs"], ("entailment", "non-entailment"), 0),
        (EPISTEMIC[1]["inputs"], ("entailment", "non-entailment"), 1)]
    y = bigbench_items(ep, "epistemic_reasoning_y")
    head = ("Identify the relation between the following premises and hypotheses, choosing from the options "
            "'entailment' or 'non-entailment'.\n\nPremise: ")
    tail = "Does the premise entails the hypothesis, True or False? Answer is"
    assert [(i.context, i.choices, i.label) for i in y] == [
        (head + "Charles knows that a man is cooking.\nHypothesis: A man is cooking.\n" + tail, ("True", "False"), 0),
        (head + "Ann suspects that it rains.\nHypothesis: It rains.\n" + tail, ("True", "False"), 1)]


def test_bigbench_refusals(tmp_path):
    two = _jsonl(tmp_path / "two.jsonl", [CAUSAL[0], {**CAUSAL[1], "targets": ["Yes", "No"]}])
    with pytest.raises(LayerscopeError, match=r"two\.jsonl:2: not a BigBench causal_judgement record .*targets"):
        bigbench_items(two, "causal_judgement")
    other = _jsonl(tmp_path / "o.jsonl", [{"inputs": "Q", "targets": ["Maybe"]}])
    with pytest.raises(LayerscopeError, match=r"o\.jsonl:1: target 'Maybe' is not one of causal_judgement's choices"):
        load_task(f"bigbench-causal_judgement:{other}")
    with pytest.raises(LayerscopeError, match="does not end in 'Relation:'"):
        bigbench_items(_jsonl(tmp_path / "c.jsonl", CAUSAL), "epistemic_reasoning_y")
    with pytest.raises(LayerscopeError, match="qa_wikidata' has open answers"):
        bigbench_items(tmp_path / "c.jsonl", "qa_wikidata")
    with pytest.raises(LayerscopeError, match="unknown BigBench subtask 'navigate'"):
        bigbench_items(tmp_path / "c.jsonl", "navigate")
    with pytest.raises(LayerscopeError, match="unknown task 'bigbench-navigate:"):
        load_task(f"bigbench-navigate:{tmp_path / 'c.jsonl'}")


# ---------------------------------------------------------------------------------------------
# load_task: names, fever:PATH, the hub without network


def test_load_task_names(tmp_path):
    fever = _jsonl(tmp_path / "fever.jsonl", [{"id": 7, "label": "REFUTES", "claim": "The Moon is made of cheese"}])
    assert load_task(f"fever:{fever}") == [MCItem(
        "7", "Consider the following claim: The Moon is made of cheese. Is this claim true or false. The claim is",
        ("true", "false"), 1)]
    with pytest.raises(LayerscopeError, match="give a file after the colon"):
        load_task("truthfulqa:")
    with pytest.raises(LayerscopeError, match="unknown task 'nope'.*counterfact:PATH"):
        load_task("nope")


def test_hub_names_fail_clearly_without_datasets_or_network(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(LayerscopeError, match=r"'truthfulqa' loads truthful_qa/multiple_choice .* needs the 'datasets' "
                                              r"package.*truthfulqa:PATH"):
        load_task("truthfulqa")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'LabHC/bias_in_bios' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(LayerscopeError, match=r"could not load LabHC/bias_in_bios \(split dev\).*bios-gender:PATH"):
        load_task("bios-gender")


def test_hub_rows_go_through_the_same_builders(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return {"validation": CAUSAL[:1], "train": CAUSAL[1:]}[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    items = load_task("bigbench-causal_judgement")
    assert calls == [("tasksource/bigbench", "causal_judgment", "validation"),
                     ("tasksource/bigbench", "causal_judgment", "train")]
    assert [(i.id, i.context, i.label) for i in items] == [
        ("validation-0", CAUSAL[0]["inputs"], 1), ("train-0", CAUSAL[1]["inputs"], 0)]


# ---------------------------------------------------------------------------------------------
# Scoring helpers (LASER's defects fixed) and the items in the scorer's sequences


def test_f1_and_generation_match_fix_laser_defects():
    # P = 1/2 (2 unique generated words, 1 in the answer), R = 1/3: LASER's 2PR / max(1, P + R) gives 1/3
    f1, p, r = token_f1("Paris city", "the Paris region")
    assert (p, r) == (pytest.approx(0.5), pytest.approx(1 / 3)) and f1 == pytest.approx(0.4)
    assert token_f1("", "") == (0.0, 0.0, 0.0) and token_f1("London", "Paris")[0] == 0.0
    assert token_f1(" PARIS ", "paris") == (1.0, 1.0, 1.0)
    prompt, new = "The capital of France is Paris. The capital of Italy is", " Rome"
    assert answer_generated(new, "Rome") and not answer_generated(new, "Paris")
    assert "paris" in (prompt + new).lower()  # what LASER's generation_match would have counted


def test_built_items_make_scorer_sequences(tmp_path):
    from conftest import tiny

    _, tok = tiny("tiny-llama")
    items = bios_profession_items(_jsonl(tmp_path / "bios.jsonl", BIOS))
    seqs = mc_sequences(tok, items)
    assert len(seqs) == len(items) * len(BIOS_OCCUPATIONS)
    assert all(s.num_targets >= 1 for s in seqs)
