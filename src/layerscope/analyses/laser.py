"""LASER sweeps: rank-reduce one weight matrix at a time and measure a task, with LASER's protocol.

Every point ``(layer, lname, rate)`` replaces the matrices ``lname`` names at block ``layer`` by
their rank-reduced approximation (:class:`~layerscope.interventions.LowRank`; one SVD per matrix
for the whole sweep) and scores every item of the task with prefix reuse. Per item, as LASER:

- single-token answers (e.g. FEVER's " true" / " false"): the next-token distribution after the
  prompt; correct when the gold token is more likely than every other choice; log-loss
  ``-log p(gold token)``; top-k accuracy when the gold token is among the ``k`` most likely tokens
  of the whole vocabulary (exact token ids: LASER compares decoded, lower-cased, stripped strings,
  which also counts "True" or "true" without the space);
- otherwise: the summed log-probability of each choice's tokens; correct when the gold choice has
  the largest; log-loss ``-log p(gold choice)`` (summed over its tokens); top-k left empty.

The first 20% of the task's items are the validation split and the remaining 80% the test split
(LASER's protocol). The best point is chosen on validation accuracy (ties: lower validation
log-loss) and reported on test beside the unmodified model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.multiple_choice import MCItem, mc_sequences
from ..data.sequences import ScoredSequence
from ..errors import LayerscopeError
from ..evaluate.engine import Evaluator
from ..interventions.low_rank import LowRank, SVDCache
from ..interventions.vendi_projection import SelectionCache, VendiProjection
from ..models.architecture import architecture
from ..runner import ResultsStore, run_sweep

TOP_K = (1, 5, 10)
METRICS = ("accuracy", "logloss", *(f"top{k}" for k in TOP_K))
VALIDATION_SHARE = 0.2
INTERVENTIONS = ("lowrank", "vendi")


@dataclass
class TaskScorer:
    """A task's items turned into sequences once, scored under any interventions."""

    items: list[MCItem]
    evaluator: Evaluator
    mode: str  # "next_token" (every choice one token) or "choices"
    candidates: list[list[int]] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))

    @classmethod
    def build(cls, model, tokenizer, items: list[MCItem], *, pad_id: int = 0) -> "TaskScorer":
        if not items:
            raise LayerscopeError("empty task: no items to score")
        seqs = mc_sequences(tokenizer, items)
        by_item: dict[int, list[ScoredSequence]] = {}
        for s in seqs:
            by_item.setdefault(s.group, []).append(s)
        labels = np.array([item.label for item in items])
        single = all(s.num_targets == 1 for s in seqs) and all(
            len({s.input_ids[:-1] for s in group}) == 1 for group in by_item.values())
        if single:  # one prompt per item; the choices are next-token candidates
            prompts = [ScoredSequence(by_item[g][0].input_ids[:-1], (False,) * (len(by_item[g][0]) - 1), group=g)
                       for g in range(len(items))]
            candidates = [[s.input_ids[-1] for s in sorted(by_item[g], key=lambda s: s.choice)] for g in range(len(items))]
            return cls(items, Evaluator(model, prompts, pad_id=pad_id), "next_token", candidates, labels)
        return cls(items, Evaluator(model, seqs, pad_id=pad_id), "choices", [], labels)

    def score(self, interventions=(), *, reuse=None) -> dict[str, np.ndarray]:
        """Per-item arrays: correct (0/1), logloss, top1/top5/top10 (NaN for multi-token answers)."""
        n = len(self.items)
        rows = np.arange(n)
        if self.mode == "next_token":
            logprob, rank = self.evaluator.next_token(self.candidates, interventions, reuse=reuse)
            gold = logprob[rows, self.labels]
            others = np.where(np.arange(logprob.shape[1])[None, :] == self.labels[:, None], -np.inf, np.nan_to_num(logprob, nan=-np.inf))
            out = {"correct": (gold > others.max(axis=1)).astype(float), "logloss": -gold}
            gold_rank = rank[rows, self.labels]
            out.update({f"top{k}": (gold_rank < k).astype(float) for k in TOP_K})
            return out
        scores = self.evaluator.score(interventions, reuse=reuse)
        width = max(len(item.choices) for item in self.items)
        ll = np.full((n, width), -np.inf)
        for seq, value in zip(self.evaluator.sequences, scores.logprob):
            ll[seq.group, seq.choice] = value
        gold = ll[rows, self.labels]
        others = np.where(np.arange(width)[None, :] == self.labels[:, None], -np.inf, ll)
        out = {"correct": (gold > others.max(axis=1)).astype(float), "logloss": -gold}
        out.update({f"top{k}": np.full(n, np.nan) for k in TOP_K})
        return out


