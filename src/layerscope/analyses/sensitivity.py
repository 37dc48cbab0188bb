"""Sensitivity: the loss change when each block or weight role is removed, and the cheap proxies.

Every point ablates one unit at one layer and scores the data with prefix reuse:

* ``block``: ``skip`` (the block becomes the identity; with ``span`` n, blocks ``[l, l+n)`` are
  skipped together) or ``mean`` (its update to the residual stream becomes its mean update);
* a weight role (``q k v o gate up down``): ``zero`` (the projection outputs zeros) or ``mean``
  (it outputs its mean vector for every token). ``o`` and ``down`` write the attention and MLP
  outputs: zeroing them removes that sublayer from the residual stream.

Means are taken over the real tokens of the evaluation data itself (one extra forward pass).
The proxies, from the same pass: ShortGPT's Block Influence and Gromov et al.'s angular distance
(:mod:`layerscope.capture.block_similarity`), each rank-correlated with the measured loss change
of skipping the same blocks.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..capture import BlockStatistics, RoleStatistics
from ..data.sequences import ScoredSequence
from ..errors import LayerscopeError, allowed
from ..evaluate.engine import Evaluator
from ..interventions import MeanAblateBlock, MeanAblateRole, SkipBlock, ZeroRole, matrix_roles
from ..metrics import rank_correlation
from ..models.architecture import ROLES, architecture
from ..runner import ResultsStore, fingerprint, run_sweep
from .tidy import tidy_frame

MODES = ("skip", "zero", "mean")
BLOCK_MODES = ("skip", "mean")
ROLE_MODES = ("zero", "mean")
DEFAULT_SPANS = (1, 2, 4, 8)
PARAMS = ["layer", "unit", "mode", "span"]
METRICS = ["loss", "delta", "perplexity", "baseline_loss", "block_influence", "angular_distance"]


def check_modes(modes) -> tuple[str, ...]:
    """Refuse an ablation mode other than :data:`MODES`."""
    for mode in modes:
        if mode not in MODES:
            raise LayerscopeError(f"mode {mode!r} is unknown; allowed: {allowed(MODES)}")
    return tuple(modes)


def unit_modes(unit: str, modes: tuple[str, ...]) -> tuple[str, ...]:
    """The modes of ``modes`` that apply to ``unit`` (blocks: skip, mean; roles: zero, mean)."""
    return tuple(m for m in modes if m in (BLOCK_MODES if unit == "block" else ROLE_MODES))


@dataclass
class SensitivityResult:
    """Measured ablations (one row per point) with the proxies beside the block skips."""

    rows: list[dict]
    correlations: list[dict]
    choices: list[dict]
    config: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Tidy: one row per (layer, unit, mode, span, metric)."""
        return tidy_frame(self.rows, PARAMS, METRICS)

    def table(self) -> pd.DataFrame:
        """The per-layer ablation table: the loss change of every single-layer ablation as
        ``<unit>_<mode>`` columns, and the two proxies (span 1)."""
        single = [r for r in self.rows if r["span"] == 1]
        frame = pd.DataFrame(single)
        wide = frame.pivot_table(index="layer", columns=["unit", "mode"], values="delta", aggfunc="first")
        rank = {unit: i for i, unit in enumerate(("block", *ROLES))}
        order = sorted(wide.columns, key=lambda c: (rank.get(c[0], len(rank)), MODES.index(c[1])))
        wide = wide[order]
        wide.columns = [f"{unit}_{mode}" for unit, mode in wide.columns]
        skip = frame[(frame["unit"] == "block") & (frame["mode"] == "skip")].set_index("layer")
        for proxy in ("block_influence", "angular_distance"):
            if proxy in skip:
                wide[proxy] = skip[proxy]
        return wide.reset_index()

    def save(self, folder) -> list[Path]:
        """``results.csv`` (tidy), ``ablation_table.csv``, ``proxy_correlations.csv``,
        ``proxy_choices.csv`` and the two figures."""
        paths = list(folder.write_table(self.to_frame()))
        for name, frame in (("ablation_table", self.table()), ("proxy_correlations", pd.DataFrame(self.correlations)),
                            ("proxy_choices", pd.DataFrame(self.choices))):
            path = folder.path(f"{name}.csv")
            frame.to_csv(path, index=False)
            paths.append(path)
        paths.append(self.plot_heatmap(folder.path("sensitivity.png")))
        paths.append(self.plot_proxies(folder.path("proxies.png")))
        return paths

    def plot_heatmap(self, path: str | Path) -> Path:
        from ..report.figures import heatmap

        table = self.table()
        columns = [c for c in table.columns if c not in ("layer", "block_influence", "angular_distance")]
        matrix = table[columns].to_numpy(dtype=float).T
        finite = np.abs(matrix[np.isfinite(matrix)])
        top = float(finite.max()) if finite.size else 1.0
        # diverging and symmetric about 0: an ablation that helps (negative) shows blue, not as a dark extreme
        return heatmap(matrix, path, title="Loss change when one unit of one layer is ablated (nats/token)",
                       xlabel="layer", ylabel="unit and ablation", xticklabels=table["layer"].tolist(),
                       yticklabels=[c.replace("_", " ") for c in columns], cmap="RdBu_r", vmin=-top, vmax=top,
                       colorbar_label="loss change (symmetric log scale, linear within 0.001)", symlog=1e-3,
                       annotate=False)

    def plot_proxies(self, path: str | Path) -> Path:
        from ..report.figures import proxy_panels

        skips: dict[int, list[dict]] = {}
        for row in sorted(self.rows, key=lambda r: r["layer"]):
            if row["unit"] == "block" and row["mode"] == "skip":
                skips.setdefault(row["span"], []).append(row)
        corr = {(c["proxy"], c["span"]): c for c in self.correlations if c["ablation"] == "block skip"}

        def label(proxy: str, span: int) -> str:
            c = corr.get((proxy, span))
            return f" (Spearman {c['spearman']:.2f})" if c else ""

        def curve(span: int, metric: str) -> tuple[list, list]:
            return [r["layer"] for r in skips[span]], [r[metric] for r in skips[span]]

        spans = sorted(skips)
        panels = [
            ("measured: loss change when skipped (nats/token)",
             {f"{n} block{'s' if n > 1 else ''}": curve(n, "delta") for n in spans}, True),
            ("Block Influence 1 - cos(in, out)",
             {"BI" + label("block_influence", 1): curve(1, "block_influence")} if 1 in skips else {}, False),
            ("angular distance d(l, n)", {f"n={n}" + label("angular_distance", n): curve(n, "angular_distance")
                                          for n in spans}, False),
        ]
        return proxy_panels(panels, path, title="Skipping blocks starting at layer l: measured loss change and the proxies",
                            xlabel="first skipped layer l")


