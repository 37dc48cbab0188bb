"""Representation dynamics: the layer-by-layer CKA matrix of one model (or between two models)
and the critical-layers paper's representation term.

delta(l) = the mean of column l of the CKA matrix over rows l - w//2 .. l + w//2 (clipped to the
valid layers, diagonal included). A small delta means layer l's representation differs from its
neighbours': a large representation shift. The layers with the smallest delta are reported as the
shift (change-point) layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..capture import capture_block_outputs
from ..data.sequences import ScoredSequence
from ..errors import LayerscopeError
from ..metrics import cka_matrix, representation_shift
from ..metrics.change_points import change_points
from ..models.architecture import architecture


@dataclass
class CKAResult:
    """A CKA matrix (rows: layers of the first model; columns: of the second, or the same) and,
    for one model, the representation term per layer."""

    matrix: np.ndarray
    labels: list[str]
    other_labels: list[str]
    shift: np.ndarray | None = None
    window: int = 3
    config: dict = field(default_factory=dict)

    def shift_layers(self, top: int = 3) -> list[int]:
        """The layers with the largest representation shift (smallest delta)."""
        if self.shift is None:
            return []
        return [int(i) for i in np.argsort(self.shift, kind="stable")[:top]]

    def consecutive(self) -> np.ndarray:
        """CKA of each block with the next one (NaN for the last)."""
        body = self.matrix[-len(self.shift):, -len(self.shift):] if self.shift is not None else self.matrix
        return np.append(np.diag(body, k=1), np.nan)

    def change_points(self) -> list[int]:
        """First layers of the diagonal blocks of the CKA matrix: the exact least-squares
        segmentation of its rows (each layer's similarity profile to the other layers; the diagonal
        is left out) with a BIC-style penalty, see
        ``layerscope.metrics.change_points``."""
        if self.shift is None or len(self.shift) < 3:
            return []
        n = len(self.shift)
        rows = np.array(self.matrix[-n:, -n:], dtype=np.float64)
        np.fill_diagonal(rows, np.nan)  # CKA of a layer with itself is 1 whatever the blocks: left out
        return change_points(rows)

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: its delta (one model) or its CKA with the same layer of the other model."""
        if self.shift is not None:
            points = set(self.change_points())
            return pd.DataFrame({"layer": list(range(len(self.shift))), "delta": self.shift,
                                 "cka_next": self.consecutive(),
                                 "change_point": [i in points for i in range(len(self.shift))]})
        n = min(len(self.labels), len(self.other_labels))
        return pd.DataFrame({"layer": self.labels[:n], "cka_same_layer": np.diag(self.matrix)[:n]})

    def matrix_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.matrix, index=self.labels, columns=self.other_labels)

    def save(self, folder) -> list[Path]:
        """``cka.csv`` (the matrix, header row of layer labels), ``results.csv/.parquet``, figures."""
        from ..report.figures import bar_chart, heatmap

        cka_path = folder.path("cka.csv")
        self.matrix_frame().to_csv(cka_path, index_label="layer")
        paths = [cka_path, *folder.write_table(self.to_frame())]
        paths.append(heatmap(self.matrix, folder.path("cka.png"), title="CKA between layers",
                             xlabel="layer" if self.shift is not None else "layer (second model)",
                             ylabel="layer", xticklabels=self.other_labels, yticklabels=self.labels,
                             vmin=0.0, vmax=1.0, colorbar_label="CKA"))
        if self.shift is not None:
            paths.append(bar_chart(list(range(len(self.shift))), self.shift.tolist(), folder.path("delta.png"),
                                   title=f"Representation term delta (w={self.window}); lowest = largest shift",
                                   xlabel="layer", ylabel="mean CKA with neighbours", highlight_top=3,
                                   highlight_lowest=True))
        return paths


