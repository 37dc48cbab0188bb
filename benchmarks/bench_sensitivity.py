"""The sensitivity sweep (every block and role, skip / zero / mean ablation), three ways side by side.

1. layerscope: ``run_sensitivity``: the model loaded once, one statistics pass (means and proxies),
   one baseline pass that caches the residual stream at every block, each point evaluated from its
   first changed block (prefix reuse), each point stored in SQLite.
2. same engine, no prefix reuse: every point a full forward pass.
3. seed-framework style: a fresh ``copy.deepcopy`` of the model per point (so that nothing leaks
   between points), the ablation made on the copy, a full ``model(labels=...)`` pass per batch.

All three score the same token windows, so their losses must agree.
Usage: python benchmarks/bench_sensitivity.py [--units block,o,down] [--samples 8] [--seq-len 128]
           [--out benchmarks/results/sensitivity.md]
"""

from __future__ import annotations

import argparse
import copy
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_ablate import machine, peak_rss_mib, publish

from layerscope.analyses.sensitivity import collect_statistics, run_sensitivity
from layerscope.data import lm_sequences, load_texts
from layerscope.evaluate.engine import Evaluator
from layerscope.interventions import MeanAblateBlock, MeanAblateRole, SkipBlock, ZeroRole, intervene
from layerscope.models import architecture, load_model
from layerscope.runner import ResultsStore


def ablation_of(point: dict, blocks, roles):
    unit, mode, layer = point["unit"], point["mode"], point["layer"]
    if unit == "block":
        return SkipBlock([layer]) if mode == "skip" else MeanAblateBlock({layer: blocks.mean_update(layer)})
    return ZeroRole(unit, [layer]) if mode == "zero" else MeanAblateRole(unit, {layer: roles.output_mean(layer, unit)})


def hf_loss(model, batches) -> float:
    """Token-weighted loss with plain transformers, one ``model(labels=...)`` call per batch."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in batches:
            labels = b.input_ids.masked_fill(~b.target_mask, -100)
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=labels, use_cache=False)
            n = int(b.target_mask[:, 1:].sum())
            total, count = total + float(out.loss) * n, count + n
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wikitext-2")
    parser.add_argument("--units", default="block,o,down")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/sensitivity.md")
    args = parser.parse_args()
    started = time.perf_counter()

    model, tok = load_model(args.model)
    seqs = lm_sequences(tok, load_texts(args.data), seq_len=args.seq_len, samples=args.samples, seed=0)
    pad = tok.pad_token_id or 0
    units = tuple(args.units.split(","))
    L = architecture(model).num_layers
    Evaluator(model, seqs[:2], pad_id=pad).score()  # warm-up
    rss0 = peak_rss_mib()

    with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "r.sqlite") as store:
        t = time.perf_counter()
        ours = run_sensitivity(model, seqs, units=units, spans=(1,), store=store, run_parts={"bench": 1}, pad_id=pad,
                               progress=False)
        ours_s = time.perf_counter() - t
    ours_rss = peak_rss_mib() - rss0
    points = [{k: r[k] for k in ("layer", "unit", "mode")} for r in ours.rows]
    ours_loss = np.array([r["loss"] for r in ours.rows])
    print(f"layerscope: {ours_s:.1f} s for {len(points)} points", flush=True)

    evaluator = Evaluator(model, seqs, pad_id=pad)
    t = time.perf_counter()
    blocks, roles = collect_statistics(model, evaluator, [(layer, u) for u in units if u != "block" for layer in range(L)])
    evaluator.score()
    full = np.array([evaluator.score([ablation_of(p, blocks, roles)]).mean_loss for p in points])
    full_s = time.perf_counter() - t
    print(f"no prefix reuse: {full_s:.1f} s", flush=True)

    batches = evaluator.batches
    t = time.perf_counter()
    hf_loss(model, batches)  # the baseline
    seed_style = []
    for p in points:
        fresh = copy.deepcopy(model)
        with intervene(fresh, ablation_of(p, blocks, roles)):  # on the copy; the copy is then dropped
            seed_style.append(hf_loss(fresh, batches))
        del fresh
        gc.collect()
    seed_s = time.perf_counter() - t
    seed_style = np.array(seed_style)
    print(f"seed style: {seed_s:.1f} s", flush=True)

    tokens = sum(len(s) for s in seqs)
    lines = [
        f"### sensitivity: {args.model}, {L} layers, units {args.units}, {len(points)} points, "
        f"{len(seqs)} x {args.seq_len} WikiText-2 tokens ({tokens})",
        "",
        f"- machine: {machine()}; float32 CPU",
        f"- command: `python benchmarks/bench_sensitivity.py --units {args.units} --samples {args.samples} --seq-len {args.seq_len}`",
        f"- block forwards: layerscope {ours.config['block_forwards']}, without prefix reuse {evaluator.block_forwards}",
        "",
        "| way | time (s) | ratio to layerscope | max abs loss difference |",
        "| --- | ---: | ---: | ---: |",
        f"| layerscope `run_sensitivity` (prefix reuse, statistics pass, SQLite store) | {ours_s:.1f} | 1.00 | 0 |",
        f"| same engine, every point a full pass | {full_s:.1f} | {full_s / ours_s:.2f} | {np.abs(full - ours_loss).max():.1e} |",
        f"| seed style: deepcopy per point, plain `model(labels=...)` | {seed_s:.1f} | {seed_s / ours_s:.2f} | "
        f"{np.abs(seed_style - ours_loss).max():.1e} |",
        "",
        f"Peak resident memory above the loaded model: {ours_rss:.0f} MiB after layerscope's sweep (its residual cache), "
        f"{peak_rss_mib() - rss0:.0f} MiB after all three (the seed style holds two models at once).",
    ]
    publish(lines, args.out, started)


if __name__ == "__main__":
    main()
