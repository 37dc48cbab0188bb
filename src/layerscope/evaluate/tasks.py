"""Multiple-choice accuracy from the engine's per-sequence log-likelihoods."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.multiple_choice import MCItem, choice_lengths
from ..data.sequences import ScoredSequence
from ..errors import LayerscopeError
from .engine import SequenceScores


@dataclass
class MCResult:
    acc: float
    acc_norm: float
    n_items: int
    predictions: np.ndarray  # argmax of summed log-likelihood per item
    predictions_norm: np.ndarray  # argmax of log-likelihood per character of the continuation


def mc_from_scores(items: Sequence[MCItem], sequences: Sequence[ScoredSequence], scores: SequenceScores) -> MCResult:
    """``acc`` and ``acc_norm`` as lm-evaluation-harness defines them.

    acc: the choice with the largest summed log-likelihood of its continuation tokens is right.
    acc_norm: the same after dividing each log-likelihood by the continuation's length in
    characters (lm-eval's ``completion_len``, the length of ``" " + choice``).
    """
    if not items:
        raise LayerscopeError("empty multiple-choice set: nothing to evaluate")
    lengths = choice_lengths(items)
    loglik: dict[tuple[int, int], float] = {}
    for seq, value in zip(sequences, scores.logprob):
        loglik[(seq.group, seq.choice)] = float(value)
    preds, preds_norm, labels = [], [], []
    for g, item in enumerate(items):
        ll = np.array([loglik[(g, c)] for c in range(len(item.choices))])
        norm = ll / np.array([max(lengths[(g, c)], 1) for c in range(len(item.choices))], dtype=np.float64)
        preds.append(int(np.argmax(ll)))
        preds_norm.append(int(np.argmax(norm)))
        labels.append(item.label)
    preds_a, norm_a, labels_a = np.array(preds), np.array(preds_norm), np.array(labels)
    return MCResult(
        acc=float((preds_a == labels_a).mean()),
        acc_norm=float((norm_a == labels_a).mean()),
        n_items=len(items),
        predictions=preds_a,
        predictions_norm=norm_a,
    )

