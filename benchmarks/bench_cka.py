"""All-pairs CKA between the layers of a model: layerscope against a pairwise loop and torch-cka.

Three ways side by side, in one run, on the same data; every way's matrix is checked against ours.

1. layerscope: ``capture_block_outputs`` (one forward pass, hooks on the blocks), then
   ``cka_matrix(acts)``: each layer's centred Gram matrix once, all L x L pairs from one matrix
   product. Capture and metric are timed separately.
2. a direct pairwise loop: for each of the L x L pairs, linear CKA from scratch with the textbook
   formula in float64 numpy (centre X and Y, ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``), nothing
   shared between pairs; and, for reference, a loop of layerscope's own scalar ``linear_cka``.
3. the ``torch-cka`` package (``CKA(model1, model2, ...).compare(loader)``). It hooks named modules,
   calls ``model(x)`` on each batch of a DataLoader (no attention mask), flattens each hooked output
   to ``(batch, tokens * hidden)`` and accumulates Nguyen et al.'s unbiased HSIC over batches, every
   pair from scratch, in float32. It cannot pool (``last_prompt``) nor mask padding, so it gets its own
   workload: the first ``--tokens`` tokens of every sequence (no padding needed), batches of
   ``--batch-size``; the same model passed as both models, its decoder blocks as the layers. Ours on
   that workload: the same hooks' outputs flattened, accumulated by ``MinibatchCKA`` (the same
   estimator); the pairwise loop: Eq. 3 of Nguyen et al. per batch and pair in float64 numpy.
   torch-cka's HSIC works on uncentred Gram matrices; in float32 that cancels away on layers with
   large activations shared by all examples, so it also runs with the model (and hence its
   arithmetic) in float64 on the first ``--check-batches`` batches, against ours on the same float64
   model, to check that the two compute the same estimator.

A synthetic case (``--synthetic-n`` examples, random activations correlated from layer to layer)
times the metric part alone at larger n.

On a shared 2-core machine where another job keeps a core busy, two threads per library make every
parallel op wait a scheduler time slice (milliseconds; the machine line reports one small op's
time); run with ``OPENBLAS_NUM_THREADS=1 ... --threads 1`` then.
Usage: python benchmarks/bench_cka.py [--model smollm2-135m] [--samples 256] [--tokens 64]
           [--batch-size 32] [--check-batches 2] [--synthetic-n 4096] [--threads 2] [--skip-torch-cka]
           [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ablate import machine  # noqa: E402

from layerscope.capture import block_output, capture_block_outputs
from layerscope.data.instructions import instruction_sequences, load_instructions
from layerscope.metrics import MinibatchCKA, cka_matrix, linear_cka
from layerscope.models import architecture, load_model


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t


def op_latency_ms() -> float:
    """Time of one small multi-threaded torch op: ~0.02 ms on a quiet machine, a scheduler time slice
    (several ms) when another job keeps the cores busy and a thread of each parallel region waits."""
    x = torch.ones(238, 576, dtype=torch.float64)
    t = time.perf_counter()
    for _ in range(50):
        x.mean(0)
    return (time.perf_counter() - t) * 20


def textbook_cka(X: np.ndarray, Y: np.ndarray) -> float:
    X = X.astype(np.float64)
    Y = Y.astype(np.float64)
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def pairwise(acts, fn) -> np.ndarray:
    return np.array([[fn(x, y) for y in acts] for x in acts])


def textbook_hsic1(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC (Nguyen et al. 2021, Eq. 3) of two Gram matrices."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    ones = np.ones(n)
    return (np.trace(K @ L) + K.sum() * L.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (ones @ K @ L @ ones)) / (n * (n - 3))


def textbook_minibatch_cka(batches) -> np.ndarray:
    """Minibatch unbiased CKA, every pair and batch from scratch (``batches``: per batch, per layer (b, D))."""
    L = len(batches[0])
    xy, xx, yy = np.zeros((L, L)), np.zeros((L, L)), np.zeros((L, L))
    for acts in batches:
        for i in range(L):
            for j in range(L):
                X, Y = acts[i].astype(np.float64), acts[j].astype(np.float64)
                K, G = X @ X.T, Y @ Y.T
                xy[i, j] += textbook_hsic1(K, G)
                xx[i, j] += textbook_hsic1(K, K)
                yy[i, j] += textbook_hsic1(G, G)
    return xy / np.sqrt(xx * yy)


@torch.inference_mode()
def capture_tokens(model, batches) -> list[list[np.ndarray]]:
    """Per batch, per block: the block's output on every token, flattened to (b, tokens * hidden)."""
    arch = architecture(model)
    current: list = [None] * arch.num_layers

    def hook(i):
        return lambda _m, _a, out: current.__setitem__(i, block_output(out).flatten(1).numpy())

    handles = [arch.block(i).register_forward_hook(hook(i)) for i in range(arch.num_layers)]
    captured = []
    try:
        for ids in batches:
            arch.base_model()(input_ids=ids, use_cache=False)
            captured.append(list(current))
    finally:
        for h in handles:
            h.remove()
    return captured


