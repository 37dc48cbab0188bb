"""Spectral analysis for all layers: layerscope's streaming PCA and PC-subspace CCA against a naive
in-memory implementation, time and peak memory side by side, same activations.

Token-level activations (``pooling="tokens"``) of the embedded SmolLM2-135M on WikiText-2 windows
of 256 tokens are captured once into an activation store (float32 on disk); the capture is timed on
its own and is no part of either way. Then every way computes the same outputs from that store: each
layer's covariance spectrum (all eigenvalues), and for every layer ``l``, neighbour ``m`` in
``l-2, l-1, l+1, l+2`` and ``k`` in (1, 3, 10) the mean canonical correlation of the top-``k``
principal-component scores of the two layers (the critical-layers paper's Figure 3).

1. ours: ``store_spectra(store, keep=10)`` (one streaming covariance per layer, one layer in memory
   at a time), ``score_gram([store], [spectra], k_max=10)`` (one pass over row blocks of every layer,
   keeping only the 300 x 300 cross products of the PC scores), then ``gram.mean_correlation(l, m, k)``
   for every pair: what ``run_spectral`` does, without its CKA part; chunks of 2048 rows as there.
2. naive: every layer loaded into memory as a float64 numpy array (``np.asarray(store.layer(i),
   dtype=np.float64)``, kept in a list), then a loop over layers: ``np.linalg.eigh(np.cov(X,
   rowvar=False))``; then for every ``(l, m, k)`` the scores ``Z = (X - mean) @ V_k`` of each side
   (recomputed per pair) and the textbook CCA: singular values of ``Sxx^{-1/2} Sxy Syy^{-1/2}`` with
   eigh-based inverse square roots of the ``k x k`` covariances.
3. direct (optional): ``layerscope.metrics.pc_subspace_cca(X_l, X_m, k)`` on the same float64
   in-memory arrays for every pair, one thin SVD of each ``(rows, hidden)`` side per call. That is
   several seconds per call at the default size, so it runs ``(l, m, k)`` calls in a seeded random
   order until ``--direct-budget`` seconds are spent (all rows), and its time is scaled to all calls.

Each way runs in its own fresh Python process (``--worker``), so that each peak memory is its own;
a worker that only imports numpy, torch and layerscope and opens the store gives the import
baseline. Peak memory is the process's ``VmHWM`` (Linux ``/proc/self/status``): ``ru_maxrss`` is
not used because Linux carries the parent's high-water mark over ``fork``/``exec`` into the child's
``ru_maxrss`` (the parent holds the model), which would hide the numbers measured here. Both ways
read the store from the page cache (it was just written or read).

The agreement check (ours against naive, and against direct on the calls it made) fails the run
(exit status 1, after printing) when any mean correlation differs by more than 1e-5 or any
eigenvalue by more than 1e-5 of its layer's largest.

Usage: python benchmarks/bench_spectral.py [--tokens 16384] [--store DIR] [--md benchmarks/results/spectral.md]
           [--skip-direct] [--direct-budget 120] [--threads N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_ablate import peak_rss_mib  # benchmarks/ is the script's folder, first on sys.path

MODEL = "smollm2-135m"
SEQ_LEN = 256
KS = (1, 3, 10)
OFFSETS = (-2, -1, 1, 2)
CHUNK_ROWS = 2048  # run_spectral's default
TOLERANCE = 1e-5
RESULT_PREFIX = "BENCH_SPECTRAL_RESULT "
WAYS = ("ours", "naive", "direct")


def pairs_of(num_layers: int) -> list[tuple[int, int, int]]:
    """Every (layer, neighbour, k) the spectral study reports, in run_spectral's order."""
    return [(layer, layer + off, k) for layer in range(num_layers) for off in OFFSETS
            if 0 <= layer + off < num_layers for k in KS]


# ------------------------------------------------------------------------------------------ workers


def run_ours(store, pairs) -> dict:
    from layerscope.analyses.spectral import score_gram, store_spectra

    t0 = time.perf_counter()
    spectra = store_spectra(store, keep=max(KS), chunk_rows=CHUNK_ROWS)
    t1 = time.perf_counter()
    gram = score_gram([store], [spectra], k_max=max(KS), chunk_rows=CHUNK_ROWS)
    t2 = time.perf_counter()
    cca = [gram.mean_correlation(l, m, k) for l, m, k in pairs]
    t3 = time.perf_counter()
    return {"eigenvalues": [sp.eigenvalues.tolist() for sp in spectra], "cca": cca, "calls": list(range(len(pairs))),
            "phases": {"store_spectra": t1 - t0, "score_gram": t2 - t1, "correlations": t3 - t2}}


