"""The LASER rank-reduction sweep three ways on the same FEVER items: one SVD per matrix (layerscope)
against a fresh randomised SVD per point, and against the LASER code's own loop.

One sweep is every point ``(layer, lname, rate)`` of ``--layers`` x ``--lnames`` (LASER's ``fc_in``,
the first MLP matrix, and ``fc_out``, the second) x ``--rates``, scored on the FEVER claims of
``load_task("fever", limit=--items, seed=0)`` (the next token after LASER's prompt: " true" or
" false") with the embedded SmolLM2-135M. The unmodified model is no point of any way.

1. layerscope: what ``run_laser`` does, without its results store: one model load, ``TaskScorer``
   (the prompts turned into sequences once, batched by length), ``Evaluator.capture`` of every
   block's input once (prefix reuse: each point runs only the blocks from its layer on), one shared
   ``SVDCache`` (one exact ``torch.linalg.svd`` per matrix for every rate; each matrix is
   decomposed when its first point needs it, and that call is timed on its own), and
   ``LowRank(lname, layer, rate=rate, cache=svd)`` per point. ``run_laser`` itself (with a
   ``ResultsStore`` in a temporary folder and its unmodified baseline point) is timed after it in
   the same process as a check: its accuracies must equal this loop's.
2. layerscope, SVD per point: the same engine (batched, prefix reuse), but each point's matrix is
   replaced through a reversible ``RoleEdit`` by LASER's ``do_low_rank``: ``torch.svd_lowrank(W,
   q=desired_rank, niter=2)`` on the float32 weight, ``U @ diag(S) @ V.T``, recomputed for every
   point; ``desired_rank = laser_kept_rank(shape, rate)`` (LASER's ``int(min(m, n) * (10 - rate) *
   0.1)``).
3. LASER-style loop (``pratyushasharma/laser``, ``src/intervention_llama2_fever.py``, one process
   per point): per point, load the model afresh (``load_model``, from the converted safetensors in
   the page cache), edit the matrix with ``do_low_rank`` as in way 2, then score the items one at a
   time: tokenise the prompt, a full forward pass, ``log_softmax`` over the logits of every position,
   the " true" and " false" log-probabilities of the last position, the vocabulary sorted for the
   top-10 tokens (decoded, as LASER does) and the prompt's own log-probability gathered. The start
   of a Python process and its imports, which LASER pays per point, are not counted. It runs the
   points in a seeded random order until ``--budget`` seconds are spent (at least one point); when
   not all fit, its time is scaled to all points and the row says so.

``torch.svd_lowrank`` is randomised; ways 2 and 3 call ``torch.manual_seed(0)`` before each point's
edit, so they decompose every matrix identically and differ only by the engine. Way 1 uses the exact
SVD, so its per-point accuracies differ from LASER's by what the randomised SVD (no oversampling,
two power iterations) changes; the agreement section says how much, and how far ``svd_lowrank``'s
rank-k matrices are from the exact truncation.

Each way runs in its own fresh Python process (``--worker``) after an untimed warm-up there (one
model load and one forward pass), so that its timing and peak memory (``VmHWM``) are its own. The
seconds of every way include its model load(s).

Usage: python benchmarks/bench_laser.py [--items 200] [--layers 25,27,29] [--lnames fc_in,fc_out]
           [--rates 1,2,4,6,8,9,9.5,9.9,9.95] [--budget 150] [--threads N] [--md benchmarks/results/laser.md]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_ablate import peak_rss_mib  # benchmarks/ is the script's folder, first on sys.path

MODEL = "smollm2-135m"
TASK = "fever"
DEFAULT_RATES = "1,2,4,6,8,9,9.5,9.9,9.95"
RESULT_PREFIX = "BENCH_LASER_RESULT "
WAIT_LIMIT = 0.10  # CPU wait share above which a timed part counts as disturbed
WAYS = ("layerscope", "svd_per_point", "laser_style")
NAMES = {
    "layerscope": "layerscope: `run_laser` loop, prefix reuse, batched, one exact SVD per matrix (`SVDCache`)",
    "svd_per_point": "layerscope, SVD per point: same engine, `torch.svd_lowrank(q=k, niter=2)` per point",
    "laser_style": "LASER-style loop: reload the model per point, `svd_lowrank` per point, one item at a time, full forward",
}


def parse_layers(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return sorted(set(out))


def parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r.strip()]
    bad = [r for r in rates if not 0 < r < 10]
    if bad:
        raise SystemExit(f"rate {bad[0]:g} is not valid here: allowed 0 < rate < 10 (svd_lowrank needs q >= 1)")
    return rates


def points_of(layers: list[int], lnames: list[str], rates: list[float]) -> list[tuple[str, int, float]]:
    """The sweep's points in run_laser's order (lname, then layer, then rate)."""
    return [(lname, layer, rate) for lname in lnames for layer in layers for rate in rates]


def key_of(point: tuple[str, int, float]) -> str:
    lname, layer, rate = point
    return f"{lname}|{layer}|{rate:g}"


def cpu_pressure_us() -> int | None:
    """The machine's ``/proc/pressure/cpu`` "some" total: microseconds in which at least one runnable
    task waited for a CPU (PSI). Its growth over a timed part, divided by the part's wall time, says
    how much other jobs (or oversubscribed threads) competed for the cores; None where PSI is absent."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def meter() -> tuple[float, float, int | None]:
    return time.perf_counter(), time.process_time(), cpu_pressure_us()


