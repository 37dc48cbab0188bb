"""Instruction data, prompt templates, and response-only scored sequences.

Files read by :func:`load_instructions` (the format is recognised from the record keys):

* Dolly jsonl: ``{instruction, context, response}``;
* Alpaca json (an array) or jsonl: ``{instruction, input, output}``;
* the critical-layers evaluation output ``prune_16.jsonl``: ``{Instrunction (sic), groundtruth}``
  where the instruction is the decoded Llama-2 prompt of that repository's Dolly dataset
  (``<s> [INST] <<SYS>> ... ### Instruction:\\n {instruction} \\n \\n[Input: \\n{context} \\n \\n]
  ### Response: [/INST]``) and the ground truth ends in ``" </s>"``; both are unwrapped back into
  instruction, input and response. Its two plain-text trailer lines (``Total loss: ...``,
  ``Average loss: ...``) are skipped.

Templates (:data:`TEMPLATES`, used by :func:`render`):

* ``"dolly"``: exactly the prompt and target the Data-Oblivious-Critical-Layers code trains and
  evaluates with (``llama2/ft_datasets/dolly_dataset.py``): the Llama-2 ``[INST]`` wrapper around a
  ``<<SYS>>`` system block, an ``Input:`` section (without ``###``) only when there is a context,
  and the target ``" " + response + " "`` followed by EOS::

      [INST] <<SYS>>
      Below is an instruction that describes a task. Write a response that appropriately completes the request.
      <</SYS>>

      ### Instruction:
       {instruction} \n \n[Input: \n{input} \n \n]### Response: [/INST]

  (``\n`` above is a newline: the spaces around the newlines are the original code's). Rendering
  the 300 examples parsed back out of ``prune_16.jsonl`` reproduces its stored prompts byte for
  byte (after the decoded ``"<s> "``).
* ``"dolly-plain"``: the same layout without the Llama-2 wrapper and the stray spaces: the header
  line, a blank line, ``### Instruction:\n{instruction}\n\n[Input:\n{input}\n\n]### Response:\n``;
  the target is the bare response;
* ``"alpaca"``: the Stanford Alpaca prompt (``### Input:``, "paired with an input" header when
  there is an input);
* ``"chat"``: the tokenizer's chat template with one user message (instruction, then a blank line
  and the input when there is one) and ``add_generation_prompt=True``.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layerscope.data.corpus import adds_bos, encode, pick, read_jsonl, resolve_source
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError, allowed

#: Short names -> path relative to the shared data folder.
INSTRUCTION_SETS: dict[str, str] = {
    "dolly": "dolly/databricks-dolly-15k-safety-only.jsonl",
    "dolly-safety": "dolly/databricks-dolly-15k-safety-only.jsonl",
    "alpaca": "alpaca/alpaca_5000.json",
    "prune_16": "critical-layers/prune_16.jsonl",
    "critical-layers": "critical-layers/prune_16.jsonl",
}

TEMPLATES: frozenset[str] = frozenset({"dolly", "dolly-plain", "alpaca", "chat"})

_NO_INPUT_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
_INPUT_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)

_PAPER_SYSTEM = (
    "<<SYS>>\nBelow is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n<</SYS>>\n\n"
)
PAPER_DOLLY_PROMPT = _PAPER_SYSTEM + "### Instruction:\n {instruction} \n \n### Response:\n"
PAPER_DOLLY_PROMPT_INPUT = _PAPER_SYSTEM + "### Instruction:\n {instruction} \n \nInput: \n{input} \n \n### Response:\n"
DOLLY_PROMPT = _NO_INPUT_HEADER + "### Instruction:\n{instruction}\n\n### Response:\n"
DOLLY_PROMPT_INPUT = _NO_INPUT_HEADER + "### Instruction:\n{instruction}\n\nInput:\n{input}\n\n### Response:\n"
ALPACA_PROMPT = _NO_INPUT_HEADER + "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = _INPUT_HEADER + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

_TRAILER = re.compile(r"^\s*(Total|Average) loss:")
_LLAMA2_DOLLY = re.compile(
    r"^(?:<s>)?\s*\[INST\].*?### Instruction:\n ?(?P<instruction>.*?)"
    r"(?: \n \nInput: \n(?P<input>.*?))? \n \n### Response:(?:\n)? ?\[/INST\]\s*$",
    re.DOTALL,
)


@dataclass(frozen=True)
class InstructionExample:
    """One instruction, its optional input (Dolly's "context"), and the reference response."""

    instruction: str
    input: str = ""
    response: str = ""


# ----------------------------------------------------------------------------------------------
# Loading


def _from_record(rec: object, where: str) -> InstructionExample:
    if not isinstance(rec, dict):
        raise LayerscopeError(f"{where}: expected a JSON object, got {type(rec).__name__}")

    def text(key: str) -> str:
        value = rec.get(key, "")
        if value is None:
            return ""
        if not isinstance(value, str):
            raise LayerscopeError(f"{where}: field {key!r} is {type(value).__name__}, not text")
        return value

    if "Instrunction" in rec or "Instruction" in rec:  # critical-layers prune_*.jsonl
        prompt = text("Instrunction") or text("Instruction")
        m = _LLAMA2_DOLLY.match(prompt)
        if m is None:
            raise LayerscopeError(f"{where}: cannot find '### Instruction:' ... '[/INST]' in {prompt[:80]!r}")
        response = text("groundtruth")
        if response.endswith("</s>"):
            response = response[: -len("</s>")]
        return InstructionExample(m["instruction"].strip(), (m["input"] or "").strip(), response.strip())
    if "instruction" not in rec:
        raise LayerscopeError(
            f"{where}: no 'instruction' field; the record has {allowed(sorted(rec))} "
            "(expected Dolly {instruction, context, response}, Alpaca {instruction, input, output} "
            "or critical-layers {Instrunction, groundtruth})"
        )
    inp = text("context") if "context" in rec else text("input")
    if "response" in rec:
        response = text("response")
    elif "output" in rec:
        response = text("output")
    else:
        raise LayerscopeError(f"{where}: no 'response' or 'output' field; the record has {allowed(sorted(rec))}")
    return InstructionExample(text("instruction"), inp, response)


def load_instructions(
    path_or_name: str | Path, limit: int | None = None, seed: int = 0
) -> list[InstructionExample]:
    """Instruction examples from a file or a short name (:data:`INSTRUCTION_SETS`).

    ``limit`` keeps that many examples, chosen with ``random.Random(seed).sample`` and kept in
    file order (all when the file has no more).
    """
    path = resolve_source(path_or_name, INSTRUCTION_SETS, "instruction set", "instruction file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = [(f"{path}:{lineno}", rec) for lineno, rec in read_jsonl(path, skip=_TRAILER)]
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LayerscopeError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise LayerscopeError(f"{path}: expected a JSON array of instruction records")
        records = [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]
    else:
        raise LayerscopeError(f"{path}: unsupported instruction file type {suffix!r}; allowed: .jsonl, .json")
    examples = [_from_record(rec, where) for where, rec in records]
    if not examples:
        raise LayerscopeError(f"empty data set: no instruction records in {path}")
    return [examples[i] for i in pick(len(examples), limit, seed)]


# ----------------------------------------------------------------------------------------------
# Templates


def render(example: InstructionExample, template: str, tokenizer=None) -> tuple[str, str]:
    """``(prompt, response)`` texts of an example under a template (see the module docstring).

    The tokenizer is needed only for ``"chat"``.
    """
    if template not in TEMPLATES:
        raise LayerscopeError(f"unknown prompt template {template!r}; allowed: {allowed(sorted(TEMPLATES))}")
    fields = {"instruction": example.instruction, "input": example.input}
    if template == "dolly":
        body = (PAPER_DOLLY_PROMPT_INPUT if example.input else PAPER_DOLLY_PROMPT).format_map(fields)
        return "[INST] " + body.strip() + " [/INST]", " " + example.response + " "
    if template == "dolly-plain":
        prompt = (DOLLY_PROMPT_INPUT if example.input else DOLLY_PROMPT).format_map(fields)
    elif template == "alpaca":
        prompt = (ALPACA_PROMPT_INPUT if example.input else ALPACA_PROMPT).format_map(fields)
    else:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LayerscopeError(
                "template 'chat' needs a tokenizer with a chat template; this tokenizer has none "
                f"(use one of {allowed(sorted(TEMPLATES - {'chat'}))})"
            )
        user = example.instruction + ("\n\n" + example.input if example.input else "")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return prompt, example.response


# ----------------------------------------------------------------------------------------------
# Token sequences


def instruction_sequences(
    tokenizer,
    examples: Sequence[InstructionExample],
    template: str,
    max_len: int = 512,
    add_bos: bool | None = None,
) -> list[ScoredSequence]:
    """Prompt + response + EOS token sequences scored on the response and the EOS only.

    ``input_ids = [BOS] + encode(prompt) + encode(response) + [EOS]``. Prompt and response are
    tokenised separately (no special tokens added) and concatenated, so the boundary between
    unscored and scored tokens is exact: no token straddles it, whatever the tokenizer's merges.
    (A SentencePiece tokenizer that adds a word-start marker to every text therefore starts the
    response with one, as training code that tokenises the parts separately also does.)
    BOS is added when ``add_bos`` is True, or, when it is None, when the tokenizer adds BOS by
    itself (:func:`adds_bos`); never twice (a chat template that writes BOS already has it).
    EOS is appended when the tokenizer has one. Sequences are cut on the right to ``max_len``
    tokens; an example left with no response token after the cut is dropped with a warning.
    ``group`` is the example's position in ``examples``.
    """
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise LayerscopeError(f"max_len must be an integer >= 2, got {max_len!r}")
    if template not in TEMPLATES:
        raise LayerscopeError(f"unknown prompt template {template!r}; allowed: {allowed(sorted(TEMPLATES))}")
    if not examples:
        raise LayerscopeError("empty data set: no instruction examples")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    want_bos = adds_bos(tokenizer) if add_bos is None else bool(add_bos)
    if want_bos and bos is None:
        raise LayerscopeError("add_bos=True but the tokenizer has no BOS token")
    out: list[ScoredSequence] = []
    dropped = 0
    for i, example in enumerate(examples):
        prompt, response = render(example, template, tokenizer)
        prompt_ids = encode(tokenizer, prompt)
        if want_bos and (not prompt_ids or prompt_ids[0] != bos):
            prompt_ids = [int(bos)] + prompt_ids
        target_ids = encode(tokenizer, response) + ([int(eos)] if eos is not None else [])
        if not prompt_ids:  # nothing to predict the first response token from
            prefix = bos if bos is not None else eos
            if prefix is None:
                raise LayerscopeError(f"example {i}: empty prompt and the tokenizer has neither BOS nor EOS")
            prompt_ids = [int(prefix)]
        ids = (prompt_ids + target_ids)[:max_len]
        mask = ([False] * len(prompt_ids) + [True] * len(target_ids))[:max_len]
        if not any(mask):
            dropped += 1
            continue
        out.append(ScoredSequence(tuple(ids), tuple(mask), group=i))
    if dropped:
        warnings.warn(
            f"{dropped} of {len(examples)} examples have prompts of {max_len} tokens or more and no response "
            f"token left after cutting to max_len={max_len}; they are left out",
            stacklevel=2,
        )
    if not out:
        raise LayerscopeError(f"empty data set: every prompt is at least max_len={max_len} tokens long")
    return out
