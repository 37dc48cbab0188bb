"""Pruning studies: magnitude and Wanda masks, per-layer sparsity, perplexity against sparsity, export.

:func:`compute_masks` builds the masks of one (method, sparsity) for every ``(layer, role)``:

- magnitude needs no data: ``|W|``, compared over the whole matrix (Wanda's ``prune_magnitude``);
- Wanda: ``|W_ij| * ||X_j||_2`` over the real (non-padding) calibration tokens, compared within
  each output row. With ``sequential=True`` it follows Wanda's ``prune_wanda``: block by block, the
  inputs of block ``i`` are computed with blocks ``< i`` already pruned; all roles of block ``i``
  are calibrated in one pass through the still dense block ``i`` (so ``o``'s inputs come from the
  dense ``q k v``), then block ``i`` is pruned. Each step starts every calibration batch from the
  kept input of block ``i-1`` (prefix reuse), runs the pruned block ``i-1`` and the dense block
  ``i`` and stops there, so calibration costs about ``2 L`` block forwards, not ``L^2``.

:func:`allocate_sparsity` spreads a target sparsity over the layers by their sensitivity (OWL-style,
Yin et al. 2024): linear in the rank, the most sensitive layer pruned least.
:func:`run_pruning` sweeps methods x sparsities (plus the dense model), each point stored at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..capture import block_input
from ..capture.linear_stats import RoleStatistics
from ..data.batching import make_batches
from ..data.sequences import ScoredSequence
from ..errors import LayerscopeError
from ..evaluate.engine import DEFAULT_MAX_TOKENS, Evaluator, ResidualCache
from ..interventions import StartFromCache, block_returns_tuple, intervene, weight_targets
from ..interventions.pruning import (DEFAULT_GROUP, GROUPS, METHODS, Prune, check_method, check_sparsity, magnitude_scores,
                                     nm_mask, parse_pattern, unstructured_mask, wanda_scores)
from ..models.architecture import architecture
from ..runner import ResultsStore, fingerprint, run_sweep
from .tidy import tidy_frame

Masks = dict[tuple[int, str], torch.Tensor]
PARAMS = ("method", "sparsity", "pattern")
METRICS = ("loss", "perplexity", "realised_sparsity", "mask_seconds")
DENSE = "dense"
UNSTRUCTURED = "unstructured"


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the blocks of interest have run."""


def pattern_label(pattern: tuple[int, int] | None) -> str:
    return UNSTRUCTURED if pattern is None else f"{pattern[0]}:{pattern[1]}"


def _targets(model, targets) -> list[tuple[int, str]]:
    if targets is None:
        return weight_targets(model)
    arch = architecture(model)
    out = list(dict.fromkeys((int(layer), role) for layer, role in targets))
    if not out:
        raise LayerscopeError("no (layer, role) targets to prune")
    for layer, role in out:
        arch.role_shape(role, layer)  # refuses a bad layer or role
    return out


def _layer_sparsities(targets, sparsity: float, layer_sparsity: Mapping[int, float] | None) -> dict[int, float]:
    layers = sorted({layer for layer, _ in targets})
    if layer_sparsity is None:
        return {layer: sparsity for layer in layers}
    missing = [layer for layer in layers if layer not in layer_sparsity]
    if missing:
        raise LayerscopeError(f"layer_sparsity gives no sparsity for layers {missing}; it must cover every pruned layer")
    return {layer: check_sparsity(layer_sparsity[layer], f"sparsity of layer {layer}") for layer in layers}


