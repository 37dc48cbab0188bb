"""Full per-layer ablation sweep of a model, three ways side by side, on the same data.

1. layerscope: the model loaded once, one baseline pass that caches the residual stream, each
   point evaluated from its first skipped block (prefix reuse).
2. in-memory, no prefix reuse: the model loaded once, every point a full forward pass.
3. reload per point: what seed research code does: load the model afresh for every point, drop the
   block, run a full forward pass.

All three use the same token windows and batches, so their losses must agree.
Usage: python benchmarks/bench_ablate.py [--model smollm2-135m] [--samples 16] [--seq-len 128]
           [--device cpu] [--dtype float32] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from layerscope.analyses.ablation import run_ablation, window_centres
from layerscope.data import lm_sequences, load_texts
from layerscope.evaluate.engine import Evaluator
from layerscope.interventions import SkipBlock, intervene
from layerscope.models import architecture, load_model
from layerscope.models.embedded import EMBEDDED, embedded_gguf
from layerscope.runner import ResultsStore


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def peak_rss_mib() -> float:
    """This process image's peak resident memory (VmHWM), MiB; ``ru_maxrss`` where /proc is absent."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def publish(lines: list[str], md: str | Path, started: float) -> None:
    """Print a benchmark's markdown section and write it to ``md`` (pasted into BENCHMARKS.md by hand)."""
    text = "\n".join([*lines, ""])
    print(text)
    md = Path(md)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(f"(written to {md}; whole run {time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="builtin")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--skip-reload", action="store_true", help="skip the slow reload-per-point way")
    parser.add_argument("--write", default=None, help="append a results section to this markdown file")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    load_seconds = time.perf_counter() - t0
    seqs = lm_sequences(tok, load_texts(args.data), seq_len=args.seq_len, samples=args.samples, seed=0)
    pad = tok.pad_token_id
    num_layers = architecture(model).num_layers
    dtype_name = str(model.dtype).replace("torch.", "")
    centres = window_centres(num_layers, 1)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    # Warm-up (allocator, page cache, thread pool) so no way pays it alone.
    Evaluator(model, seqs[:2], pad_id=pad).score()

    # 1. layerscope (including its SQLite store, as the CLI runs it)
    with tempfile.TemporaryDirectory() as tmp, ResultsStore(Path(tmp) / "r.sqlite") as store:
        sync(); t = time.perf_counter()
        result = run_ablation(model, seqs, store=store, run_parts={"bench": 1}, pad_id=pad, progress=False)
        sync(); ours_s = time.perf_counter() - t
    ours = np.array([r["loss"] for r in result.rows])
    print(f"layerscope: {ours_s:.2f} s", flush=True)

    # 2. in memory, every point a full forward pass
    evaluator = Evaluator(model, seqs, pad_id=pad)
    sync(); t = time.perf_counter()
    base = evaluator.score().mean_loss
    naive = np.array([evaluator.score([SkipBlock([c])]).mean_loss for c in centres])
    sync(); naive_s = time.perf_counter() - t
    print(f"in-memory, no prefix reuse: {naive_s:.2f} s", flush=True)

    # 2b. in memory, plain transformers: model(labels=...) per batch and per point
    hf_batches = Evaluator(model, seqs, pad_id=pad).batches
    blocks = architecture(model).blocks()

    def hf_loss() -> float:
        total, count = 0.0, 0
        with torch.inference_mode():
            for b in hf_batches:
                labels = b.input_ids.masked_fill(~b.target_mask, -100).to(model.device)
                out = model(input_ids=b.input_ids.to(model.device), attention_mask=b.attention_mask.to(model.device), labels=labels, use_cache=False)
                n = int(b.target_mask[:, 1:].sum())
                total, count = total + float(out.loss) * n, count + n
        return total / count

    sync(); t = time.perf_counter()
    hf_loss()
    hf = []
    for c in centres:
        removed = blocks[c]
        del blocks[c]  # what seed code does: drop the layer from the ModuleList, put it back after
        try:
            hf.append(hf_loss())
        finally:
            blocks.insert(c, removed)
    sync(); hf_s = time.perf_counter() - t
    hf = np.array(hf)
    print(f"in-memory, plain transformers loss: {hf_s:.2f} s", flush=True)

    # 3. reload the model for every point, from the GGUF it ships as (what code without
    #    layerscope's converted cache must do) and, for transparency, from a safetensors folder.
    def reload_loop(source: str) -> tuple[float, np.ndarray]:
        losses = np.full(len(centres), np.nan)
        sync(); t = time.perf_counter()
        fresh, _ = load_model(source, device=args.device, dtype=args.dtype)
        Evaluator(fresh, seqs, pad_id=pad).score()  # the baseline, as the seed loop computes it
        del fresh
        for i, c in enumerate(centres):
            fresh, _ = load_model(source, device=args.device, dtype=args.dtype)
            with intervene(fresh, SkipBlock([c])):
                losses[i] = Evaluator(fresh, seqs, pad_id=pad).score().mean_loss
            del fresh
            gc.collect()
        sync()
        return time.perf_counter() - t, losses

    reloads = []
    if not args.skip_reload:
        del evaluator, model
        gc.collect()
        sources = [("reload per point, safetensors folder", args.model)]
        if args.model in EMBEDDED and embedded_gguf(args.model).exists():
            sources.insert(0, ("reload per point, from the GGUF", str(embedded_gguf(args.model))))
        for label, source in sources:
            seconds, losses = reload_loop(source)
            print(f"{label}: {seconds:.2f} s", flush=True)
            reloads.append((label, seconds, float(np.abs(ours - losses).max())))

    diff_naive = float(np.abs(ours - naive).max())
    tokens = sum(len(s) for s in seqs)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"### ablate: {args.model}, {num_layers} layers, {len(seqs)} x {args.seq_len} tokens ({tokens} tokens), {dtype_name}",
        "",
        f"- machine: {machine()}; device {args.device or 'auto'}; commit {commit}",
        f"- command: `python benchmarks/bench_ablate.py --model {args.model} --samples {args.samples} "
        f"--seq-len {args.seq_len}{' --device ' + args.device if args.device else ''}{' --dtype ' + args.dtype if args.dtype else ''}`",
        f"- model load (converted cache): {load_seconds:.2f} s; baseline loss {base:.4f}; {len(centres)} points",
        "",
        "| way | time (s) | ratio to layerscope | max abs loss difference |",
        "| --- | ---: | ---: | ---: |",
        f"| layerscope (prefix reuse) | {ours_s:.2f} | 1.00 | 0 |",
        f"| in-memory, no prefix reuse (same engine) | {naive_s:.2f} | {naive_s / ours_s:.2f} | {diff_naive:.2e} |",
        f"| in-memory, plain transformers `model(labels=...)`, layer deleted | {hf_s:.2f} | {hf_s / ours_s:.2f} | {float(np.abs(ours - hf).max()):.2e} |",
    ]
    lines += [f"| {label} | {seconds:.2f} | {seconds / ours_s:.2f} | {diff:.2e} |" for label, seconds, diff in reloads]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
