"""The critical-layers substitution sweep (window 5 over every centre), three ways, same data.

1. layerscope: both models loaded once; one pass of the fine-tuned model caches the residual
   stream at every window start; each window is evaluated from its first substituted block with
   the base model's blocks swapped in (no copy), batched by length.
2. in-memory, no prefix reuse: the same, but every window a full forward pass.
3. seed-style loop (the paper's ``prune_inference.py``): for every window, load both models
   afresh, copy the base parameters of the window into the fine-tuned model, then score the test
   examples one at a time with ``model(input_ids, labels=...)`` and average the losses.

All three average the per-example losses, so their numbers must agree.
Usage: python benchmarks/bench_substitute.py --base smollm2-135m --finetuned runs/ft-dolly [--samples 300]
           [--window 5] [--device cpu] [--dtype float32] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ablate import machine  # noqa: E402

from layerscope.analyses.substitution import run_substitution  # noqa: E402
from layerscope.analyses.windows import window_bounds, window_centres  # noqa: E402
from layerscope.data import instruction_sequences, load_instructions  # noqa: E402
from layerscope.evaluate.engine import Evaluator  # noqa: E402
from layerscope.interventions import SubstituteBlocks  # noqa: E402
from layerscope.models import architecture, load_model  # noqa: E402
from layerscope.runner import ResultsStore  # noqa: E402


def seed_style_window(base_path: str, tuned_path: str, layers: list[int], seqs, device, dtype) -> float:
    """Load both models, copy the window's base parameters in, score example by example."""
    base, _ = load_model(base_path, device=device, dtype=dtype)
    tuned, _ = load_model(tuned_path, device=device, dtype=dtype)
    blocks_t, blocks_b = architecture(tuned).blocks(), architecture(base).blocks()
    with torch.no_grad():
        for i in layers:
            for mine, theirs in zip(blocks_t[i].parameters(), blocks_b[i].parameters()):
                mine.data.copy_(theirs.data)
    del base
    losses = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s.input_ids], device=tuned.device)
            labels = ids.clone()
            labels[0, ~torch.tensor(s.target_mask, device=tuned.device)] = -100
            losses.append(float(tuned(input_ids=ids, labels=labels).loss))
    del tuned
    gc.collect()
    return float(np.mean(losses))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--finetuned", required=True)
    parser.add_argument("--instructions", default="prune_16")
    parser.add_argument("--template", default="dolly")
    parser.add_argument("--samples", type=int, default=None, help="test examples (default: all)")
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--seed-windows", type=int, default=None,
                        help="time the seed-style loop on this many windows only and extrapolate (it is slow)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--write", default=None, help="append a results section to this markdown file")
    args = parser.parse_args()

    tuned, tok = load_model(args.finetuned, device=args.device, dtype=args.dtype)
    base, _ = load_model(args.base, device=tuned.device, dtype=tuned.dtype)
    seqs = instruction_sequences(tok, load_instructions(args.instructions, limit=args.samples), args.template, max_len=1024)
    pad = tok.pad_token_id
    centres = window_centres(architecture(tuned).num_layers, args.window)
    sync = torch.cuda.synchronize if tuned.device.type == "cuda" else (lambda: None)
    Evaluator(tuned, seqs[:2], pad_id=pad).score()  # warm-up

    with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "r.sqlite") as store:
        sync(); t = time.perf_counter()
        ours = run_substitution(tuned, base, seqs, window=args.window, store=store, run_parts={"bench": 1},
                                pad_id=pad, progress=False).to_frame()
        sync(); ours_s = time.perf_counter() - t

    evaluator = Evaluator(tuned, seqs, pad_id=pad)
    sync(); t = time.perf_counter()
    plain = []
    for c in centres:
        start, end = window_bounds(c, args.window)
        plain.append(evaluator.score([SubstituteBlocks(base, range(start, end))]).example_mean_loss)
    sync(); plain_s = time.perf_counter() - t

    base_src = getattr(base, "_layerscope_source", args.base)
    from layerscope.models.embedded import EMBEDDED, fetch_embedded
    base_path = str(fetch_embedded(base_src)) if base_src in EMBEDDED else base_src
    del base
    gc.collect()
    timed = centres if args.seed_windows is None else centres[: args.seed_windows]
    t = time.perf_counter()
    seed_losses = [seed_style_window(base_path, args.finetuned, list(range(*window_bounds(c, args.window))), seqs,
                                     tuned.device, tuned.dtype) for c in timed]
    seed_s = (time.perf_counter() - t) * len(centres) / len(timed)

    diff_plain = float(np.max(np.abs(ours["loss"].to_numpy() - np.array(plain))))
    diff_seed = float(np.max(np.abs(ours["loss"].to_numpy()[: len(timed)] - np.array(seed_losses))))
    rows = [("layerscope (prefix reuse, batched, swap blocks)", ours_s), ("in-memory, no prefix reuse", plain_s),
            ("seed-style: reload both models per window, one example at a time"
             + (f" (timed on {len(timed)} of {len(centres)} windows, scaled)" if len(timed) < len(centres) else ""), seed_s)]
    lines = [f"## Substitution sweep: {args.finetuned} with {args.base} blocks, window {args.window}", "",
             f"- machine: {machine()}",
             f"- command: `python benchmarks/bench_substitute.py {' '.join(sys.argv[1:])}`",
             f"- data: {args.instructions} ({len(seqs)} examples, template {args.template}), {len(centres)} windows, "
             f"dtype {str(tuned.dtype).replace('torch.', '')}, device {tuned.device}",
             "", "| way | seconds | ratio to layerscope |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {sec:.1f} | {sec / ours_s:.2f}x |" for name, sec in rows]
    lines += ["", f"Max loss difference: in-memory {diff_plain:.2e}, seed-style {diff_seed:.2e} "
              "(per-example mean losses; the seed-style loop runs one example at a time, so no padding).", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