def usage(start: tuple, end: tuple) -> dict:
    """Wall seconds, CPU use (process CPU seconds / wall) and CPU wait share (PSI) between two meters."""
    wall = end[0] - start[0]
    wait = None if start[2] is None or end[2] is None else (end[2] - start[2]) / 1e6 / wall
    return {"wall": wall, "cpu_use": (end[1] - start[1]) / wall, "cpu_wait": wait}


# ------------------------------------------------------------------------------------------ workers


def laser_low_rank(weight, rank: int):
    """LASER's ``do_low_rank`` (``src/laser/matrix_utils.py``) on the float32 weight, cast back."""
    import torch

    results = torch.svd_lowrank(weight.to(torch.float32), q=rank, niter=2)
    return (results[0] @ torch.diag(results[1]) @ results[2].T).to(weight.dtype)


def point_roles(model, lname: str, layer: int, rate: float) -> list[tuple[str, int]]:
    """(role, kept rank) of every matrix the point rank-reduces (those LowRank would write)."""
    from layerscope.interventions.low_rank import laser_kept_rank, lname_roles
    from layerscope.models import architecture

    arch = architecture(model)
    out = []
    for role in lname_roles(lname, model):
        shape = arch.role_shape(role, layer)
        rank = laser_kept_rank(shape, rate)
        if rank < min(shape):
            out.append((role, rank))
    return out


def run_layerscope(items, points) -> dict:
    import torch

    from layerscope.analyses.laser import TaskScorer
    from layerscope.api.common import pad_id_of
    from layerscope.interventions.low_rank import LowRank, SVDCache
    from layerscope.models import architecture, load_model

    m0 = meter()
    t0 = m0[0]
    model, tok = load_model(MODEL)
    t1 = time.perf_counter()
    scorer = TaskScorer.build(model, tok, items, pad_id=pad_id_of(tok))
    n_layers = architecture(model).num_layers
    cache = scorer.evaluator.capture(range(n_layers))[1]
    svd = SVDCache(dtype=torch.float32)
    t2 = time.perf_counter()
    svd_s, per_point = 0.0, {}
    decomposed: set[tuple[str, int]] = set()
    for point in points:
        lname, layer, rate = point
        for role, _ in point_roles(model, lname, layer, rate):
            if (role, layer) not in decomposed:  # the SVD the first LowRank of this matrix would compute
                ts = time.perf_counter()
                svd.factors(model, role, layer)
                svd_s += time.perf_counter() - ts
                decomposed.add((role, layer))
        out = scorer.score([LowRank(lname, layer, rate=rate, cache=svd)], reuse=cache)
        per_point[key_of(point)] = {"correct": out["correct"].astype(int).tolist(), "gold": (-out["logloss"]).tolist()}
    m3 = meter()
    t3 = m3[0]
    timed = {"seconds": t3 - t0, "usage": usage(m0, m3), "points_timed": len(points), "loads": 1, "svds": svd.computed, "svd_seconds": svd_s,
             "phases": {"model load": t1 - t0, "sequences + capture": t2 - t1, f"{svd.computed} exact SVDs": svd_s,
                        f"scoring {len(points)} points": t3 - t2 - svd_s}}

    # ---- untimed extras: run_laser itself, prompt lengths, svd_lowrank against the exact truncation
    m4 = meter()
    timed.update(checks(model, tok, items, points, svd, scorer))
    timed["checks_usage"] = usage(m4, meter())
    timed["per_point"] = per_point
    timed["candidates"] = scorer.candidates[0]
    return timed


