"""Tasks for rank-reduction sweeps (LASER), in the one multiple-choice schema.

A task is a list of :class:`~layerscope.data.multiple_choice.MCItem`: any ``*.mc.jsonl`` file or
short name of :data:`~layerscope.data.multiple_choice.MC_TASKS`, or a task built here from a data
set's public format with the LASER paper's prompt (Sharma, Ash, Misra 2024; code
``pratyushasharma/laser``):

- ``fever``: FEVER 1.0 claims (``{claim, label}`` JSON lines; the shared folder holds ``paper_dev``).
  As LASER's ``dataset_utils/fever.py``: claims labelled NOT ENOUGH INFO are left out, a claim
  kept once, and only when all its rows carry the same label. As its ``intervention_*_fever.py``:
  the prompt is ``"Consider the following claim: " + claim.strip() + " Is this claim true or
  false. The claim is"`` (with ``"."`` added after a claim that does not end in ``.`` or ``?``),
  and the answer is the single token " true" (SUPPORTS) or " false" (REFUTES).
"""

from __future__ import annotations

from pathlib import Path

from layerscope.data.corpus import pick, read_jsonl, resolve_source
from layerscope.data.multiple_choice import MC_TASKS, MCItem, load_mc
from layerscope.errors import LayerscopeError, allowed

#: Task builders' short names -> path relative to the shared data folder.
LASER_TASKS: dict[str, str] = {"fever": "fever/paper_dev.jsonl"}

FEVER_LABELS = {"SUPPORTS": 0, "REFUTES": 1}  # index into the choices ("true", "false")


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


def load_task(name_or_path: str | Path, limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """A task's items: a builder's name (:data:`LASER_TASKS`), an ``MC_TASKS`` name, or a
    ``*.mc.jsonl`` file (``{id, context, choices, label}`` rows; anything else is refused with the
    schema named). ``limit`` keeps that many items chosen with the seed, in task order."""
    if name_or_path == "fever":
        items = fever_items(name_or_path)
    elif isinstance(name_or_path, str) and name_or_path not in MC_TASKS and not Path(name_or_path).expanduser().is_file():
        known = allowed(list(LASER_TASKS) + list(MC_TASKS))
        raise LayerscopeError(f"unknown task {name_or_path!r}: allowed are {known} or a *.mc.jsonl file")
    else:
        items = load_mc(name_or_path)
    return [items[i] for i in pick(len(items), limit, seed, "samples")]
