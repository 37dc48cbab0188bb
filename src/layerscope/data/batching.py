"""Length-sorted, right-padded batches of scored sequences.

Sorting by length (longest first) keeps padding small and puts the largest batch first, so a run
that does not fit in memory fails at once rather than at the end. ``Batch.index`` maps each row
back to its position in the input list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from layerscope.data.sequences import Batch, ScoredSequence
from layerscope.errors import LayerscopeError


def _positive(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LayerscopeError(f"{name} must be a positive integer, got {value!r}")
    return value


def make_batches(
    seqs: Sequence[ScoredSequence],
    batch_size: int | None = None,
    max_tokens: int | None = None,
    pad_id: int | None = 0,
) -> list[Batch]:
    """Group sequences into right-padded batches, longest first.

    Sequences are ordered by length, descending; ties keep their input order. Batches are then
    filled greedily in that order with at most ``batch_size`` rows and, when ``max_tokens`` is
    given, at most ``max_tokens`` padded tokens (rows x longest length). Give either limit or
    both. Padding positions get ``pad_id`` (0 when None), attention 0 and no target. The result depends only on
    the input.
    """
    if not seqs:
        raise LayerscopeError("empty data set: there are no sequences to batch")
    if batch_size is None and max_tokens is None:
        raise LayerscopeError("give batch_size or max_tokens (or both) to make batches; both are None")
    if batch_size is not None:
        _positive(batch_size, "batch_size")
    if max_tokens is not None:
        _positive(max_tokens, "max_tokens")
    if pad_id is None:  # e.g. GPT-2's tokenizer.pad_token_id; padded positions are masked anyway
        pad_id = 0
    if not isinstance(pad_id, int) or isinstance(pad_id, bool):
        raise LayerscopeError(f"pad_id must be an integer token id, got {pad_id!r}")
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    for i in order[-1:]:
        if len(seqs[i]) == 0:
            raise LayerscopeError(f"sequence {i} is empty; every sequence needs at least one token")
    longest = len(seqs[order[0]])
    if max_tokens is not None and longest > max_tokens:
        raise LayerscopeError(
            f"max_tokens={max_tokens} is smaller than the longest sequence ({longest} tokens, "
            f"sequence {order[0]}); allowed: max_tokens >= {longest}"
        )

    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(seqs[current[0]]) if current else len(seqs[i])  # the first row is the longest
        rows = len(current) + 1
        fits = (batch_size is None or rows <= batch_size) and (max_tokens is None or rows * width <= max_tokens)
        if current and not fits:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)

    return [pad_batch(seqs, group, pad_id) for group in groups]


def pad_batch(seqs: Sequence[ScoredSequence], index: Sequence[int], pad_id: int) -> Batch:
    """Right-pad the sequences at ``index`` into one :class:`Batch` (rows in the given order)."""
    width = max(len(seqs[i]) for i in index)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(index), width), dtype=torch.long)
    target = torch.zeros((len(index), width), dtype=torch.bool)
    for row, i in enumerate(index):
        seq = seqs[i]
        n = len(seq)
        ids[row, :n] = torch.tensor(seq.input_ids, dtype=torch.long)
        attn[row, :n] = 1
        target[row, :n] = torch.tensor(seq.target_mask, dtype=torch.bool)
    return Batch(ids, attn, target, list(index))