def checks(model, tok, items, points, svd, scorer) -> dict:
    import torch

    from layerscope.analyses.laser import run_laser
    from layerscope.api.common import pad_id_of
    from layerscope.models import architecture
    from layerscope.runner import ResultsStore

    layers = sorted({p[1] for p in points})
    lnames = list(dict.fromkeys(p[0] for p in points))
    rates = list(dict.fromkeys(p[2] for p in points))
    with tempfile.TemporaryDirectory(prefix="bench-laser-") as tmp, ResultsStore(Path(tmp) / "r.sqlite") as store:
        m0 = meter()
        result = run_laser(model, tok, items, layers=layers, lnames=lnames, rates=rates, store=store,
                           run_parts={"bench": "laser"}, pad_id=pad_id_of(tok), progress=False)
        run_laser_usage = usage(m0, meter())
    frame = result.to_frame()
    run_laser_acc = {}
    for (lname, layer, rate), part in frame.groupby(["lname", "layer", "rate"], sort=False):
        if lname == "dont":
            continue
        run_laser_acc[key_of((lname, int(layer), float(rate)))] = float((part["accuracy"] * part["n"]).sum() / part["n"].sum())
    base = result.baseline
    n_val = int(frame["n"].iloc[0])
    n_test = int(frame["n"].iloc[1])
    baseline_acc = (base["validation"]["accuracy"] * n_val + base["test"]["accuracy"] * n_test) / (n_val + n_test)

    # svd_lowrank (seeded as ways 2 and 3) against the exact rank-k truncation of the same matrix
    arch = architecture(model)
    excess: dict[str, float] = {}
    for lname, layer, rate in points:
        torch.manual_seed(0)
        for role, rank in point_roles(model, lname, layer, rate):
            W = arch.read_weight(role, layer).to(torch.float64)
            exact = svd.truncated(model, role, layer, rank).to(torch.float64)
            approx = laser_low_rank(arch.read_weight(role, layer), rank).to(torch.float64)
            e_exact, e_rand = float(torch.linalg.norm(W - exact)), float(torch.linalg.norm(W - approx))
            k = f"{rate:g}"
            excess[k] = max(excess.get(k, 0.0), e_rand / e_exact - 1.0)
    lengths = [len(s) for s in scorer.evaluator.sequences]
    return {"run_laser_usage": run_laser_usage, "run_laser_acc": run_laser_acc, "baseline_acc": baseline_acc,
            "n_validation": n_val, "n_test": n_test, "svd_excess_error": excess,
            "prompt_tokens": [min(lengths), float(np.mean(lengths)), max(lengths)],
            "batches": len(scorer.evaluator.batches)}


