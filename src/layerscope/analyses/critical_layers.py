"""Data-oblivious prediction of critical layers from the pre-fine-tuned model alone (Liu et al. 2025).

The layer-by-layer CKA matrix is computed on several data sets; where the representation shifts
most (the smallest representation term delta, see :mod:`.representation`), fine-tuning will
change the model most. The evidence that this is a property of the model and not of the data is
that the CKA matrices of different data sets agree (their correlation, the same change points).

Prediction, documented so it can be argued with:

1. candidates are the layers ``edge .. L-1-edge`` (default ``edge=2``: the first and last two
   blocks always shift most, from token embeddings to context and back to the vocabulary, and
   the paper's windows of 5 are centred on exactly these candidates);
2. centres, on delta averaged over the data sets: with ``select="dips"`` (default) the ``top``
   local minima of delta, ranked by their prominence (``scipy.signal.find_peaks`` on -delta, at
   least ``2 * radius + 1`` layers apart): a layer whose representation shifts more than both its
   neighbours' is a change point, whereas a steady trend (delta rising through the first blocks)
   is not; when there are fewer dips than ``top``, the remaining centres are the lowest deltas.
   With ``select="lowest"`` the ``top`` candidates with the smallest delta;
3. each centre with ``radius`` layers on either side (clipped to the model) is predicted critical.

The control set for the fine-tuning check is the same number of candidate layers with the
largest delta (the most stable representations), avoiding the predicted ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from scipy.signal import find_peaks

from ..errors import LayerscopeError
from .representation import CKAResult


SELECTIONS = ("dips", "lowest")


def _upper(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(matrix.shape[0], k=1)]


@dataclass
class CriticalLayersResult:
    """CKA evidence on several data sets and the predicted critical layers."""

    sources: list[str]
    results: list[CKAResult]
    top: int = 3
    radius: int = 1
    edge: int = 2
    select: str = "dips"
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.results) or not self.sources:
            raise LayerscopeError("critical-layer prediction needs one CKA result per data set, and at least one")
        n = self.num_layers
        if any(r.shift is None or len(r.shift) != n for r in self.results):
            raise LayerscopeError("every CKA result must be within one model, over the same blocks")
        if self.select not in SELECTIONS:
            raise LayerscopeError(f"unknown selection {self.select!r}; allowed: {', '.join(SELECTIONS)}")
        if self.top < 1 or self.radius < 0 or self.edge < 0:
            raise LayerscopeError(f"top {self.top} must be >= 1, radius {self.radius} and edge {self.edge} >= 0")
        if n - 2 * self.edge < self.top:
            raise LayerscopeError(f"edge {self.edge} leaves {max(n - 2 * self.edge, 0)} candidate layers of {n}; "
                                  f"need at least top={self.top}")

    @property
    def num_layers(self) -> int:
        return len(self.results[0].shift)

    def mean_delta(self) -> np.ndarray:
        """delta(l) averaged over the data sets."""
        return np.mean([r.shift for r in self.results], axis=0)

    def candidates(self) -> list[int]:
        return list(range(self.edge, self.num_layers - self.edge))

    def centres(self) -> list[int]:
        """The ``top`` candidate layers with the largest representation shift (see the module docstring)."""
        delta = self.mean_delta()
        candidates = self.candidates()
        lowest = sorted(candidates, key=lambda layer: (delta[layer], layer))
        if self.select == "lowest":
            return sorted(lowest[: self.top])
        values = -delta[candidates]
        peaks, props = find_peaks(values, prominence=0.0, distance=2 * self.radius + 1)
        ranked = [candidates[i] for i in peaks[np.argsort(-props["prominences"], kind="stable")]]
        chosen = ranked[: self.top]
        for layer in lowest:
            if len(chosen) >= self.top:
                break
            if all(abs(layer - c) > 2 * self.radius for c in chosen):
                chosen.append(layer)
        return sorted(chosen)

    def predicted_layers(self) -> list[int]:
        """The centres and ``radius`` layers on each side: the layers to fine-tune (or to protect)."""
        out = {layer for c in self.centres() for layer in range(c - self.radius, c + self.radius + 1)}
        return sorted(layer for layer in out if 0 <= layer < self.num_layers)

    def control_layers(self) -> list[int]:
        """As many candidate layers as predicted, those with the most stable representations."""
        delta = self.mean_delta()
        predicted = set(self.predicted_layers())
        others = sorted((layer for layer in self.candidates() if layer not in predicted),
                        key=lambda layer: (-delta[layer], layer))
        return sorted(others[: len(predicted)])

    def agreement(self) -> list[dict]:
        """For each pair of data sets: correlation of their CKA matrices (upper triangles, Pearson),
        rank correlation of their deltas, and their change points."""
        rows = []
        for (i, a), (j, b) in combinations(enumerate(self.sources), 2):
            ra, rb = self.results[i], self.results[j]
            cp_a, cp_b = ra.change_points(), rb.change_points()
            rows.append({
                "data_a": a, "data_b": b,
                "cka_matrix_pearson": float(stats.pearsonr(_upper(ra.matrix), _upper(rb.matrix))[0]),
                "delta_spearman": float(stats.spearmanr(ra.shift, rb.shift)[0]),
                "change_points_a": ",".join(map(str, cp_a)), "change_points_b": ",".join(map(str, cp_b)),
                "shared_change_points": ",".join(map(str, sorted(set(cp_a) & set(cp_b)))),
                "same_change_points": cp_a == cp_b,
                "top_shift_overlap": len(set(ra.shift_layers(self.top)) & set(rb.shift_layers(self.top))),
            })
        return rows

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: ``delta`` (mean over data sets), each data set's delta, the prediction."""
        predicted, control, centres = set(self.predicted_layers()), set(self.control_layers()), set(self.centres())
        frame = pd.DataFrame({"layer": range(self.num_layers), "delta": self.mean_delta()})
        for name, result in zip(self.sources, self.results):
            frame[f"delta_{name}"] = result.shift
            points = set(result.change_points())
            frame[f"change_point_{name}"] = [layer in points for layer in range(self.num_layers)]
        frame["centre"] = [layer in centres for layer in range(self.num_layers)]
        frame["predicted"] = [layer in predicted for layer in range(self.num_layers)]
        frame["control"] = [layer in control for layer in range(self.num_layers)]
        return frame

    def prediction(self) -> dict:
        """What ``prediction.json`` holds: the layer lists, ready for ``layerscope finetune --layers``."""
        return {"predicted_layers": self.predicted_layers(), "centres": self.centres(),
                "control_layers": self.control_layers(), "top": self.top, "radius": self.radius, "edge": self.edge,
                "select": self.select,
                "sources": self.sources, "agreement": self.agreement()}

    def save(self, folder) -> list[Path]:
        """results.csv/.parquet (per layer), cka-<data>.csv and heatmaps, the delta figure, prediction.json."""
        from ..report.figures import bar_chart, heatmap

        paths = [*folder.write_table(self.to_frame())]
        for name, result in zip(self.sources, self.results):
            csv = folder.path(f"cka-{name}.csv")
            result.matrix_frame().to_csv(csv, index_label="layer")
            paths.append(csv)
            paths.append(heatmap(result.matrix, folder.path(f"cka-{name}.png"), title=f"CKA between layers ({name})",
                                 xlabel="layer", ylabel="layer", xticklabels=result.other_labels,
                                 yticklabels=result.labels, vmin=0.0, vmax=1.0, colorbar_label="CKA"))
        paths.append(bar_chart(list(range(self.num_layers)), self.mean_delta().tolist(), folder.path("delta.png"),
                               title="Representation term delta, mean over data sets (marked: predicted critical layers)",
                               xlabel="layer", ylabel="mean CKA with neighbours", marked=self.predicted_layers()))
        target = folder.path("prediction.json")
        target.write_text(json.dumps(self.prediction(), indent=2))
        paths.append(target)
        return paths