def token_cka_matrix(
    model,
    sequences: list[ScoredSequence],
    *,
    other=None,
    kernel: str = "linear",
    include_embeddings: bool = False,
    pad_id: int = 0,
    other_pad_id: int = 0,
    chunk: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """CKA over every real token (padding masked), streamed: each batch's tokens are shuffled
    (seeded) into chunks of ``chunk`` tokens, and the unbiased HSIC of every layer pair is
    accumulated over the chunks (:class:`~layerscope.metrics.MinibatchCKA`), so memory holds one
    batch, whatever the number of tokens. A last chunk of fewer than 4 tokens is left out. With
    ``other``, both models see the same token sequences (they must share a tokenizer)."""
    from itertools import repeat

    from ..capture import iter_block_outputs
    from ..metrics import MinibatchCKA

    if chunk < 4:
        raise LayerscopeError(f"chunk {chunk} must be at least 4 tokens (the unbiased HSIC needs 4)")
    if other is model:  # one model against itself: the same matrix (its hooks must not be set twice)
        other = None
    layers_x = architecture(model).num_layers + int(include_embeddings)
    layers_y = architecture(other).num_layers + int(include_embeddings) if other is not None else None
    acc = MinibatchCKA(layers_x, layers_y, kernel=kernel)
    mine = iter_block_outputs(model, sequences, pooling="tokens", include_embeddings=include_embeddings, pad_id=pad_id)
    theirs = (iter_block_outputs(other, sequences, pooling="tokens", include_embeddings=include_embeddings,
                                 pad_id=other_pad_id) if other is not None else repeat((None, None)))
    generator = torch.Generator().manual_seed(seed)
    for (_, acts), (_, other_acts) in zip(mine, theirs):
        order = torch.randperm(acts[0].shape[0], generator=generator).to(acts[0].device)
        for lo in range(0, len(order), chunk):
            pick = order[lo : lo + chunk]
            if len(pick) < 4:
                break
            acc.update([a[pick] for a in acts], [a[pick] for a in other_acts] if other_acts is not None else None)
    if acc.num_batches == 0:
        raise LayerscopeError("too few tokens for token-level CKA: need at least 4 real tokens")
    return acc.compute()


def run_cka(
    model,
    sequences: list[ScoredSequence],
    *,
    other=None,
    other_sequences: list[ScoredSequence] | None = None,
    pooling: str = "last_prompt",
    kernel: str = "linear",
    unbiased: bool = False,
    include_embeddings: bool = False,
    window: int = 3,
    pad_id: int = 0,
    other_pad_id: int = 0,
) -> CKAResult:
    """Capture every block's pooled output and compute the CKA matrix (and delta for one model).

    ``pooling="tokens"`` compares every real token instead of one vector per example, streamed
    through :func:`token_cka_matrix` (always the unbiased mini-batch estimator)."""
    if window < 1 or window % 2 == 0:
        raise LayerscopeError(f"window {window} must be a positive odd number (the paper uses 3 and 5)")
    if pooling == "tokens":
        n_layers = architecture(model).num_layers
        labels = (["emb"] if include_embeddings else []) + [str(i) for i in range(n_layers)]
        if other is not None:
            if other_sequences is not None and [s.input_ids for s in other_sequences] != [s.input_ids for s in sequences]:
                raise LayerscopeError("token-level CKA between two models needs the same token sequences: "
                                      "the two tokenizers differ; use --pooling last_prompt or mean")
            matrix = token_cka_matrix(model, sequences, other=other, kernel=kernel, include_embeddings=include_embeddings,
                                      pad_id=pad_id, other_pad_id=other_pad_id)
            other_layers = architecture(other).num_layers
            other_labels = (["emb"] if include_embeddings else []) + [str(i) for i in range(other_layers)]
            return CKAResult(matrix, labels, other_labels, shift=None, window=window)
        matrix = token_cka_matrix(model, sequences, kernel=kernel, include_embeddings=include_embeddings, pad_id=pad_id)
        body = slice(int(include_embeddings), None)
        return CKAResult(matrix, labels, labels, shift=representation_shift(matrix[body, body], w=window), window=window)
    acts = capture_block_outputs(model, sequences, pooling=pooling, include_embeddings=include_embeddings, pad_id=pad_id)
    labels = (["emb"] if include_embeddings else []) + [str(i) for i in range(len(acts) - int(include_embeddings))]
    if other is None:
        matrix = cka_matrix(acts, kernel=kernel, unbiased=unbiased)
        body = slice(int(include_embeddings), None)  # delta over the blocks, as the paper's code
        shift = representation_shift(matrix[body, body], w=window)
        return CKAResult(matrix, labels, labels, shift=shift, window=window)
    other_seqs = other_sequences if other_sequences is not None else sequences
    if len(other_seqs) != len(sequences):
        raise LayerscopeError(f"the two models saw {len(sequences)} and {len(other_seqs)} examples; CKA needs the same examples")
    other_acts = capture_block_outputs(other, other_seqs, pooling=pooling, include_embeddings=include_embeddings, pad_id=other_pad_id)
    other_labels = (["emb"] if include_embeddings else []) + [str(i) for i in range(len(other_acts) - int(include_embeddings))]
    matrix = cka_matrix(acts, other_acts, kernel=kernel, unbiased=unbiased)
    return CKAResult(matrix, labels, other_labels, shift=None, window=window)