def _inverse_sqrt(S: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh(S)
    return (V / np.sqrt(w)) @ V.T


def run_naive(store, pairs) -> dict:
    t0 = time.perf_counter()
    acts = [np.asarray(store.layer(i), dtype=np.float64) for i in range(store.num_layers)]
    t1 = time.perf_counter()
    eigenvalues, directions = [], []
    for X in acts:
        w, V = np.linalg.eigh(np.cov(X, rowvar=False))
        order = np.argsort(w)[::-1]
        eigenvalues.append(w[order])
        directions.append(V[:, order])
    t2 = time.perf_counter()
    cca = []
    for l, m, k in pairs:
        X, Y = acts[l], acts[m]
        Zx = (X - X.mean(axis=0)) @ directions[l][:, :k]
        Zy = (Y - Y.mean(axis=0)) @ directions[m][:, :k]
        n = X.shape[0]
        Sxx, Syy, Sxy = Zx.T @ Zx / (n - 1), Zy.T @ Zy / (n - 1), Zx.T @ Zy / (n - 1)
        rho = np.linalg.svd(_inverse_sqrt(Sxx) @ Sxy @ _inverse_sqrt(Syy), compute_uv=False)
        cca.append(float(np.clip(rho, 0.0, 1.0).mean()))
    t3 = time.perf_counter()
    return {"eigenvalues": [w.tolist() for w in eigenvalues], "cca": cca, "calls": list(range(len(pairs))),
            "phases": {"load float64": t1 - t0, "PCA per layer": t2 - t1, "pair loop": t3 - t2}}


def run_direct(store, pairs, budget: float) -> dict:
    """pc_subspace_cca on the float64 arrays, calls in a seeded random order until ``budget`` seconds
    of calls are spent (at least one call): an unbiased sample of the calls when not all fit."""
    from layerscope.metrics import pc_subspace_cca

    t0 = time.perf_counter()
    acts = [np.asarray(store.layer(i), dtype=np.float64) for i in range(store.num_layers)]
    t1 = time.perf_counter()
    calls, cca = [], []
    for i in np.random.default_rng(0).permutation(len(pairs)).tolist():
        if calls and time.perf_counter() - t1 >= budget:
            break
        l, m, k = pairs[i]
        calls.append(i)
        cca.append(pc_subspace_cca(acts[l], acts[m], k).mean)
    t2 = time.perf_counter()
    return {"eigenvalues": None, "cca": cca, "calls": calls,
            "phases": {"load float64": t1 - t0, f"{len(calls)} calls": t2 - t1},
            "scaled_seconds": (t1 - t0) + (t2 - t1) * len(pairs) / len(calls)}


def worker(method: str, store_dir: str, budget: float, threads: int | None) -> None:
    import torch  # every worker imports the same modules, so the baseline is theirs

    if threads is not None:
        torch.set_num_threads(threads)

    import layerscope
    import layerscope.analyses.spectral
    import layerscope.metrics  # noqa: F401
    from layerscope.capture.activation_store import ActivationStore

    store = ActivationStore(store_dir)
    pairs = pairs_of(store.num_layers)
    before = peak_rss_mib()
    t = time.perf_counter()
    if method == "baseline":
        result: dict = {}
    elif method == "ours":
        result = run_ours(store, pairs)
    elif method == "naive":
        result = run_naive(store, pairs)
    elif method == "direct":
        result = run_direct(store, pairs, budget)
    else:
        raise SystemExit(f"unknown worker method {method!r}")
    seconds = time.perf_counter() - t
    result.update(method=method, seconds=result.pop("scaled_seconds", seconds), measured_seconds=seconds,
                  peak_mib=peak_rss_mib(), peak_before_mib=before,
                  ru_maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def spawn(method: str, store_dir: Path, budget: float, threads: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--store", str(store_dir),
           "--direct-budget", str(budget)] + ([] if threads is None else ["--threads", str(threads)])
    env = dict(os.environ)
    if threads is not None:  # numpy's BLAS reads these when it is loaded, so they go in the worker's environment
        env.update({name: str(threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {method!r} failed (exit status {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["process_wall"] = wall
    print(f"{method}: {result['seconds']:.2f} s, peak {result['peak_mib']:.0f} MiB "
          f"(process wall {wall:.1f} s)", flush=True)
    return result


# ------------------------------------------------------------------------------------------ capture


def capture(store_dir: Path, tokens: int) -> tuple[str, float, float]:
    """Capture the token-level store; returns (data description, model load s, capture s)."""
    import torch  # noqa: F401

    from layerscope.capture.activation_store import write_activations
    from layerscope.data import lm_sequences, load_texts
    from layerscope.errors import LayerscopeError
    from layerscope.models import load_model
    from layerscope.models.embedded import embedded_dir, is_fetched

    if not is_fetched(MODEL):
        raise SystemExit(f"the embedded model {MODEL} is not fetched (no converted copy under {embedded_dir(MODEL)}): "
                         f"run `layerscope fetch {MODEL}` first (it downloads the model once), then this benchmark")
    print(f"capturing {tokens} token rows of {MODEL} into {store_dir} ...", flush=True)
    t = time.perf_counter()
    model, tok = load_model(MODEL)
    load_s = time.perf_counter() - t
    try:
        texts, data = load_texts("wikitext-2"), "WikiText-2 test"
    except LayerscopeError as exc:
        texts, data = load_texts("builtin"), f"builtin corpus (WikiText-2 is not available: {exc})"
        print(f"note: {data}", flush=True)
    t = time.perf_counter()
    seqs = lm_sequences(tok, texts, seq_len=SEQ_LEN, samples=-(-tokens // SEQ_LEN), seed=0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    write_activations(model, seqs, store_dir, pooling="tokens", token_budget=tokens, pad_id=pad, dtype="float32")
    capture_s = time.perf_counter() - t
    data += f", {len(seqs)} windows of up to {SEQ_LEN} tokens (lm_sequences, seed 0)"
    del model
    return data, load_s, capture_s


# ------------------------------------------------------------------------------------------ report


def compare(ours: dict, other: dict) -> tuple[float, float | None]:
    """(max |mean CCA difference| over the other's calls, max eigenvalue difference / layer's largest)."""
    ref = np.asarray(ours["cca"])[other["calls"]]
    cca_diff = float(np.max(np.abs(ref - np.asarray(other["cca"]))))
    if other.get("eigenvalues") is None:
        return cca_diff, None
    spec_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(a))
                    for a, b in zip(ours["eigenvalues"], other["eigenvalues"]))
    return cca_diff, spec_diff


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="token rows to capture (default 16384)")
    parser.add_argument("--store", default=None, help="activation store folder: reused when complete, "
                        "else captured into and kept (default: a temporary folder, removed at the end)")
    parser.add_argument("--md", default="benchmarks/results/spectral.md", help="write the markdown section here")
    parser.add_argument("--skip-direct", action="store_true", help="skip the pc_subspace_cca way")
    parser.add_argument("--direct-budget", type=float, default=120.0,
                        help="seconds of pc_subspace_cca calls to time; scaled to all calls when they do not fit")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per way (torch and numpy's BLAS); default: the libraries' defaults")
    parser.add_argument("--worker", choices=("baseline",) + WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.store, args.direct_budget, args.threads)
        return

    started = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch  # noqa: F401
    from bench_ablate import machine, publish
    from bench_cka import op_latency_ms

    from layerscope.capture.activation_store import ActivationStore

    load_start, latency_start = os.getloadavg()[0], op_latency_ms()
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=False, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, check=False, capture_output=True,
                           text=True).stdout.strip()
    tmp = None
    if args.store is None:
        tmp = tempfile.mkdtemp(prefix="bench-spectral-")
        store_dir = Path(tmp) / "store"
    else:
        store_dir = Path(args.store)
    try:
        if (store_dir / "manifest.json").is_file() and json.loads((store_dir / "manifest.json").read_text()).get("complete"):
            data, load_s, capture_s = f"an existing store ({store_dir})", None, None
            print(f"reusing the activation store at {store_dir}", flush=True)
        else:
            data, load_s, capture_s = capture(store_dir, args.tokens)
            print(f"capture: model load {load_s:.1f} s, capture {capture_s:.1f} s", flush=True)
        store = ActivationStore(store_dir)
        rows, hidden, L = store.num_rows, store.hidden, store.num_layers
        size = dir_size(store_dir)
        del store
        calls = len(pairs_of(L))

        results = {"baseline": spawn("baseline", store_dir, args.direct_budget, args.threads)}
        for way in WAYS:
            if way == "direct" and args.skip_direct:
                continue
            results[way] = spawn(way, store_dir, args.direct_budget, args.threads)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    base = results["baseline"]["peak_mib"]
    ours = results["ours"]
    diffs = {way: compare(ours, results[way]) for way in WAYS if way in results and way != "ours"}
    failed = [way for way, (c, s) in diffs.items() if c > TOLERANCE or (s is not None and s > TOLERANCE)]
    theory = rows * hidden * L * 8

    names = {
        "ours": "layerscope streaming: `store_spectra` + `score_gram` + `mean_correlation`",
        "naive": "naive: all layers in memory as float64, `eigh(np.cov)` per layer, textbook CCA per pair",
    }
    if "direct" in results:
        done = len(results["direct"]["calls"])
        names["direct"] = "`pc_subspace_cca` per call on the float64 arrays (SVD per call)" + (
            f"; timed on {done} of {calls} calls, scaled" if done < calls else "")
    table = [
        ("| method | seconds | peak RSS (MiB) | peak above import baseline (MiB) | max abs diff vs ours, mean CCA "
         "| max diff vs ours, eigenvalues (relative to layer's largest) |"),
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for way in WAYS:
        if way not in results:
            continue
        r = results[way]
        if way == "ours":
            cca_text, spec_text = "-", "-"
        else:
            cca_text = f"{diffs[way][0]:.1e}"
            spec_text = "-" if diffs[way][1] is None else f"{diffs[way][1]:.1e}"
        table.append(f"| {names[way]} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {r['peak_mib'] - base:.0f} "
                     f"| {cca_text} | {spec_text} |")
    table.append(f"| import baseline (numpy, torch, layerscope imported, store opened) | - | {base:.0f} | 0 | - | - |")

    def phases(r: dict) -> str:
        return ", ".join(f"{name} {sec:.2f} s" for name, sec in r["phases"].items())

    naive = results["naive"]
    above_ours, above_naive = ours["peak_mib"] - base, naive["peak_mib"] - base
    loads = (f"load average {load_start:.1f} / {os.getloadavg()[0]:.1f}, one small torch op {latency_start:.2f} / "
             f"{op_latency_ms():.2f} ms (start / end)")
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    command = (f"OPENBLAS_NUM_THREADS={blas} " if blas else "") + "python benchmarks/bench_spectral.py " + " ".join(sys.argv[1:])
    threads = "" if args.threads is None else f" (each way: {args.threads} thread(s), torch and BLAS)"
    tree = " + uncommitted changes" if dirty else ""
    captured = ("reused an existing store" if capture_s is None
                else f"model load {load_s:.1f} s, forward passes and writing the store {capture_s:.1f} s")
    phase_text = f"Phases: ours: {phases(ours)}; naive: {phases(naive)}"
    if "direct" in results:
        phase_text += f"; direct: {phases(results['direct'])} (measured {results['direct']['measured_seconds']:.1f} s)"
    lines = [
        "## Spectral analysis: streaming PCA and PC-subspace CCA for all layers",
        "",
        f"- machine: {machine()}{threads}; commit {commit}{tree}; {datetime.date.today().isoformat()}; {loads}",
        f"- command: `{command.strip()}`",
        (f"- data: {MODEL}, token-level activations (`pooling=\"tokens\"`) of {data}; {rows} rows x {L} layers x "
         f"{hidden} wide, float32 store of {size / 2**20:.0f} MiB on disk"),
        f"- capture (not part of any way): {captured}",
        (f"- outputs of every way: {L} spectra ({hidden} eigenvalues each) and {calls} mean canonical correlations "
         f"(layer l against l-2, l-1, l+1, l+2, top k = {', '.join(map(str, KS))} PCs)"),
        (f"- naive activation memory in theory: {rows} x {hidden} x {L} x 8 bytes = {theory / 2**20:.0f} MiB "
         f"({theory / 2**30:.2f} GiB)"),
        ("- each way in its own fresh process; peak RSS is the process's VmHWM; the import baseline is a process that "
         "only imports numpy, torch and layerscope and opens the store"),
        "",
        *table,
        "",
        (f"Naive / ours: time {naive['seconds'] / ours['seconds']:.1f}x, peak RSS {naive['peak_mib'] / ours['peak_mib']:.1f}x, "
         f"peak above the import baseline {above_naive / max(above_ours, 1):.1f}x "
         f"({above_naive:.0f} MiB against {above_ours:.0f} MiB)."),
        "",
        phase_text + ".",
    ]
    if args.skip_direct:
        lines += ["", "`pc_subspace_cca` way skipped (`--skip-direct`)."]
    elif "direct" in results and len(results["direct"]["calls"]) < calls:
        lines += ["", (f"`pc_subspace_cca` does two thin SVDs of {rows} x {hidden} float64 per call; its row is the time "
                       f"of loading the arrays plus {len(results['direct']['calls'])} calls drawn at random (seed 0, all rows), "
                       f"scaled to all {calls} calls; its difference column covers those calls.")]
    if failed:
        lines += ["", f"**AGREEMENT CHECK FAILED** for {', '.join(failed)} (tolerance {TOLERANCE:g})."]
    publish(lines, args.md, started)
    if failed:
        raise SystemExit(f"ours and {', '.join(failed)} disagree by more than {TOLERANCE:g}: see the table")


if __name__ == "__main__":
    main()