def minibatch_ours(captured) -> np.ndarray:
    m = MinibatchCKA(len(captured[0]))
    for acts in captured:
        m.update(acts)
    return m.compute()


def torch_cka_matrix(model, ids: torch.Tensor, batch_size: int) -> np.ndarray:
    """torch-cka's matrix for the model's blocks (the same model as both models), computed in the model's dtype."""
    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    base = architecture(model).base_model()
    blocks = {id(b) for b in architecture(model).blocks()}
    names = [name for name, module in base.named_modules() if id(module) in blocks]
    loader = DataLoader(TensorDataset(ids), batch_size=batch_size)
    runner = CKA(base, base, "model (1)", "model (2)", model1_layers=names, model2_layers=names, device="cpu")
    default = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)  # its HSIC makes torch.ones(N, 1) in the default dtype
    try:
        with torch.inference_mode():  # its compare() leaves autograd on; a user would turn it off
            runner.compare(loader, loader)
    except AssertionError as exc:  # "HSIC computation resulted in NANs": the matrix is kept all the same
        print(f"torch-cka ({model.dtype}): {exc}", flush=True)
    finally:
        torch.set_default_dtype(default)
    return runner.hsic_matrix.numpy().astype(np.float64)


def table(rows, unit: str = "time (s)") -> list[str]:
    """rows: (way, seconds, max abs difference to ours or None); the first row is ours."""
    ref = rows[0][1]
    lines = [f"| way | {unit} | ratio to layerscope | max abs difference to layerscope |", "| --- | ---: | ---: | ---: |"]
    for way, seconds, diff in rows:
        diff_text = "-" if diff is None else diff if isinstance(diff, str) else f"{diff:.2e}"
        lines.append(f"| {way} | {seconds:.3f} | {seconds / ref:.2f} | {diff_text} |")
    return lines


