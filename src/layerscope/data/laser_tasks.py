"""Tasks for rank-reduction sweeps (LASER), in the one multiple-choice schema.

A task is a list of :class:`~layerscope.data.multiple_choice.MCItem`: any ``*.mc.jsonl`` file or
short name of :data:`~layerscope.data.multiple_choice.MC_TASKS`, or a task built here from a data
set's public format with the LASER paper's prompt (Sharma, Ash, Misra 2024; code
``pratyushasharma/laser``). :func:`load_task` takes ``"NAME:PATH"`` for every builder below (a
local file in the public format: JSON lines, one JSON array, or Parquet), the bare name ``fever``
(the shared data folder), and the bare names of :data:`HUB_SOURCES` (the Hugging Face data sets
LASER loads, only with the ``datasets`` package and a machine that reaches the hub; otherwise a
:class:`~layerscope.errors.LayerscopeError` says to give ``NAME:PATH``). A record not in the
expected layout is refused with the file, the line or record number and the expected fields.

Every choice is scored as the continuation ``" " + choice`` of the prompt, which is exactly how
LASER forms its answers (``" " + answer``, ``tokenizer(" true")``, ``f" {choice}"``).

- ``fever``: FEVER 1.0 claims (``{claim, label}`` JSON lines; the shared folder holds ``paper_dev``).
  As LASER's ``dataset_utils/fever.py``: claims labelled NOT ENOUGH INFO are left out, a claim
  kept once, and only when all its rows carry the same label. As its ``intervention_*_fever.py``:
  the prompt is ``"Consider the following claim: " + claim.strip() + " Is this claim true or
  false. The claim is"`` (with ``"."`` added after a claim that does not end in ``.`` or ``?``),
  and the answer is the single token " true" (SUPPORTS) or " false" (REFUTES).
- ``counterfact`` (:func:`counterfact_items`): ROME's ``counterfact.json`` records. As LASER's
  ``dataset_utils/get_counterfact.py``: each record gives three prompts in this order, the rewrite
  prompt ``requested_rewrite.prompt.format(subject)`` and then its two ``paraphrase_prompts``
  verbatim, all with the gold answer ``" " + target_true.str``; nothing is filtered. LASER's
  ``intervention_gptj_counterfact.py`` scores the next token after the prompt (it asserts the true
  target is one token) and reports top-1/5/10 of the true target over the whole vocabulary; its
  Llama-2 script generates and scores the summed answer log-probability. The items here have two
  choices ``(target_true, target_new)``, label 0. With single-token targets the sweep's ``top1``,
  ``top5``, ``top10`` columns are LASER's CounterFact accuracy and top-k (by exact token id) and
  ``logloss`` is its ``-answer_log_prob``; ``accuracy`` is additionally whether the true target
  beats the counterfactual one (ROME's comparison; not a LASER number). When any target of the
  task is several tokens, every item is scored by summed log-probability: ``accuracy`` is then
  true-versus-new by summed log-probability, ``logloss`` the summed true-target log-probability
  (LASER's ``answer_log_prob``) and top-k is left empty.
- ``truthfulqa`` (:func:`truthfulqa_mc2_items`): TruthfulQA ``multiple_choice`` records
  (``question`` and ``mc2_targets`` as the hub's ``{choices, labels}`` or the original
  ``mc_task.json``'s ``{answer: 0/1}``). As LASER's ``dataset_utils/truthfulqa.py``, point-wise:
  every (question, answer) pair is one item with prompt ``question + " " + answer``, ``"."`` added
  when it does not end in ``.``, then ``"Is this statement true or false? This statement is"``
  appended with no space before it (LASER's text, kept verbatim: ``"...answer.Is this ..."``);
  choices " true" / " false" (an answer labelled 1 in ``mc2_targets`` gets label 0, "true"). A
  question without a true answer is refused (LASER asserts one).
- ``bios-gender`` (:func:`bios_gender_items`): Bias in Bios (``LabHC/bias_in_bios``, split
  ``dev``: ``hard_text``, ``gender`` 0 male / 1 female). All rows, as LASER. Prompt (its
  ``intervention_*_bios.py``): ``"Consider the following text: " + text.strip()`` then ``"."``
  unless it ends in ``.`` or ``?``, then ``" Is the person in this text a male or female? The
  gender of this person is"``; choices " male" / " female", label = ``gender``.
- ``bios-profession`` (:func:`bios_profession_items`): the same records, ``profession`` an index
  into LASER's 28 professions (:data:`BIOS_PROFESSIONS`, the data set's class order). As its
  ``BiasBiosOccupation``: only rows whose profession is one of the 8 single-token
  :data:`BIOS_OCCUPATIONS` are kept and the label is its index there; prompt ``"Consider the
  following text: " + text.strip()`` (``"."`` added as above) + ``" What is the profession of the
  person in this text? The profession of this person is"``; the 8 occupations are the choices.
- ``bigbench-SUBTASK`` (:func:`bigbench_items`): the single-token-choice subtasks of LASER's
  ``dataset_utils/bigbench.py`` (:data:`BIGBENCH_SUBTASKS`): ``tasksource/bigbench`` rows
  (``inputs``, ``targets`` with one target; LASER reads ``validation`` then ``train``) or
  ``lighteval/big_bench_hard`` rows (``input``, ``target``; ``train``). The prompt is the input
  verbatim, the choices LASER's fixed list and the label the target's index in it (a row with
  other than one target, or a target outside the list, is refused, as LASER asserts).
  ``epistemic_reasoning_y`` replaces the trailing ``"Relation:"`` by ``"Does the premise entails
  the hypothesis, True or False? Answer is"`` (LASER's words) with choices True / False; LASER's
  branch asserts the targets are True/False, which the hub's ``entailment`` / ``non-entailment``
  never are, so it cannot run as written: here entailment maps to True and non-entailment to
  False. ``qa_wikidata`` has open answers (LASER generates), so it is not a choice task here.

Scoring (:mod:`layerscope.analyses.laser`) is LASER's: the next-token distribution when every
choice is one token (top-1 and top-k over the vocabulary, log-loss of the gold token), the summed
answer log-probability otherwise. LASER's ``study_utils/metric_utils.py`` has three defects that
are fixed here:

1. F1 divided by ``max(1, P + R)``: ``Metrics.f1pr_scores`` computes ``f1_score = (2 *
   precision_score * recall_score) / float(max(1, precision_score + recall_score))``. Since
   ``P + R <= 2`` this is ``2PR``, not the F1, whenever ``P + R < 1`` (P = R = 0.4 gives 0.32,
   not 0.4). :func:`token_f1` divides by ``P + R`` (0 when both are 0).
2. Answers counted correct when they appear in the prompt: ``Metrics.generation_match`` is
   ``return answer in generation``, and the scripts that use it (``intervention_llama2_counterfact
   .py``, ``intervention_gptj_bbh_qa.py``, ...) pass ``generation = tokenizer.batch_decode(
   generate_ids, ...)[0]`` where ``generate_ids = model_edit.generate(inputs.input_ids, ...)``
   holds the prompt followed by the new tokens, so an answer already in the prompt is "correct"
   whatever the model generates (its F1 is taken on the same string). The sweep here never
   generates: an item is correct when the gold choice scores above every other choice.
   :func:`answer_generated` and :func:`token_f1` take the new text only.
3. Answer length off by one: ``Metrics.masked_answer_log_prob`` (the RoBERTa scripts) starts
   ``answer_len = 1.0`` and adds 1 per masked answer token, so the length is one more than the
   number of answer tokens; it divides the mean log-probability and is the token count of
   LASER's answer perplexity. Here the answer length is the number of scored continuation
   tokens (``ScoredSequence.num_targets``) and ``logloss`` is the summed answer log-probability
   (LASER's BigBench scripts report it divided by the answer length; single-token answers agree).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from layerscope.data.corpus import pick, read_jsonl, resolve_source
from layerscope.data.multiple_choice import MC_TASKS, MCItem, load_mc
from layerscope.errors import LayerscopeError, allowed

#: Task builders' short names -> path relative to the shared data folder.
LASER_TASKS: dict[str, str] = {"fever": "fever/paper_dev.jsonl"}

FEVER_LABELS = {"SUPPORTS": 0, "REFUTES": 1}  # index into the choices ("true", "false")

TRUE_FALSE = ("true", "false")
BIOS_GENDERS = ("male", "female")  # LabHC/bias_in_bios gender: 0 male, 1 female
#: LabHC/bias_in_bios ``profession`` class order (LASER's ``occupation_dict``).
BIOS_PROFESSIONS = (
    "accountant", "architect", "attorney", "chiropractor", "comedian", "composer", "dentist", "dietitian",
    "dj", "filmmaker", "interior designer", "journalist", "model", "nurse", "painter", "paralegal", "pastor",
    "personal trainer", "photographer", "physician", "poet", "professor", "psychologist", "rapper",
    "software engineer", "surgeon", "teacher", "yoga teacher",
)
#: LASER's ``BiasBiosOccupation.occupations``: the single-token professions kept, in label order.
BIOS_OCCUPATIONS = ("journalist", "poet", "composer", "model", "teacher", "architect", "painter", "professor")

#: LASER's single-token-choice BigBench subtasks -> their fixed choices.
BIGBENCH_SUBTASKS: dict[str, tuple[str, ...]] = {
    "causal_judgement": ("Yes", "No"),
    "web_of_lies": ("Yes", "No"),
    "epistemic_reasoning": ("entailment", "non-entailment"),
    "epistemic_reasoning_y": ("True", "False"),
}
EPISTEMIC_Y_SUFFIX = "Does the premise entails the hypothesis, True or False? Answer is"
EPISTEMIC_Y_TARGETS = {"entailment": "True", "non-entailment": "False"}

#: Bare task names loaded from the Hugging Face hub as LASER loads them: (data set, config, splits).
HUB_SOURCES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "truthfulqa": ("truthful_qa", "multiple_choice", ("validation",)),
    "bios-gender": ("LabHC/bias_in_bios", None, ("dev",)),
    "bios-profession": ("LabHC/bias_in_bios", None, ("dev",)),
    "bigbench-causal_judgement": ("tasksource/bigbench", "causal_judgment", ("validation", "train")),
    "bigbench-web_of_lies": ("lighteval/big_bench_hard", "web_of_lies", ("train",)),
    "bigbench-epistemic_reasoning": ("tasksource/bigbench", "epistemic_reasoning", ("validation", "train")),
    "bigbench-epistemic_reasoning_y": ("tasksource/bigbench", "epistemic_reasoning", ("validation", "train")),
}
COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"  # where LASER fetches it

# (where: for error messages, key: for item ids, record)
_Record = tuple[str, str, object]
_MISSING = object()


# ----------------------------------------------------------------------------------------------
# Reading public-format records


def _plain(value: object) -> object:
    """Parquet/Arrow values as JSON ones (numpy arrays -> lists, numpy scalars -> Python)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    return value