def _correlate(proxy: np.ndarray, measured: np.ndarray, seed: int) -> dict:
    finite = np.isfinite(proxy) & np.isfinite(measured)
    if finite.sum() < 3:
        return {"spearman": np.nan, "spearman_p": np.nan, "kendall": np.nan, "kendall_p": np.nan, "n": int(finite.sum())}
    stats = rank_correlation(proxy[finite], measured[finite], n_boot=1000, seed=seed)
    return {"spearman": stats["spearman"], "spearman_p": stats["spearman_p"], "kendall": stats["kendall"],
            "kendall_p": stats["kendall_p"], "spearman_ci_lo": stats["spearman_ci"][0],
            "spearman_ci_hi": stats["spearman_ci"][1], "n": stats["n"]}


def proxy_analysis(rows: list[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Rank correlations of each proxy with the measured loss change of skipping (and mean-ablating)
    the same blocks, and, per span, the window each proxy would remove against the best one."""
    correlations, choices = [], []
    by = {}
    for row in rows:
        if row["unit"] == "block":
            by.setdefault((row["mode"], row["span"]), []).append(row)
    for (mode, span), group in sorted(by.items(), key=lambda kv: (kv[0][0] != "skip", kv[0][1])):
        group = sorted(group, key=lambda r: r["layer"])
        measured = np.array([r["delta"] for r in group], dtype=float)
        for proxy in ("block_influence", "angular_distance"):
            values = np.array([r.get(proxy, np.nan) for r in group], dtype=float)
            if np.isnan(values).all():
                continue
            correlations.append({"proxy": proxy, "span": span, "ablation": f"block {mode}",
                                 **_correlate(values, measured, seed)})
            if mode == "skip" and np.isfinite(values).all():
                pick = int(np.argmin(values))
                order = np.argsort(measured, kind="stable")
                choices.append({"proxy": proxy, "span": span, "proxy_start": group[pick]["layer"],
                                "proxy_delta": measured[pick],
                                "proxy_rank": int(np.flatnonzero(order == pick)[0]) + 1,
                                "best_start": group[int(order[0])]["layer"], "best_delta": measured[order[0]],
                                "windows": len(group)})
    return correlations, choices


def collect_statistics(model: torch.nn.Module, evaluator: Evaluator, role_targets: list[tuple[int, str]]):
    """One forward pass over the evaluation batches: block proxies and mean updates, and the mean
    output of every role in ``role_targets`` (for mean ablation)."""
    blocks = BlockStatistics(model, len(evaluator.sequences))
    roles = RoleStatistics(model, role_targets, inputs=False, outputs=True) if role_targets else None
    arch = architecture(model)
    with torch.inference_mode(), blocks.recording():
        with roles.recording() if roles is not None else nullcontext():
            for batch in evaluator.batches:
                batch = batch.to(evaluator.device)
                blocks.set_batch(batch.attention_mask, batch.index)
                if roles is not None:
                    roles.set_mask(batch.attention_mask)
                arch.base_model()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                evaluator.block_forwards += arch.num_layers
    return blocks, roles


def run_sensitivity(
    model: torch.nn.Module,
    sequences: list[ScoredSequence],
    *,
    units: tuple[str, ...] | None = None,
    modes: tuple[str, ...] = MODES,
    spans: tuple[int, ...] | None = None,
    store: ResultsStore,
    run_parts: dict,
    pad_id: int = 0,
    reuse_prefix: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> SensitivityResult:
    """Ablate every unit at every layer in every applicable mode, plus block skips of each span
    (default: those of 1, 2, 4, 8 below the number of layers); each point is stored at once (a
    rerun resumes)."""
    arch = architecture(model)
    L = arch.num_layers
    roles = matrix_roles(model)
    units = ("block", *roles) if units is None else tuple(dict.fromkeys(units))
    for unit in units:
        if unit != "block" and unit not in roles:
            raise LayerscopeError(f"unit {unit!r} does not exist in a {arch.family} model; allowed: {allowed(('block', *roles))}")
    check_modes(modes)
    spans = tuple(n for n in DEFAULT_SPANS if n < L) if spans is None else tuple(sorted(set(spans)))
    for span in spans:
        if isinstance(span, bool) or not isinstance(span, int) or not 1 <= span <= L:
            raise LayerscopeError(f"span {span!r} is out of range: allowed 1..{L} for this {L}-layer model")
    if "block" in units and "skip" in modes and 1 not in spans:
        spans = (1, *spans)

    points = []
    for unit in units:
        for mode in unit_modes(unit, modes):
            for span in (spans if (unit, mode) == ("block", "skip") else (1,)):
                points += [{"layer": layer, "unit": unit, "mode": mode, "span": span} for layer in range(L - span + 1)]
    if not points:
        raise LayerscopeError(f"no ablation applies to units {list(units)} with modes {list(modes)}: blocks take "
                              f"{', '.join(BLOCK_MODES)}, roles take {', '.join(ROLE_MODES)}")

    evaluator = Evaluator(model, sequences, pad_id=pad_id)
    mean_roles = [(layer, unit) for unit in units if unit != "block" and "mean" in modes for layer in range(L)]
    blocks, role_stats = collect_statistics(model, evaluator, mean_roles)
    state: dict = {}

    def baseline():
        if "scores" not in state:
            scores, cache = evaluator.capture(range(L) if reuse_prefix else [])
            state["scores"], state["cache"] = scores, (cache if reuse_prefix else None)
        return state["scores"], state["cache"]

    def intervention(point: dict):
        layer, unit, mode, span = point["layer"], point["unit"], point["mode"], point["span"]
        if unit == "block":
            if mode == "skip":
                return SkipBlock(list(range(layer, layer + span)))
            return MeanAblateBlock({layer: blocks.mean_update(layer)})
        if mode == "zero":
            return ZeroRole(unit, [layer])
        return MeanAblateRole(unit, {layer: role_stats.output_mean(layer, unit)})

    def compute(point: dict) -> dict:
        base, cache = baseline()
        scores = evaluator.score([intervention(point)], reuse=cache)
        return {"loss": scores.mean_loss, "delta": scores.mean_loss - base.mean_loss, "perplexity": scores.perplexity,
                "baseline_loss": base.mean_loss}

    run_id = fingerprint(run_parts, {"analysis": "sensitivity"})
    rows = run_sweep(points, compute, store, run_id, description=f"sensitivity {arch.family} x{len(points)}",
                     progress=progress)
    influence = blocks.block_influence()
    distances = {span: blocks.angular_distance(span) for span in spans}
    for row in rows:
        if row["unit"] == "block" and row["mode"] in ("skip", "mean"):
            if row["span"] == 1:
                row["block_influence"] = float(influence[row["layer"]])
            row["angular_distance"] = float(distances[row["span"]][row["layer"]])
    correlations, choices = proxy_analysis(rows, seed=seed)
    config = {"num_layers": L, "units": list(units), "modes": list(modes), "spans": list(spans), "run_id": run_id,
              "block_forwards": evaluator.block_forwards, "points": len(points)}
    return SensitivityResult(rows=rows, correlations=correlations, choices=choices, config=config)
