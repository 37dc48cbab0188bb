"""The sensitivity job: ablate every block and weight role, with the Block Influence and
angular-distance proxies and their rank correlation to the measured loss change."""

from __future__ import annotations

from pathlib import Path

from .. import __version__
from ..data.sequences import sequences_fingerprint
from ..models import load_model, model_fingerprint
from ..runner import ResultsStore, RunFolder
from .common import build_sequences, check_positive, pad_id_of


def sensitivity(
    model: str = "smollm2-135m",
    *,
    units: tuple[str, ...] | None = None,
    modes: tuple[str, ...] = ("skip", "zero", "mean"),
    spans: tuple[int, ...] | None = None,
    data: str = "wikitext-2",
    instructions: str | None = None,
    template: str = "dolly",
    samples: int = 8,
    seq_len: int = 256,
    out: str | Path | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    reuse_prefix: bool = True,
    progress: bool = True,
):
    """Loss change per layer and unit (block skip / mean, role zero / mean), the proxies and their
    rank correlations; writes the run folder and returns ``(result, folder)``."""
    from ..analyses.sensitivity import check_modes, run_sensitivity
    from ..report.html import write_report

    check_positive("samples", samples)
    check_positive("seq-len", seq_len, 2)
    check_modes(modes)  # before the model is loaded
    net, tok = load_model(model, dtype=dtype, device=device, seed=seed)
    sequences = build_sequences(tok, data=data, instructions=instructions, template=template, samples=samples,
                                seq_len=seq_len, seed=seed)
    folder = RunFolder(Path(out) if out else None, "sensitivity")
    source = instructions or data
    config = {"analysis": "sensitivity", "model": model, "data": source, "template": template if instructions else None,
              "samples": samples, "seq_len": seq_len, "units": list(units) if units else None, "modes": list(modes),
              "spans": list(spans) if spans else None, "dtype": str(net.dtype), "device": str(net.device), "reuse_prefix": reuse_prefix,
              "n_sequences": len(sequences)}
    fp = model_fingerprint(net)
    run_parts = {"model": fp, "data": source, "data_fingerprint": sequences_fingerprint(sequences),
                 "dtype": str(net.dtype), "version": __version__}
    folder.write_run_json(config, seed=seed, fingerprint=run_parts)
    with ResultsStore(folder.store_path) as store:
        result = run_sensitivity(net, sequences, units=units, modes=modes, spans=spans, store=store, run_parts=run_parts,
                                 pad_id=pad_id_of(tok), reuse_prefix=reuse_prefix, progress=progress, seed=seed)
    result.config.update(config)
    paths = result.save(folder)
    table = result.table()
    summary = {**config, "baseline loss": result.rows[0]["baseline_loss"],
               "block forwards": result.config["block_forwards"]}
    if "block_skip" in table:
        top = table.sort_values("block_skip", ascending=False)["layer"].head(5).tolist()
        summary["blocks whose skip costs most"] = top
    for c in result.correlations:
        summary[f"Spearman({c['proxy']}, {c['ablation']} x{c['span']})"] = (
            f"{c['spearman']:.3f} (p {c['spearman_p']:.2g}; Kendall {c['kendall']:.3f}, n {c['n']})")
    for c in result.choices:
        summary[f"{c['proxy']} picks, span {c['span']}"] = (
            f"layers {c['proxy_start']}..{c['proxy_start'] + c['span'] - 1}: loss +{c['proxy_delta']:.4f}, rank "
            f"{c['proxy_rank']} of {c['windows']} (best: from {c['best_start']}, +{c['best_delta']:.4f})")
    write_report(folder.path("report.html"), title=f"Sensitivity of {model}", summary=summary, table=table,
                 figures=[p for p in paths if p.suffix == ".png"],
                 notes=["Loss change = loss with the ablation minus the unmodified model's loss, nats per scored token.",
                        "block skip: the block is the identity; block mean: its update to the residual stream is its "
                        "mean update; role zero: the projection outputs zeros (o = the attention output, down = the MLP "
                        "output); role mean: it outputs its mean vector. Means are over the real tokens of the same data.",
                        "Block Influence (ShortGPT) = 1 - mean cosine between a block's input and output over all real "
                        "tokens; angular distance (Gromov et al.) = arccos(cos(x_l, x_{l+n}))/pi at the last token, mean "
                        "over sequences. A larger proxy should mean a larger loss change: the Spearman correlations above "
                        "say how far that holds.",
                        "The full tidy table (one row per point and metric) is results.csv."])
    return result, folder.out