def run_svd_per_point(items, points) -> dict:
    import torch

    from layerscope.analyses.laser import TaskScorer
    from layerscope.api.common import pad_id_of
    from layerscope.interventions.weights import RoleEdit
    from layerscope.models import architecture, load_model

    clock = [0.0, 0]

    class LaserLowRank(RoleEdit):
        """One role at one layer replaced by LASER's svd_lowrank approximation (restored afterwards)."""

        def __init__(self, role: str, layer: int, rank: int):
            super().__init__(role, layer)
            self.rank = rank

        def new_weight(self, weight, layer):
            ts = time.perf_counter()
            approx = laser_low_rank(weight, self.rank)
            clock[0] += time.perf_counter() - ts
            clock[1] += 1
            return approx

    m0 = meter()
    t0 = m0[0]
    model, tok = load_model(MODEL)
    t1 = time.perf_counter()
    scorer = TaskScorer.build(model, tok, items, pad_id=pad_id_of(tok))
    cache = scorer.evaluator.capture(range(architecture(model).num_layers))[1]
    t2 = time.perf_counter()
    per_point = {}
    for point in points:
        lname, layer, rate = point
        edits = [LaserLowRank(role, layer, rank) for role, rank in point_roles(model, lname, layer, rate)]
        torch.manual_seed(0)
        out = scorer.score(edits, reuse=cache)
        per_point[key_of(point)] = {"correct": out["correct"].astype(int).tolist(), "gold": (-out["logloss"]).tolist()}
    m3 = meter()
    t3 = m3[0]
    return {"seconds": t3 - t0, "usage": usage(m0, m3), "points_timed": len(points), "loads": 1, "svds": clock[1], "svd_seconds": clock[0],
            "phases": {"model load": t1 - t0, "sequences + capture": t2 - t1, f"{clock[1]} svd_lowrank": clock[0],
                       f"scoring {len(points)} points": t3 - t2 - clock[0]},
            "per_point": per_point}


def run_laser_style(items, points, budget: float) -> dict:
    import torch

    from layerscope.models import architecture, load_model

    order = np.random.default_rng(0).permutation(len(points)).tolist()
    per_point, done = {}, []
    load_s = svd_s = items_s = 0.0
    svds = 0
    m0 = meter()
    t0 = m0[0]
    for i in order:
        if done and time.perf_counter() - t0 >= budget:
            break
        lname, layer, rate = points[i]
        ta = time.perf_counter()
        model, tokenizer = load_model(MODEL)
        tb = time.perf_counter()
        arch = architecture(model)
        torch.manual_seed(0)
        with torch.no_grad():
            for role, rank in point_roles(model, lname, layer, rate):
                arch.write_weight(role, layer, laser_low_rank(arch.read_weight(role, layer), rank))
                svds += 1
        tc = time.perf_counter()
        true_id = tokenizer(" true")["input_ids"]
        false_id = tokenizer(" false")["input_ids"]
        assert len(true_id) == 1 and len(false_id) == 1, (true_id, false_id)
        true_id, false_id = true_id[0], false_id[0]
        correct, gold = [], []
        for item in items:
            inputs = tokenizer(item.context, return_tensors="pt")
            with torch.no_grad():
                logits = model(inputs.input_ids).logits[0]  # prompt length x vocabulary
                log_prob = torch.nn.functional.log_softmax(logits, dim=1)
                last = log_prob[-1]
                true_lp, false_lp = last[true_id].item(), last[false_id].item()
                if item.label == 0:  # SUPPORTS: " true"
                    answer_lp, is_correct, answer = true_lp, true_lp > false_lp, "true"
                else:
                    answer_lp, is_correct, answer = false_lp, true_lp < false_lp, "false"
                _, sorted_indices = torch.sort(last, descending=True)
                top = [t.lower().strip() for t in tokenizer.batch_decode(sorted_indices[:10])]
                _ = [float(answer in top[:k]) for k in (1, 5, 10)]
                indices = inputs.input_ids[0, 1:].unsqueeze(1)
                _ = torch.gather(log_prob[:-1, :], index=indices, dim=1).sum().item()
            correct.append(int(is_correct))
            gold.append(answer_lp)
        td = time.perf_counter()
        del model
        gc.collect()
        load_s, svd_s, items_s = load_s + tb - ta, svd_s + tc - tb, items_s + td - tc
        per_point[key_of(points[i])] = {"correct": correct, "gold": gold}
        done.append(i)
    m1 = meter()
    measured = m1[0] - t0
    n = len(done)
    return {"seconds": measured * len(points) / n, "measured_seconds": measured, "usage": usage(m0, m1), "points_timed": n,
            "loads": len(points), "svds": round(svds * len(points) / n), "svd_seconds": svd_s * len(points) / n,
            "phases": {"model load per point": load_s / n, "svd_lowrank per point": svd_s / n,
                       f"{len(items)} items one at a time per point": items_s / n},
            "per_point": per_point, "candidates": [true_id, false_id]}


