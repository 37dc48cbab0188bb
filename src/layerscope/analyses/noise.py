"""Weight-noise sweeps: how fast does the loss grow as noise is added to the weights?

Every point ``(level, seed)`` adds noise of that level, drawn with that seed
(:class:`~layerscope.interventions.noise.WeightNoise`), to the chosen weights and scores the
evaluation sequences. Each point is stored at once (resumable). The seeds of one level are
independent draws, so the loss at a level is summarised by the mean over seeds and its 95%
Student-t interval (:func:`~layerscope.metrics.intervals.mean_interval`).

When the noise starts at block ``i > 0`` (chosen layers, not ``all_parameters``), the unmodified
model is run once and every point starts from its cached residual stream at block ``i`` (prefix
reuse). A noise level that destroys the model gives an infinite or NaN loss: it is stored and shown
as such (the summary's interval is then NaN), never turned into a number that looks meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.sequences import ScoredSequence
from ..errors import LayerscopeError
from ..evaluate.engine import Evaluator
from ..interventions.noise import NOISE_VERSION, WeightNoise, check_level
from ..metrics.intervals import mean_interval
from ..models.architecture import architecture
from ..runner import ResultsStore, fingerprint, run_sweep
from .tidy import tidy_frame

PARAMS = ("level", "seed")
METRICS = ("loss", "delta", "perplexity", "baseline_loss")
SUMMARY_METRICS = ("loss", "delta", "perplexity")
SUMMARY_COLUMNS = ["level", "metric", "mean", "lo", "hi", "std", "n", "n_nonfinite"]


@dataclass
class NoiseResult:
    """One wide row per (level, seed): ``loss``, ``delta`` (loss - unmodified loss), ``perplexity``,
    ``baseline_loss``, ``baseline_perplexity``; ``baseline`` holds the unmodified model's numbers."""

    rows: list[dict]
    baseline: dict
    config: dict = field(default_factory=dict)
    confidence: float = 0.95

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (level, seed, metric), columns ``level, seed, metric, value``."""
        return tidy_frame(self.rows, PARAMS, METRICS)

    def levels(self) -> list[float]:
        return sorted({float(r["level"]) for r in self.rows})

    def summary(self, confidence: float | None = None) -> pd.DataFrame:
        """Per level and metric (loss, delta, perplexity): the mean over seeds and its Student-t
        interval (``lo``, ``hi``), the sample ``std``, the number of seeds ``n`` and of non-finite
        values ``n_nonfinite`` (a destroyed model: the interval is then NaN)."""
        confidence = self.confidence if confidence is None else confidence
        out = []
        for level in self.levels():
            rows = [r for r in self.rows if float(r["level"]) == level]
            for metric in SUMMARY_METRICS:
                values = np.array([_number(r[metric]) for r in rows], dtype=np.float64)
                stats = mean_interval(values, confidence)
                out.append({"level": level, "metric": metric, **{k: stats[k] for k in ("mean", "lo", "hi", "std")},
                            "n": int(stats["n"]), "n_nonfinite": int((~np.isfinite(values)).sum())})
        return pd.DataFrame(out, columns=SUMMARY_COLUMNS)

    def save(self, folder) -> list[Path]:
        """Write ``results.csv/.parquet`` (tidy), ``summary.csv/.parquet`` and ``noise.png``."""
        paths = [*folder.write_table(self.to_frame())]
        paths += [*folder.write_table(self.summary(), "summary")]
        paths.append(self.plot(folder.path("noise.png")))
        return paths

    def plot(self, path: str | Path, metric: str = "loss") -> Path:
        """``metric`` against the level (log x): the mean over seeds as a line, its interval as a band,
        each seed as a dot, the unmodified model as a dashed line; non-finite values as red crosses
        at the top edge."""
        from matplotlib.transforms import blended_transform_factory

        from ..report.figures import _figure, _save

        if metric not in SUMMARY_METRICS:
            raise LayerscopeError(f"unknown metric {metric!r} to plot: allowed {', '.join(SUMMARY_METRICS)}")
        summary = self.summary()
        part = summary[summary["metric"] == metric]
        levels = part["level"].to_numpy(dtype=float)
        fig = _figure((7.0, 4.2))
        ax = fig.add_subplot()
        pct = f"{self.confidence * 100:g}%"
        mean = part["mean"].to_numpy(dtype=float)
        finite = np.isfinite(mean)
        ax.plot(levels[finite], mean[finite], marker="o", markersize=4, color="#1f77b4", label="mean over seeds")
        lo, hi = part["lo"].to_numpy(dtype=float), part["hi"].to_numpy(dtype=float)
        band = np.isfinite(lo) & np.isfinite(hi)
        if band.any():
            ax.fill_between(levels[band], lo[band], hi[band], color="#1f77b4", alpha=0.2, label=f"{pct} interval")
        xs = np.array([float(r["level"]) for r in self.rows])
        ys = np.array([_number(r[metric]) for r in self.rows])
        ok = np.isfinite(ys)
        ax.scatter(xs[ok], ys[ok], s=10, color="black", alpha=0.6, zorder=3, label="one seed")
        if (~ok).any():
            top = blended_transform_factory(ax.transData, ax.transAxes)
            ax.scatter(xs[~ok], np.full((~ok).sum(), 0.97), marker="x", color="#d62728", s=30, transform=top,
                       zorder=4, clip_on=False, label="non-finite (model destroyed)")
        base = {"loss": self.baseline.get("loss"), "delta": 0.0, "perplexity": self.baseline.get("perplexity")}[metric]
        if base is not None and math.isfinite(float(base)):
            ax.axhline(float(base), color="black", linestyle="--", linewidth=1, label=f"unmodified {float(base):.4g}")
        positive = levels[levels > 0]
        if len(positive):  # every level on the x axis, also one whose seeds are all non-finite
            if (levels > 0).all():
                ax.set_xscale("log")
                ax.set_xlim(positive.min() / 1.5, positive.max() * 1.5)
            else:
                ax.set_xscale("symlog", linthresh=float(positive.min()))
                ax.set_xlim(-0.5 * positive.min(), positive.max() * 1.5)
        cfg = self.config
        what = "all parameters" if cfg.get("all_parameters") else "block matrices"
        ax.set_title(f"{metric} under {cfg.get('distribution', 'gaussian')} weight noise "
                     f"({cfg.get('scale', 'relative')} scale, {what})")
        ax.set_xlabel("noise level" + (" (x std of each tensor)" if cfg.get("scale", "relative") == "relative" else " (std)"))
        ax.set_ylabel({"loss": "loss (nats/token)", "delta": "loss change (nats/token)", "perplexity": "perplexity"}[metric])
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        return _save(fig, path)


def _number(value) -> float:
    """A stored metric as a float (JSON keeps NaN/Infinity; None, if any, becomes NaN)."""
    return math.nan if value is None else float(value)


def check_levels(levels: Sequence[float]) -> list[float]:
    levels = list(levels)
    if not levels:
        raise LayerscopeError("no noise levels given: give at least one level >= 0, e.g. 0.01,0.1")
    return sorted(dict.fromkeys(check_level(level) for level in levels))


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise LayerscopeError("no noise seeds given: give at least one")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise LayerscopeError(f"noise seed {s!r} is not an integer: allowed whole numbers")
    return list(dict.fromkeys(int(s) for s in seeds))


def run_noise(
    model: torch.nn.Module,
    sequences: list[ScoredSequence],
    *,
    levels: Sequence[float],
    seeds: Sequence[int],
    distribution: str = "gaussian",
    scale: str = "relative",
    layers: Sequence[int] | None = None,
    roles: Sequence[str] | None = None,
    all_parameters: bool = False,
    store: ResultsStore,
    run_parts: dict,
    pad_id: int = 0,
    reuse_prefix: bool = True,
    progress: bool = True,
) -> NoiseResult:
    """Score the sequences under noise at every ``level`` x ``seed``; each point stored at once.

    Metrics per point: ``loss`` (nats per scored token), ``perplexity``, ``delta`` (loss minus the
    unmodified model's), ``baseline_loss``, ``baseline_perplexity``."""
    levels = check_levels(levels)
    seeds = check_seeds(seeds)

    def make(level: float, seed: int) -> WeightNoise:
        return WeightNoise(level, distribution=distribution, scale=scale, seed=seed, layers=layers, roles=roles,
                           all_parameters=all_parameters)

    probe = make(levels[0], seeds[0])  # validates distribution, scale and the combination of options
    targets = probe.targets(model)  # validates layers and roles against the model before any forward
    first = probe.first_block(model)
    arch = architecture(model)
    evaluator = Evaluator(model, sequences, pad_id=pad_id)
    resolved_layers = None if layers is None else sorted({t[0] for t in targets})
    run_id = fingerprint(run_parts, {"analysis": "noise", "noise_version": NOISE_VERSION, "distribution": distribution,
                                     "scale": scale, "layers": resolved_layers,
                                     "roles": None if roles is None else list(dict.fromkeys(roles)),
                                     "all_parameters": bool(all_parameters)})
    state: dict = {}

    def baseline():
        if "scores" not in state:
            blocks = [first] if reuse_prefix and first > 0 else []
            scores, cache = evaluator.capture(blocks)
            state["scores"], state["cache"] = scores, (cache if blocks else None)
        return state["scores"], state["cache"]

    def compute(point: dict) -> dict:
        base, cache = baseline()
        scores = evaluator.score([make(point["level"], point["seed"])], reuse=cache)
        loss = _loss(scores)
        return {"loss": loss, "delta": loss - base.mean_loss, "perplexity": _exp(loss),
                "baseline_loss": base.mean_loss, "baseline_perplexity": base.perplexity}

    points = [{"level": level, "seed": seed} for level in levels for seed in seeds]
    rows = run_sweep(points, compute, store, run_id,
                     description=f"noise {arch.family} {len(levels)} levels x {len(seeds)} seeds", progress=progress)
    baseline_row = rows[0]
    config = {"levels": levels, "seeds": seeds, "distribution": distribution, "scale": scale,
              "layers": resolved_layers, "roles": None if roles is None else list(roles),
              "all_parameters": bool(all_parameters), "n_targets": len(targets), "first_block": first,
              "num_layers": arch.num_layers, "run_id": run_id, "block_forwards": evaluator.block_forwards}
    return NoiseResult(rows=rows, baseline={"loss": _number(baseline_row["baseline_loss"]),
                                            "perplexity": _number(baseline_row["baseline_perplexity"])}, config=config)


def _loss(scores) -> float:
    """The mean loss; NaN rather than an error when the log-likelihoods are not finite."""
    total = int(scores.n_targets.sum())
    if total == 0:
        raise LayerscopeError("no scored tokens: every sequence is too short or fully masked")
    return -float(np.sum(scores.logprob)) / total


def _exp(value: float) -> float:
    if math.isnan(value):
        return math.nan
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf
