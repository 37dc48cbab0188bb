"""Helpers shared by the API's jobs: padding id, argument checks, building the evaluation sequences."""

from __future__ import annotations

from pathlib import Path

from ..data import instruction_sequences, lm_sequences, load_instructions, load_texts
from ..errors import LayerscopeError


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise LayerscopeError(f"{name} {value} is out of range: must be at least {minimum}")


def build_sequences(tokenizer, *, data, instructions, template, samples, seq_len, seed, max_len=1024):
    """Instruction sequences (response-only loss) when ``instructions`` is given, else corpus windows."""
    if instructions:
        examples = load_instructions(instructions, limit=samples, seed=seed)
        return instruction_sequences(tokenizer, examples, template, max_len=max_len)
    return lm_sequences(tokenizer, load_texts(data), seq_len=seq_len, samples=samples or 16, seed=seed)


def is_instruction_source(source: str) -> bool:
    """An instruction-set short name, or a .json/.jsonl file whose first record has an instruction."""
    from ..data import INSTRUCTION_SETS

    if source in INSTRUCTION_SETS:
        return True
    path = Path(source)
    if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file():
        return False
    with path.open(encoding="utf-8") as handle:
        head = handle.read(4096)
    return '"instruction"' in head or '"Instrunction"' in head


def source_label(source: str) -> str:
    from ..data.corpus import looks_like_path

    return Path(source).stem if looks_like_path(source) else source