def _task_file(path: str | Path, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise LayerscopeError(f"{what} file {file} does not exist")
    return file


def _read_records(path: Path, what: str, fields: str) -> list[_Record]:
    """Records of a JSON-lines file, a file holding one JSON array, or a Parquet file."""
    expected = f"expected {what} records (JSON lines, one JSON array or Parquet) with {fields}"
    if path.suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # not Parquet, unreadable: user-facing
            raise LayerscopeError(f"{path}: not a readable Parquet file ({exc}); {expected}") from None
        return [(f"{path}: row {i + 1}", f"{path.name}#{i + 1}", _plain(rec))
                for i, rec in enumerate(frame.to_dict("records"))]
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except UnicodeDecodeError:
        raise LayerscopeError(f"{path}: not a text file; {expected}") from None
    if head.startswith("["):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise LayerscopeError(f"{path}:{exc.lineno}: not a JSON array ({exc.msg}); {expected}") from None
        if not isinstance(data, list):
            raise LayerscopeError(f"{path}: not a JSON array; {expected}")
        return [(f"{path}: record {i + 1}", f"{path.name}#{i + 1}", rec) for i, rec in enumerate(data)]
    try:
        rows = read_jsonl(path)
    except LayerscopeError as exc:
        raise LayerscopeError(f"{exc}; {expected}") from None
    except UnicodeDecodeError:
        raise LayerscopeError(f"{path}: not a text file; {expected}") from None
    return [(f"{path}:{lineno}", f"{path.name}:{lineno}", rec) for lineno, rec in rows]


def _get(rec: object, dotted: str) -> object:
    for part in dotted.split("."):
        if not isinstance(rec, dict) or part not in rec:
            return _MISSING
        rec = rec[part]
    return rec


def _refuse(where: str, what: str, fields: str, detail: str = "") -> LayerscopeError:
    return LayerscopeError(f"{where}: not a {what} record{detail}; expected {fields}")


def _text(rec: object, field: str, where: str, what: str, fields: str) -> str:
    value = _get(rec, field)
    if not isinstance(value, str):
        detail = f" (no {field!r})" if value is _MISSING else f" ({field!r} is {type(value).__name__}, not text)"
        raise _refuse(where, what, fields, detail)
    return value


def _nonempty(items: list[MCItem], source: str, what: str) -> list[MCItem]:
    if not items:
        raise LayerscopeError(f"{source}: no {what} items")
    return items


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


# ----------------------------------------------------------------------------------------------
# FEVER


def fever_prompt(claim: str) -> str:
    """LASER's FEVER prompt for one claim."""
    claim = claim.strip()
    if not (claim.endswith(".") or claim.endswith("?")):
        claim += "."
    return "Consider the following claim: " + claim + " Is this claim true or false. The claim is"


def fever_items(path: str | Path) -> list[MCItem]:
    """FEVER claims as two-choice items ("true", "false"), filtered as LASER does."""
    path = resolve_source(path, LASER_TASKS, "task", "FEVER file")
    labels: dict[str, set[str]] = {}
    ids: dict[str, str] = {}
    for lineno, rec in read_jsonl(path):
        if not isinstance(rec, dict) or "claim" not in rec or "label" not in rec:
            raise LayerscopeError(f"{path}:{lineno}: not a FEVER row; expected JSON objects with 'claim' and 'label'")
        claim, label = str(rec["claim"]), rec["label"]
        if isinstance(label, int) and not isinstance(label, bool):  # EleutherAI/fever v1.0: 0 REFUTES, 1 SUPPORTS
            label = {0: "REFUTES", 1: "SUPPORTS"}.get(label, label)
        labels.setdefault(claim, set()).add(label)
        ids.setdefault(claim, str(rec.get("id", f"{path.name}:{lineno}")))
    items = [MCItem(ids[claim], fever_prompt(claim), ("true", "false"), FEVER_LABELS[next(iter(found))])
             for claim, found in labels.items() if len(found) == 1 and next(iter(found)) in FEVER_LABELS]
    if not items:
        raise LayerscopeError(f"{path}: no FEVER claim with one SUPPORTS or REFUTES label")
    return items


# ----------------------------------------------------------------------------------------------
# CounterFact

COUNTERFACT_FIELDS = ("requested_rewrite.prompt, requested_rewrite.subject, requested_rewrite.target_true.str, "
                      "requested_rewrite.target_new.str, paraphrase_prompts (a list of texts)")


def _counterfact(records: list[_Record], source: str) -> list[MCItem]:
    what, fields = "CounterFact", COUNTERFACT_FIELDS
    items: list[MCItem] = []
    for where, key, rec in records:
        template = _text(rec, "requested_rewrite.prompt", where, what, fields)
        subject = _text(rec, "requested_rewrite.subject", where, what, fields)
        true = _text(rec, "requested_rewrite.target_true.str", where, what, fields)
        new = _text(rec, "requested_rewrite.target_new.str", where, what, fields)
        paraphrases = _get(rec, "paraphrase_prompts")
        if not isinstance(paraphrases, list) or not all(isinstance(p, str) for p in paraphrases):
            raise _refuse(where, what, fields, " (paraphrase_prompts is not a list of texts)")
        try:
            prompt = template.format(subject)
        except (IndexError, KeyError, ValueError) as exc:
            raise _refuse(where, what, fields, f" (the prompt {template!r} is not a template with one '{{}}': {exc})") from None
        if true == new:
            raise LayerscopeError(f"{where}: target_true and target_new are both {true!r}; nothing to tell apart")
        case = _get(rec, "case_id")
        base = str(case) if case is not _MISSING else key
        items.append(MCItem(f"{base}:prompt", prompt, (true, new), 0))
        items += [MCItem(f"{base}:paraphrase{k}", p, (true, new), 0) for k, p in enumerate(paraphrases)]
    return _nonempty(items, source, what)


def counterfact_items(path: str | Path) -> list[MCItem]:
    """CounterFact records (``counterfact.json``) as LASER's prompts: for each record the rewrite
    prompt with its subject, then its paraphrase prompts; choices (target_true, target_new), label 0."""
    file = _task_file(path, "CounterFact")
    return _counterfact(_read_records(file, "CounterFact", COUNTERFACT_FIELDS), str(file))


# ----------------------------------------------------------------------------------------------
# TruthfulQA (MC2, point-wise)

TRUTHFULQA_FIELDS = "question (text) and mc2_targets ({choices: [text], labels: [0/1]} or {answer: 0/1})"


def truthfulqa_prompt(question: str, answer: str) -> str:
    """LASER's point-wise TruthfulQA prompt (no space before "Is": its text verbatim)."""
    prompt = question + " " + answer
    if not prompt.endswith("."):
        prompt += "."
    return prompt + "Is this statement true or false? This statement is"


def _mc2_pairs(targets: object) -> list[tuple[str, object]] | None:
    if isinstance(targets, dict) and set(targets) == {"choices", "labels"}:
        choices, labels = targets["choices"], targets["labels"]
        if isinstance(choices, list) and isinstance(labels, list) and len(choices) == len(labels):
            return list(zip(choices, labels))
        return None
    if isinstance(targets, dict):  # the original mc_task.json: {answer: 0/1}
        return list(targets.items())
    return None


def _truthfulqa(records: list[_Record], source: str) -> list[MCItem]:
    what, fields = "TruthfulQA multiple-choice", TRUTHFULQA_FIELDS
    items: list[MCItem] = []
    for where, key, rec in records:
        question = _text(rec, "question", where, what, fields)
        pairs = _mc2_pairs(_get(rec, "mc2_targets"))
        if pairs is None or not pairs or not all(
                isinstance(a, str) and _int(lab) in (0, 1) for a, lab in pairs):
            raise _refuse(where, what, fields, " (mc2_targets missing or not answers with 0/1 labels)")
        if not any(lab == 1 for _, lab in pairs):
            raise LayerscopeError(f"{where}: no answer of mc2_targets is labelled 1 (true); LASER requires one")
        items += [MCItem(f"{key}:{j}", truthfulqa_prompt(question, answer), TRUE_FALSE, 0 if lab == 1 else 1)
                  for j, (answer, lab) in enumerate(pairs)]
    return _nonempty(items, source, what)


def truthfulqa_mc2_items(path: str | Path) -> list[MCItem]:
    """TruthfulQA ``mc2_targets`` point-wise as LASER: one ("true", "false") item per (question, answer)."""
    file = _task_file(path, "TruthfulQA")
    return _truthfulqa(_read_records(file, "TruthfulQA multiple-choice", TRUTHFULQA_FIELDS), str(file))


# ----------------------------------------------------------------------------------------------
# Bias in Bios

BIOS_FIELDS = "hard_text (text), gender (0 male, 1 female) and profession (0..27, LabHC/bias_in_bios)"


def _bios_text(text: str) -> str:
    text = text.strip()
    if not (text.endswith(".") or text.endswith("?")):
        text += "."
    return "Consider the following text: " + text


def bios_gender_prompt(text: str) -> str:
    """LASER's Bias-in-Bios gender prompt."""
    return _bios_text(text) + " Is the person in this text a male or female? The gender of this person is"


def bios_profession_prompt(text: str) -> str:
    """LASER's Bias-in-Bios profession prompt."""
    return _bios_text(text) + " What is the profession of the person in this text? The profession of this person is"


def _bios_gender(records: list[_Record], source: str) -> list[MCItem]:
    what, fields = "Bias in Bios", BIOS_FIELDS
    items = []
    for where, key, rec in records:
        text = _text(rec, "hard_text", where, what, fields)
        gender = _get(rec, "gender")
        if _int(gender) not in (0, 1):
            raise _refuse(where, what, fields, f" (gender {gender!r})" if gender is not _MISSING else " (no 'gender')")
        items.append(MCItem(key, bios_gender_prompt(text), BIOS_GENDERS, int(gender)))
    return _nonempty(items, source, "Bias in Bios gender")


def _bios_profession(records: list[_Record], source: str) -> list[MCItem]:
    what, fields = "Bias in Bios", BIOS_FIELDS
    items = []
    for where, key, rec in records:
        text = _text(rec, "hard_text", where, what, fields)
        profession = _get(rec, "profession")
        index = _int(profession)
        if index is not None and 0 <= index < len(BIOS_PROFESSIONS):
            name = BIOS_PROFESSIONS[index]
        elif isinstance(profession, str) and profession in BIOS_PROFESSIONS:
            name = profession
        else:
            raise _refuse(where, what, fields,
                          f" (profession {profession!r})" if profession is not _MISSING else " (no 'profession')")
        if name in BIOS_OCCUPATIONS:
            items.append(MCItem(key, bios_profession_prompt(text), BIOS_OCCUPATIONS, BIOS_OCCUPATIONS.index(name)))
    return _nonempty(items, source, f"Bias in Bios profession (one of {', '.join(BIOS_OCCUPATIONS)})")


def bios_gender_items(path: str | Path) -> list[MCItem]:
    """Bias-in-Bios records as LASER's gender items: choices ("male", "female"), every row kept."""
    file = _task_file(path, "Bias in Bios")
    return _bios_gender(_read_records(file, "Bias in Bios", BIOS_FIELDS), str(file))


def bios_profession_items(path: str | Path) -> list[MCItem]:
    """Bias-in-Bios records as LASER's profession items: rows of the 8 :data:`BIOS_OCCUPATIONS` only."""
    file = _task_file(path, "Bias in Bios")
    return _bios_profession(_read_records(file, "Bias in Bios", BIOS_FIELDS), str(file))


# ----------------------------------------------------------------------------------------------
# BigBench

BIGBENCH_FIELDS = "inputs (text) and targets (a list of one text) as tasksource/bigbench, or input and target as BBH"


def _bigbench_subtask(subtask: str) -> tuple[str, ...]:
    if subtask == "qa_wikidata":
        raise LayerscopeError("BigBench subtask 'qa_wikidata' has open answers (LASER generates and matches them), "
                              f"not a fixed set of choices; allowed are {allowed(BIGBENCH_SUBTASKS)}")
    if subtask not in BIGBENCH_SUBTASKS:
        raise LayerscopeError(f"unknown BigBench subtask {subtask!r}: allowed are {allowed(BIGBENCH_SUBTASKS)}")
    return BIGBENCH_SUBTASKS[subtask]


def _bigbench(records: list[_Record], source: str, subtask: str) -> list[MCItem]:
    choices = _bigbench_subtask(subtask)
    what, fields = f"BigBench {subtask}", BIGBENCH_FIELDS
    items = []
    for where, key, rec in records:
        if isinstance(rec, dict) and "inputs" in rec:
            prompt, targets = _text(rec, "inputs", where, what, fields), rec.get("targets")
            if not isinstance(targets, list) or len(targets) != 1 or not isinstance(targets[0], str):
                raise _refuse(where, what, fields, f" (targets {targets!r:.80} is not a list of one text)")
            target = targets[0]
        else:
            prompt, target = _text(rec, "input", where, what, fields), _text(rec, "target", where, what, fields)
        if subtask == "epistemic_reasoning_y":
            if not prompt.endswith("Relation:"):
                raise LayerscopeError(f"{where}: the input does not end in 'Relation:', which epistemic_reasoning_y replaces")
            prompt = prompt[: -len("Relation:")] + EPISTEMIC_Y_SUFFIX
            target = EPISTEMIC_Y_TARGETS.get(target, target)
        if target not in choices:
            raise LayerscopeError(f"{where}: target {target!r} is not one of {subtask}'s choices {allowed(choices)}")
        items.append(MCItem(key, prompt, choices, choices.index(target)))
    return _nonempty(items, source, what)


def bigbench_items(path: str | Path, subtask: str) -> list[MCItem]:
    """A BigBench subtask of :data:`BIGBENCH_SUBTASKS` as LASER reads it: the input verbatim (or
    epistemic_reasoning_y's rewrite), LASER's fixed choices, label = index of the one target."""
    _bigbench_subtask(subtask)
    file = _task_file(path, f"BigBench {subtask}")
    return _bigbench(_read_records(file, f"BigBench {subtask}", BIGBENCH_FIELDS), str(file), subtask)


# ----------------------------------------------------------------------------------------------
# Scoring helpers with LASER's defects fixed (see the module docstring)

_WORDS = re.compile(r"\w+|[^\w\s]")


def _bag(text: str) -> set[str]:
    return set(_WORDS.findall(text.strip().lower()))


def token_f1(generation: str, answer: str) -> tuple[float, float, float]:
    """``(f1, precision, recall)`` of the unique lower-cased words of ``generation`` (the new text
    only) against ``answer``, as LASER's ``f1pr_scores`` (which splits with ``nltk.word_tokenize``;
    here words and single punctuation marks) but with ``F1 = 2PR / (P + R)``, 0 when ``P + R = 0``."""
    gen, ans = _bag(generation), _bag(answer)
    common = len(gen & ans)
    precision = common / max(1, len(gen))
    recall = common / max(1, len(ans))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return f1, precision, recall


def answer_generated(generation: str, answer: str) -> bool:
    """Whether the answer (stripped, lower-cased) occurs in ``generation``, which must be the newly
    generated text only: LASER passes the prompt with it, so an answer in the prompt always counts."""
    return answer.strip().lower() in generation.strip().lower()


# ----------------------------------------------------------------------------------------------
# Task names


def _bigbench_builder(subtask: str) -> Callable[[str | Path], list[MCItem]]:
    return lambda path: bigbench_items(path, subtask)


#: Builders by task name; each takes a local file (``load_task("NAME:PATH")``).
BUILDERS: dict[str, Callable[[str | Path], list[MCItem]]] = {
    "fever": fever_items,
    "counterfact": counterfact_items,
    "truthfulqa": truthfulqa_mc2_items,
    "bios-gender": bios_gender_items,
    "bios-profession": bios_profession_items,
    **{f"bigbench-{s}": _bigbench_builder(s) for s in BIGBENCH_SUBTASKS},
}


def _from_records(name: str, records: list[_Record], source: str) -> list[MCItem]:
    if name == "truthfulqa":
        return _truthfulqa(records, source)
    if name == "bios-gender":
        return _bios_gender(records, source)
    if name == "bios-profession":
        return _bios_profession(records, source)
    return _bigbench(records, source, name[len("bigbench-"):])


def hub_items(name: str) -> list[MCItem]:
    """A task of :data:`HUB_SOURCES` loaded from the Hugging Face hub with ``datasets.load_dataset``
    (the ids and splits LASER uses); a LayerscopeError when ``datasets`` is missing or the load
    fails (offline, unknown data set)."""
    if name not in HUB_SOURCES:
        raise LayerscopeError(f"task {name!r} has no Hugging Face source: allowed are {allowed(HUB_SOURCES)}")
    dataset_id, config, splits = HUB_SOURCES[name]
    source = dataset_id + (f"/{config}" if config else "")
    try:
        import datasets  # noqa: PLC0415  (optional dependency)
    except ImportError:
        raise LayerscopeError(
            f"task {name!r} loads {source} from the Hugging Face hub, which needs the 'datasets' package "
            f"(pip install 'layerscope[datasets]'); or give a local file: {name}:PATH") from None
    records: list[_Record] = []
    for split in splits:
        try:
            rows = datasets.load_dataset(dataset_id, config, split=split)
        except Exception as exc:  # offline, unknown name or split: user-facing
            raise LayerscopeError(
                f"task {name!r}: could not load {source} (split {split}) from the Hugging Face hub "
                f"({type(exc).__name__}: {exc}); offline, give a local file: {name}:PATH") from None
        records += [(f"{source}[{split}] row {i}", f"{split}-{i}", _plain(dict(row))) for i, row in enumerate(rows)]
    return _from_records(name, records, source)


def _known() -> str:
    return allowed([*LASER_TASKS, *HUB_SOURCES, *(f"{n}:PATH" for n in BUILDERS), *MC_TASKS], limit=40)


def _task_items(spec: str | Path) -> list[MCItem]:
    if isinstance(spec, str):
        name, sep, rest = spec.partition(":")
        if sep and name in BUILDERS:
            if not rest:
                raise LayerscopeError(f"task {spec!r}: give a file after the colon, e.g. {name}:/data/{name}.jsonl")
            return BUILDERS[name](rest)
        if spec in LASER_TASKS:
            return fever_items(spec)
        if spec in HUB_SOURCES:
            return hub_items(spec)
        if spec == "counterfact":
            raise LayerscopeError(f"task 'counterfact' needs a local file: counterfact:PATH with ROME's "
                                  f"counterfact.json (LASER fetches {COUNTERFACT_URL})")
        if spec not in MC_TASKS and not Path(spec).expanduser().is_file():
            raise LayerscopeError(f"unknown task {spec!r}: allowed are {_known()} or a *.mc.jsonl file")
    return load_mc(spec)


def load_task(name_or_path: str | Path, limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """A task's items: ``"NAME:PATH"`` for a builder of :data:`BUILDERS` on a local file in its
    public format; a bare builder name (``fever`` from the shared folder, the :data:`HUB_SOURCES`
    names from the hub); an ``MC_TASKS`` name; or a ``*.mc.jsonl`` file (``{id, context, choices,
    label}`` rows; anything else is refused with the schema named). ``limit`` keeps that many items
    chosen with the seed, in task order."""
    items = _task_items(name_or_path)
    return [items[i] for i in pick(len(items), limit, seed, "samples")]