def worker(args) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from layerscope.data.laser_tasks import load_task
    from layerscope.models import load_model

    items = load_task(TASK, limit=args.items, seed=0)
    points = points_of(parse_layers(args.layers), args.lnames.split(","), parse_rates(args.rates))
    # untimed warm-up: the first load and forward of a process pay one-time costs (imports, kernels)
    model, tok = load_model(MODEL)
    with torch.no_grad():
        model(tok(items[0].context, return_tensors="pt").input_ids)
    del model
    gc.collect()

    before = peak_rss_mib()
    wall = time.perf_counter()
    if args.worker == "layerscope":
        result = run_layerscope(items, points)
    elif args.worker == "svd_per_point":
        result = run_svd_per_point(items, points)
    elif args.worker == "laser_style":
        result = run_laser_style(items, points, args.budget)
    else:
        raise SystemExit(f"unknown worker {args.worker!r}")
    wall = time.perf_counter() - wall
    result.update(way=args.worker, worker_wall=wall, peak_mib=peak_rss_mib(), peak_before_mib=before,
                  torch_threads=torch.get_num_threads())
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def spawn(way: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", way, "--items", str(args.items),
           "--layers", args.layers, "--lnames", args.lnames, "--rates", args.rates, "--budget", str(args.budget)]
    env = dict(os.environ)
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
        env.update({name: str(args.threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {way!r} failed (exit status {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    scaled = "" if "measured_seconds" not in result else \
        f" (timed {result['points_timed']} points in {result['measured_seconds']:.1f} s, scaled to all)"
    print(f"{way}: {result['seconds']:.1f} s{scaled}, peak {result['peak_mib']:.0f} MiB, "
          f"{usage_text(result['usage'])} (process wall {wall:.1f} s)", flush=True)
    return result


# ------------------------------------------------------------------------------------------ report


def usage_text(u: dict) -> str:
    wait = "" if u["cpu_wait"] is None else f", CPU wait {100 * u['cpu_wait']:.0f}%"
    return f"CPU use {u['cpu_use']:.2f} cores{wait}"


def wait_cell(u: dict) -> str:
    return "-" if u["cpu_wait"] is None else f"{100 * u['cpu_wait']:.0f}%"


def agreement(a: dict, b: dict, keys: list[str]) -> dict:
    """Per-point accuracy and per-item differences between two ways on ``keys``."""
    acc = [abs(np.mean(a[k]["correct"]) - np.mean(b[k]["correct"])) for k in keys]
    flips = sum(int(np.sum(np.asarray(a[k]["correct"]) != np.asarray(b[k]["correct"]))) for k in keys)
    total = sum(len(a[k]["correct"]) for k in keys)
    gold = max(float(np.max(np.abs(np.asarray(a[k]["gold"]) - np.asarray(b[k]["gold"])))) for k in keys)
    same = sum(1 for x in acc if x == 0)
    return {"max_acc": max(acc), "mean_acc": float(np.mean(acc)), "same_points": same, "points": len(keys),
            "flips": flips, "total": total, "max_gold": gold}


def agreement_text(name: str, g: dict) -> str:
    return (f"{name}: accuracy identical on {g['same_points']} of {g['points']} points, max |difference| "
            f"{100 * g['max_acc']:.2f} points (mean {100 * g['mean_acc']:.2f}); {g['flips']} of {g['total']} "
            f"per-item answers differ; max |difference| of the gold answer's log-probability {g['max_gold']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200, help="FEVER items (load_task('fever', limit=N, seed=0))")
    parser.add_argument("--layers", default="25,27,29", help="layers, comma-separated, ranges a-b allowed")
    parser.add_argument("--lnames", default="fc_in,fc_out", help="LASER lnames, comma-separated")
    parser.add_argument("--rates", default=DEFAULT_RATES, help="LASER rates, comma-separated, each in (0, 10)")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds for the LASER-style way; scaled to all points when they do not fit")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per way (torch and BLAS); default: the libraries' defaults")
    parser.add_argument("--md", default="benchmarks/results/laser.md", help="write the markdown section here")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    layers, lnames, rates = parse_layers(args.layers), args.lnames.split(","), parse_rates(args.rates)
    points = points_of(layers, lnames, rates)
    keys = [key_of(p) for p in points]
    started = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch  # noqa: F401
    from bench_ablate import machine, publish
    from bench_cka import op_latency_ms

    from layerscope.interventions.low_rank import LASER_LNAMES
    from layerscope.models.embedded import embedded_dir, is_fetched

    if not is_fetched(MODEL):
        raise SystemExit(f"the embedded model {MODEL} is not fetched (no converted copy under {embedded_dir(MODEL)}): "
                         f"run `layerscope fetch {MODEL}` first (it downloads the model once), then this benchmark")
    bad = [n for n in lnames if n not in LASER_LNAMES or n == "dont"]
    if bad:
        raise SystemExit(f"lname {bad[0]!r} is not valid here: allowed {', '.join(n for n in LASER_LNAMES if n != 'dont')}")
    load_start, latency_start = os.getloadavg()[0], op_latency_ms()
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=False, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, check=False, capture_output=True,
                           text=True).stdout.strip()
    print(f"{len(points)} points ({len(layers)} layers x {len(lnames)} lnames x {len(rates)} rates), "
          f"{args.items} FEVER items; load average {load_start:.1f}", flush=True)

    results = {way: spawn(way, args) for way in WAYS}

    ours, per_svd, laser = results["layerscope"], results["svd_per_point"], results["laser_style"]
    laser_keys = [k for k in keys if k in laser["per_point"]]
    g13 = agreement(ours["per_point"], laser["per_point"], laser_keys)
    g12 = agreement(ours["per_point"], per_svd["per_point"], keys)
    g23 = agreement(per_svd["per_point"], laser["per_point"], laser_keys)
    run_laser_diff = max(abs(ours["run_laser_acc"][k] - np.mean(ours["per_point"][k]["correct"])) for k in keys)
    same_candidates = ours["candidates"] == laser["candidates"]

    table = [("| way | points timed | model loads | SVDs | seconds (all points) | s per point | SVD seconds (share) "
              "| peak RSS (MiB) | CPU use (cores) | CPU wait (PSI) | ratio to layerscope |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for way in WAYS:
        r = results[way]
        name = NAMES[way]
        if r["points_timed"] < len(points):
            name += f"; timed on {r['points_timed']} of {len(points)} points (seeded random), scaled"
        share = r["svd_seconds"] / r["seconds"]
        table.append(f"| {name} | {r['points_timed']} | {r['loads']} | {r['svds']} | {r['seconds']:.1f} "
                     f"| {r['seconds'] / len(points):.3f} | {r['svd_seconds']:.2f} ({100 * share:.1f}%) "
                     f"| {r['peak_mib']:.0f} | {r['usage']['cpu_use']:.2f} | {wait_cell(r['usage'])} "
                     f"| {r['seconds'] / ours['seconds']:.1f}x |")

    def phases(r: dict) -> str:
        return ", ".join(f"{name} {sec:.2f} s" for name, sec in r["phases"].items())

    load_end, latency_end = os.getloadavg()[0], op_latency_ms()
    waits = [results[w]["usage"]["cpu_wait"] for w in WAYS] + [ours["run_laser_usage"]["cpu_wait"]]
    worst_wait = max((w for w in waits if w is not None), default=None)
    if worst_wait is not None:  # measured over each timed part itself; the load average lags by a minute
        disturbed = worst_wait > WAIT_LIMIT
    else:
        disturbed = load_start >= 0.5 or max(latency_start, latency_end) > 1.0
    loads = (f"load average {load_start:.1f} / {load_end:.1f}, one small torch op {latency_start:.2f} / "
             f"{latency_end:.2f} ms (start / end)")
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    command = (f"OPENBLAS_NUM_THREADS={blas} " if blas else "") + "python benchmarks/bench_laser.py " + " ".join(sys.argv[1:])
    threads = "" if args.threads is None else f" (each way: {args.threads} thread(s), torch and BLAS)"
    tree = " + uncommitted changes" if dirty else ""
    lo, mean_len, hi = ours["prompt_tokens"]
    no_load = ours["seconds"] - ours["phases"]["model load"]
    excess = ", ".join(f"rate {rate}: +{100 * e:.1f}%" for rate, e in ours["svd_excess_error"].items())
    lines = [
        "## LASER rank-reduction sweep: one SVD per matrix against an SVD per point",
        "",
        f"- machine: {machine()}{threads}; commit {commit}{tree}; {datetime.date.today().isoformat()}; {loads}",
        f"- command: `{command.strip()}`",
        (f"- data: {MODEL} (float32, CPU), FEVER `load_task(\"fever\", limit={args.items}, seed=0)`: {args.items} claims "
         f"with LASER's prompt, {lo}-{hi} tokens (mean {mean_len:.1f}); answer = the next token, \" true\" or \" false\"; "
         f"unmodified model accuracy {100 * ours['baseline_acc']:.1f}%"),
        (f"- sweep: layers {', '.join(map(str, layers))} x lnames {', '.join(lnames)} x rates "
         f"{', '.join(f'{r:g}' for r in rates)} = {len(points)} points; kept rank `int(min(m, n) * (10 - rate) * 0.1)`"),
        ("- each way in its own fresh process after an untimed warm-up (one model load, one forward); seconds include "
         "the way's model load(s); LASER's per-point process start and imports are not counted; "
         "CPU use = the way's process CPU seconds / wall seconds; CPU wait = share of the wall time in which some "
         "runnable task of the machine waited for a core (`/proc/pressure/cpu`, \"some\"; near 0% on an idle machine)"),
        "",
        *table,
        "",
        (f"LASER-style / layerscope: **{laser['seconds'] / ours['seconds']:.1f}x**; SVD per point / layerscope: "
         f"{per_svd['seconds'] / ours['seconds']:.1f}x (the SVD cache alone); LASER-style / SVD per point: "
         f"{laser['seconds'] / per_svd['seconds']:.1f}x (batching, prefix reuse and one model load). "
         f"Without its one model load layerscope's sweep takes {no_load:.1f} s ({laser['seconds'] / no_load:.1f}x)."),
        "",
        (f"Phases: layerscope: {phases(ours)}; SVD per point: {phases(per_svd)}; LASER-style: {phases(laser)}"
         + (f" (measured {laser['measured_seconds']:.1f} s)." if "measured_seconds" in laser else ".")),
        "",
        (f"`run_laser` itself on the same sweep (its `ResultsStore` in a temporary folder, plus its unmodified "
         f"baseline point): {ours['run_laser_usage']['wall']:.1f} s ({usage_text(ours['run_laser_usage'])}); "
         "its per-point accuracies "
         + ("equal the loop above." if run_laser_diff == 0 else f"differ from the loop above by up to {run_laser_diff:.2e}.")),
        "",
        "Agreement (per-point accuracy over all items; `svd_lowrank` seeded with `torch.manual_seed(0)` per point in ways 2 and 3):",
        "",
        f"- {agreement_text('SVD per point vs LASER-style (same randomised SVD, different engine)', g23)}",
        f"- {agreement_text('layerscope vs LASER-style (exact against randomised SVD)', g13)}",
        f"- {agreement_text('layerscope vs SVD per point (exact against randomised SVD, same engine)', g12)}",
        (f"- `svd_lowrank(q=k, niter=2)`'s rank-k matrix is a worse approximation than the exact truncation: "
         f"\\|W - W_k\\| above the optimum by at most {excess} (over the swept matrices)"),
        "- answer token ids: " + ("the same in both (`TaskScorer` candidates and LASER-style tokenisation)"
                                   if same_candidates else f"DIFFER: {ours['candidates']} vs {laser['candidates']}"),
    ]
    if disturbed:
        worst = "" if worst_wait is None else f", CPU wait up to {100 * worst_wait:.0f}% in a timed part"
        lines += ["", (f"**Note: the machine was not idle** (load average {load_start:.1f} at the start, one small torch "
                       f"op {max(latency_start, latency_end):.2f} ms at worst, idle about 0.02 ms{worst}): other jobs "
                       "shared the cores, so these seconds are not those of an idle machine, and a way that ran "
                       "while others competed is slowed more than the rest (see the CPU wait column).")]
    publish(lines, args.md, started)


if __name__ == "__main__":
    main()