def maxdiff(a: np.ndarray, b: np.ndarray) -> float | str:
    """Largest |a - b| over the entries where b is finite; entries of b that are not (nan, inf) are counted."""
    bad = ~np.isfinite(b) & np.isfinite(a)
    diff = float(np.nanmax(np.where(bad, np.nan, np.abs(a - b))))
    return f"{diff:.2e} ({int(bad.sum())} of {b.size} entries nan/inf)" if bad.any() else diff


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=256, help="Dolly examples requested (too-long ones are dropped)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence in the torch-cka workload")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the torch-cka workload")
    parser.add_argument("--synthetic-n", type=int, default=4096, help="examples in the synthetic case (0: skip it)")
    parser.add_argument("--synthetic-d", type=int, default=576)
    parser.add_argument("--check-batches", type=int, default=2, help="batches for the float64 torch-cka check")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (numpy's BLAS: set OPENBLAS_NUM_THREADS)")
    parser.add_argument("--skip-torch-cka", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start, latency_start = os.getloadavg()[0], op_latency_ms()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True).stdout.strip()

    model, tok = load_model(args.model)
    arch = architecture(model)
    L = arch.num_layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note about examples too long for max_len
        seqs = instruction_sequences(tok, load_instructions("dolly", limit=args.samples), "dolly")
    n = len(seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    capture_block_outputs(model, seqs[:2], pooling="last_prompt", pad_id=pad)  # warm-up

    # A. pooled (last_prompt), the critical-layers workload
    acts, capture_s = timed(capture_block_outputs, model, seqs, pooling="last_prompt", pad_id=pad)
    ours, ours_s = timed(cka_matrix, acts)
    naive, naive_s = timed(pairwise, acts, textbook_cka)
    loop, loop_s = timed(pairwise, acts, linear_cka)
    print(f"pooled: capture {capture_s:.2f} s, cka_matrix {ours_s:.3f} s, textbook loop {naive_s:.2f} s, linear_cka loop {loop_s:.2f} s", flush=True)
    pooled_rows = [
        ("layerscope `cka_matrix(acts)`", ours_s, None),
        (f"textbook pairwise loop, float64 numpy ({L * L} pairs)", naive_s, maxdiff(ours, naive)),
        (f"pairwise loop of layerscope `linear_cka` ({L * L} pairs)", loop_s, maxdiff(ours, loop)),
    ]

    # B. torch-cka's computation: first T tokens flattened, unbiased HSIC accumulated over batches
    T = args.tokens
    kept = [s for s in seqs if len(s.input_ids) >= T]
    ids = torch.tensor([list(s.input_ids[:T]) for s in kept])
    batches = list(ids.split(args.batch_size))
    captured, tok_capture_s = timed(capture_tokens, model, batches)
    mb_ours, mb_ours_s = timed(minibatch_ours, captured)
    mb_naive, mb_naive_s = timed(textbook_minibatch_cka, captured)
    print(f"token-level: capture {tok_capture_s:.2f} s, MinibatchCKA {mb_ours_s:.3f} s, textbook loop {mb_naive_s:.2f} s", flush=True)
    token_rows = [
        ("layerscope: capture (1 forward per batch) + `MinibatchCKA`", tok_capture_s + mb_ours_s, None),
        ("capture (shared) + textbook pairwise loop, float64 numpy", tok_capture_s + mb_naive_s, maxdiff(mb_ours, mb_naive)),
    ]
    torch_cka_note, check_rows = "", []
    if args.skip_torch_cka:
        torch_cka_note = "torch-cka skipped (--skip-torch-cka)"
    else:
        try:
            import torch_cka  # noqa: F401
        except ImportError:
            torch_cka_note = "torch-cka is not installed (`pip install --no-deps torch-cka`): its row is skipped"
        else:
            peer, peer_s = timed(torch_cka_matrix, model, ids, args.batch_size)
            print(f"torch-cka: {peer_s:.2f} s", flush=True)
            token_rows.append(("torch-cka 0.21 `CKA.compare`, as shipped (float32; 2 forwards per batch)", peer_s, maxdiff(mb_ours, peer)))
            # The same in float64 (model and torch-cka's arithmetic) on the first batches, against ours on that model:
            # a check that the two compute the same estimator (float32 torch-cka cancels away, see above).
            k = args.check_batches
            model64, _ = load_model(args.model, dtype="float64")
            cap64, cap64_s = timed(capture_tokens, model64, batches[:k])
            ours64, ours64_s = timed(minibatch_ours, cap64)
            del cap64
            peer64, peer64_s = timed(torch_cka_matrix, model64, ids[: k * args.batch_size], args.batch_size)
            print(f"float64: capture {cap64_s:.2f} s, MinibatchCKA {ours64_s:.3f} s, torch-cka {peer64_s:.2f} s", flush=True)
            check_rows = [
                (f"layerscope, model in float64: capture + `MinibatchCKA` ({k} batches)", cap64_s + ours64_s, None),
                (f"torch-cka 0.21, model in float64 ({k} batches)", peer64_s, maxdiff(ours64, peer64)),
            ]
            del model64
    if torch_cka_note:
        print(torch_cka_note, flush=True)
    del model, captured  # torch-cka leaves its hooks on the model

    # C. synthetic, the metric alone at larger n
    synth_rows = []
    if args.synthetic_n:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.synthetic_n, args.synthetic_d)).astype(np.float32)
        synth = []
        for _ in range(L):
            x = (0.9 * x + 0.45 * rng.standard_normal(x.shape)).astype(np.float32)
            synth.append(x)
        s_ours, s_ours_s = timed(cka_matrix, synth)
        s_naive, s_naive_s = timed(pairwise, synth, textbook_cka)
        print(f"synthetic: cka_matrix {s_ours_s:.2f} s, textbook loop {s_naive_s:.2f} s", flush=True)
        synth_rows = [
            ("layerscope `cka_matrix(acts)`", s_ours_s, None),
            (f"textbook pairwise loop, float64 numpy ({L * L} pairs)", s_naive_s, maxdiff(s_ours, s_naive)),
        ]

    loads = (
        f"load average {load_start:.1f} / {os.getloadavg()[0]:.1f}, one small torch op {latency_start:.2f} / "
        f"{op_latency_ms():.2f} ms (start / end)"
    )
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    command = ("" if blas is None else f"OPENBLAS_NUM_THREADS={blas} ") + "python benchmarks/bench_cka.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if not isinstance(v, bool)
    ) + (" --skip-torch-cka" if args.skip_torch_cka else "")
    lines = [
        f"### cka: {args.model}, {L} layers, Dolly, float32 activations, float64 metrics",
        "",
        f"- machine: {machine()}; commit {commit}; {datetime.date.today().isoformat()}; {loads}",
        f"- command: `{command}`",
        "",
        (
            f"Pooled `last_prompt`, n = {n} examples (of {args.samples} requested), d = {arch.hidden_size}, linear biased CKA;"
            f" capture (forward passes, shared by all ways): {capture_s:.2f} s; metric part only:"
        ),
        "",
        *table(pooled_rows),
        "",
        f"Token level (torch-cka's computation): {len(kept)} sequences x first {T} tokens flattened to {T * arch.hidden_size} "
        f"features, {len(batches)} batches of up to {args.batch_size}, unbiased HSIC accumulated over batches; capture + metric "
        f"(capture {tok_capture_s:.2f} s, `MinibatchCKA` {mb_ours_s:.3f} s, textbook loop {mb_naive_s:.2f} s)"
        + (f"; {torch_cka_note}" if torch_cka_note else "") + ":",
        "",
        *table(token_rows),
    ]
    if check_rows:
        lines += ["", "Check in float64 (model and arithmetic), same estimator, first batches only:", "", *table(check_rows)]
    if synth_rows:
        lines += [
            "",
            f"Synthetic: n = {args.synthetic_n}, d = {args.synthetic_d}, {L} layers (each 0.9 x the previous + noise), metric only:",
            "",
            *table(synth_rows),
        ]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        with open(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
