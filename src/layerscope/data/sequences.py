"""The one thing every data source becomes: token sequences with a mask of the positions scored.

Every evaluation (perplexity, instruction loss, multiple choice) reduces to summing the
log-likelihood of some tokens of some sequences. A :class:`ScoredSequence` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ScoredSequence:
    """Token ids and, per position, whether that token's log-likelihood counts.

    ``target_mask[t]`` is True when token ``t`` is predicted from tokens ``< t`` and scored;
    ``target_mask[0]`` is always False (nothing predicts the first token).
    ``group`` ties sequences together (the example or multiple-choice item they come from),
    ``choice`` numbers the choices of a multiple-choice item (-1 elsewhere).
    """

    input_ids: tuple[int, ...]
    target_mask: tuple[bool, ...]
    group: int = -1
    choice: int = -1

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.target_mask):
            raise ValueError("input_ids and target_mask differ in length")
        if self.target_mask and self.target_mask[0]:
            raise ValueError("target_mask[0] must be False: no token predicts the first one")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        return sum(self.target_mask)


@dataclass
class Batch:
    """Right-padded tensors for a group of sequences of similar length.

    ``index`` holds each row's position in the list the batches were made from, so results can
    be put back in the original order.
    """

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 for real tokens
    target_mask: torch.Tensor  # (B, T) bool
    index: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.target_mask.to(device),
            list(self.index),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def sequences_fingerprint(sequences: "list[ScoredSequence]") -> str:
    """Hash of the exact tokens and masks scored: a changed data file gives a new run id."""
    import hashlib

    digest = hashlib.sha256()
    for seq in sequences:
        digest.update(repr((seq.input_ids, seq.target_mask, seq.group, seq.choice)).encode())
    return digest.hexdigest()[:16]
