"""What do a layer's principal components carry? Remove them and measure (the critical-layers
paper's Section 4.2 case study, made quantitative).

The PCA of the layer's output is computed once (streamed over every real token of the data, or
read from a spectral run's ``pca.safetensors``); then, for each requested number of top components,
:class:`~layerscope.interventions.PCRemoval` projects them out of the residual stream and the loss
on the data set is measured with prefix reuse. As a control, the same number of random orthonormal
directions (seeded) is removed: a top component that matters changes the loss far more than a random
direction does. Greedy generations with and without the removal are shown side by side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..capture import iter_block_outputs
from ..data.sequences import ScoredSequence
from ..errors import LayerscopeError
from ..evaluate.engine import Evaluator
from ..interventions import PCRemoval
from ..metrics import PCAResult, StreamingCovariance
from ..models.architecture import architecture


def fit_layer_pca(model, sequences: list[ScoredSequence], layer: int, *, pad_id: int = 0, keep: int = 64) -> PCAResult:
    """PCA of block ``layer``'s output over every real token of ``sequences`` (streaming covariance)."""
    arch = architecture(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < arch.num_layers:
        raise LayerscopeError(f"layer {layer!r} is out of range: allowed are 0..{arch.num_layers - 1}")
    acc = StreamingCovariance(arch.hidden_size)
    for _, outputs in iter_block_outputs(model, sequences, pooling="tokens", pad_id=pad_id):
        acc.update(outputs[layer].double().cpu())
    return acc.pca(min(keep, arch.hidden_size))


def random_directions(d: int, k: int, seed: int) -> np.ndarray:
    """``k`` random orthonormal directions in ``R^d`` (rows), from a seeded Gaussian matrix's QR."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q.T.copy()


@dataclass
class PCRemovalResult:
    """Loss with the top-k components of one layer removed, against k random directions."""

    layer: int
    baseline_loss: float
    rows: list[dict]
    generations: list[dict] = field(default_factory=list)
    explained_variance_ratio: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (removed directions, k) with the loss and its change."""
        return pd.DataFrame(self.rows)

    def save(self, folder) -> list[Path]:
        from ..report.figures import line_chart

        paths = [*folder.write_table(self.to_frame())]
        frame = self.to_frame()
        series = {}
        for kind, part in frame.groupby("directions", sort=False):
            series[f"{kind} directions"] = (part["k"].tolist(), part["loss_change"].tolist())
        paths.append(line_chart(None, series, folder.path("loss_change.png"),
                                title=f"Loss change when directions are removed from layer {self.layer}'s output",
                                xlabel="number of directions removed", ylabel="loss change (nats/token)", baseline=0.0))
        if self.generations:  # JSON lines: generated text may hold any character a CSV reader trips on
            path = folder.path("generations.jsonl")
            with open(path, "w", encoding="utf-8") as handle:
                for row in self.generations:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            paths.append(path)
        return paths


def run_pc_removal(
    model,
    sequences: list[ScoredSequence],
    layer: int,
    basis: PCAResult | tuple[np.ndarray, np.ndarray],
    *,
    tops=(1,),
    positions: str = "all",
    control: bool = True,
    seed: int = 0,
    pad_id: int = 0,
    prompts=(),
    tokenizer=None,
    max_new_tokens: int = 32,
    chat: bool = False,
) -> PCRemovalResult:
    """Score ``sequences`` with the top-``k`` components of ``layer`` removed, for each ``k`` in ``tops``
    (and ``k`` random directions as a control); generate for ``prompts`` with and without removal."""
    from ..evaluate.generation import generate_with

    mean, components = (basis.mean, basis.components) if isinstance(basis, PCAResult) else basis
    tops = sorted(set(int(k) for k in tops))
    if not tops or tops[0] < 1 or tops[-1] > len(components):
        raise LayerscopeError(f"numbers of components {tops} must be in 1..{len(components)} (the directions available)")
    evaluator = Evaluator(model, sequences, pad_id=pad_id)
    baseline, cache = evaluator.capture(range(architecture(model).num_layers))
    base_loss = baseline.mean_loss
    rows = []
    d = len(mean)
    for k in tops:
        kinds = [("top", components)] + ([("random", random_directions(d, k, seed + k))] if control else [])
        for kind, directions in kinds:
            scores = evaluator.score([PCRemoval(layer, (mean, directions), k, positions=positions)], reuse=cache)
            rows.append({"layer": layer, "directions": kind, "k": k, "positions": positions, "loss": scores.mean_loss,
                         "baseline_loss": base_loss, "loss_change": scores.mean_loss - base_loss})
    generations = []
    if prompts:
        if tokenizer is None:
            raise LayerscopeError("generations need the tokenizer")
        k = tops[0]
        plain = generate_with(model, tokenizer, prompts, max_new_tokens=max_new_tokens, chat=chat)
        last = generate_with(model, tokenizer, prompts, [PCRemoval(layer, (mean, components), k, positions="last")],
                             scope="prompt", max_new_tokens=max_new_tokens, chat=chat)
        every = generate_with(model, tokenizer, prompts, [PCRemoval(layer, (mean, components), k, positions="all")],
                              scope="all", max_new_tokens=max_new_tokens, chat=chat)
        for prompt, a, b, c in zip(prompts, plain, last, every):
            generations.append({"prompt": prompt, "original": a, f"top{k}_removed_at_last_prompt_token": b,
                                f"top{k}_removed_everywhere": c})
    ratio = list(basis.explained_variance_ratio[: max(tops)]) if isinstance(basis, PCAResult) else []
    return PCRemovalResult(layer, base_loss, rows, generations, [float(r) for r in ratio])


def outlier_layer(spectra: pd.DataFrame) -> int:
    """The layer whose top principal direction carries the largest share of its variance."""
    if spectra.empty:
        raise LayerscopeError("no spectra to choose a layer from")
    return int(spectra["var_top1"].astype(float).to_numpy().argmax())


__all__ = ["PCRemovalResult", "fit_layer_pca", "outlier_layer", "random_directions", "run_pc_removal"]
