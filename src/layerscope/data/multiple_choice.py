"""Multiple-choice tasks in one schema, scored by log-likelihood as lm-evaluation-harness does.

Every task is a JSONL file of ``{"id": str, "context": str, "choices": [str, ...], "label": int}``
(label = 0-based index of the right choice). The shared data folder holds the converted
``*.mc.jsonl`` files of :data:`MC_TASKS`.

A choice is scored as the continuation ``" " + choice`` of the context: the sum of the
log-likelihoods of its tokens given the context. Accuracy picks the choice with the highest sum;
length-normalised accuracy (``acc_norm``) divides by :func:`choice_lengths` first. Both are
computed by the evaluation layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from layerscope.data.corpus import adds_bos, encode, pick, read_jsonl, resolve_source
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError, allowed

#: Short task names -> path relative to the shared data folder.
MC_TASKS: dict[str, str] = {
    "piqa": "piqa/valid.mc.jsonl",
    "arc-easy": "arc/ARC-Easy-Test.mc.jsonl",
    "arc-challenge": "arc/ARC-Challenge-Test.mc.jsonl",
    "boolq": "boolq/boolq.mc.jsonl",
    "hellaswag": "hellaswag/hellaswag_val_full.mc.jsonl",
    "winogrande": "winogrande/dev.mc.jsonl",
    "openbookqa": "openbookqa/openbook_qa.mc.jsonl",
    "copa": "copa/copa.mc.jsonl",
}

#: What goes between the context and a choice (lm-evaluation-harness ``target_delimiter``).
DELIMITER = " "


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question: the context, its choices, and the index of the right one."""

    id: str
    context: str
    choices: tuple[str, ...]
    label: int


def _item(rec: object, where: str) -> MCItem:
    if not isinstance(rec, dict):
        raise LayerscopeError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("context", "choices", "label") if k not in rec]
    if missing:
        raise LayerscopeError(
            f"{where}: missing field(s) {allowed(missing)}; a multiple-choice row is "
            '{"id", "context", "choices", "label"}'
        )
    context, choices, label = rec["context"], rec["choices"], rec["label"]
    if not isinstance(context, str):
        raise LayerscopeError(f"{where}: context is {type(context).__name__}, not text")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise LayerscopeError(f"{where}: choices must be a list of texts, got {choices!r:.80}")
    if len(choices) < 2:
        raise LayerscopeError(f"{where}: {len(choices)} choice(s); a multiple-choice item needs at least 2")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise LayerscopeError(f"{where}: label {label!r} is out of range; allowed 0..{len(choices) - 1}")
    return MCItem(str(rec.get("id", where)), context, tuple(choices), label)


def load_mc(path_or_name: str | Path, limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """Multiple-choice items from a JSONL file or a short task name (:data:`MC_TASKS`).

    Every row is validated (at least 2 choices, label in range); errors name the file and line.
    ``limit`` keeps that many items, chosen with ``random.Random(seed).sample`` and kept in file
    order (all when the file has no more).
    """
    path = resolve_source(path_or_name, MC_TASKS, "multiple-choice task", "multiple-choice file")
    items = [_item(rec, f"{path}:{lineno}") for lineno, rec in read_jsonl(path)]
    if not items:
        raise LayerscopeError(f"empty data set: no multiple-choice rows in {path}")
    return [items[i] for i in pick(len(items), limit, seed)]


def split_context(context: str, choice: str) -> tuple[str, str]:
    """``(context, continuation)`` strings as lm-evaluation-harness forms them.

    The continuation is ``" " + choice``; trailing whitespace of the context moves to the front
    of the continuation, so the context never ends in whitespace.
    """
    continuation = DELIMITER + choice
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    return context, continuation


def mc_sequences(tokenizer, items: Sequence[MCItem], add_bos: bool | None = None) -> list[ScoredSequence]:
    """One scored sequence per (item, choice): context tokens then the choice's tokens, scored.

    As in lm-evaluation-harness: ``whole = encode(context + continuation)``,
    ``context_enc = encode(context)`` and the sequence is ``context_enc + whole[len(context_enc):]``:
    the continuation tokens are those of the joint text (a merge across the boundary counts to the
    choice) and the context tokens those of the context alone.
    ``target_mask`` is True on the continuation tokens only. ``group`` is the item's position,
    ``choice`` the choice's index.

    BOS is put in front when ``add_bos`` is True, or, when it is None, when the tokenizer adds BOS
    by itself (Llama, Gemma; not GPT-2 or SmolLM2). When the context is empty and no BOS was
    added, the first continuation token would have nothing to be predicted from, so BOS (or EOS
    when the tokenizer has no BOS, as lm-evaluation-harness uses its end-of-text token) is put in
    front; the continuation is then ``encode(continuation)``.
    """
    if not items:
        raise LayerscopeError("empty data set: no multiple-choice items")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    want_bos = adds_bos(tokenizer) if add_bos is None else bool(add_bos)
    if want_bos and bos is None:
        raise LayerscopeError("add_bos=True but the tokenizer has no BOS token")
    out: list[ScoredSequence] = []
    for g, item in enumerate(items):
        for c, choice in enumerate(item.choices):
            context, continuation = split_context(item.context, choice)
            if context:
                whole = encode(tokenizer, context + continuation)
                context_enc = encode(tokenizer, context)
                cont_enc = whole[len(context_enc) :]
            else:
                context_enc, cont_enc = [], encode(tokenizer, continuation)
            if want_bos:
                context_enc = [int(bos)] + context_enc
            elif not context_enc:
                prefix = bos if bos is not None else eos
                if prefix is None:
                    raise LayerscopeError(
                        f"item {item.id!r}: empty context and the tokenizer has neither BOS nor EOS to start from"
                    )
                context_enc = [int(prefix)]
            if not cont_enc:
                raise LayerscopeError(f"item {item.id!r} choice {c}: the choice {choice!r} gives no token to score")
            ids = tuple(context_enc + cont_enc)
            mask = (False,) * len(context_enc) + (True,) * len(cont_enc)
            out.append(ScoredSequence(ids, mask, group=g, choice=c))
    return out


def choice_lengths(items: Sequence[MCItem]) -> dict[tuple[int, int], int]:
    """Length in characters of each choice's continuation ``" " + choice``, keyed (group, choice).

    This is lm-evaluation-harness's ``acc_norm`` denominator (delimiter plus choice; whitespace
    moved over from the context is not counted).
    """
    return {(g, c): len(DELIMITER + choice) for g, item in enumerate(items) for c, choice in enumerate(item.choices)}