def split_index(n: int, share: float = VALIDATION_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """LASER's protocol: the first ``share`` of the items validate, the rest test (both non-empty)."""
    if n < 2:
        raise LayerscopeError(f"{n} item(s): the validation/test protocol needs at least 2")
    n_val = min(max(1, int(math.floor(share * n))), n - 1)
    return np.arange(n_val), np.arange(n_val, n)


def summarise(per_item: dict[str, np.ndarray], index: np.ndarray) -> dict[str, float]:
    """Mean metrics over the items in ``index`` (accuracy = mean correctness)."""
    out = {"accuracy": float(per_item["correct"][index].mean()), "logloss": float(per_item["logloss"][index].mean())}
    for k in TOP_K:
        values = per_item[f"top{k}"][index]
        out[f"top{k}"] = float(values.mean()) if not np.isnan(values).all() else float("nan")
    return out


@dataclass
class LaserResult:
    """One row per (point, split); the validation-chosen point and its test numbers beside the baseline."""

    rows: list[dict]
    best: dict
    baseline: dict
    composed: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def save(self, folder) -> list[Path]:
        from ..report.figures import heatmap

        paths = [*folder.write_table(self.to_frame())]
        frame = self.to_frame()
        val = frame[(frame["split"] == "validation") & (frame["lname"] != "dont")]
        base = self.baseline["validation"]["accuracy"]
        for lname, part in val.groupby("lname", sort=False):
            grid = part.pivot_table(index="layer", columns="rate", values="accuracy", aggfunc="first").sort_index()
            paths.append(heatmap((grid - base).to_numpy(), folder.path(f"heatmap_{lname}.png"),
                                 title=f"{lname}: validation accuracy change (rank reduction - unmodified)",
                                 xlabel="rate", ylabel="layer", xticklabels=[f"{r:g}" for r in grid.columns],
                                 yticklabels=[str(i) for i in grid.index], cmap="RdBu", vmin=-max(0.01, abs(grid - base).to_numpy().max()),
                                 vmax=max(0.01, abs(grid - base).to_numpy().max()), colorbar_label="accuracy change"))
        return paths


def _point_rows(point: dict, metrics: dict) -> list[dict]:
    return [{**point, "split": split, **{m: metrics[f"{split}_{m}"] for m in METRICS}, "n": metrics[f"{split}_n"]}
            for split in ("validation", "test")]


def run_laser(
    model,
    tokenizer,
    items: list[MCItem],
    *,
    layers,
    lnames,
    rates,
    store: ResultsStore,
    run_parts: dict,
    pad_id: int = 0,
    compose: int = 0,
    svd_dtype: torch.dtype = torch.float32,
    intervention: str = "lowrank",
    vendi_options: dict | None = None,
    selection_cache: SelectionCache | None = None,
    progress: bool = True,
) -> LaserResult:
    """Sweep layers x lnames x rates on a task; each point stored at once, resumable.

    ``intervention``: ``"lowrank"`` (LASER's SVD truncation) or ``"vendi"`` (the fork's projection
    onto Vendi-selected rows, ``vendi_options``: bandwidth, use_quality, minimize)."""
    if intervention not in INTERVENTIONS:
        raise LayerscopeError(f"unknown intervention {intervention!r}: allowed are {', '.join(INTERVENTIONS)}")
    from ..runner import fingerprint

    n_layers = architecture(model).num_layers
    layers = sorted(set(int(layer) for layer in layers))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise LayerscopeError(f"layers {layers} out of range: allowed are 0..{n_layers - 1}")
    scorer = TaskScorer.build(model, tokenizer, items, pad_id=pad_id)
    val_idx, test_idx = split_index(len(items))
    cache = scorer.evaluator.capture(range(n_layers))[1]  # prefix reuse: every point starts at its layer
    svd = SVDCache(dtype=svd_dtype)
    selections = selection_cache if selection_cache is not None else SelectionCache()
    options = dict(vendi_options or {})

    def reduction(lname: str, layer: int, rate: float):
        if intervention == "vendi":
            return VendiProjection(lname, layer, rate=rate, cache=selections, **options)
        return LowRank(lname, layer, rate=rate, cache=svd)

    def metrics_of(per_item):
        out = {}
        for split, index in (("validation", val_idx), ("test", test_idx)):
            out.update({f"{split}_{k}": v for k, v in summarise(per_item, index).items()})
            out[f"{split}_n"] = int(len(index))
        return out

    def compute(point: dict, fixed: list = ()) -> dict:
        extra = [] if point["lname"] == "dont" else [reduction(point["lname"], point["layer"], point["rate"])]
        return metrics_of(scorer.score([*fixed, *extra], reuse=cache))

    points = [{"layer": -1, "lname": "dont", "rate": 0.0}]
    points += [{"layer": layer, "lname": lname, "rate": float(rate)} for lname in lnames for layer in layers for rate in rates]
    # lowrank points keep the identity they had before Vendi existed, so those stores still resume
    run_id = fingerprint({**run_parts, "analysis": "laser", "mode": scorer.mode,
                          **({"intervention": intervention, "vendi": options} if intervention == "vendi" else {})})
    rows_by_point = run_sweep(points, compute, store, run_id, description="laser sweep", progress=progress)
    rows = [r for point_row in rows_by_point for r in _point_rows(
        {k: point_row[k] for k in ("layer", "lname", "rate")}, point_row)]
    baseline_row = rows_by_point[0]
    baseline = {s: {m: baseline_row[f"{s}_{m}"] for m in METRICS} for s in ("validation", "test")}
    best_row = max(rows_by_point, key=lambda r: (r["validation_accuracy"], -r["validation_logloss"]))
    best = {"layer": best_row["layer"], "lname": best_row["lname"], "rate": best_row["rate"],
            **{s: {m: best_row[f"{s}_{m}"] for m in METRICS} for s in ("validation", "test")}}
    composed = (_compose(best, rows_by_point, compute, store, run_id, reduction, rounds=compose, progress=progress)
                if compose else [])
    return LaserResult(rows, best, baseline, composed)


def _compose(best, rows_by_point, compute, store, run_id, reduction, *, rounds: int, progress: bool) -> list[dict]:
    """Greedy composition: keep the best reduction, search the grid again on the other layers with it
    applied, keep the best if it improves validation accuracy (ties: log-loss); up to ``rounds`` more."""
    chosen = [] if best["lname"] == "dont" else [dict(layer=best["layer"], lname=best["lname"], rate=best["rate"])]
    score = (best["validation"]["accuracy"], -best["validation"]["logloss"])
    steps = [{"step": 0, "interventions": list(chosen), **{f"{s}_{m}": best[s][m] for s in ("validation", "test") for m in METRICS}}]
    grid = [{k: r[k] for k in ("layer", "lname", "rate")} for r in rows_by_point if r["lname"] != "dont"]
    for step in range(1, rounds + 1):
        if not chosen:
            break
        fixed = [reduction(c["lname"], c["layer"], c["rate"]) for c in chosen]
        used = {c["layer"] for c in chosen}
        candidates = [dict(p, after=len(chosen), fixed=str(chosen)) for p in grid if p["layer"] not in used]
        if not candidates:
            break
        step_rows = run_sweep(candidates, lambda p: compute({k: p[k] for k in ("layer", "lname", "rate")}, fixed),
                              store, f"{run_id}-compose", description=f"greedy step {step}", progress=progress)
        top = max(step_rows, key=lambda r: (r["validation_accuracy"], -r["validation_logloss"]))
        if (top["validation_accuracy"], -top["validation_logloss"]) <= score:
            break
        chosen.append({k: top[k] for k in ("layer", "lname", "rate")})
        score = (top["validation_accuracy"], -top["validation_logloss"])
        steps.append({"step": step, "interventions": list(chosen),
                      **{f"{s}_{m}": top[f"{s}_{m}"] for s in ("validation", "test") for m in METRICS}})
    return steps