def compute_masks(
    model: torch.nn.Module,
    method: str,
    sparsity: float,
    *,
    pattern: tuple[int, int] | str | None = None,
    calibration: Sequence[ScoredSequence] | None = None,
    pad_id: int = 0,
    targets: Sequence[tuple[int, str]] | None = None,
    layer_sparsity: Mapping[int, float] | None = None,
    sequential: bool = True,
    group: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Masks:
    """``{(layer, role): bool mask}`` (True = pruned) for ``method`` at ``sparsity``.

    ``pattern=(n, m)`` (or ``"n:m"``) prunes ``n`` in every ``m`` consecutive input columns instead
    (``sparsity`` is then not used). ``layer_sparsity`` gives each layer its own sparsity
    (unstructured only). ``group`` overrides the method's comparison group (:data:`DEFAULT_GROUP`).
    Wanda needs ``calibration`` sequences; the model is left unchanged.
    """
    check_method(method)
    sparsity = check_sparsity(sparsity)
    pattern = parse_pattern(pattern)
    group = DEFAULT_GROUP[method] if group is None else group
    if group not in GROUPS:
        raise LayerscopeError(f"unknown group {group!r}: allowed are {', '.join(GROUPS)}")
    if pattern is not None and layer_sparsity is not None:
        raise LayerscopeError("an N:M pattern fixes the sparsity of every layer (n/m): per-layer sparsity "
                              "(layer_sparsity) applies to unstructured pruning only")
    targets = _targets(model, targets)
    per_layer = _layer_sparsities(targets, sparsity, layer_sparsity)
    arch = architecture(model)
    if pattern is not None:
        for layer, role in targets:
            cols = arch.role_shape(role, layer)[1]
            if cols % pattern[1]:
                raise LayerscopeError(f"N:M pattern {pattern[0]}:{pattern[1]} needs in_features divisible by "
                                      f"{pattern[1]}, but role {role!r} of layer {layer} has {cols} input columns")
    elif all(s == 0 for s in per_layer.values()):
        return {}

    def mask_of(scores: torch.Tensor, layer: int) -> torch.Tensor:
        if pattern is not None:
            return nm_mask(scores, *pattern)
        return unstructured_mask(scores, per_layer[layer], group)

    if method == "magnitude":
        return {(layer, role): mask_of(magnitude_scores(arch.read_weight(role, layer)), layer) for layer, role in targets}
    if not calibration:
        raise LayerscopeError("wanda needs calibration sequences (its scores use the input norm of every column)")
    longest = max(len(s) for s in calibration)
    batches = make_batches(list(calibration), max_tokens=max(max_tokens, longest), pad_id=pad_id)
    with torch.no_grad():
        if sequential:
            return _wanda_sequential(model, batches, targets, mask_of)
        return _wanda_one_pass(model, batches, targets, mask_of)


def _wanda_one_pass(model, batches, targets, mask_of) -> Masks:
    """Every block's input statistics from one pass of the dense model."""
    arch = architecture(model)
    device = next(model.parameters()).device
    stats = RoleStatistics(model, targets)
    with stats.recording():
        for batch in batches:
            batch = batch.to(device)
            stats.set_mask(batch.attention_mask)
            arch.base_model()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return {(layer, role): mask_of(wanda_scores(arch.read_weight(role, layer), stats.input_norm(layer, role)), layer)
            for layer, role in targets}


def _wanda_sequential(model, batches, targets, mask_of) -> Masks:
    """Wanda's prune_wanda order with prefix reuse (see the module docstring)."""
    arch = architecture(model)
    device = next(model.parameters()).device
    by_layer: dict[int, list[tuple[int, str]]] = {}
    for layer, role in targets:
        by_layer.setdefault(layer, []).append((layer, role))
    block_returns_tuple(model)  # observed (one tiny forward) now, before the stopping hooks are in place
    masks: Masks = {}
    states: ResidualCache | None = None  # input of block i-1 per batch (None: start from the embeddings)
    store_device = device if device.type == "cuda" else "cpu"
    for i in range(max(by_layer) + 1):
        start = max(i - 1, 0)
        keys = by_layer.get(i, [])
        new_states = ResidualCache(store_device=store_device)
        current = {"batch": 0}

        def keep_input(_module, args, kwargs):
            new_states.put(current["batch"], i, block_input(args, kwargs))
            if not keys:
                raise _Stop  # nothing to calibrate in block i: its input is all the next step needs

        def stop(_module, _args, _output):
            raise _Stop

        previous = Prune({k: masks[k] for k in by_layer.get(i - 1, [])}) if i > 0 else None
        stats = RoleStatistics(model, keys) if keys else None
        handles = [arch.block(i).register_forward_pre_hook(keep_input, with_kwargs=True),
                   arch.block(i).register_forward_hook(stop)]
        try:
            with intervene(model, *([previous] if previous else [])), \
                    (stats.recording() if stats is not None else nullcontext()):
                for b, batch in enumerate(batches):
                    current["batch"] = b
                    batch = batch.to(device)
                    if stats is not None:
                        stats.set_mask(batch.attention_mask)
                    prefix = [StartFromCache(start, states.get(b, start, device))] if start > 0 else []
                    with intervene(model, *prefix):
                        _run(arch, batch)
        finally:
            for handle in handles:
                handle.remove()
        states = new_states
        for layer, role in keys:
            scores = wanda_scores(arch.read_weight(role, layer), stats.input_norm(layer, role))
            masks[(layer, role)] = mask_of(scores, layer)
    return masks


def _run(arch, batch) -> None:
    try:
        arch.base_model()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Stop:
        return
    raise RuntimeError("the forward pass did not reach the block it should stop at")  # pragma: no cover


def realised_sparsity(model: torch.nn.Module, targets: Sequence[tuple[int, str]]) -> float:
    """The fraction of exactly-zero weights over the ``targets`` matrices, as the model is now."""
    arch = architecture(model)
    zeros = total = 0
    for layer, role in targets:
        weight = arch.read_weight(role, layer)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


# ----------------------------------------------------------------------------------------------
# Per-layer sparsity from sensitivity


def allocate_sparsity(sensitivity: Mapping[int, float] | Sequence[float], target: float, spread: float = 0.08
                      ) -> dict[int, float]:
    """Per-layer sparsity, linear in the sensitivity rank: the most sensitive layer gets
    ``target - spread``, the least ``target + spread``, the mean is exactly ``target``.

    ``sensitivity`` maps layer -> score (larger = more sensitive), or is a list indexed by layer.
    Tied scores share their average rank (so they get the same sparsity and the mean stays
    ``target``). OWL (Yin et al. 2024) uses a spread of about 0.08 around the target."""
    items = dict(enumerate(sensitivity)) if not isinstance(sensitivity, Mapping) else dict(sensitivity)
    if not items:
        raise LayerscopeError("no layer sensitivities to allocate sparsity from")
    target = check_sparsity(target, "target sparsity")
    if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not 0 <= spread:
        raise LayerscopeError(f"spread {spread!r} is out of range: allowed spread >= 0")
    if target - spread < 0 or target + spread >= 1:
        raise LayerscopeError(f"target sparsity {target:g} with spread {spread:g} gives layer sparsities from "
                              f"{target - spread:g} to {target + spread:g}: allowed 0 <= target - spread and "
                              "target + spread < 1")
    layers = sorted(int(layer) for layer in items)
    scores = np.array([float(items[layer]) for layer in layers], dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = layers[int(np.flatnonzero(~np.isfinite(scores))[0])]
        raise LayerscopeError(f"sensitivity of layer {bad} is {items[bad]!r}: every sensitivity must be finite")
    if len(layers) == 1:
        return {layers[0]: target}
    from scipy.stats import rankdata

    rank = rankdata(-scores, method="average") - 1  # 0 = most sensitive
    position = rank / (len(layers) - 1)  # 0 .. 1, mean exactly 1/2
    return {layer: float(target + spread * (2 * p - 1)) for layer, p in zip(layers, position)}


def sensitivity_from_run(run_dir: str | Path) -> dict[int, float]:
    """Per-layer sensitivity from a ``layerscope sensitivity`` run's tidy ``results.csv``: the rows
    with ``unit == "block"``, ``mode == "skip"``, ``metric == "delta"`` (the loss increase when the
    block is skipped) and, where the table has a ``span`` column, ``span == 1`` (one block alone;
    longer spans skip several blocks at once), averaged per layer when there are several."""
    path = Path(run_dir)
    csv = path / "results.csv" if path.is_dir() else path
    if not csv.is_file():
        raise LayerscopeError(f"sensitivity results {str(csv)!r} do not exist: give the folder of a "
                              "`layerscope sensitivity` run (it holds results.csv)")
    try:
        frame = pd.read_csv(csv)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input file
        raise LayerscopeError(f"could not read {str(csv)!r} as a CSV table: {exc}") from exc
    needed = ["layer", "unit", "mode", "metric", "value"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise LayerscopeError(f"{str(csv)!r} lacks the columns {missing}: it is not a `layerscope sensitivity` result")
    rows = frame[(frame["unit"] == "block") & (frame["mode"] == "skip") & (frame["metric"] == "delta")]
    if "span" in rows:
        rows = rows[rows["span"] == 1]
    rows = rows[pd.to_numeric(rows["value"], errors="coerce").notna()]
    if rows.empty:
        raise LayerscopeError(f"{str(csv)!r} has no rows with unit 'block', mode 'skip' and metric 'delta': run "
                              "`layerscope sensitivity` with block skipping first")
    means = rows.assign(value=rows["value"].astype(float)).groupby("layer")["value"].mean()
    return {int(layer): float(value) for layer, value in means.items()}


# ----------------------------------------------------------------------------------------------
# The sweep


@dataclass
class PruningResult:
    """One wide row per point (method, sparsity, pattern) with loss, perplexity, realised sparsity and
    the seconds spent computing the masks; the dense model is the point ``method="dense"``."""

    rows: list[dict]
    config: dict = field(default_factory=dict)
    #: with ``run_pruning(keep_masks=True)``: the masks of the points computed in this call (not of
    #: points resumed from the store), by ``(method, sparsity, pattern)``; not saved
    masks: dict[tuple[str, float, str], Masks] = field(default_factory=dict, repr=False)

    def to_frame(self) -> pd.DataFrame:
        """Tidy: columns method, sparsity, pattern, metric, value."""
        return tidy_frame(self.rows, PARAMS, METRICS)

    def wide(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)[[*PARAMS, *[m for m in METRICS if any(m in r for r in self.rows)]]]

    def dense(self) -> dict:
        return next(r for r in self.rows if r["method"] == DENSE)

    def save(self, folder) -> list[Path]:
        """``results.csv``/``results.parquet`` (tidy) and ``perplexity.png`` into a run folder."""
        paths = list(folder.write_table(self.to_frame()))
        paths.append(self.plot(folder.path("perplexity.png")))
        return paths

    def plot(self, path: str | Path) -> Path:
        """Perplexity (log scale) against sparsity, one line per method (each from the dense model at 0),
        the dense model's perplexity as a dashed line."""
        from ..report.figures import line_chart

        dense = self.dense()
        series = {}
        for row in self.rows:
            if row["method"] == DENSE:
                continue
            name = row["method"] if row["pattern"] == UNSTRUCTURED else f"{row['method']} {row['pattern']}"
            series.setdefault(name, [(0.0, dense["perplexity"])]).append((row["sparsity"], row["perplexity"]))
        curves = {name: ([x for x, _ in sorted(pts)], [y for _, y in sorted(pts)]) for name, pts in series.items()}
        if not curves:
            curves = {DENSE: ([0.0], [dense["perplexity"]])}
        allocation = self.config.get("allocation", "uniform")
        return line_chart(None, curves, path, title=f"Perplexity after pruning ({allocation} per-layer sparsity)",
                          xlabel="sparsity (fraction of weights pruned per matrix)", ylabel="perplexity (log scale)",
                          baseline=dense["perplexity"], logy=True)


def run_pruning(
    model: torch.nn.Module,
    eval_sequences: Sequence[ScoredSequence],
    calibration: Sequence[ScoredSequence] | None,
    *,
    methods: Sequence[str] = METHODS,
    sparsities: Sequence[float] = (0.5,),
    pattern: tuple[int, int] | str | None = None,
    layer_allocation: Mapping[int, float] | None = None,
    spread: float = 0.08,
    store: ResultsStore,
    run_parts: dict,
    pad_id: int = 0,
    sequential: bool = True,
    targets: Sequence[tuple[int, str]] | None = None,
    progress: bool = True,
    keep_masks: bool = False,
) -> PruningResult:
    """Prune with each method at each sparsity (or with the N:M ``pattern``), score ``eval_sequences``.

    ``layer_allocation``: per-layer sensitivity scores (larger = more sensitive); each target
    sparsity is then spread over the layers by :func:`allocate_sparsity` with ``spread``. Every
    point (and the dense model, sparsity 0) is stored in ``store`` the moment it finishes, so a
    rerun resumes. The model is left unchanged. ``keep_masks`` keeps the masks of the points
    computed now in ``result.masks`` (e.g. to export one without computing it again).
    """
    methods = list(dict.fromkeys(check_method(m) for m in methods))
    if not methods:
        raise LayerscopeError(f"no pruning methods given: allowed are {', '.join(METHODS)}")
    pattern = parse_pattern(pattern)
    sparsities = [check_sparsity(s) for s in sparsities]
    if pattern is not None and layer_allocation is not None:
        raise LayerscopeError("an N:M pattern fixes the sparsity of every layer: per-layer allocation needs "
                              "unstructured pruning")
    if pattern is not None:
        sparsities = [pattern[0] / pattern[1]]
    targets = _targets(model, targets)
    if layer_allocation is not None:
        have = set(int(k) for k in layer_allocation)
        missing = sorted({layer for layer, _ in targets} - have)
        if missing:
            raise LayerscopeError(f"the sensitivity scores cover layers {sorted(have)} but not {missing}, "
                                  "which are to be pruned")
        for s in sparsities:
            if s > 0:
                allocate_sparsity(layer_allocation, s, spread)  # refuses s +- spread outside [0, 1) up front
    if "wanda" in methods and not calibration:
        raise LayerscopeError("wanda needs calibration sequences")
    evaluator = Evaluator(model, eval_sequences, pad_id=pad_id)
    label = pattern_label(pattern)
    points = [{"method": DENSE, "sparsity": 0.0, "pattern": "none"}]
    points += [{"method": m, "sparsity": s, "pattern": label} for m in methods for s in sparsities if s > 0]
    allocation = ("uniform" if layer_allocation is None
                  else {str(k): float(v) for k, v in sorted(layer_allocation.items())})
    run_id = fingerprint(run_parts, {"analysis": "prune", "allocation": allocation,
                                     "spread": spread if layer_allocation is not None else None,
                                     "sequential": sequential, "targets": [list(t) for t in targets]})

    kept: dict[tuple[str, float, str], Masks] = {}

    def compute(point: dict) -> dict:
        masks: Masks = {}
        started = time.perf_counter()
        if point["method"] != DENSE:
            layer_sparsity = (None if layer_allocation is None
                              else allocate_sparsity(layer_allocation, point["sparsity"], spread))
            masks = compute_masks(model, point["method"], point["sparsity"], pattern=pattern, calibration=calibration,
                                  pad_id=pad_id, targets=targets, layer_sparsity=layer_sparsity, sequential=sequential)
        seconds = time.perf_counter() - started
        if keep_masks and point["method"] != DENSE:
            kept[(point["method"], point["sparsity"], point["pattern"])] = masks
        with intervene(model, Prune(masks)):
            scores = evaluator.score()
            realised = realised_sparsity(model, targets)
        loss = scores.mean_loss
        with np.errstate(over="ignore"):
            perplexity = float(np.exp(loss))
        return {"loss": loss, "perplexity": perplexity,
                "realised_sparsity": realised, "mask_seconds": seconds}

    rows = run_sweep(points, compute, store, run_id, description=f"prune x{len(points)}", progress=progress)
    config = {"methods": methods, "sparsities": sparsities, "pattern": label, "run_id": run_id,
              "allocation": "uniform" if layer_allocation is None else "sensitivity", "spread": spread,
              "sequential": sequential, "n_targets": len(targets)}
    return PruningResult(rows=rows, config=config, masks=kept)


def export_pruned(model: torch.nn.Module, tokenizer, masks: Masks, out_dir: str | Path) -> Path:
    """Save the pruned model (and tokenizer) as a standard Hugging Face folder that plain
    ``transformers`` loads; the in-memory model is restored afterwards."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LayerscopeError(f"export folder {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with intervene(model, Prune(masks)):
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


__all__ = ["compute_masks", "realised_sparsity", "allocate_sparsity", "sensitivity_from_run", "PruningResult",
           "run_pruning", "export_pruned", "pattern_label", "PARAMS", "METRICS"]
