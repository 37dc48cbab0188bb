"""Pruning time: Wanda (sequential, with prefix reuse) against magnitude pruning, and against a naive
Wanda that re-runs the whole model for every block; with the WikiText-2 test perplexity of each.

On the embedded model (``smollm2-135m``), at ``--sparsity`` unstructured and at each N:M
``--patterns`` (default 50% and 2:4), every way computes its masks for every q k v o gate up down
matrix and applies them (``Prune``); its seconds are those two steps together (apply is the
``Prune.apply`` part). Perplexity is then measured on ``--samples`` x ``--seq-len`` windows of the
WikiText-2 test split (``Evaluator``), untimed. Wanda calibrates on ``--calibration-samples``
windows of the WikiText-2 validation split.

1. magnitude: ``|W|``, the lowest of each whole matrix (Wanda's ``prune_magnitude``); no data.
2. wanda (layerscope): ``compute_masks(..., sequential=True)``, Wanda's ``prune_wanda`` order
   (block i calibrated with blocks < i pruned), each step starting every calibration batch from the
   kept input of block i-1: about 2 L block forwards.
3. wanda, one pass: every block's input norms from one pass of the dense model (not Wanda's order;
   shown for the cost of the calibration forward alone).
4. wanda, naive: for each block i the whole model is run again (embeddings to the last block) with
   blocks < i pruned, recording block i's inputs: L full passes, L^2 block forwards. Its masks must
   equal way 2's. ``--naive full`` runs it for every block; ``--naive sample`` (default) times the
   first ``--naive-blocks`` blocks and scales to all (each step is one full pass, so the cost is the
   same per block); its perplexity is then not measured. ``--naive off`` leaves it out.

Usage: python benchmarks/bench_prune.py [--samples 32] [--calibration-samples 32] [--seq-len 256]
           [--sparsity 0.5] [--patterns 2:4] [--naive sample|full|off] [--naive-blocks 3] [--threads N]
           [--md benchmarks/results/prune.md]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import time

import torch

from bench_ablate import machine, peak_rss_mib, publish  # benchmarks/ is the script's folder, first on sys.path

MODEL = "smollm2-135m"


def sync(model) -> None:
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def naive_wanda(model, calibration, sparsity, pattern, *, pad_id, blocks=None):
    """Wanda's order by brute force: for block i a full forward of the model with blocks < i pruned.
    Returns (masks, block forwards run). ``blocks`` limits it to the first blocks (for timing)."""
    from layerscope.capture.linear_stats import RoleStatistics
    from layerscope.data.batching import make_batches
    from layerscope.interventions import intervene, weight_targets
    from layerscope.interventions.pruning import Prune, nm_mask, unstructured_mask, wanda_scores
    from layerscope.models.architecture import architecture

    arch = architecture(model)
    device = next(model.parameters()).device
    batches = make_batches(list(calibration), max_tokens=max(4096, max(len(s) for s in calibration)), pad_id=pad_id)
    targets = weight_targets(model)
    masks, forwards = {}, 0
    for i in range(arch.num_layers if blocks is None else blocks):
        keys = [k for k in targets if k[0] == i]
        stats = RoleStatistics(model, keys)
        with torch.no_grad(), intervene(model, Prune(dict(masks))), stats.recording():
            for batch in batches:
                batch = batch.to(device)
                stats.set_mask(batch.attention_mask)
                arch.base_model()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                forwards += arch.num_layers
        for layer, role in keys:
            scores = wanda_scores(arch.read_weight(role, layer), stats.input_norm(layer, role))
            masks[(layer, role)] = nm_mask(scores, *pattern) if pattern else unstructured_mask(scores, sparsity, "row")
    return masks, forwards


def count_block_forwards(model):
    """A counter of real block forwards (forward pre-hooks on every block) and its removal."""
    from layerscope.models.architecture import architecture

    arch = architecture(model)
    count = [0]
    handles = [arch.block(i).register_forward_pre_hook(lambda *_a: count.__setitem__(0, count[0] + 1))
               for i in range(arch.num_layers)]
    return count, lambda: [h.remove() for h in handles]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--patterns", default="2:4", help="N:M patterns, comma-separated ('' for none)")
    parser.add_argument("--naive", choices=("sample", "full", "off"), default="sample")
    parser.add_argument("--naive-blocks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--md", default="benchmarks/results/prune.md")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    from layerscope.analyses.pruning import compute_masks, realised_sparsity
    from layerscope.data import lm_sequences, load_texts
    from layerscope.evaluate.engine import Evaluator
    from layerscope.interventions import block_returns_tuple, intervene, weight_targets
    from layerscope.interventions.pruning import Prune, parse_pattern
    from layerscope.models import load_model
    from layerscope.models.architecture import architecture

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    arch = architecture(model)
    L = arch.num_layers
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eval_seqs = lm_sequences(tok, load_texts("wikitext-2"), seq_len=args.seq_len, samples=args.samples, seed=0)
    calib = lm_sequences(tok, load_texts("wikitext-2-valid"), seq_len=args.seq_len, samples=args.calibration_samples, seed=0)
    targets = weight_targets(model)
    evaluator = Evaluator(model, eval_seqs, pad_id=pad)
    block_returns_tuple(model)
    Evaluator(model, calib[:2], pad_id=pad).score()  # warm-up
    t = time.perf_counter()
    dense = evaluator.score().perplexity
    eval_seconds = time.perf_counter() - t
    print(f"dense perplexity {dense:.3f} ({eval_seconds:.1f} s per evaluation)", flush=True)

    settings = [(f"{args.sparsity:g} unstructured", args.sparsity, None)]
    settings += [(f"{p} (N:M)", None, parse_pattern(p)) for p in args.patterns.split(",") if p.strip()]
    rows = []
    for label, sparsity, pattern in settings:
        s = sparsity if pattern is None else pattern[0] / pattern[1]
        base = None
        ways = [("magnitude", "magnitude", True), ("wanda (layerscope: sequential, prefix reuse)", "wanda", True),
                ("wanda, one pass of the dense model (not Wanda's order)", "wanda", False)]
        masks_by_way = {}
        for name, method, sequential in ways:
            count, remove = count_block_forwards(model)
            try:
                sync(model); t = time.perf_counter()
                masks = compute_masks(model, method, s, pattern=pattern, calibration=calib, pad_id=pad,
                                      sequential=sequential)
                sync(model); t_mask = time.perf_counter() - t
            finally:
                remove()
            iv = Prune(masks)
            t = time.perf_counter()
            undo = iv.apply(model)
            sync(model); t_apply = time.perf_counter() - t
            try:
                ppl = evaluator.score().perplexity
                realised = realised_sparsity(model, targets)
            finally:
                undo()
            masks_by_way[name] = masks
            seconds = t_mask + t_apply
            base = base or seconds
            rows.append({"setting": label, "way": name, "seconds": seconds, "apply": t_apply, "forwards": count[0],
                         "ppl": ppl, "realised": realised, "ratio": seconds / base, "estimated": False})
            print(f"{label} | {name}: {seconds:.2f} s (apply {t_apply:.2f} s), {count[0]} block forwards, "
                  f"perplexity {ppl:.3f}", flush=True)
        if args.naive != "off":
            blocks = None if args.naive == "full" else min(args.naive_blocks, L)
            sync(model); t = time.perf_counter()
            masks, forwards = naive_wanda(model, calib, s, pattern, pad_id=pad, blocks=blocks)
            sync(model); seconds = time.perf_counter() - t
            ppl = realised = float("nan")
            agree = all(torch.equal(masks[k], masks_by_way[ways[1][0]][k]) for k in masks)
            if blocks is None:
                with intervene(model, Prune(masks)):
                    ppl = evaluator.score().perplexity
                    realised = realised_sparsity(model, targets)
            else:
                seconds, forwards = seconds * L / blocks, forwards * L // blocks
            rows.append({"setting": label, "way": "wanda, naive: the whole model re-run for every block",
                         "seconds": seconds, "apply": float("nan"), "forwards": forwards, "ppl": ppl,
                         "realised": realised, "ratio": seconds / base, "estimated": blocks is not None,
                         "agree": agree, "blocks": blocks})
            print(f"{label} | naive wanda: {seconds:.2f} s{' (estimated)' if blocks else ''}, masks equal: {agree}",
                  flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    tokens = sum(len(x) for x in eval_seqs)
    lines = [
        "## Pruning: Wanda against magnitude pruning, and Wanda's calibration with and without prefix reuse",
        "",
        f"- machine: {machine()}; commit {commit}; {datetime.date.today().isoformat()}",
        f"- command: `python benchmarks/bench_prune.py --samples {args.samples} --calibration-samples "
        f"{args.calibration_samples} --seq-len {args.seq_len} --sparsity {args.sparsity:g} --patterns '{args.patterns}' "
        f"--naive {args.naive}{f' --naive-blocks {args.naive_blocks}' if args.naive == 'sample' else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}`",
        f"- model: {args.model} ({L} blocks, {str(model.dtype).replace('torch.', '')}, {next(model.parameters()).device}); "
        f"pruned: the {len(targets)} q k v o gate up down matrices of every block",
        f"- evaluation: {len(eval_seqs)} windows of WikiText-2 test ({tokens} tokens), dense perplexity {dense:.3f} "
        f"({eval_seconds:.1f} s per evaluation, not counted); calibration: {len(calib)} x {args.seq_len}-token "
        "windows of WikiText-2 validation",
        "- seconds = computing the masks (Wanda's calibration passes included) + applying them (`Prune`); block "
        "forwards = real decoder-block forward calls during the mask computation, summed over the calibration batches",
        "",
        "| setting | way | seconds | apply (s) | block forwards | ratio to magnitude | WikiText-2 perplexity | realised sparsity |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        est = " (estimated)" if r["estimated"] else ""
        apply_s = "" if r["apply"] != r["apply"] else f"{r['apply']:.2f}"
        ppl = "not run" if r["ppl"] != r["ppl"] else f"{r['ppl']:.3f}"
        realised = "" if r["realised"] != r["realised"] else f"{r['realised']:.4f}"
        lines.append(f"| {r['setting']} | {r['way']} | {r['seconds']:.2f}{est} | {apply_s} | {r['forwards']}{est} | "
                     f"{r['ratio']:.1f}x | {ppl} | {realised} |")
    lines.append("")
    for r in rows:
        if "agree" in r:
            what = (f"its first {r['blocks']} blocks timed and scaled to {L}" if r["blocks"] else "run for every block")
            ours = next(x for x in rows if x["setting"] == r["setting"] and x["way"].startswith("wanda (layerscope"))
            lines.append(f"- {r['setting']}, naive Wanda ({what}): {r['seconds'] / ours['seconds']:.1f}x the time of "
                         f"layerscope's sequential Wanda; masks equal to it on the blocks it ran: "
                         f"{'yes' if r['agree'] else 'NO'}")
    lines.append(f"- peak RSS {peak_rss_mib():.0f} MiB")
    publish(lines, args.md, started)


if __name__ == "__main__":
    main()
