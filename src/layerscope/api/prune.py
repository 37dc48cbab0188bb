"""The pruning job: magnitude and Wanda at several sparsities (or N:M), perplexity against sparsity,
optionally the pruned model exported as a Hugging Face folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import LayerscopeError
from .common import check_positive, pad_id_of

DEFAULT_METHODS = ("magnitude", "wanda")


def _source_id(source: str) -> str:
    """What text a corpus source names: the shared file behind a short name, else the resolved path."""
    from ..data.corpus import CORPORA, shared_data_dir

    if source in CORPORA:
        return str((shared_data_dir() / CORPORA[source]).resolve())
    if source == "builtin" or source.startswith("hf:"):
        return source
    return str(Path(source).expanduser().resolve())


def resolve_points(methods: Sequence[str], sparsities: Sequence[float] | None, pattern) -> tuple[list[str], list[float], tuple | None]:
    """Validated ``(methods, sparsities, pattern)``; with a pattern the sparsity is ``n/m``."""
    from ..interventions.pruning import METHODS, check_method, check_sparsity, parse_pattern

    methods = list(dict.fromkeys(methods))
    if not methods:
        raise LayerscopeError(f"no pruning method given: allowed are {', '.join(METHODS)}")
    for method in methods:
        check_method(method)
    pattern = parse_pattern(pattern)
    if sparsities is not None:
        sparsities = list(dict.fromkeys(check_sparsity(s) for s in sparsities))
        if not sparsities:
            raise LayerscopeError("no sparsity given: allowed are numbers 0 <= s < 1, e.g. 0.5")
    if pattern is not None:
        implied = pattern[0] / pattern[1]
        if sparsities is not None and any(abs(s - implied) > 1e-12 for s in sparsities):
            raise LayerscopeError(f"sparsity {', '.join(f'{s:g}' for s in sparsities)} conflicts with pattern "
                                  f"{pattern[0]}:{pattern[1]}, which prunes {implied:g} of every matrix: leave the "
                                  "sparsity out")
        sparsities = [implied]
    elif sparsities is None:
        sparsities = [0.5]
    return methods, sparsities, pattern


def prune(
    model: str = "smollm2-135m",
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    sparsities: Sequence[float] | None = None,
    pattern: str | tuple[int, int] | None = None,
    allocation: str | Path = "uniform",
    spread: float = 0.08,
    data: str = "wikitext-2",
    samples: int = 32,
    seq_len: int = 256,
    calibration: str = "wikitext-2-valid",
    calibration_samples: int = 32,
    sequential: bool = True,
    export: str | Path | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
):
    """Prune with each method at each sparsity (default 0.5; with ``pattern="2:4"`` N:M instead),
    measure the perplexity on ``data`` beside the dense model, write the run folder, and return
    ``(result, folder)``.

    Wanda calibrates on ``calibration_samples`` windows of ``calibration`` (by default WikiText-2's
    validation split, never the evaluation text). ``allocation`` is ``"uniform"`` or the folder of a
    ``layerscope sensitivity`` run: each layer's sparsity is then spread by ``spread`` around the
    target by its sensitivity. ``export=DIR`` (one method and one sparsity) also saves the pruned
    model there as a Hugging Face folder.
    """
    from ..analyses.pruning import (allocate_sparsity, compute_masks, export_pruned, pattern_label,
                                    run_pruning, sensitivity_from_run)
    from ..data import lm_sequences, load_texts
    from ..data.sequences import sequences_fingerprint
    from ..models import load_model, model_fingerprint
    from ..report.html import write_report
    from ..runner import ResultsStore, RunFolder

    methods, sparsities, pattern = resolve_points(methods, sparsities, pattern)
    check_positive("samples", samples)
    check_positive("calibration-samples", calibration_samples)
    check_positive("seq-len", seq_len, 2)
    sensitivity = None
    if str(allocation) != "uniform":
        if pattern is not None:
            raise LayerscopeError("an N:M pattern fixes the sparsity of every layer: --allocation from a sensitivity "
                                  "run needs unstructured pruning (leave out --pattern)")
        sensitivity = sensitivity_from_run(allocation)
        for s in sparsities:
            if s > 0:
                allocate_sparsity(sensitivity, s, spread)  # refuses target +- spread outside [0, 1) now
    positive = [s for s in sparsities if s > 0]
    if export is not None and (len(methods) != 1 or len(positive) != 1):
        raise LayerscopeError(f"--export saves one pruned model: give one method and one sparsity above 0 "
                              f"(got methods {', '.join(methods)} and sparsities {', '.join(f'{s:g}' for s in positive) or 'none'})")
    needs_calibration = "wanda" in methods and bool(positive)
    if needs_calibration and _source_id(calibration) == _source_id(data):
        raise LayerscopeError(f"calibration {calibration!r} and evaluation data {data!r} are the same text: Wanda must "
                              "calibrate on other text (e.g. --calibration wikitext-2-valid)")

    eval_texts = load_texts(data)
    calib_texts = load_texts(calibration) if needs_calibration else None
    net, tok = load_model(model, dtype=dtype, device=device, seed=seed)
    eval_seqs = lm_sequences(tok, eval_texts, seq_len=seq_len, samples=samples, seed=seed)
    calib_seqs = None
    if calib_texts is not None:
        calib_seqs = lm_sequences(tok, calib_texts, seq_len=seq_len, samples=calibration_samples, seed=seed)
        shared = {s.input_ids for s in eval_seqs} & {s.input_ids for s in calib_seqs}
        if shared:
            raise LayerscopeError(f"{len(shared)} calibration window(s) equal evaluation windows: calibrate on other "
                                  "text than the evaluation data")
    folder = RunFolder(Path(out) if out else None, "prune")
    config = {"analysis": "prune", "model": model, "methods": methods, "sparsities": sparsities,
              "pattern": pattern_label(pattern), "allocation": str(allocation), "spread": spread if sensitivity else None,
              "data": data, "samples": samples, "seq_len": seq_len,
              "calibration": calibration if needs_calibration else None,
              "calibration_samples": calibration_samples if needs_calibration else None,
              "sequential": sequential, "export": str(export) if export is not None else None,
              "n_sequences": len(eval_seqs), "n_calibration": len(calib_seqs) if calib_seqs else 0,
              "dtype": str(net.dtype), "device": str(net.device)}
    run_parts = {"model": model_fingerprint(net), "data": data, "data_fingerprint": sequences_fingerprint(eval_seqs),
                 "calibration_fingerprint": sequences_fingerprint(calib_seqs) if calib_seqs else None,
                 "seed": seed, "dtype": str(net.dtype), "version": __version__}
    folder.write_run_json(config, seed=seed, fingerprint=run_parts)
    pad = pad_id_of(tok)
    with ResultsStore(folder.store_path) as store:
        result = run_pruning(net, eval_seqs, calib_seqs, methods=methods, sparsities=sparsities, pattern=pattern,
                             layer_allocation=sensitivity, spread=spread, store=store, run_parts=run_parts, pad_id=pad,
                             sequential=sequential, progress=progress, keep_masks=export is not None)
    result.config.update(config)
    result.config["allocation"] = "uniform" if sensitivity is None else f"sensitivity (spread {spread:g})"
    paths = result.save(folder)

    summary = {**config}
    dense = result.dense()
    summary["dense perplexity"] = f"{dense['perplexity']:.4f}"
    for row in result.rows:
        if row["method"] != "dense":
            summary[f"{row['method']} {row['pattern']} {row['sparsity']:g}: perplexity"] = (
                f"{row['perplexity']:.4f} (realised sparsity {row['realised_sparsity']:.4f}, masks {row['mask_seconds']:.1f} s)")
    if export is not None:
        masks = result.masks.get((methods[0], positive[0], pattern_label(pattern)))
        if masks is None:  # the point was resumed from the store: compute its masks again (deterministic)
            layer_sparsity = None if sensitivity is None else allocate_sparsity(sensitivity, positive[0], spread)
            masks = compute_masks(net, methods[0], positive[0], pattern=pattern, calibration=calib_seqs, pad_id=pad,
                                  layer_sparsity=layer_sparsity, sequential=sequential)
        exported = export_pruned(net, tok, masks, export)
        (exported / "layerscope_pruning.json").write_text(json.dumps(
            {"source_model": model, "method": methods[0], "sparsity": positive[0], "pattern": pattern_label(pattern),
             "allocation": str(allocation), "spread": spread if sensitivity else None,
             "calibration": config["calibration"], "calibration_samples": config["calibration_samples"],
             "seed": seed, "run": str(folder.out)}, indent=2) + "\n")
        summary["exported model"] = str(exported)
        result.config["export"] = str(exported)
    notes = [
        "magnitude: score |W|, the lowest int(s * size) of each whole matrix pruned (Wanda's magnitude baseline). "
        "wanda: score |W_ij| * ||X_j||_2 over the calibration tokens, the lowest int(s * in_features) of each output "
        "row pruned; calibrated block by block with the earlier blocks already pruned (Wanda's prune_wanda).",
        "N:M: in every m consecutive input columns of each row the n lowest-scored weights are pruned.",
        "Pruned: every q k v o gate up down matrix of every block; embeddings, norms, biases and the head are kept.",
        "realised_sparsity: the fraction of exactly-zero weights over the pruned matrices; mask_seconds: time to "
        "compute the masks (Wanda's includes its calibration passes).",
    ]
    if sensitivity is not None:
        notes.append(f"per-layer sparsity from {allocation}: linear in the rank of the block-skip loss increase, the "
                     f"most sensitive layer target - {spread:g}, the least target + {spread:g}, mean = target.")
    write_report(folder.path("report.html"), title=f"Pruning {model}", summary=summary, table=result.to_frame(),
                 figures=[p for p in paths if p.suffix == ".png"], notes=notes)
    return result, folder.out
