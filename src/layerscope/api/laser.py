"""The LASER job: a rank-reduction sweep on a task with the validation/test protocol."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..errors import LayerscopeError
from ..models import load_model, model_fingerprint
from ..runner import ResultsStore, RunFolder
from .common import check_positive, pad_id_of

DEFAULT_RATES = (1.0, 5.0, 9.0, 9.5, 9.9)
DEFAULT_LNAMES = ("fc_in", "fc_out")


def laser(
    model: str = "smollm2-135m",
    *,
    task: str = "fever",
    samples: int | None = None,
    layers: list[int] | None = None,
    lnames: tuple[str, ...] = DEFAULT_LNAMES,
    rates: tuple[float, ...] = DEFAULT_RATES,
    compose: int = 0,
    intervention: str = "lowrank",
    bandwidth: float | str = 1.0,
    use_quality: bool = False,
    minimize: bool = False,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
):
    """Rank-reduce each (layer, lname) at each rate, score the task, pick the best point on the first
    20% of the items and report it on the remaining 80% beside the unmodified model."""
    from ..analyses.laser import METRICS, run_laser
    from ..data.laser_tasks import load_task
    from ..data.sequences import sequences_fingerprint
    from ..interventions.low_rank import LASER_LNAMES, laser_kept_rank
    from ..interventions.vendi_projection import SelectionCache
    from ..models.architecture import architecture
    from ..report.html import write_report

    if samples is not None:
        check_positive("samples", samples)
    for rate in rates:
        laser_kept_rank((10, 10), rate)  # refuses a rate outside [0, 10] before anything is loaded
    unknown = [name for name in lnames if name not in LASER_LNAMES]
    if unknown:
        raise LayerscopeError(f"unknown lname {unknown[0]!r}: allowed are {', '.join(LASER_LNAMES)}")
    if intervention not in ("lowrank", "vendi"):
        raise LayerscopeError(f"unknown intervention {intervention!r}: allowed are lowrank, vendi")
    items = load_task(task, limit=samples, seed=seed)
    net, tok = load_model(model, dtype=dtype, device=device, seed=seed)
    n_layers = architecture(net).num_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise LayerscopeError(f"layer {bad[0]} is out of range: allowed are 0..{n_layers - 1}")
    folder = RunFolder(Path(out) if out else None, "laser")
    from ..data.multiple_choice import mc_sequences

    config = {"analysis": "laser", "model": model, "task": task, "samples": samples, "n_items": len(items),
              "layers": layers, "lnames": list(lnames), "rates": [float(r) for r in rates], "compose": compose,
              "intervention": intervention,
              **({"bandwidth": bandwidth, "use_quality": use_quality, "minimize": minimize} if intervention == "vendi" else {}),
              "dtype": str(net.dtype), "device": str(net.device)}
    run_parts = {"model": model_fingerprint(net), "task": task, "data": sequences_fingerprint(mc_sequences(tok, items)),
                 "version": __version__}
    folder.write_run_json(config, seed=seed, fingerprint=run_parts)
    with ResultsStore(folder.store_path) as store:
        result = run_laser(net, tok, items, layers=layers, lnames=lnames, rates=rates, store=store, run_parts=run_parts,
                           pad_id=pad_id_of(tok), compose=compose, intervention=intervention,
                           vendi_options={"bandwidth": bandwidth, "use_quality": use_quality, "minimize": minimize},
                           selection_cache=SelectionCache(folder.path("vendi-selections")), progress=progress)
    result.config.update(config)
    paths = result.save(folder)
    best, base = result.best, result.baseline
    summary = {**config, "validation items": result.rows[0]["n"], "test items": result.rows[1]["n"],
               "chosen on validation": f"layer {best['layer']}, {best['lname']}, rate {best['rate']:g}"}
    from collections import Counter

    from ..analyses.laser import split_index

    val_idx, test_idx = split_index(len(items))
    for split, index in (("validation", val_idx), ("test", test_idx)):
        counts = Counter(items[i].label for i in index)
        summary[f"{split}: always the most common answer"] = f"{max(counts.values()) / len(index):.4f}"
    for metric in METRICS:
        summary[f"test {metric}: unmodified -> chosen"] = f"{base['test'][metric]:.4f} -> {best['test'][metric]:.4f}"
    if result.composed:
        last = result.composed[-1]
        summary["greedy composition"] = (f"{last['interventions']}: test accuracy {last['test_accuracy']:.4f} "
                                         f"(validation {last['validation_accuracy']:.4f})")
    what = "LASER rank reduction" if intervention == "lowrank" else "Vendi row selection (LASER fork)"
    write_report(folder.path("report.html"), title=f"{what} of {model} on {task}", summary=summary,
                 table=result.to_frame(), figures=[p for p in paths if p.suffix == ".png"],
                 notes=["rate r keeps int(min(m, n) * (10 - r) / 10) singular values of each matrix (LASER's do_low_rank).",
                        "Validation: the first 20% of the items; test: the remaining 80%. The point with the best "
                        "validation accuracy (ties: lower validation log-loss) is reported on test.",
                        "Single-token answers: correct = gold token more likely than the other choices; top-k = gold "
                        "token among the k most likely tokens of the vocabulary; log-loss = -log p(gold)."])
    return result, folder.out
